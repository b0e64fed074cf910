"""The target distribution shared by every decoding mode: temperature, then top-p (nucleus).

Plain sampling (`ar` at T > 0), lossless speculative sampling (`sample`) and the root/bonus token of `typical`
all draw from `target_probs`, so speculative sampling reproduces exactly the distribution plain sampling uses.

Temperature 0 is never divided by: callers decide greedy statically (`greedy=True` takes the argmax) and only
call these helpers for T > 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def tempered_log_probs(logits: Array, temperature: Array) -> Array:
    """log softmax(logits / T) over the last axis. logits [..., V] float32; T > 0 scalar."""
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def top_p_keep(probs: Array, top_p: Array) -> Array:
    """The nucleus: bool [..., V], True on the smallest set of most likely tokens whose mass reaches `top_p`.

    Tokens tied with the least likely kept token are kept too (the set is defined by a probability cutoff, so
    it does not depend on sort stability). The most likely token is always kept.
    """
    desc = -jnp.sort(-probs, axis=-1)  # [..., V], descending
    mass_before = jnp.cumsum(desc, axis=-1) - desc  # mass of strictly more likely tokens (in sorted order)
    kept_sorted = mass_before < top_p
    cutoff = jnp.min(jnp.where(kept_sorted, desc, jnp.inf), axis=-1, keepdims=True)  # [..., 1]
    return probs >= cutoff


def target_probs(logits: Array, temperature: Array, top_p: Array, use_top_p: bool) -> Array:
    """The sampling distribution [..., V] float32: softmax(logits / T), restricted to the top-p nucleus and
    renormalised. `use_top_p` is static: False skips the sort (top_p == 1 keeps every token anyway)."""
    probs = jnp.exp(tempered_log_probs(logits, temperature))
    if not use_top_p:
        return probs
    probs = jnp.where(top_p_keep(probs, top_p), probs, 0.0)
    return probs / jnp.sum(probs, axis=-1, keepdims=True)


def sample_from(key: Array, probs: Array) -> Array:
    """One token per row from probabilities [..., V] (need not be normalised; zeros are never drawn) -> int32 [...]."""
    logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


def greedy_token(logits: Array) -> Array:
    """argmax over the last axis -> int32 [...] (first index on ties, as `jnp.argmax`)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

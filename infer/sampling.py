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

    The cutoff is the smallest probability v whose strictly-more-likely mass H(v) = sum(p > v) is below
    `top_p` (a token is kept exactly when the tokens before it in descending order hold less than `top_p`).
    H falls as v grows, so the cutoff is found by bisection over the bit patterns of v (non-negative float32s
    order as their int32 bits): 32 masked sums over the vocabulary instead of a sort of it, which took 15-16 ms
    of a 47-51 ms one-row SmolLM2 step on a 2-core CPU and 468 ms of a 638 ms step of 32 rows (BENCHMARKS.md,
    "Sort-free top-p").
    """
    probs = probs.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # [..., V]
    top_p = jnp.asarray(top_p, jnp.float32)

    def halve(_, bounds):
        lo, hi = bounds  # invariant: H(hi) < top_p, and the cutoff lies in [lo, hi]
        mid = lo + (hi - lo) // 2
        below = jnp.sum(jnp.where(bits > mid, probs, 0.0), axis=-1, keepdims=True) < top_p
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    lo = jnp.zeros(bits.shape[:-1] + (1,), jnp.int32)
    hi = jnp.max(bits, axis=-1, keepdims=True)  # H(max) = 0 < top_p
    _, cutoff = jax.lax.fori_loop(0, 32, halve, (lo, hi))  # 32 halvings close any range of int32s
    return bits >= cutoff


def target_probs(logits: Array, temperature: Array, top_p: Array, use_top_p: bool) -> Array:
    """The sampling distribution [..., V] float32: softmax(logits / T), restricted to the top-p nucleus and
    renormalised. `use_top_p` is static: False skips the nucleus search (top_p == 1 keeps every token anyway)."""
    probs = jnp.exp(tempered_log_probs(logits, temperature))
    if not use_top_p:
        return probs
    probs = jnp.where(top_p_keep(probs, top_p), probs, 0.0)
    return probs / jnp.sum(probs, axis=-1, keepdims=True)


# Tokens per block of the two-stage draw: about sqrt(V) for LLaMA vocabularies (32k-128k), so both stages are short.
SAMPLE_BLOCK = 256


def _pick(key: Array, weights: Array) -> Array:
    """Index along the last axis drawn with probability proportional to `weights` >= 0 (Gumbel-max on the log)."""
    logw = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-38)), -jnp.inf)
    return jax.random.categorical(key, logw, axis=-1)


def sample_from(key: Array, probs: Array) -> Array:
    """One token per row from probabilities [..., V] (need not be normalised; zeros are never drawn) -> int32 [...].

    Two exact stages: a block of `SAMPLE_BLOCK` consecutive tokens with probability proportional to its mass S_b,
    then a token of that block proportional to its own probability, so P(i) = (S_b / S) (p_i / S_b) = p_i / S.
    A one-stage Gumbel-max draw needs V random numbers per row; this needs V / 256 + 256. Random bits are what cost
    on a CPU: about 32 ms of a 32-row SmolLM2 step before, under 1 ms now (BENCHMARKS.md, "Two-stage sampling").
    """
    *rows, v = probs.shape
    blocks = -(-v // SAMPLE_BLOCK)
    padded = jnp.pad(probs.astype(jnp.float32), [(0, 0)] * len(rows) + [(0, blocks * SAMPLE_BLOCK - v)])
    padded = padded.reshape(*rows, blocks, SAMPLE_BLOCK)  # [..., blocks, SAMPLE_BLOCK]; padding has mass 0
    key_block, key_token = jax.random.split(key)
    block = _pick(key_block, jnp.sum(padded, axis=-1))  # [...]
    inside = jnp.take_along_axis(padded, block[..., None, None], axis=-2)[..., 0, :]  # [..., SAMPLE_BLOCK]
    return (block * SAMPLE_BLOCK + _pick(key_token, inside)).astype(jnp.int32)


def greedy_token(logits: Array) -> Array:
    """argmax over the last axis -> int32 [...] (first index on ties, as `jnp.argmax`)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

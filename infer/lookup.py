"""Lookup drafts: draft tokens copied from the context, for the tree's lookup branch (`build_tree(lookup=L)`).

A chat answer repeats itself and its prompt: names, code identifiers, list markers, whole phrases of the
question, and a small model's loops. So the tokens that followed the latest earlier occurrence of the context's
last few tokens are a cheap guess at what comes next ("prompt lookup decoding"). They need no weights and no
training; the decoder verifies them in the same forward as the heads' guesses, as one more branch under the root,
so the output is unchanged (greedy: plain greedy decoding; sampling: the same distribution, since the guesses
are a function of the context alone, like the heads' top-k).

The match: at each step, the latest position e < r (r = the root's position) where the context's last n tokens
(ending at the root) occur, preferring the longest n up to `MAX_NGRAM`, then the latest e; the drafts are the
tokens at e + 1, e + 2, ... When e + i would pass the root (the context ends in a repeating pattern of period
r - e), the pattern continues periodically. Without any match the drafts repeat the root; the decoder then runs
the step without the chain (`infer.decode.step`): on MT-Bench such drafts were almost never right, and each
node of a CPU step costs about 9% of a one-token step (BENCHMARKS.md, "Lookup drafts").

Everything is [B, W] vector work over the history buffer (W = cache slots + slack, a few thousand at most):
negligible next to the forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Longest n-gram matched: a longer match is rarer but more often continued the same way. 3 came from replaying
# the shipped model's greedy MT-Bench answers offline (a scratch check, not a repo command, so no figure is
# quoted); `python -m infer.bench --methods ar,lookup4` measures the chain as shipped.
MAX_NGRAM = 3


def slack(max_depth: int) -> int:
    """History slots beyond the cache's S: a step writes D + 1 tokens after the root, which sits at most at S - 1."""
    return max_depth + 2


def init_history(prompt: Array, prompt_len: Array, root: Array, width: int) -> Array:
    """int32 [B, width]: the right-padded prompt [B, Tb] with the root written at position prompt_len [B]."""
    b, tb = prompt.shape
    history = jnp.zeros((b, width), jnp.int32).at[:, :tb].set(prompt)
    return history.at[jnp.arange(b), prompt_len].set(root)


def record(history: Array, chunk: Array, root_pos: Array) -> Array:
    """Writes each row's emitted chunk [B, D+1] (accepted drafts, then the bonus token: the next root) at
    positions root_pos + 1 ... (entries past a row's count are stale and overwritten by later steps; `drafts`
    reads nothing past the root)."""
    return jax.vmap(lambda h, c, i: jax.lax.dynamic_update_slice(h, c, (i,)))(history, chunk, root_pos + 1)


def match(history: Array, root_pos: Array, max_ngram: int = MAX_NGRAM) -> tuple[Array, Array]:
    """The match the drafts continue (module docstring): (end e, int32 [B]; its length n, int32 [B], 0 = none).

    Args:
      history: int32 [B, W]; tokens by position (the prompt, then every emitted token); read only up to root_pos.
      root_pos: int32 [B]; the position of the root (the last emitted token), < W.
    """
    b, w = history.shape
    e = jnp.arange(w)[None, :]  # [1, W]: candidate match ends
    rows = jnp.arange(b)
    run = jnp.zeros((b, w), jnp.int32)  # length of the match ending at e, up to max_ngram
    matching = jnp.ones((b, w), bool)
    for i in range(max_ngram):
        here = jnp.roll(history, i, axis=1)  # here[:, e] = history[:, e - i]
        want = history[rows, jnp.maximum(root_pos - i, 0)]  # [B]
        matching = matching & (here == want[:, None]) & (e >= i) & (root_pos[:, None] >= i)
        run = run + matching.astype(jnp.int32)
    score = jnp.where((e < root_pos[:, None]) & (run > 0), run * w + e, -1)  # longest first, then latest
    best = jnp.argmax(score, axis=1)  # [B]
    return best.astype(jnp.int32), jnp.where(jnp.max(score, axis=1) >= 0, run[rows, best], 0)


def drafts(history: Array, root_pos: Array, length: int, max_ngram: int = MAX_NGRAM,
           found: tuple[Array, Array] | None = None) -> Array:
    """The lookup branch's `length` tokens for each row: int32 [B, length] (module docstring; arguments as
    `match`, whose result `found` may pass in)."""
    best, n = match(history, root_pos, max_ngram) if found is None else found
    rows = jnp.arange(history.shape[0])
    found = n > 0
    period = jnp.maximum(root_pos - best, 1)
    at = best[:, None] + 1 + jnp.arange(length)[None, :] % period[:, None]  # [B, length]; <= root_pos
    out = jnp.take_along_axis(history, at, axis=1)
    return jnp.where(found[:, None], out, history[rows, root_pos][:, None])

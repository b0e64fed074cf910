"""How often each Medusa head's top-k holds the token that greedy decoding will actually produce.

This is the statistic that decides what a draft tree gains: at temperature 0 a draft node is accepted exactly when
its token equals the base model's greedy continuation. So we decode each prompt greedily (plain decoding), run one
cache-free forward over prompt + answer, and compare head k's ranked predictions at position t with the answer's
token at t + 2 + k.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infer.api import generate_ids
from medusa_jax import model
from medusa_jax.bundle import Bundle
from medusa_jax.config import HeadsConfig, LlamaConfig
from medusa_jax.errors import MedusaError


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _head_ranks(config: LlamaConfig, heads_config: HeadsConfig, ranks: int, base, heads, tokens):
    """tokens [1, T] -> top-`ranks` ids of every head at every position: [T, K, ranks]."""
    t = tokens.shape[1]
    hidden, _ = model.forward(config, base, tokens, jnp.arange(t, dtype=jnp.int32)[None], model.causal_mask(1, t))
    logits = model.head_logits(heads_config, config, base, heads, hidden[0])  # [T, K, V]
    return jax.lax.top_k(logits, ranks)[1]


def head_accuracy(params: Bundle, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                  ranks: int = 10) -> tuple[np.ndarray, int]:
    """Per-head, per-rank hit rates on the greedy continuations of `prompts`.

    Returns:
      accuracy: float [K, ranks]; accuracy[k, r] = P(rank r of head k equals the greedy token 2 + k ahead).
        Cumulative sums over r give top-r accuracy.
      count: number of (position, head 0) comparisons made.
    """
    if params.heads is None:
        raise MedusaError("head accuracy needs Medusa heads; load them with medusa_jax.load(..., heads=PATH)")
    k = params.heads_config.num_heads
    hits = np.zeros((k, ranks))
    counts = np.zeros(k)
    for ids in prompts:
        gen = generate_ids(params, [list(ids)], max_new_tokens=max_new_tokens, mode="ar")
        answer = gen.tokens[0]
        full = list(ids) + answer
        # Pad to a multiple of 64 so prompts of similar length share one compiled forward.
        length = -(-len(full) // 64) * 64
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :len(full)] = full
        top = np.asarray(_head_ranks(params.config, params.heads_config, ranks, params.base, params.heads,
                                     jnp.asarray(tokens)))  # [T, K, ranks]
        start = len(ids) - 1  # the last prompt position predicts the first answer token
        for head in range(k):
            positions = np.arange(start, len(full) - 2 - head)
            if positions.size == 0:
                continue
            truth = np.asarray(full)[positions + 2 + head]
            hits[head] += (top[positions, head, :] == truth[:, None]).sum(0)
            counts[head] += positions.size
    return hits / np.maximum(counts, 1)[:, None], int(counts[0])


def topk_table(accuracy: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, list[float]]:
    """{"top1": [per head], "top5": [...]} from a per-rank accuracy matrix."""
    cum = np.cumsum(accuracy, axis=1)
    return {f"top{k}": [round(float(x), 4) for x in cum[:, min(k, cum.shape[1]) - 1]] for k in ks}

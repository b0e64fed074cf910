"""Stage 2's base-quality guard: does the fine-tuned base still answer as the original did?

Two figures, measured before and after training on held-out data:
  - KL(original || current) per token of the base's next-token distribution over the held-out rows (with the
    argmax agreement), from the stage-2 eval step (`train.losses.BaseStats`);
  - the perplexity, under the current base, of the original model's own greedy answers to held-out prompts.
    Before training it is the original's (low) perplexity on what it would say itself; a rise means the
    fine-tuned base has moved away from those answers.
The run warns when the final KL exceeds `--max-kl`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import model
from medusa_jax.config import LlamaConfig
from train import losses


def greedy_answers(bundle, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """The original base's greedy continuation of each prompt (plain decoding, no heads)."""
    from infer import api

    if not prompts:
        return []
    gen = api.generate_ids(bundle.with_heads(None, None), prompts, max_new_tokens=max_new, temperature=0.0,
                           mode="ar")
    return [list(t) for t in gen.tokens]


@functools.partial(jax.jit, static_argnums=0)
def _answer_nll(config: LlamaConfig, base: Any, tokens: jax.Array, segments: jax.Array, target: jax.Array):
    """Summed NLL and count of the tokens marked in `target` [N, L] (each predicted from the position before)."""
    n, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    hidden, _ = model.forward(config, base, tokens, positions, losses.attention_mask(segments))
    logp = jax.nn.log_softmax(model.logits(config, base, hidden[:, :-1]))  # [N, L-1, V]
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = target[:, 1:].astype(jnp.float32)
    return -jnp.sum(picked * w), jnp.sum(w)


def answer_perplexity(config: LlamaConfig, base: Any, prompts: list[list[int]],
                      answers: list[list[int]]) -> float | None:
    """exp(mean NLL) of `answers` following `prompts` under `base` (None without any answer token)."""
    rows = [(p, a) for p, a in zip(prompts, answers) if a]
    if not rows:
        return None
    length = max(len(p) + len(a) for p, a in rows)
    tokens = np.zeros((len(rows), length), np.int32)
    segments, target = np.zeros_like(tokens), np.zeros((len(rows), length), bool)
    for i, (p, a) in enumerate(rows):
        tokens[i, : len(p) + len(a)] = p + a
        segments[i, : len(p) + len(a)] = 1
        target[i, len(p): len(p) + len(a)] = True
    nll, count = _answer_nll(config, base, tokens, segments, target)
    return math.exp(float(nll) / max(float(count), 1.0))


def guard_figures(base_means: dict | None, ppl: float | None) -> dict:
    """One side (before or after) of the guard: per-token KL and argmax agreement, answer perplexity."""
    out = {"answer_ppl": ppl}
    if base_means:
        out.update(kl=base_means["kl"], agree=base_means["agree"], base_ce=base_means["ce"])
    return out


def guard_lines(guard: dict) -> list[str]:
    """Readable lines of the before/after guard figures and the warning."""
    b, a = guard["before"], guard["after"]
    lines = ["base quality guard (held-out):  before -> after"]
    if "kl" in a:
        lines.append(f"  KL(original || current) per token   {b['kl']:.4f} -> {a['kl']:.4f}   "
                     f"(bound {guard['max_kl']:g})")
        lines.append(f"  argmax agreement with the original  {b['agree']:.3f} -> {a['agree']:.3f}")
    if a.get("answer_ppl") is not None:
        lines.append(f"  perplexity of the original's greedy answers  {b['answer_ppl']:.3f} -> {a['answer_ppl']:.3f}")
    return lines

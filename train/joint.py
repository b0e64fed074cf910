"""The stage-2 (Medusa-2) objective and optimizer: base and heads trained together.

Loss = base term + lambda0(step) * sum_k lambda_k * CE_k (reference §2.3):
  - base term: KL(original || current) of the base's next-token distribution (`--base-loss kl`, the default for
    self-distilled data: the base keeps answering as it did), or the next-token cross-entropy on the labels
    (`ce`). The original is the frozen starting base; it is a second set of weights in the step's inputs (no
    gradient, no optimizer state), and its hidden states can come from the host cache like stage 1's.
  - CE_k: head k's masked-mean cross-entropy on token t + 2 + k (`train.losses.medusa_loss`, now with gradients
    into the base); lambda_k = decay**(k + 1) for 0-based k, i.e. 0.8, 0.64, ... (axolotl's
    medusa_decay_coefficient**i with the base head at i = 0).
  - lambda0 (default 0.2, axolotl's medusa_heads_coefficient) may ramp up: `constant` 1, `linear` step / ramp,
    `sine` sin(pi/2 * step / ramp), then 1.
Optimizer: AdamW with separate learning rates for the base (`--lr`, default 1e-5) and the heads (`--lr` x
`--head-lr-mult`, default 4: axolotl's medusa_lr_multiplier), both linear warmup then cosine; weight decay (if any)
never applies to norm scales and biases.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from medusa_jax import model
from medusa_jax.config import HeadsConfig, LlamaConfig
from medusa_jax.errors import MedusaError
from train import layerwise, losses
from train.loop import OptimConfig, lr_schedule

LAMBDA0_WARMUPS = ("constant", "linear", "sine")
BASE_LOSSES = ("kl", "ce")


@dataclasses.dataclass(frozen=True)
class JointLossConfig:
    """Stage-2 loss settings (see the module docstring). ramp_steps: steps of the lambda0 warm-up."""

    lambda0: float = 0.2
    decay: float = 0.8
    warmup: str = "constant"
    ramp_steps: int = 1
    base_loss: str = "kl"
    chunk: int | None = 256
    remat: bool = False  # recompute each decoder layer in the backward pass
    head_targets: str = "data"  # "teacher": the heads learn the original model's distributions (train.losses)
    teacher_temperature: float = 1.0

    def __post_init__(self):
        if self.warmup not in LAMBDA0_WARMUPS:
            raise MedusaError(f"--lambda0-warmup {self.warmup!r} is unknown; use one of {', '.join(LAMBDA0_WARMUPS)}")
        if self.base_loss not in BASE_LOSSES:
            raise MedusaError(f"--base-loss {self.base_loss!r} is unknown; use one of {', '.join(BASE_LOSSES)}")
        if self.lambda0 < 0:
            raise MedusaError(f"--lambda0 {self.lambda0} must be >= 0")


@struct.dataclass
class JointStats:
    """Sums of one batch: the base output's (BaseStats) and the heads' (HeadStats)."""

    base: losses.BaseStats
    heads: losses.HeadStats


def head_loss_weights(num_heads: int, decay: float) -> tuple[float, ...]:
    """lambda_k = decay**(k + 1) for 0-based heads k (the base output is term 0)."""
    return tuple(float(decay) ** (k + 1) for k in range(num_heads))


def lambda0_at(cfg: JointLossConfig, step: jax.Array) -> jax.Array:
    """lambda0 times the warm-up factor at `step` (steps already taken), float32 []."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(cfg.ramp_steps, 1), 0.0, 1.0)
    factor = {"constant": jnp.float32(1.0), "linear": frac, "sine": jnp.sin(0.5 * math.pi * frac)}[cfg.warmup]
    return cfg.lambda0 * factor


def frozen_hidden(config: LlamaConfig, base: Any, batch: dict, remat: bool = False, sharded: Any = None
                  ) -> jax.Array:
    """Post-final-norm hidden states [B, S, H] of packed rows (causal within each conversation); with `sharded`
    (a `train.parallel.Sharded`), as a scan over the layers, each layer's weights gathered at its use
    (`train.layerwise`)."""
    mask = losses.attention_mask(batch["segment_ids"])  # [B, S, S]
    if sharded is not None:
        return layerwise.forward(config, base, batch["tokens"], batch["positions"], mask, gather=sharded.gather,
                                 stacked=sharded.constrain_stacked, remat=remat)
    hidden, _ = model.forward(config, base, batch["tokens"], batch["positions"], mask, remat=remat)
    return hidden


def joint_loss(cfg: JointLossConfig, config: LlamaConfig, hc: HeadsConfig, params: dict, teacher: Any,
               batch: dict, step: jax.Array, compute_dtype: Any, sharded: Any = None, layerwise_fsdp: bool = False
               ) -> tuple[jax.Array, JointStats]:
    """The stage-2 loss of one batch.

    Args:
      params: {"base": current base params, "heads": head params} (float32 masters; cast to compute_dtype).
      teacher: the original base params (frozen).
      batch: tokens, loss_mask, segment_ids, positions [B, S]; optionally "teacher_hidden" [B, S, H] (cached
        states of the original base; computed here otherwise).
      step: steps already taken (for the lambda0 warm-up).
      sharded: the `train.parallel.Sharded` runner, or None. Its layout is pinned on the compute-dtype copy of
        the base, so that a sharded master is cast where it lies and gathered in the (smaller) compute dtype.
      layerwise_fsdp: with `sharded`, run both forwards as a scan over the layers that gathers one layer's
        weights at a time (`train.layerwise`; what makes a 7B step fit, see `train.memory`).
    Returns:
      (loss, JointStats sums over the batch).
    """
    base = jax.tree.map(lambda p: p.astype(compute_dtype), params["base"])
    if sharded is not None:
        base = sharded.constrain(base)
    per_layer = sharded if layerwise_fsdp else None
    hidden = frozen_hidden(config, base, batch, cfg.remat, per_layer)  # [B, S, H], differentiable here
    if "teacher_hidden" in batch:
        t_hidden = batch["teacher_hidden"].astype(compute_dtype)
    else:
        t_hidden = jax.lax.stop_gradient(frozen_hidden(config, teacher, batch, sharded=per_layer))
    labels, label_valid = losses.next_token_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
    teacher_kernel = model.lm_head_kernel(config, teacher).astype(compute_dtype)
    base_stats = losses.base_terms(hidden, model.lm_head_kernel(config, base), t_hidden, teacher_kernel, labels,
                                   label_valid, batch["segment_ids"] > 0, cfg.chunk)
    head_teacher = None
    if cfg.head_targets == "teacher":  # the original model, not the moving base, supplies the heads' targets
        head_teacher = losses.Teacher(t_hidden, teacher_kernel, cfg.teacher_temperature)
    heads_loss, head_stats = losses.medusa_loss(
        hc, config, base, params["heads"], hidden, batch["tokens"], batch["loss_mask"], batch["segment_ids"],
        weights=head_loss_weights(hc.num_heads, cfg.decay), compute_dtype=compute_dtype, chunk=cfg.chunk,
        train_base=True, teacher=head_teacher)
    if cfg.base_loss == "kl":
        base_term = base_stats.kl / jnp.maximum(base_stats.count, 1.0)
    else:
        base_term = base_stats.ce / jnp.maximum(base_stats.label_count, 1.0)
    loss = base_term + lambda0_at(cfg, step) * heads_loss
    sg = jax.lax.stop_gradient
    return loss, JointStats(base=jax.tree.map(sg, base_stats), heads=jax.tree.map(sg, head_stats))


def _decays(path, _) -> bool:
    """Weight decay applies to weight matrices only, never to norm scales or biases."""
    name = str(path[-1].key) if path and isinstance(path[-1], jax.tree_util.DictKey) else ""
    return not (name == "scale" or name.endswith("bias"))


def make_joint_optimizer(cfg: OptimConfig, head_lr: float) -> tuple[optax.GradientTransformation, dict]:
    """(optimizer over {"base": ..., "heads": ...}, {"base": schedule, "heads": schedule}).

    Global-norm clipping over everything, then one AdamW per group (optax.multi_transform), each with its own
    warmup + cosine schedule.
    """
    if cfg.lr <= 0 or head_lr <= 0 or cfg.total_steps < 1 or not 0 <= cfg.warmup_fraction < 1:
        raise MedusaError(f"bad optimizer settings lr={cfg.lr}, head lr={head_lr}, steps={cfg.total_steps}, "
                          f"warmup={cfg.warmup_fraction}; use learning rates > 0, steps >= 1, 0 <= warmup < 1")
    schedules = {"base": lr_schedule(cfg), "heads": lr_schedule(cfg, head_lr)}
    mask = lambda params: jax.tree_util.tree_map_with_path(_decays, params)

    def adamw(schedule):
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)

    labels = lambda params: {group: jax.tree.map(lambda _: group, tree) for group, tree in params.items()}
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    chain.append(optax.multi_transform({g: adamw(s) for g, s in schedules.items()}, labels))
    return optax.chain(*chain), schedules

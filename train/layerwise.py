"""`model.forward` run one decoder layer at a time, with each layer's weights gathered just before its use.

Why: under FSDP the weights live split over the "fsdp" mesh axis. Left to itself, XLA (the CPU compiler at least)
gathers every layer's weights up front and keeps them - and every layer's unsplit gradient - alive through the
whole step of the unrolled model, which for a 7B model is more than the sharding saves. Here the layers are the
body of a `lax.scan` over their stacked *split* weights; the body gathers one layer's weights (`gather`) and,
with `remat`, is a `jax.checkpoint` region, so the backward pass gathers them again and reduces the layer's
gradient back to the split layout in the same iteration: one layer's full weights and gradient are alive at a
time.

The computation is exactly `model.Llama.__call__` without a cache (embedding lookup, `model.DecoderLayer` per
layer, `model.RMSNorm`); it runs the model's own modules on the params sub-trees, so there is still one model
definition (tests/test_stage2.py checks equality with `model.forward`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from medusa_jax import model
from medusa_jax.config import LlamaConfig


def forward(config: LlamaConfig, base: dict, tokens: jax.Array, positions: jax.Array, mask: jax.Array, *,
            gather: Callable[[Any], Any] | None = None, stacked: Callable[[Any], Any] | None = None,
            remat: bool = False) -> jax.Array:
    """Post-final-norm hidden states [B, T, H] of a cache-free forward (see `model.forward`).

    The layers run as a `lax.scan` over their weights stacked on a new leading axis (a copy in the compute dtype;
    its gradient is unstacked back): a loop body is what makes XLA gather one layer at a time.

    Args:
      gather: maps one layer's params sub-tree to the layout it is computed in (e.g. `Sharded.gather`).
      stacked: pins the layout of the stacked layer weights (e.g. `Sharded.constrain_stacked`).
      remat: recompute each layer (gather included) in the backward pass.
    """
    gather = gather or (lambda p: p)
    layers = [base[f"layers_{i}"] for i in range(config.num_layers)]
    weights = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)  # each leaf [L, ...]
    if stacked is not None:
        weights = stacked(weights)

    def layer(x, params):
        out, _ = model.DecoderLayer(config).apply({"params": gather(params)}, x, positions, mask, None, None)
        return out, None

    if remat:
        layer = jax.checkpoint(layer)
    x = jnp.take(gather(base["embed"])["embedding"], tokens, axis=0)  # [B, T, H]
    x, _ = jax.lax.scan(layer, x, weights)
    return model.RMSNorm(config.rms_norm_eps).apply({"params": base["final_norm"]}, x)

"""The params bundle users pass around: arrays as a pytree, config and tokenizer as static fields."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from medusa_jax import model
from medusa_jax.config import HeadsConfig, LlamaConfig


@struct.dataclass
class Bundle:
    """A loaded model: base weights, optional Medusa heads, and what is needed to use them.

    Attributes:
      base: Flax params of `model.Llama` (layers `layers_{i}`, `embed`, `final_norm`, `lm_head` unless tied).
      heads: Flax params of `model.MedusaHeads` (+ `proj` [K, H, V] for the `own` projection), or None.
      config: the base model's `LlamaConfig`.
      heads_config: the heads' `HeadsConfig`, or None without heads.
      tokenizer: a transformers tokenizer, or None (the `tiny` test model).
      tree: the default draft tree shipped beside the heads (tuple of paths), or None.
      lookup: the default lookup chain shipped with that tree (draft tokens copied from the context per step:
        `infer.lookup`), 0 for none.
      source: where the weights came from, for messages.
    """

    base: Any
    heads: Any = None
    config: LlamaConfig = struct.field(pytree_node=False, default=None)
    heads_config: HeadsConfig | None = struct.field(pytree_node=False, default=None)
    tokenizer: Any = struct.field(pytree_node=False, default=None)
    tree: tuple | None = struct.field(pytree_node=False, default=None)
    lookup: int = struct.field(pytree_node=False, default=0)
    source: str = struct.field(pytree_node=False, default="")

    @property
    def dtype(self):
        return jax.tree.leaves(self.base)[0].dtype

    def with_heads(self, heads: Any, heads_config: HeadsConfig | None, tree: tuple | None = None,
                   lookup: int = 0) -> "Bundle":
        """The same base with other heads (None removes them) and their default tree and lookup chain."""
        return self.replace(heads=heads, heads_config=heads_config, tree=tree, lookup=lookup)


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(config: LlamaConfig, base: Any, tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _ = model.forward(config, base, tokens, positions, model.causal_mask(b, t))
    return model.logits(config, base, hidden)


def forward_logits(params: Bundle, token_ids) -> jax.Array:
    """Full causal forward without a cache: token ids [B, T] (or [T]) -> float32 logits [B, T, V]."""
    tokens = jnp.asarray(token_ids, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    return _forward_logits(params.config, params.base, tokens)

"""Resuming stage-2 checkpoints written before the fused projections (commit 7b8ebde, 2026-11-28).

Until then every decoder layer had separate `attn/{q,k,v}/kernel` ([H, N*D], [H, Kv*D], [H, Kv*D]) and
`mlp/{gate,up}/kernel` ([H, I] each); now Q/K/V share `attn/qkv/kernel` [H, Kv, G + 2, D] and gate/up share
`mlp/gate_up/kernel` [H, 2, I] (`medusa_jax.model`). A stage-2 checkpoint holds the trained base and the Adam
moments shaped like it, so one written by the old layout no longer matches the run's state. `Checkpoints.restore`
then reads it through `unfuse` of the run's own target and converts what it read with `fuse`: the run resumes
exactly where it stopped. Stage-1 checkpoints (heads only) are unaffected.

Both functions act on every dict in a pytree that holds such kernels (params, Adam moments, masked optimizer
states alike) and leave everything else as it is. Kernels are arrays, `jax.ShapeDtypeStruct`s (restore targets) or
empty optax masks.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

from medusa_jax.config import LlamaConfig
from medusa_jax.loading import names


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _split(kernel: Any, parts: list[tuple[Any, tuple[int, ...]]]) -> list[Any]:
    """[in, ...] kernel -> one [in, out] kernel per (index, part shape); masks and shapes pass through."""
    if not _is_array(kernel):
        return [kernel] * len(parts)  # an optax MaskedNode: this optimizer branch does not hold the kernel
    h = kernel.shape[0]
    if isinstance(kernel, jax.ShapeDtypeStruct):  # a restore target (read to host: its sharding is not needed)
        return [jax.ShapeDtypeStruct((h, int(np.prod(shape[1:]))), kernel.dtype) for _, shape in parts]
    return [np.asarray(kernel)[index].reshape(h, -1) for index, _ in parts]


def _join(kernels: list[Any], parts: list[tuple[Any, tuple[int, ...]]], shape: tuple[int, ...]) -> Any:
    """The inverse of `_split`: one kernel of `shape` from its [in, out] parts."""
    if not _is_array(kernels[0]):
        return kernels[0]
    out = np.empty(shape, np.asarray(kernels[0]).dtype)
    for kernel, (index, part_shape) in zip(kernels, parts):
        out[index] = np.asarray(kernel).reshape(part_shape)
    return out


# The on-disk names of the old layout, pinned here: they must not follow a future renaming in `names`.
OLD_NAMES = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def _layout(config: LlamaConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], list]]:
    """Fused name -> (old names, fused kernel shape, (index, part shape) per old name), from the loaders' map."""
    if names.FUSED_PARTS != OLD_NAMES:
        raise AssertionError(f"the loaders' fused parts {names.FUSED_PARTS} no longer match the old layout "
                             f"{OLD_NAMES}: map them onto each other here")
    return {name: (parts, names.fused_shape(config, name), [names.fused_part(config, p) for p in parts])
            for name, parts in OLD_NAMES.items()}


def _map_dicts(fn: Any, tree: Any) -> Any:
    """Applies `fn` to every dict in `tree`, outermost first (then to the dicts inside what `fn` returned)."""

    def visit(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: _map_dicts(fn, v) for k, v in fn(node).items()}
        return node

    return jax.tree.map(visit, tree, is_leaf=lambda x: isinstance(x, dict))


def unfuse(config: LlamaConfig, tree: Any) -> Any:
    """A pytree in the current layout -> the same in the pre-7b8ebde layout (separate q/k/v and gate/up)."""
    layout = _layout(config)

    def one(node: Any) -> Any:
        if not any(name in node for name in layout):
            return node
        node = dict(node)
        for name, (old, _, parts) in layout.items():
            if name in node:
                kernels = _split(node.pop(name)["kernel"], parts)
                node.update({o: {"kernel": k} for o, k in zip(old, kernels)})
        return node

    return _map_dicts(one, tree)


def fuse(config: LlamaConfig, tree: Any) -> Any:
    """The inverse of `unfuse`: a pytree in the pre-7b8ebde layout -> the current layout."""
    layout = _layout(config)

    def one(node: Any) -> Any:
        if not any(old[0] in node for old, _, _ in layout.values()):
            return node
        node = dict(node)
        for name, (old, shape, parts) in layout.items():
            if old[0] in node:
                node[name] = {"kernel": _join([node.pop(o)["kernel"] for o in old], parts, shape)}
        return node

    return _map_dicts(one, tree)


def converters(config: LlamaConfig) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(to the old layout, from the old layout) for `Checkpoints.restore(..., convert=...)`."""
    return functools.partial(unfuse, config), functools.partial(fuse, config)

"""Packed weight panels: float32 decoding products on a CPU that read each weight once, for 1 row or for a tree.

Batch-1 decoding is bound by reading the weights, so a forward of a few tree nodes should cost about what one
token costs. XLA's CPU products do not behave so: on a 2-core x86-64 machine the SmolLM2 layers' matmuls take
about 14 ms for one row but 2.3x that for 4 rows and 3x for 8, which kept every Medusa tree slower than plain
decoding there (BENCHMARKS.md, "What the matmuls of an M-token forward cost"). The kernel here
(`csrc/cpu_kernels.cc`, built by `medusa_jax.native`) reads a [K, N] kernel repacked as panels [N/16, K, 16], each
streamed once while up to 6 rows accumulate in registers: about the one-row time up to 6 rows, and faster than
XLA at every row count measured (1-128, so prefill chunks use it too; BENCHMARKS.md, "Packed panels").

Each output element is one FMA chain over k in order, whatever the number of rows: a tree node's products equal a
one-token forward's bit for bit, so greedy Medusa and plain greedy decoding see the same numbers.

Use: `for_decoding(config, base)` returns the base parameters with every layer projection and the output
projection replaced by a `Panels` (the tied embedding's transpose is added as `TIED`; the embedding itself stays
for the lookup), on the CPU backend for float32 weights when the kernel is available, else `base` unchanged.
`model.Linear` and `Llama.logits` run `matmul` when they meet a `Panels`. `infer` does this for every generation;
training never sees panels.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from medusa_jax import native

Array = jax.Array
PANEL = 16  # output columns per panel (the kernel's register block)
PACKED = ("qkv", "o", "gate_up", "down", "lm_head")  # the modules whose "kernel" is packed
TIED = "tied_lm_head"  # base entry holding the packed transpose of a tied embedding [V, H] -> panels of [H, V]
ATTENTION_MAX_ROWS = 64  # query rows per cache row (G*T) the attention kernel takes; prefill chunks run XLA's
MAX_MEMORY_FRACTION = 0.25  # never pack kernels larger than this share of the machine's memory (a copy is made)


@struct.dataclass
class Panels:
    """A kernel [K, *features] repacked for the CPU kernel.

    Attributes:
      data: float32 [P, K, 16], P = ceil(prod(features) / 16): columns 16p .. 16p + 15 of the kernel flattened to
        [K, prod(features)] (zero padded), contiguous over k.
      features: the kernel's output shape (static).
    """

    data: Array
    features: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the kernel this replaces."""
        return (self.data.shape[1],) + self.features


@jax.jit
def _panels(flat: Array) -> Array:
    """[K, N] -> [P, K, 16], zero padded (XLA's transposes: ~20x numpy's here)."""
    k, n = flat.shape
    p = -(-n // PANEL)
    return jnp.pad(flat, ((0, 0), (0, p * PANEL - n))).reshape(k, p, PANEL).transpose(1, 0, 2)


@jax.jit
def _panels_of_transpose(rows: Array) -> Array:
    """[N, K] -> the panels of its transpose [K, N] (without materialising the transpose)."""
    n, k = rows.shape
    p = -(-n // PANEL)
    return jnp.pad(rows, ((0, p * PANEL - n), (0, 0))).reshape(p, PANEL, k).transpose(0, 2, 1)


def pack(kernel: Array) -> Panels:
    """kernel [K, *features] (float32) -> `Panels`."""
    kernel = jnp.asarray(kernel, jnp.float32)
    return Panels(_panels(kernel.reshape(kernel.shape[0], -1)), tuple(kernel.shape[1:]))


def pack_transposed(rows: Array) -> Panels:
    """rows [N, K] (float32; a tied embedding) -> the `Panels` of rows.T, a kernel [K, N]."""
    rows = jnp.asarray(rows, jnp.float32)
    return Panels(_panels_of_transpose(rows), (rows.shape[0],))


def matmul(x: Array, w: Panels) -> Array:
    """x [..., K] @ the packed kernel -> float32 [..., *features]. Runs the CPU kernel where it is loaded (see
    `medusa_jax.native`), else the same product as an XLA einsum over the panels."""
    lead, k = x.shape[:-1], x.shape[-1]
    p = w.data.shape[0]
    rows = x.reshape(math.prod(lead), k).astype(jnp.float32)  # [M, K]
    if native.available():
        out = jax.ffi.ffi_call("medusa_panels_matmul", jax.ShapeDtypeStruct((rows.shape[0], p * PANEL), jnp.float32),
                               vmap_method="sequential")(rows, w.data)
    else:
        out = jnp.einsum("mk,pkc->mpc", rows, w.data, precision=jax.lax.Precision.HIGHEST).reshape(-1, p * PANEL)
    return out[:, :math.prod(w.features)].reshape(lead + w.features)


def attention_applies(q: Array, keys: Array) -> bool:
    """Whether `attention` takes these shapes (static): float32, head_dim and slots multiples of 16, at most
    `ATTENTION_MAX_ROWS` query rows per cache row, and the kernels loaded."""
    return (q.dtype == jnp.float32 and keys.dtype == jnp.float32 and q.shape[-1] % 16 == 0
            and keys.shape[-1] % 16 == 0 and q.shape[1] <= ATTENTION_MAX_ROWS and native.available())


def attention(q: Array, keys: Array, values: Array, mask: Array, scale: float, window: int | Array | None) -> Array:
    """`model.attend` over slots [0, window) by the CPU kernel, with the window a runtime bound: no copy of the
    window, no branch per window size (`model.attend_window`'s XLA path needs both). Every slot at and beyond
    `window` must be masked for the rows whose output is used.

    Args:
      q: [B*Kv, G*T, D] float32; keys [B*Kv, D, S]; values [B*Kv, S, D]; mask [B, T, S] bool; window: slots read
        (None: all S).
    Returns:
      [B*Kv, G*T, D] float32.
    """
    s = keys.shape[-1]
    w = jnp.asarray(s if window is None else window, jnp.int32).reshape(())
    return jax.ffi.ffi_call("medusa_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")(q, keys, values, mask, w, scale=np.float32(scale))


def _kernels(config, base: dict) -> list[tuple[tuple[str, ...], Any]]:
    """(path, kernel) of every product `for_decoding` packs; the tied embedding's path ends in "embedding"."""
    found = []

    def walk(tree: dict, path: tuple[str, ...]) -> None:
        for name, sub in tree.items():
            if isinstance(sub, dict):
                if name in PACKED and "kernel" in sub and not isinstance(sub["kernel"], dict):
                    found.append((path + (name, "kernel"), sub["kernel"]))
                else:
                    walk(sub, path + (name,))

    walk(base, ())
    if config.tie_embeddings:
        found.append((("embed", "embedding"), base["embed"]["embedding"]))
    return found


def _packable(config, base: dict) -> bool:
    if native.ENV in os.environ and os.environ[native.ENV].lower() in ("0", "off", "false", "no"):
        return False
    if jax.default_backend() != "cpu" or not isinstance(base, dict) or TIED in base:
        return False
    kernels = _kernels(config, base)
    if not kernels or any(not isinstance(k, jax.Array) or k.dtype != jnp.float32
                          or len(k.sharding.device_set) != 1 for _, k in kernels):
        return False
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    if memory and sum(k.nbytes for _, k in kernels) > MAX_MEMORY_FRACTION * memory:
        return False
    return native.available()


_cached: list[tuple[tuple[weakref.ref, ...], dict]] = []  # the last packed base, by identity of its leaves
_lock = threading.RLock()  # re-entrant: `_forget_dead` may run from a garbage collection inside `for_decoding`


def pack_base(config, base: dict) -> dict:
    """`base` with the products of `_kernels` packed (nested dicts copied, other leaves shared)."""
    out = jax.tree.map(lambda x: x, base, is_leaf=lambda x: not isinstance(x, dict))  # copy the dict skeleton
    for path, kernel in _kernels(config, base):
        if path == ("embed", "embedding"):
            out[TIED] = pack_transposed(kernel)  # logits = hidden @ E.T
            continue
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = pack(kernel)
    return out


def for_decoding(config, base: Any) -> Any:
    """The base parameters a generation should run with: packed (`pack_base`, cached for the same weights) when
    the products are float32 on a single CPU device and the kernel is available; else `base` itself."""
    if not _packable(config, base):
        return base
    leaves = jax.tree.leaves(base)
    with _lock:
        for refs, packed in _cached:
            if len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
                return packed
        packed = pack_base(config, base)
        _cached[:] = [(tuple(weakref.ref(x) for x in leaves), packed)]
        weakref.finalize(leaves[0], _forget_dead)  # the packed copy goes when the weights it came from go
        return packed


def _forget_dead() -> None:
    with _lock:
        _cached[:] = [(refs, packed) for refs, packed in _cached if all(r() is not None for r in refs)]

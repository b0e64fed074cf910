"""The prefix cache: a chat's next turn reuses the keys and values of the conversation so far.

After a batch-1 generation, slots [0, length) of its KV cache hold the prompt and every generated token but the
last (`decode.generate`), and `infer.api` keeps that cache for the next call of its shape. The entry here
remembers which token ids those slots hold and which model and weights computed them. A later batch-1 call whose
prompt starts with some of those ids (the next turn of the same conversation: the same messages, the answer,
a new user message) takes the cache and runs only its remaining tokens through the model: the chunked prefill
starts at the first token not in common (`decode._prefill_forward`).

Reuse needs the chunked prefill (a prompt bucket longer than `prefill_chunk`) and happens only where it saves at
least one chunk. The ids are compared token by token, so a chat template that renders the earlier answer with
different tokens than were generated simply shares a shorter prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from medusa_jax import model


@dataclasses.dataclass
class Entry:
    """What `cache` (also the pool's cache for `pool_key`, until a later call of that shape replaces it) holds in
    slots [0, len(ids)), computed by `config` with the weights `base`."""

    ids: tuple[int, ...]
    cache: model.KVCache
    pool_key: tuple
    config: Any
    base: tuple[weakref.ref, ...]  # the base weights' leaves, by identity (never kept alive by the entry)


_entry: list[Entry | None] = [None]
_lock = threading.Lock()  # calls from several threads must not take the same cache twice


def _base_refs(base: Any) -> tuple[weakref.ref, ...] | None:
    try:
        return tuple(weakref.ref(x) for x in jax.tree.leaves(base))
    except TypeError:  # a leaf type without weak references: no reuse rather than a risky one
        return None


def _same_base(refs: tuple[weakref.ref, ...], base: Any) -> bool:
    leaves = jax.tree.leaves(base)
    return len(leaves) == len(refs) and all(r() is x for r, x in zip(refs, leaves))


def clear() -> None:
    """Forgets the kept prefix."""
    with _lock:
        _entry[0] = None


def keep(config: Any, base: Any, ids: Sequence[int], cache: model.KVCache, pool_key: tuple) -> None:
    """Records that `cache` (put in the pool for `pool_key`) holds the keys and values of `ids`, computed by the
    model `config` with the weights `base`."""
    refs = _base_refs(base)
    with _lock:
        _entry[0] = None if refs is None else Entry(tuple(ids), cache, pool_key, config, refs)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _reusable(entry: Entry | None, config: Any, base: Any, prompt: Sequence[int], chunk: int, bucket: int) -> int:
    if entry is None or not chunk or bucket <= chunk or bucket % chunk:
        return 0
    if entry.cache[0][0].is_deleted() or entry.config != config or not _same_base(entry.base, base):
        return 0  # the kept cache was donated to another call since, or another model computed it
    common = min(common_prefix(entry.ids, prompt), len(prompt) - 1)  # the last prompt token always runs
    chunks = lambda n: -(-n // chunk)
    return common if chunks(len(prompt) - common) < chunks(len(prompt)) else 0


def take(config: Any, base: Any, prompt: Sequence[int], pool: dict, chunk: int, bucket: int, slots: int
         ) -> tuple[int, model.KVCache | None]:
    """(reused, cache): the leading tokens of `prompt` whose keys and values the kept cache holds and a prefill of
    `chunk`-token chunks over a `bucket`-token prompt bucket would skip, and that cache as one of `slots` slots
    (its first slots kept; out of the pool; the entry is spent: the cache is donated to the call that reuses
    it). (0, None) when reuse would save no chunk."""
    with _lock:
        entry = _entry[0]
        reused = _reusable(entry, config, base, prompt, chunk, bucket)
        if not reused:
            return 0, None
        _entry[0] = None
        if pool.get(entry.pool_key) is entry.cache:
            del pool[entry.pool_key]
    cache = entry.cache
    return reused, (cache if cache[0][0].shape[model.KEY_SLOT_AXIS] == slots else _fit(cache, slots))


def holds(cache: model.KVCache | None) -> bool:
    """Whether `cache` is the kept prefix's (a call that does not reuse it must not take it)."""
    entry = _entry[0]
    return cache is not None and entry is not None and entry.cache is cache


@functools.partial(jax.jit, static_argnums=1)
def _fit(cache: model.KVCache, slots: int) -> model.KVCache:
    """The cache cut or zero-padded to `slots` slots (along `model.KEY_SLOT_AXIS` / `VALUE_SLOT_AXIS`)."""

    def fit(x: jax.Array, axis: int) -> jax.Array:
        if x.shape[axis] >= slots:
            return jax.lax.slice_in_dim(x, 0, slots, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, slots - x.shape[axis])
        return jnp.pad(x, pad)

    return tuple((fit(k, model.KEY_SLOT_AXIS), fit(v, model.VALUE_SLOT_AXIS)) for k, v in cache)

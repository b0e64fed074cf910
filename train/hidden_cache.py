"""Host-memory cache of a frozen model's post-final-norm hidden states, one entry per distinct data row.

Stage 1 caches the frozen base (the heads' input); stage 2 caches the frozen *original* base (the teacher of the
KL term). Either way the cached states depend on nothing that training changes, so each row is computed once.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np


def cache_bytes(rows: int, seq_len: int, hidden: int) -> int:
    """Bytes of a float32 [rows, seq_len, hidden] cache."""
    return rows * seq_len * hidden * 4


class HiddenCache:
    """Post-final-norm hidden states of dataset rows, float32 [rows, seq, H] in host memory.

    Rows are found by content (a hash of tokens and segment ids), so any batch iterator can be served, and
    identical rows (e.g. padding rows) share one entry.
    """

    def __init__(self):
        self._index: dict[bytes, int] = {}
        self.array: np.ndarray | None = None

    @staticmethod
    def _key(tokens: np.ndarray, segments: np.ndarray) -> bytes:
        return hashlib.blake2b(tokens.tobytes() + segments.tobytes(), digest_size=16).digest()

    def build(self, datasets: Sequence[Any], compute: Callable[[dict], np.ndarray], batch_size: int,
              hidden_size: int, progress: bool) -> None:
        """Fills the cache for every row of `datasets`; compute(host batch) -> float32 [B, S, H] numpy."""
        import tqdm

        from train.data import BATCH_KEYS

        todo = []
        for ds in datasets:
            for r in range(len(ds)):
                key = self._key(ds.tokens[r], ds.segment_ids[r])
                if key not in self._index:
                    self._index[key] = len(todo)
                    todo.append((ds, r))
        first = todo[0][0]
        self.array = np.empty((len(todo), first.seq_len, hidden_size), np.float32)
        for b in tqdm.trange(0, len(todo), batch_size, desc="hidden states", unit="batch", disable=not progress):
            chunk = todo[b: b + batch_size]
            batch = {k: np.stack([getattr(ds, k)[r] for ds, r in chunk]) for k in BATCH_KEYS}
            pad = batch_size - len(chunk)
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            self.array[b: b + len(chunk)] = compute(batch)[: len(chunk)]

    def lookup(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """float32 [B, S, H] for a host batch; padding rows a last batch adds (never built) read zeros."""
        idx = [self._index.get(self._key(t, s)) for t, s in zip(batch["tokens"], batch["segment_ids"])]
        if any(i is None for i in idx):
            missing = [j for j, i in enumerate(idx) if i is None]
            if not all((batch["segment_ids"][j] == 0).all() for j in missing):
                raise RuntimeError("hidden-state cache miss for a data row")
            return np.stack([self.array[i] if i is not None else np.zeros_like(self.array[0]) for i in idx])
        return self.array[np.asarray(idx)]


def build_if_it_fits(datasets: Sequence[Any], compute: Callable[[dict], np.ndarray], *, batch_size: int,
                     seq_len: int, hidden_size: int, cache_gb: float, progress: bool) -> HiddenCache | None:
    """A filled HiddenCache when the rows of `datasets` fit in `cache_gb` on a single host, else None (with a
    note on stderr when caching was wanted but does not fit)."""
    import sys

    import jax

    datasets = [d for d in datasets if d is not None]
    need = cache_bytes(sum(len(d) for d in datasets), seq_len, hidden_size)
    if 0 < need <= cache_gb * 1e9 and jax.process_count() == 1:
        cache = HiddenCache()
        cache.build(datasets, compute, batch_size, hidden_size, progress)
        return cache
    if cache_gb > 0:
        print(f"note: hidden states need {need / 1e9:.1f} GB (> --cache-gb {cache_gb}); recomputing the frozen "
              "forward every step", file=sys.stderr)
    return None

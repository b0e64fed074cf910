"""Compiled generation executables kept on disk, so that a new process skips tracing as well as compiling.

JAX's persistent compilation cache (`medusa_jax.compile_cache`) saves the XLA compilation, but finding an entry
in it takes the lowered program, i.e. tracing the whole model first: 1-2 s per executable for SmolLM2 on a CPU,
most of a warm chat's wait for its first token (BENCHMARKS.md, "Stored executables"). This store keeps each
executable `infer.api` builds as JAX's serialized form (`jax.experimental.serialize_executable`) under a key that
covers everything the program depends on: the decoding function and its static arguments (the `DecodeSpec`,
trees included, by value), the argument shapes, dtypes and shardings, the versions of jax, jaxlib and flax, the
backend, device kind and host CPU, `XLA_FLAGS` and the JAX options that change tracing, and the source of every
module of `medusa_jax` and `infer`. Any change makes a new key; an entry that fails to load is compiled again
and rewritten.

It lives in a `medusa-jax-executables` folder inside the compilation cache directory in use (so it is on and
off with it: `MEDUSA_JAX_COMPILE_CACHE`), holds only executables whose build took at least JAX's
`jax_persistent_cache_min_compile_time_secs`, and is capped at `MAX_BYTES`, least recently used first out.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

MAX_BYTES = 2 << 30  # 2 GiB: a SmolLM2 generation executable is about 4 MB on a CPU
FOLDER = "medusa-jax-executables"
# JAX options that change what tracing produces (dtypes, matmul precision, random bits, dtype promotion).
_TRACING_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                    "jax_numpy_dtype_promotion", "jax_threefry_partitionable")


def directory() -> Path | None:
    """The store's folder, or None when no compilation cache is in use."""
    root = jax.config.jax_compilation_cache_dir
    return Path(root) / FOLDER if root else None


@functools.lru_cache(maxsize=None)
def _host_fingerprint() -> str:
    """The CPU's architecture and instruction-set flags: a CPU executable is machine code for them (a cache
    directory shared between machines must not hand one machine's executables to another)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {hashlib.sha256(flags.encode()).hexdigest()}"


@functools.lru_cache(maxsize=None)
def _code_fingerprint() -> str:
    """sha256 of the source of every module of the packages that build the programs."""
    h = hashlib.sha256()
    for package in ("medusa_jax", "infer"):
        root = Path(__file__).resolve().parents[1] / package
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _fingerprint(value: Any, h: Any) -> None:
    """Feeds a static argument into hash `h` by value (numpy arrays by their bytes: their repr elides)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(type(value).__qualname__.encode())
        for field in dataclasses.fields(value):
            h.update(field.name.encode())
            _fingerprint(getattr(value, field.name), h)
    elif isinstance(value, (np.ndarray, jax.Array)):
        value = np.asarray(value)
        h.update(f"ndarray {value.dtype} {value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (tuple, list)):
        h.update(f"{type(value).__name__} {len(value)}".encode())
        for item in value:
            _fingerprint(item, h)
    else:
        h.update(f"{type(value).__name__} {value!r}".encode())


def key(kind: str, static: tuple, args: tuple) -> str:
    """The store key of `decode.<kind>_jit` with static arguments `static` and (abstract or real) `args`."""
    import flax
    import jaxlib

    h = hashlib.sha256()
    device = jax.devices()[0]
    h.update(repr((kind, jax.__version__, jaxlib.__version__, flax.__version__, jax.default_backend(),
                   device.device_kind, device.client.platform_version, _host_fingerprint(),
                   os.environ.get("XLA_FLAGS", ""), _code_fingerprint(), str(jax.tree.structure(args)),
                   [str(getattr(jax.config, name, None)) for name in _TRACING_OPTIONS])).encode())
    _fingerprint(static, h)
    for leaf in jax.tree.leaves(args):
        h.update(f"{tuple(leaf.shape)} {leaf.dtype} {getattr(leaf, 'sharding', None)}".encode())
    return h.hexdigest()[:32]


def load(name: str) -> Any | None:
    """The stored executable `name` (a `key`), loaded for this process, or None."""
    folder = directory()
    path = folder / f"{name}.bin" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        from jax.experimental import serialize_executable

        with open(path, "rb") as f:
            payload, in_tree, out_tree = pickle.load(f)
        exe = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        os.utime(path)  # recently used
        return exe
    except Exception:  # noqa: BLE001 - a damaged or foreign entry: build the executable again
        path.unlink(missing_ok=True)
        return None


def save(name: str, compiled: Any, build_s: float) -> None:
    """Stores a compiled executable built in `build_s` seconds (if that reaches JAX's threshold for its own
    cache); a store that cannot be written only costs time."""
    folder = directory()
    if folder is None or build_s < jax.config.jax_persistent_cache_min_compile_time_secs:
        return
    try:
        from jax.experimental import serialize_executable

        data = pickle.dumps(serialize_executable.serialize(compiled))
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / f"{name}.bin")
        _prune(folder)
    except Exception:  # noqa: BLE001 - e.g. a read-only cache, or an executable JAX cannot serialize
        return


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.bin"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for path in entries:
        total += path.stat().st_size
        if total > MAX_BYTES:
            path.unlink(missing_ok=True)


def load_or_build(kind: str, static: tuple, args: tuple, build: Callable[[], Any]) -> tuple[Any, bool]:
    """(executable, whether it was built here): the stored one when there is one, else `build()`, stored."""
    name = key(kind, static, args)
    exe = load(name)
    if exe is not None:
        return exe, False
    t0 = time.perf_counter()
    exe = build()
    save(name, exe, time.perf_counter() - t0)
    return exe, True

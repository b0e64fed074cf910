"""The CPU kernels behind `medusa_jax.panels`: built from `csrc/cpu_kernels.cc` on first use, registered with XLA's
FFI.

The C++ source ships with the package and is compiled once per source, jaxlib and compiler by the system C++
compiler (`$CXX`, else `c++`, `g++` or `clang++`; about 6 s) into `$MEDUSA_JAX_CACHE/native` (default
`~/.cache/medusa-jax/native`). Concurrent first uses (two test workers, two processes) each compile to a file of
their own and move it into place atomically, so a half-written library is never loaded.

The kernels need an x86-64 CPU with AVX2 and FMA on Linux. Anywhere else, or without a compiler, or with
`MEDUSA_JAX_CPU_KERNELS=off`, `available()` is False and the model runs XLA's own products: the same results to
rounding, at XLA's speed. `status()` says which and why (`python -m infer.bench` prints it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

ENV = "MEDUSA_JAX_CPU_KERNELS"
# FFI target names (as compiled executables call them) -> the library's handler symbols
TARGETS = {"medusa_panels_matmul": "MedusaPanelsMatmul", "medusa_decode_attention": "MedusaDecodeAttention"}
SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cc"
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str, "path": str (once decided, for the process)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_dir() -> Path:
    """Where built libraries are kept: `native` in `$MEDUSA_JAX_CACHE` (default ~/.cache/medusa-jax)."""
    from medusa_jax.loading.embedded import cache_dir

    return cache_dir() / "native"


def _build(cxx: str) -> Path:
    """The library for this source, jaxlib and compiler, compiled now unless an earlier process did."""
    import jax.ffi
    import jaxlib

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode() + version.encode()
                         + " ".join(FLAGS).encode()).hexdigest()[:16]
    path = library_dir() / f"libmedusa_cpu_kernels-{key}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.part")
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{Path(cxx).name} failed ({last[:200]})")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _decide() -> None:
    if os.environ.get(ENV, "").lower() in ("0", "off", "false", "no"):
        _state.update(ok=False, why=f"turned off by {ENV}")
        return
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        _state.update(ok=False, why=f"no kernel for {platform.system()} {platform.machine()} (x86-64 Linux only)")
        return
    if not {"avx2", "fma"} <= _cpu_flags():
        _state.update(ok=False, why="this CPU lacks AVX2/FMA")
        return
    cxx = _compiler()
    if cxx is None:
        _state.update(ok=False, why="no C++ compiler found (install g++ or set CXX)")
        return
    try:
        import jax

        path = _build(cxx)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        _state.update(ok=False, why=f"could not build or load the kernel: {e}")
        return
    _state.update(ok=True, why=f"built with {Path(cxx).name}", path=str(path))


def available() -> bool:
    """Whether the kernel is built, loaded and registered in this process (builds it on the first call)."""
    with _lock:
        if not _state:
            _decide()
        return bool(_state["ok"])


def status() -> str:
    """One line: the kernels in use, or why XLA's own products and attention are used instead."""
    ok = available()
    return f"medusa-jax CPU kernels ({_state['why']})" if ok else f"XLA only ({_state['why']})"

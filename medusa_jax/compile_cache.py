"""JAX's persistent compilation cache, on by default: a new process reuses the executables earlier ones compiled.

A generation compiles one executable per shape bucket and mode (seconds each on a CPU, more for a large model on
a GPU), and so does each training step; without a persistent cache every new process pays them again.
`medusa_jax.load` calls `enable()` before it compiles anything, so scripts, the CLIs and training resumes
start warm after their first run.

`MEDUSA_JAX_COMPILE_CACHE`: unset for `$XDG_CACHE_HOME/medusa-jax/xla/jaxlib-<version>` (default under
`~/.cache`; one folder per jaxlib, so no runtime ever loads another's executables), a directory, or `off`. A
cache directory the user gave JAX (`JAX_COMPILATION_CACHE_DIR`, `jax.config`) is left as it is. JAX decides once
per process, at its first compilation, whether it uses the cache: a process that compiled something before
`enable()` runs without it. JAX writes no executable that holds a host callback (streamed generations use none:
`infer.decode`), and only those that took at least a second to compile (its default). The cache is capped at
`MAX_BYTES`, least recently used entries first out (JAX needs the `filelock` package for that, which
transformers installs).
Known upstream problem: on some CPUs XLA rejects its own cached executables on reload (jax-ml/jax#38445), logs
an error line for each, and compiles as if there were no cache; `MEDUSA_JAX_COMPILE_CACHE=off` silences it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax

ENV = "MEDUSA_JAX_COMPILE_CACHE"
MAX_BYTES = 4 << 30  # 4 GiB: SmolLM2's executables are 1-10 MB each


def default_dir() -> Path:
    """`$XDG_CACHE_HOME/medusa-jax/xla/jaxlib-<version>`, under `~/.cache` without XDG_CACHE_HOME."""
    import jaxlib

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medusa-jax" / "xla" / f"jaxlib-{jaxlib.__version__}"


def enable() -> str | None:
    """Points JAX's persistent compilation cache at `MEDUSA_JAX_COMPILE_CACHE` (module docstring) unless a
    cache directory is already configured. Returns the directory in use, or None (off, or not writable)."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    choice = os.environ.get(ENV, "").strip()
    if choice.lower() in ("off", "0", "false", "no"):
        return None
    path = Path(choice).expanduser() if choice else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    if not os.access(path, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if jax.config.jax_compilation_cache_max_size == -1 and _has_filelock():  # JAX's default: unbounded
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return str(path)


def _has_filelock() -> bool:
    return importlib.util.find_spec("filelock") is not None  # installed with transformers' huggingface_hub

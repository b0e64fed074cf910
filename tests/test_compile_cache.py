"""The persistent compilation cache: a second process loads the generation executables the first one compiled,
streamed generations included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, jax
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
import medusa_jax
from infer import generate_ids
tiny = medusa_jax.load("tiny")
g = generate_ids(tiny, [[5, 6, 7]], max_new_tokens=4, mode="ar", stop_ids=())
seen = []
s = generate_ids(tiny, [[5, 6, 7]], max_new_tokens=4, mode="ar", stop_ids=(), prefix_cache=False,
                 stream=lambda new: seen.append(new[0]))
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"), "tokens": g.tokens,
                  "streamed": [s.tokens[0], sum(seen, [])], "dir": jax.config.jax_compilation_cache_dir}))
"""


def _run(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("MEDUSA_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    # Cache every executable, however fast it compiled (JAX's default keeps those that took a second or more).
    full.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(REPO), **env)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=full, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


def test_second_process_loads_the_compiled_generation(tmp_path):
    cache = tmp_path / "xla"
    first = _run(MEDUSA_JAX_COMPILE_CACHE=str(cache))
    assert first["dir"] == str(cache) and first["hits"] == 0
    names = [p.name for p in cache.iterdir()]
    # The plain generation, and the streamed one's prefill and segment executables (`infer.decode`).
    assert all(any(n.startswith(f"jit_{kind}") for n in names) for kind in ("generate", "_start", "_advance"))
    assert first["streamed"][0] == first["streamed"][1] == first["tokens"][0]
    second = _run(MEDUSA_JAX_COMPILE_CACHE=str(cache))
    if second["hits"] == 0 and "doesn't match the machine type" in second["stderr"]:
        pytest.skip("this CPU hits jax-ml/jax#38445: XLA rejects its own cached executables on reload")
    assert second["hits"] >= 4 and second["tokens"] == first["tokens"]  # generate; start, advance, finish
    assert second["streamed"] == first["streamed"]


def test_off_leaves_the_cache_alone(tmp_path):
    off = _run(MEDUSA_JAX_COMPILE_CACHE="off", XDG_CACHE_HOME=str(tmp_path / "home"))
    assert off["dir"] is None and off["hits"] == 0 and not (tmp_path / "home").exists()


def test_a_cache_directory_configured_for_jax_is_kept(monkeypatch, tmp_path):
    """In this process (conftest enabled the cache) JAX has a directory: enable() keeps it, whatever the variable."""
    import jax

    from medusa_jax import compile_cache

    configured = jax.config.jax_compilation_cache_dir
    assert configured
    monkeypatch.setenv("MEDUSA_JAX_COMPILE_CACHE", str(tmp_path / "ours"))
    assert compile_cache.enable() == configured == jax.config.jax_compilation_cache_dir
    assert not (tmp_path / "ours").exists()


def test_default_directory_follows_xdg_cache_home(tmp_path, monkeypatch):
    from medusa_jax import compile_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    import jaxlib

    version = f"jaxlib-{jaxlib.__version__}"
    assert compile_cache.default_dir() == tmp_path / "medusa-jax" / "xla" / version
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "medusa-jax" / "xla" / version

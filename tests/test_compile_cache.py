"""The persistent compilation cache and the executable store: a second process loads the generation executables
the first one compiled, streamed generations included, without tracing them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infer import aot_cache

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, jax
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
import medusa_jax
from infer import decode, generate_ids
tiny = medusa_jax.load("tiny")
g = generate_ids(tiny, [[5, 6, 7]], max_new_tokens=4, mode="ar", stop_ids=())
seen = []
s = generate_ids(tiny, [[5, 6, 7]], max_new_tokens=4, mode="ar", stop_ids=(), prefix_cache=False,
                 stream=lambda new: seen.append(new[0]))
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"), "tokens": g.tokens,
                  "streamed": [s.tokens[0], sum(seen, [])], "dir": jax.config.jax_compilation_cache_dir,
                  "traces": decode.trace_count()}))
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
    assert first["traces"] == 2 and len(list((cache / aot_cache.FOLDER).glob("*.bin"))) == 4
    second = _run(MEDUSA_JAX_COMPILE_CACHE=str(cache))
    if second["traces"] and "doesn't match the machine type" in second["stderr"]:
        pytest.skip("this CPU hits jax-ml/jax#38445: XLA rejects its own cached executables on reload")
    # All four executables (generate; start, advance, finish) came from the store: nothing was traced.
    assert second["traces"] == 0 and second["tokens"] == first["tokens"]
    assert second["streamed"] == first["streamed"]
    for entry in (cache / aot_cache.FOLDER).glob("*.bin"):  # damaged entries are built again (XLA cache hits)
        entry.write_bytes(b"not an executable")
    third = _run(MEDUSA_JAX_COMPILE_CACHE=str(cache))
    assert third["traces"] == 2 and third["hits"] >= 4 and third["streamed"] == first["streamed"]
    assert third["tokens"] == first["tokens"]


def test_store_keys_follow_everything_the_program_depends_on(monkeypatch):
    import jax
    import jax.numpy as jnp

    from infer.plan import make_plan
    from infer.testing import random_bundle

    bundle = random_bundle(seed=0)

    def key(tree, **kw):
        plan = make_plan(bundle, [[5, 6, 7]], 8, 0.0, 1.0, "greedy", tree, (), None, 0.09, 0.3, None)
        args = (bundle.base, plan.heads, jnp.asarray(plan.padded), kw.get("cache", jnp.zeros((1, 64), jnp.float32)))
        return aot_cache.key("generate", (plan.spec,), args)

    base = key([[0], [1], [0, 0]])
    assert key([[0], [1], [0, 0]]) == base
    assert key([[0], [1], [1, 0]]) != base  # same node count, another tree
    assert key([[0], [1], [0, 0]], cache=jnp.zeros((1, 128), jnp.float32)) != base
    with jax.default_matmul_precision("highest"):  # a JAX option that changes the traced program
        assert key([[0], [1], [0, 0]]) != base
    monkeypatch.setattr(aot_cache, "_code_fingerprint", lambda: "edited source")
    assert key([[0], [1], [0, 0]]) != base


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

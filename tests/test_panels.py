"""The packed-panel CPU kernel (`medusa_jax.panels`, `medusa_jax.native`): exact products, rows independent of
each other, the model and decoding on packed weights, and the fall-backs when the kernel cannot be used."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import generate_ids
from medusa_jax import config as configs, model, native, panels

ROOT = Path(__file__).resolve().parent.parent
needs_kernel = pytest.mark.skipif(not native.available(), reason=f"kernel unavailable here: {native.status()}")


def _rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 130])
@pytest.mark.parametrize("k, features", [(1, (16,)), (7, (33,)), (64, (100,)), (48, (3, 2, 8)), (576, (960,))])
def test_the_kernel_computes_the_product(m, k, features):
    x, w = _rand((m, k), 0), _rand((k,) + features, 1)
    got = np.asarray(jax.jit(panels.matmul)(jnp.asarray(x), panels.pack(w)))
    want = (x.astype(np.float64) @ w.reshape(k, -1).astype(np.float64)).reshape((m,) + features)
    assert got.shape == (m,) + features and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.sqrt(k))


@needs_kernel
def test_each_row_is_the_same_alone_or_among_others_bit_for_bit():
    """Row blocks of 6, chunks over threads: no row's result depends on which rows come with it."""
    w = panels.pack(_rand((576, 3072), 2))
    x = jnp.asarray(_rand((20, 576), 3))
    run = jax.jit(panels.matmul)
    together = np.asarray(run(x, w))
    for m in (1, 3, 6, 7, 20):
        part = np.asarray(run(x[:m], w))
        assert np.array_equal(part, together[:m]), m
    for i in (0, 5, 6, 19):
        assert np.array_equal(np.asarray(run(x[i:i + 1], w))[0], together[i]), i


@needs_kernel
def test_the_xla_fallback_computes_the_same_product(monkeypatch):
    x, w = jnp.asarray(_rand((3, 40), 4)), panels.pack(_rand((40, 2, 9), 5))
    kernel = np.asarray(panels.matmul(x, w))
    monkeypatch.setattr(native, "available", lambda: False)
    fallback = np.asarray(panels.matmul(x, w))
    np.testing.assert_allclose(kernel, fallback, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_kernel_works_under_vmap():
    x, w = jnp.asarray(_rand((2, 3, 8), 6)), panels.pack(_rand((8, 16), 7))
    got = np.asarray(jax.vmap(panels.matmul, in_axes=(0, None))(x, w))
    np.testing.assert_allclose(got, np.asarray(x) @ _rand((8, 16), 7), rtol=1e-5, atol=1e-5)


def _tied_tiny():
    cfg = dataclasses.replace(configs.tiny(), tie_embeddings=True)
    return cfg, model.init_base(cfg, jax.random.PRNGKey(0))


@needs_kernel
@pytest.mark.parametrize("tied", [False, True])
def test_the_model_on_packed_weights_computes_the_same_logits(tiny_bundle, tied):
    cfg, base = _tied_tiny() if tied else (tiny_bundle.config, tiny_bundle.base)
    packed = panels.for_decoding(cfg, base)
    assert isinstance(packed["layers_0"]["attn"]["qkv"]["kernel"], panels.Panels)
    assert (panels.TIED in packed) == tied and isinstance(packed.get("lm_head", {}).get("kernel"),
                                                          panels.Panels) != tied
    tokens = jnp.asarray([[1, 5, 9, 2, 7, 3]], jnp.int32)
    positions = jnp.arange(6, dtype=jnp.int32)[None]
    mask = model.causal_mask(1, 6)
    run = jax.jit(lambda b: model.logits(cfg, b, model.forward(cfg, b, tokens, positions, mask)[0]))
    np.testing.assert_allclose(np.asarray(run(packed)), np.asarray(run(base)), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_for_decoding_packs_once_per_weights_and_only_float32_cpu_weights(tiny_bundle, monkeypatch):
    cfg, base = tiny_bundle.config, tiny_bundle.base
    first = panels.for_decoding(cfg, base)
    assert panels.for_decoding(cfg, base) is first  # cached for the same weights
    assert panels.for_decoding(cfg, first) is first  # already packed: nothing to do
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), base)
    assert panels.for_decoding(cfg, bf16) is bf16
    monkeypatch.setenv(native.ENV, "off")
    assert panels.for_decoding(cfg, base) is base


@needs_kernel
def test_greedy_medusa_on_packed_weights_equals_plain_greedy_on_xla_products(embedded, monkeypatch):
    """The decoder picks the kernel by itself (`infer.plan`); with it off the same prompts give the same tokens.
    chain:1 gets the base and head logits from one pass over the tied projection (`DecodeSpec.fused_head_rows`)."""
    prompts = [embedded.tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):")]
    packed = {tree: [generate_ids(embedded, [p], max_new_tokens=24, mode="greedy", tree=tree).tokens[0]
                     for p in prompts] for tree in ("mc_sim_7b_63", "chain:1")}
    monkeypatch.setenv(native.ENV, "off")
    plain = [generate_ids(embedded, [p], max_new_tokens=24, mode="ar").tokens[0] for p in prompts]
    assert packed == {"mc_sim_7b_63": plain, "chain:1": plain}


def _status_in_subprocess(tmp_path, **env) -> str:
    code = "from medusa_jax import native; print(native.status())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "MEDUSA_JAX_CACHE": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_without_a_working_compiler_xla_products_are_used_and_the_reason_is_given(tmp_path):
    line = _status_in_subprocess(tmp_path, CXX="false")
    assert line.startswith("XLA only (")
    if native.available():  # a machine the kernel suits: the compiler is what failed
        assert "could not build or load the kernel: false failed" in line
    assert not list((tmp_path / "native").glob("*.part"))  # a failed build leaves no partial file


def test_the_kernel_can_be_turned_off(tmp_path):
    assert _status_in_subprocess(tmp_path, **{native.ENV: "off"}) == f"XLA only (turned off by {native.ENV})"

"""Matmul precision: a float32 model computes its products in float32 on every backend.

JAX lets a GPU round float32 matmul operands to TensorFloat32 by default, which would make a tree-verification
forward and a one-token forward disagree at many more near-ties (greedy Medusa would stop equalling plain greedy
decoding on a GPU). A CPU computes float32 either way, so these tests read the precision off the lowered programs,
which is what a GPU would compile: every product of a float32 generation or training loss asks for HIGHEST, and no
product of a bfloat16 model does (it keeps the backend's fast default).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import decode
from infer.plan import make_plan
from medusa_jax import model, native
from medusa_jax.config import HeadsConfig
from train import losses

_DOT = re.compile(r"stablehlo\.(?:dot_general|dot)\b.*")


def _dots(lowered) -> list[str]:
    """Every matmul line of the lowered StableHLO program."""
    dots = _DOT.findall(lowered.as_text())
    assert dots, "no matmul found in the lowered program"
    return dots


def _generation(bundle, dtype, mode: str, tree):
    base = jax.tree.map(lambda x: x.astype(dtype), bundle.base)
    params = bundle.replace(base=base)
    plan = make_plan(params, [[5, 6, 7], [8, 9]], 6, 0.0, 1.0, mode, tree, None, None, 0.09, 0.3, None)
    cache = model.init_cache(plan.spec.config, len(plan.prompts), plan.spec.cache_len, dtype)
    return decode.generate_jit.lower(plan.spec, *plan.args(params, cache, 6, 0, 0.0, 1.0, 0))


@pytest.mark.parametrize("mode, tree", [("ar", None), ("greedy", "chain:2")])
def test_a_float32_generation_asks_for_float32_products_everywhere(tiny_heads_bundle, mode, tree, monkeypatch):
    """Prefill, tree verification, heads and output projection: every product of the generation program (with
    the CPU kernels off, as on a GPU: on a CPU they take the products and compute them in float32 by design)."""
    monkeypatch.setenv(native.ENV, "off")
    dots = _dots(_generation(tiny_heads_bundle, jnp.float32, mode, tree))
    plain = [d for d in dots if "HIGHEST" not in d]
    assert not plain, f"{len(plain)} of {len(dots)} float32 products at the backend's default precision: {plain[0]}"


def test_a_bfloat16_generation_keeps_the_backend_default(tiny_heads_bundle):
    dots = _dots(_generation(tiny_heads_bundle, jnp.bfloat16, "greedy", "chain:2"))
    assert not [d for d in dots if "HIGHEST" in d]


def test_the_untied_output_projection_keeps_its_parameter_name_and_values(tiny_bundle):
    """`model.Linear` as the untied output projection keeps `nn.Dense`'s parameter path and shape, and its product."""
    assert not tiny_bundle.config.tie_embeddings
    kernel = tiny_bundle.base["lm_head"]["kernel"]
    assert kernel.shape == (tiny_bundle.config.hidden_size, tiny_bundle.config.vocab_size)
    hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 3, tiny_bundle.config.hidden_size))
    got = model.logits(tiny_bundle.config, tiny_bundle.base, hidden)
    np.testing.assert_allclose(np.asarray(got), np.asarray(hidden) @ np.asarray(kernel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("teacher", [False, True])
def test_the_float32_head_loss_and_its_gradient_ask_for_float32_products(tiny_bundle, teacher):
    cfg = tiny_bundle.config
    hc = HeadsConfig(num_heads=2, num_layers=1, projection="shared")
    heads = model.init_heads(hc, cfg, tiny_bundle.base)
    b, s = 2, 16
    tokens = jnp.arange(b * s, dtype=jnp.int32).reshape(b, s) % cfg.vocab_size
    hidden = jax.random.normal(jax.random.PRNGKey(1), (b, s, cfg.hidden_size))
    mask, segments = jnp.ones((b, s), bool), jnp.ones((b, s), jnp.int32)
    kernel = model.lm_head_kernel(cfg, tiny_bundle.base)
    tch = losses.Teacher(hidden, kernel, 1.0) if teacher else None

    def loss(heads):
        return losses.medusa_loss(hc, cfg, tiny_bundle.base, heads, hidden, tokens, mask, segments,
                                  weights=(1.0, 0.8), chunk=8, teacher=tch)[0]

    dots = _dots(jax.jit(jax.value_and_grad(loss)).lower(heads))
    assert not [d for d in dots if "HIGHEST" not in d]

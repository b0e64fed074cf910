"""Medusa head files: export/import round trips, original PyTorch Medusa files (incl. aliased layers), errors."""

from __future__ import annotations

import collections
import json

import jax
import numpy as np
import pytest

import medusa_jax
from medusa_jax import HeadsConfig, MedusaError, model
from medusa_jax.loading import attach_heads, save_heads

torch = pytest.importorskip("torch")


class ResBlock(torch.nn.Module):
    """The original Medusa residual block: x + SiLU(W x + b)."""

    def __init__(self, hidden):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        return x + torch.nn.functional.silu(self.linear(x))


def original_heads(num_heads, num_layers, hidden, vocab, own=True, seed=0):
    """The original `nn.ModuleList` of heads; `[ResBlock] * n` repeats ONE module, so layers alias one tensor."""
    torch.manual_seed(seed)
    heads = torch.nn.ModuleList([
        torch.nn.Sequential(*([ResBlock(hidden)] * num_layers),
                            *([torch.nn.Linear(hidden, vocab, bias=False)] if own else []))
        for _ in range(num_heads)])
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.1)
    return heads.eval()


def random_heads(bundle, heads_config, seed=0):
    heads = model.init_heads(heads_config, bundle.config, bundle.base)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(heads)))
    return {k: 0.1 * jax.random.normal(next(keys), v.shape, v.dtype) for k, v in heads.items()}


def ours_logits(bundle, hidden):
    return np.asarray(model.head_logits(bundle.heads_config, bundle.config, bundle.base, bundle.heads, hidden))


@pytest.mark.parametrize("projection,num_layers", [("own", 1), ("shared", 1), ("own", 2), ("shared", 3)])
def test_round_trip(tiny_bundle, tmp_path, projection, num_layers):
    heads_config = HeadsConfig(num_heads=3, num_layers=num_layers, projection=projection)
    source = tiny_bundle.with_heads(random_heads(tiny_bundle, heads_config), heads_config, tree=((0,), (0, 0), (1,)))
    save_heads(source, out_dir=tmp_path)
    info = json.loads((tmp_path / "heads_config.json").read_text())
    assert (info["num_heads"], info["num_layers"], info["projection"]) == (3, num_layers, projection)
    assert (info["hidden_size"], info["vocab_size"]) == (64, 256)
    loaded = attach_heads(tiny_bundle, tmp_path)
    assert loaded.heads_config == heads_config and loaded.tree == source.tree
    assert set(loaded.heads) == set(source.heads)
    jax.tree.map(np.testing.assert_array_equal, loaded.heads, source.heads)
    via_load = medusa_jax.load("tiny", heads=tmp_path / "medusa_lm_head.safetensors", dtype="bfloat16")
    assert via_load.heads_config == heads_config and via_load.heads["res_0_kernel"].dtype == jax.numpy.bfloat16


def test_params_dict_export_needs_config(tiny_bundle, tmp_path):
    heads_config = HeadsConfig(num_heads=2, projection="own")
    heads = random_heads(tiny_bundle, heads_config)
    with pytest.raises(MedusaError, match="pass heads_config"):
        save_heads(heads, None, tmp_path)
    save_heads(heads, heads_config, tmp_path)
    jax.tree.map(np.testing.assert_array_equal, attach_heads(tiny_bundle, tmp_path).heads, heads)
    with pytest.raises(MedusaError, match="the bundle has no Medusa heads"):
        save_heads(tiny_bundle, out_dir=tmp_path)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_import_original_pt(tiny_bundle, tmp_path, num_layers):
    """A pickled OrderedDict as Medusa v0.1 saved it; with 2 layers both keys hold the same (aliased) tensor."""
    heads = original_heads(3, num_layers, 64, 256)
    state = collections.OrderedDict(heads.state_dict())
    if num_layers == 2:
        assert state["0.0.linear.weight"].data_ptr() == state["0.1.linear.weight"].data_ptr()
    torch.save(state, tmp_path / "medusa_lm_head.pt")
    # The published configs under-count heads; the weights decide.
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    bundle = medusa_jax.load("tiny", heads=tmp_path)
    assert bundle.heads_config == HeadsConfig(num_heads=3, num_layers=num_layers, projection="own")
    np.testing.assert_array_equal(np.asarray(bundle.heads["res_0_kernel"][1]), state["1.0.linear.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(bundle.heads["proj"][2]), state[f"2.{num_layers}.weight"].numpy().T)
    hidden = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    with torch.no_grad():
        want = np.stack([h(torch.tensor(hidden)).numpy() for h in heads], axis=1)  # [5, K, V]
    np.testing.assert_allclose(ours_logits(bundle, hidden), want, atol=1e-5)


def test_import_version2_safetensors(tiny_bundle, tmp_path):
    """Shared-projection ("version 2") files have no `{i}.{n}.weight`: the heads reuse the base lm_head."""
    from safetensors.torch import save_file

    heads = original_heads(2, 1, 64, 256, own=False)
    save_file(heads.state_dict(), str(tmp_path / "medusa_lm_head.safetensors"))
    bundle = attach_heads(tiny_bundle, tmp_path / "medusa_lm_head.safetensors")
    assert bundle.heads_config == HeadsConfig(num_heads=2, num_layers=1, projection="shared")
    hidden = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
    lm_head = torch.tensor(np.asarray(model.lm_head_kernel(tiny_bundle.config, tiny_bundle.base)))
    with torch.no_grad():
        want = np.stack([(h(torch.tensor(hidden)) @ lm_head).numpy() for h in heads], axis=1)
    np.testing.assert_allclose(ours_logits(bundle, hidden), want, atol=1e-5)


def test_export_serves_in_original_module(tiny_bundle, tmp_path):
    """Our exported file loads strictly into the original PyTorch head modules and computes the same logits."""
    from safetensors.torch import load_file

    heads_config = HeadsConfig(num_heads=4, num_layers=1, projection="own")
    bundle = tiny_bundle.with_heads(random_heads(tiny_bundle, heads_config, seed=3), heads_config)
    save_heads(bundle, out_dir=tmp_path)
    torch_heads = original_heads(4, 1, 64, 256, seed=9)
    torch_heads.load_state_dict(load_file(str(tmp_path / "medusa_lm_head.safetensors")), strict=True)
    hidden = np.random.default_rng(2).normal(size=(3, 64)).astype(np.float32)
    with torch.no_grad():
        want = np.stack([h(torch.tensor(hidden)).numpy() for h in torch_heads], axis=1)
    np.testing.assert_allclose(ours_logits(bundle, hidden), want, atol=1e-5)


def _save(state, path):
    torch.save(collections.OrderedDict(state), path)
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda s: original_heads(2, 1, 32, 256).state_dict(),
     r"heads have hidden size 32 .* base model has hidden size 64"),
    (lambda s: original_heads(2, 1, 64, 100).state_dict(),
     r"vocabulary does not match: '0\.1\.weight' is \[100, 64\] but the base model has vocabulary 256"),
    (lambda s: {k: v for k, v in s.items() if k != "1.0.linear.bias"}, r"'1\.0\.linear\.bias' is missing"),
    (lambda s: {**s, "foo.weight": s["0.1.weight"]}, r"unexpected key 'foo\.weight'"),
    (lambda s: {k: v for k, v in s.items() if k != "1.1.weight"}, r"projection keys .* do not match 2 heads"),
    (lambda s: {("2" + k[1:] if k.startswith("1.") else k): v for k, v in s.items()},
     r"head indices \[0, 2\] are not 0\.\.K-1"),
])
def test_bad_head_files(tiny_bundle, tmp_path, edit, match):
    state = edit(original_heads(2, 1, 64, 256).state_dict())
    with pytest.raises(MedusaError, match=match) as info:
        attach_heads(tiny_bundle, _save(state, tmp_path / "medusa_lm_head.pt"))
    assert "\n" not in str(info.value)


def test_bad_head_paths(tiny_bundle, tmp_path):
    with pytest.raises(MedusaError, match=r"missing: file not found"):
        attach_heads(tiny_bundle, tmp_path / "missing")
    with pytest.raises(MedusaError, match=r"no Medusa head file"):
        attach_heads(tiny_bundle, tmp_path)
    (tmp_path / "medusa_lm_head.pt").write_bytes(b"garbage")
    with pytest.raises(MedusaError, match=r"medusa_lm_head\.pt: cannot read PyTorch weights"):
        attach_heads(tiny_bundle, tmp_path)
    _save(original_heads(2, 1, 64, 256).state_dict(), tmp_path / "medusa_lm_head.pt")
    (tmp_path / "tree.json").write_text(json.dumps({"tree": [[0], [0, 0, 0]]}))
    with pytest.raises(MedusaError, match=r"tree path \[0, 0, 0\] .* deeper than the 2 heads"):
        attach_heads(tiny_bundle, tmp_path)
    (tmp_path / "tree.json").write_text(json.dumps([[0]]))
    with pytest.raises(MedusaError, match=r"tree\.json: expected"):
        attach_heads(tiny_bundle, tmp_path)

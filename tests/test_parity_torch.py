"""Logits parity with transformers' PyTorch LlamaForCausalLM for checkpoints saved in every HF layout, and export."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import medusa_jax  # noqa: E402
from medusa_jax.loading import save_hf  # noqa: E402

CONFIGS = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa_head_dim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=8),  # head_dim != hidden / heads
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=500.0),
}


def _ids(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 24))


def _torch_logits(net, ids) -> np.ndarray:
    with torch.no_grad():
        return net(torch.tensor(ids)).logits.float().numpy()


def _save_bin(net, directory, shards: int = 1):
    """pytorch_model.bin (or `shards` pickled shards + index), as transformers 4.x wrote them."""
    directory.mkdir(parents=True)
    net.config.save_pretrained(directory)
    state = net.state_dict()
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = list(state)
    weight_map = {}
    for s, chunk in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        torch.save({keys[i]: state[keys[i]] for i in chunk}, directory / name)
        weight_map.update({keys[i]: name for i in chunk})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _assert_parity(net, directory):
    bundle = medusa_jax.load(directory)
    ids = _ids(net.config.vocab_size)
    ours = np.asarray(medusa_jax.forward_logits(bundle, ids))
    np.testing.assert_array_less(np.abs(ours - _torch_logits(net, ids)).max(), 1e-4)
    return bundle


@pytest.mark.parametrize("name", list(CONFIGS))
def test_safetensors_parity(torch_llama, tmp_path, name):
    net = torch_llama(**CONFIGS[name])
    net.save_pretrained(tmp_path / "model")
    bundle = _assert_parity(net, tmp_path / "model")
    assert bundle.config.tie_embeddings == bool(net.config.tie_word_embeddings)
    assert bundle.config.rope_scaling == (4.0 if name == "linear_rope" else None)
    assert ("lm_head" in bundle.base) != bundle.config.tie_embeddings


@pytest.mark.parametrize("layout", ["bin", "sharded_safetensors", "sharded_bin"])
@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied"])
def test_other_layouts_parity(torch_llama, tmp_path, layout, name):
    net = torch_llama(seed=1, **CONFIGS[name])
    directory = tmp_path / "model"
    if layout == "bin":
        _save_bin(net, directory)
    elif layout == "sharded_bin":
        _save_bin(net, directory, shards=3)
    else:
        net.save_pretrained(directory, max_shard_size="40KB")
        assert len(list(directory.glob("model-*.safetensors"))) > 1
    _assert_parity(net, directory)


def test_bin_is_only_read_with_weights_only(torch_llama, tmp_path, monkeypatch):
    net = torch_llama()
    _save_bin(net, tmp_path / "model")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    medusa_jax.load(tmp_path / "model")
    assert calls and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied", "linear_rope"])
def test_export_round_trip(torch_llama, tmp_path, name):
    net = torch_llama(seed=2, **CONFIGS[name])
    net.save_pretrained(tmp_path / "src")
    bundle = medusa_jax.load(tmp_path / "src")
    save_hf(bundle, tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    want, got = net.state_dict(), reloaded.state_dict()
    assert set(want) == set(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    ids = _ids(net.config.vocab_size, seed=3)
    np.testing.assert_array_equal(_torch_logits(reloaded, ids), _torch_logits(net, ids))
    ours = medusa_jax.load(tmp_path / "out")
    assert ours.config == bundle.config.__class__(**{**bundle.config.__dict__, "name": "out"})
    jax.tree.map(np.testing.assert_array_equal, ours.base, bundle.base)


def test_export_bfloat16_and_pickle(torch_llama, tmp_path):
    net = torch_llama(seed=4)
    net.save_pretrained(tmp_path / "src")
    bf16 = medusa_jax.load(tmp_path / "src", dtype="bfloat16")
    save_hf(bf16, tmp_path / "bf16")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    state = reloaded.state_dict()
    for key, want in net.state_dict().items():
        assert torch.equal(state[key], want.to(torch.bfloat16)), key
    save_hf(medusa_jax.load(tmp_path / "src"), tmp_path / "pickle", safe=False)
    assert (tmp_path / "pickle" / "pytorch_model.bin").is_file()
    jax.tree.map(np.testing.assert_array_equal, medusa_jax.load(tmp_path / "pickle").base,
                 medusa_jax.load(tmp_path / "src").base)

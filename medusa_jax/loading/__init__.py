"""Checkpoint loading: `load()` turns a source (embedded default, HF directory, GGUF file, "tiny") into a Bundle.

Every reader yields params in the `model.Llama` layout (see `names`), cast tensor by tensor to the requested
jax dtype as they are read, so a checkpoint is never held twice in host memory. The embedded model's float32
params and tokenizer are kept in memory per process, so repeated `load()` calls (tests, benchmarks) dequantize
the 98 MB GGUF only once.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import model
from medusa_jax.bundle import Bundle
from medusa_jax.config import LlamaConfig, tiny
from medusa_jax.errors import MedusaError
from medusa_jax.loading import embedded, gguf_file, hf, heads_io

DTYPES = ("float32", "bfloat16", "float16")
# Heads shipped with the repository for the embedded model (trained by train/; absent until then).
DEFAULT_HEADS_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2_135m"
_EMBEDDED: dict[tuple, tuple[LlamaConfig, Any, Any]] = {}  # file identity -> (config, f32 jax params, tokenizer)


def _dtype(dtype: Any) -> jnp.dtype:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPES:
        raise MedusaError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return resolved


def _caster(dtype: jnp.dtype):
    return lambda array: jnp.asarray(array, dtype)


def _to_jax(params: Any, dtype: jnp.dtype) -> Any:
    return jax.tree.map(_caster(dtype), params)


def _load_embedded() -> tuple[LlamaConfig, Any, Any, str]:
    path = embedded.gguf_path()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _EMBEDDED:
        config, params, _ = gguf_file.read(path, _caster(jnp.float32))
        config = dataclasses.replace(config, name=embedded.CONFIG_NAME)
        _EMBEDDED.clear()  # one embedded model per process
        _EMBEDDED[key] = (config, params, embedded.load_tokenizer(path))
    config, params, tokenizer = _EMBEDDED[key]
    return config, params, tokenizer, str(path)


def _load_path(source: str | os.PathLike, dtype: jnp.dtype) -> tuple[LlamaConfig, Any, Any, str]:
    path = Path(source).expanduser()
    if path.is_dir():
        config, params = hf.read(path, _caster(dtype))
        return config, params, hf.load_tokenizer(path), str(path)
    if path.is_file() and path.suffix == ".gguf":
        config, params, has_tokenizer = gguf_file.read(path, _caster(dtype))
        return config, params, gguf_file.load_tokenizer(path) if has_tokenizer else None, str(path)
    if path.is_file():
        raise MedusaError(f"{path}: not a .gguf file; pass a .gguf file or a Hugging Face model directory "
                          "(the folder holding config.json)")
    raise MedusaError(f"{path}: file or directory not found; pass a Hugging Face model directory, a .gguf file, "
                      "'tiny', or nothing for the embedded SmolLM2-135M-Instruct")


def load(source: str | os.PathLike | None = None, *, heads: str | os.PathLike | bool | None = None,
         dtype: Any = "float32") -> Bundle:
    """Loads a LLaMA-family model and, optionally, Medusa heads.

    Args:
      source: None for the embedded SmolLM2-135M-Instruct; a Hugging Face LLaMA directory (config.json +
        safetensors or pytorch_model.bin, sharded or not); a `.gguf` file; or "tiny" (random `config.tiny()` model,
        seed 0, no tokenizer).
      heads: a Medusa heads directory or head file; None attaches the heads shipped in `checkpoints/smollm2_135m/`
        for the embedded model (when present) and nothing otherwise; True requires those shipped heads; False
        never attaches heads.
      dtype: "float32", "bfloat16" or "float16" for all parameters.
    Returns:
      a Bundle; its tokenizer is None when the source has none.
    """
    dtype = _dtype(dtype)
    if source is None:
        config, params, tokenizer, where = _load_embedded()
        if heads is True or heads is None and any((DEFAULT_HEADS_DIR / f).is_file() for f in heads_io.HEAD_FILES):
            heads = DEFAULT_HEADS_DIR  # heads=True insists: a missing folder is then an error
    elif isinstance(source, str) and source == "tiny":
        config, tokenizer, where = tiny(), None, "tiny"
        params = model.init_base(config, jax.random.PRNGKey(0), jnp.float32)
    elif isinstance(source, (str, os.PathLike)):
        config, params, tokenizer, where = _load_path(source, dtype)
    else:
        raise MedusaError(f"source {source!r} is not a path; pass a directory, a .gguf file, 'tiny' or None")
    if heads is True:
        raise MedusaError("heads=True only applies to the embedded model; pass the path of a Medusa heads directory")
    bundle = Bundle(base=_to_jax(params, dtype), config=config, tokenizer=tokenizer, source=where)
    if heads not in (None, False):
        bundle = attach_heads(bundle, heads)
    return bundle


def attach_heads(bundle: Bundle, path: str | os.PathLike) -> Bundle:
    """The bundle with the Medusa heads (and tree.json's tree and lookup chain, if any) from a heads directory or
    file, in its dtype."""
    params, heads_config, (tree, lookup) = heads_io.read_heads(path, bundle.config)
    return bundle.with_heads(_to_jax(params, bundle.dtype), heads_config, tree, lookup)


def save_hf(bundle: Bundle, out_dir: str | os.PathLike, safe: bool = True) -> Path:
    """Exports the base model as a Hugging Face directory `LlamaForCausalLM.from_pretrained` loads.

    Writes config.json, generation_config.json, model.safetensors (or pytorch_model.bin with safe=False) in the
    bundle's dtype, and the tokenizer files when the bundle has a tokenizer. Heads are saved by `save_heads`.
    """
    base = jax.tree.map(np.asarray, bundle.base)
    return hf.save(bundle.config, base, bundle.tokenizer, out_dir, safe=safe)


save_heads = heads_io.save_heads

__all__ = ["DTYPES", "attach_heads", "load", "save_heads", "save_hf"]

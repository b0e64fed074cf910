"""Hugging Face LLaMA checkpoint directories: config.json mapping, weight reading, and export.

Weights may be `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, or
`pytorch_model.bin` (optionally sharded with `pytorch_model.bin.index.json`). PyTorch files are only ever read with
`torch.load(..., weights_only=True)`, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medusa_jax.config import LlamaConfig
from medusa_jax.errors import MedusaError
from medusa_jax.loading import names

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MedusaError(f"{path}: file not found; a Hugging Face model directory needs config.json and "
                          "its weights") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MedusaError(f"{path}: cannot read JSON ({type(e).__name__}: {e}); re-download or fix the file") from None
    if not isinstance(data, dict):
        raise MedusaError(f"{path}: expected a JSON object; re-download or fix the file")
    return data


def _rope(cfg: dict, where: Path) -> tuple[float, float | None]:
    """(rope_theta, linear scaling factor or None) from the transformers 4 or 5 config layout."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in ("default", None):
        return float(theta), None
    if kind != "linear":
        raise MedusaError(f"{where}: rope scaling type {kind!r} is not supported; medusa-jax supports "
                          "default and linear RoPE only")
    factor = float(scaling.get("factor", 1.0))
    return float(theta), (factor if factor != 1.0 else None)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def read_config(directory: Path) -> LlamaConfig:
    """Maps `config.json` (plus `generation_config.json` end-of-turn ids) to a `LlamaConfig`."""
    where = directory / "config.json"
    if not where.is_file():
        raise MedusaError(f"{directory}: no config.json; pass a Hugging Face model directory (config.json + "
                          "weights) or a .gguf file")
    cfg = _read_json(where)
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "mistral"):
        raise MedusaError(f"{where}: model_type {model_type!r} is not supported; medusa-jax loads LLaMA-architecture "
                          "models (model_type llama, or mistral without sliding window)")
    if model_type == "mistral" and cfg.get("sliding_window") is not None:
        raise MedusaError(f"{where}: sliding_window={cfg['sliding_window']} attention is not supported; "
                          "use a checkpoint without a sliding window")
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if not any(a in ("LlamaForCausalLM", "MistralForCausalLM") for a in archs):
        raise MedusaError(f"{where}: architectures {archs} are not supported; expected LlamaForCausalLM")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise MedusaError(f"{where}: {flag}=true is not supported; medusa-jax's LLaMA has no biases")
    if cfg.get("hidden_act", "silu") != "silu":
        raise MedusaError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported; LLaMA uses silu")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        theta, scaling = _rope(cfg, where)
        generation = directory / "generation_config.json"
        eos = _ids(cfg.get("eos_token_id"))
        if generation.is_file():
            eos += tuple(i for i in _ids(_read_json(generation).get("eos_token_id")) if i not in eos)
        return LlamaConfig(
            name=directory.resolve().name, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), rope_theta=theta, rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=int(cfg.get("bos_token_id") if cfg.get("bos_token_id") is not None else 1),
            eos_token_ids=eos or (2,), max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)))
    except KeyError as e:
        raise MedusaError(f"{where}: required field {e.args[0]!r} is missing; fix config.json") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, MedusaError):
            raise
        raise MedusaError(f"{where}: invalid value ({e}); fix config.json") from None


def _safetensors_reader(path: Path) -> dict[str, Callable[[], np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
        handle = safe_open(str(path), framework="numpy")
        keys = list(handle.keys())
        # safe_open checks the header only: a cut-off download fails here, before any tensor is read.
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise SafetensorError("data ends before the last tensor")
    except (SafetensorError, OSError, ValueError) as e:
        raise MedusaError(f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt, "
                          "re-download it") from None

    def get(key):
        try:
            return handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - any read failure is a corrupt file
            raise MedusaError(f"{path}: cannot read tensor {key!r} ({e}); re-download the file") from None

    return {k: (lambda k=k: get(k)) for k in keys}


def torch_reader(path: Path) -> dict[str, Callable[[], np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise MedusaError(f"{path}: reading pytorch_model.bin needs torch (pip install torch); "
                          "or convert to safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise MedusaError(f"{path}: cannot read PyTorch weights ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          "re-download the file or convert it to safetensors") from None
    if not isinstance(state, dict):
        raise MedusaError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")

    def to_numpy(t):
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: widen exactly to float32
            t = t.float()
        return t.numpy()

    return {k: (lambda t=t: to_numpy(t)) for k, t in state.items()}


def _read_index(index: Path, reader) -> dict[str, Callable[[], np.ndarray]]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise MedusaError(f"{index}: no weight_map; re-download the index file")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.is_file():
            raise MedusaError(f"{path}: shard listed in {index.name} is missing; download all shards")
        tensors.update(reader(path))
    return tensors


def read_weights(directory: Path) -> dict[str, Callable[[], np.ndarray]]:
    """HF name -> lazy array for whichever weight layout the directory holds (safetensors preferred)."""
    layouts = [("model.safetensors", _safetensors_reader, False), ("model.safetensors.index.json",
               _safetensors_reader, True), ("pytorch_model.bin", torch_reader, False),
               ("pytorch_model.bin.index.json", torch_reader, True)]
    for filename, reader, indexed in layouts:
        path = directory / filename
        if path.is_file():
            return _read_index(path, reader) if indexed else reader(path)
    raise MedusaError(f"{directory}: no weights found (expected model.safetensors, model.safetensors.index.json, "
                      "pytorch_model.bin or pytorch_model.bin.index.json)")


def load_tokenizer(directory: Path):
    """The directory's transformers tokenizer, or None when it ships no tokenizer files."""
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)  # never prompt, never run
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise MedusaError(f"{directory}: cannot load the tokenizer: it asks to run custom Python code from the "
                              "folder (auto_map), which medusa-jax never does; use a standard tokenizer.json") from None
        raise MedusaError(f"{directory}: cannot load the tokenizer ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); fix or remove the tokenizer files") from None


def read(directory: Path, convert: Callable[[np.ndarray], Any] = lambda array: array) -> tuple[LlamaConfig, dict]:
    """(config, base params) of a HF LLaMA directory; `convert` maps each numpy array as it is read."""
    config = read_config(directory)
    return config, names.hf_to_params(config, read_weights(directory), str(directory), convert=convert)


def config_json(config: LlamaConfig, dtype: str) -> dict:
    """A transformers `LlamaConfig` dict (both the 4.x `rope_theta`/`rope_scaling` and 5.x `rope_parameters`)."""
    rope = {"rope_type": "linear", "factor": config.rope_scaling} if config.rope_scaling else None
    eos = list(config.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": rope,
        "rope_parameters": {"rope_theta": config.rope_theta, **(rope or {"rope_type": "default"})},
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": dtype, "dtype": dtype,
    }


def save(config: LlamaConfig, base: dict, tokenizer, out_dir: str | os.PathLike, safe: bool = True) -> Path:
    """Writes config.json, generation_config.json and model.safetensors (or pytorch_model.bin) to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = names.params_to_hf(config, base)
    dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
        next(iter(tensors.values())).dtype, "bfloat16")
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(config_json(config, dtype), f, indent=2)
    with open(out / "generation_config.json", "w", encoding="utf-8") as f:
        eos = list(config.eos_token_ids)
        json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}, f,
                  indent=2)
    if safe:
        from safetensors.numpy import save_file

        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        try:
            import torch
        except ImportError:
            raise MedusaError("writing pytorch_model.bin needs torch (pip install torch); or use safe=True") from None
        # numpy has no bfloat16 for torch to take over: go through float32 (exact both ways)
        state = {k: (torch.tensor(v.astype(np.float32)).to(torch.bfloat16) if dtype == "bfloat16"
                     else torch.tensor(v)) for k, v in tensors.items()}
        torch.save(state, out / "pytorch_model.bin")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out

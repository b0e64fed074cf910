"""Tensor names of the checkpoint formats and how they map onto `model.Llama` params.

Three namings meet here:
  * Hugging Face `LlamaForCausalLM` state-dict keys (`model.layers.3.self_attn.q_proj.weight`, [out, in] layout);
  * GGUF / llama.cpp tensor names (`blk.3.attn_q.weight`), converted to the HF name first;
  * our Flax params paths (`layers_3/attn/o/kernel`, [in, out] layout, i.e. the HF weight transposed). Q, K and V
    share one kernel `attn/qkv/kernel` [H, Kv, G + 2, D] (per KV group: its G query heads, its key, its value) and the
    SwiGLU gate and up projections share `mlp/gate_up/kernel` [H, 2, I]: one matmul each instead of three and two
    (see `model.Attention`).

Every reader produces a {HF name: numpy array in HF layout} dict and calls `hf_to_params`, which checks names and
shapes against the config, so all formats share one set of checks and error messages.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from medusa_jax.config import LlamaConfig
from medusa_jax.errors import MedusaError

# Per-layer tensors: HF suffix (after `model.layers.{i}.`) -> (params path inside `layers_{i}`, transposed).
_LAYER = {
    "self_attn.o_proj.weight": (("attn", "o", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down", "kernel"), True),
    "input_layernorm.weight": (("attn_norm", "scale"), False),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
}
# Per-layer tensors stored as a part of a fused kernel: HF suffix -> (params path, which part).
_FUSED = {
    "self_attn.q_proj.weight": (("attn", "qkv", "kernel"), "q"),
    "self_attn.k_proj.weight": (("attn", "qkv", "kernel"), "k"),
    "self_attn.v_proj.weight": (("attn", "qkv", "kernel"), "v"),
    "mlp.gate_proj.weight": (("mlp", "gate_up", "kernel"), "gate"),
    "mlp.up_proj.weight": (("mlp", "gate_up", "kernel"), "up"),
}
_GLOBAL = {
    "model.embed_tokens.weight": (("embed", "embedding"), False),
    "model.norm.weight": (("final_norm", "scale"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
# Buffers some old checkpoints saved next to the weights; recomputed by the model, so skipped.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# llama.cpp name -> HF name (per-layer names take the layer index).
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF LLaMA checkpoint of `config` holds, with its [out, in] shape."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layer = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
             "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
             "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
             "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(config.num_layers):
        shapes.update({f"model.layers.{n}.{suffix}": shape for suffix, shape in layer.items()})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def param_path(hf_name: str) -> tuple[tuple[str, ...], bool]:
    """HF name of an unfused tensor -> (path in the Flax params tree, whether the array is stored transposed)."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, n, suffix = hf_name.split(".", 3)
    path, transposed = _LAYER[suffix]
    return (f"layers_{n}",) + path, transposed


FUSED_PARTS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}  # fused kernel -> its parts, in order


def fused_part(config: LlamaConfig, part: str) -> tuple[tuple, tuple[int, ...]]:
    """Where a fused part sits in its kernel (an index into it) and the part's shape there. q/k/v: kernel
    [H, Kv, G + 2, D], query heads at [:, :, :G] (head h = group h // G), key at [:, :, G], value at [:, :, G + 1];
    gate/up: kernel [H, 2, I] at [:, 0] and [:, 1]."""
    kv, d, h, i = config.num_kv_heads, config.head_dim, config.hidden_size, config.intermediate_size
    g = config.num_heads // kv
    every = slice(None)
    return {"q": ((every, every, slice(0, g)), (h, kv, g, d)), "k": ((every, every, g), (h, kv, d)),
            "v": ((every, every, g + 1), (h, kv, d)), "gate": ((every, 0), (h, i)), "up": ((every, 1), (h, i))}[part]


def _fused(hf_name: str) -> tuple[tuple[str, ...], str] | None:
    """(params path of the fused kernel, part) for a tensor stored inside one, else None."""
    if not hf_name.startswith("model.layers."):
        return None
    _, _, n, suffix = hf_name.split(".", 3)
    if suffix not in _FUSED:
        return None
    sub, part = _FUSED[suffix]
    return (f"layers_{n}",) + sub, part


def fused_shape(config: LlamaConfig, kernel: str) -> tuple[int, ...]:
    """Shape of a fused kernel: "qkv" [H, Kv, G + 2, D] or "gate_up" [H, 2, I]."""
    kv, d, h, i = config.num_kv_heads, config.head_dim, config.hidden_size, config.intermediate_size
    return {"qkv": (h, kv, config.num_heads // kv + 2, d), "gate_up": (h, 2, i)}[kernel]


def hf_to_params(config: LlamaConfig, tensors: Mapping[str, Callable[[], np.ndarray]], where: str,
                 display: Callable[[str], str] = lambda name: name,
                 convert: Callable[[np.ndarray], Any] = lambda array: array) -> dict:
    """Builds the Flax base params from HF-named tensors, checking every name and shape against `config`.

    Args:
      config: the model's config (shapes are checked against it).
      tensors: HF name -> zero-argument function returning the array in HF [out, in] layout (lazy, so a checkpoint
        is read one tensor at a time).
      where: the file or directory, for error messages.
      display: maps a HF name to the name the user's file uses (GGUF names), for error messages.
      convert: applied to each array in our layout as soon as it is complete (e.g. the cast to a jax array), so a
        checkpoint never sits in host memory twice (a fused kernel is assembled in numpy first).
    Returns:
      nested dicts of converted arrays (numpy by default) in the `model.Llama` params layout.
    """
    expected = hf_shapes(config)
    unknown = [n for n in tensors if n not in expected and not _IGNORED.fullmatch(n)
               and not (n == "lm_head.weight" and config.tie_embeddings)]
    if unknown:
        raise MedusaError(f"{where}: unexpected tensor {display(unknown[0])!r} for a LLaMA model "
                          f"({len(unknown)} unexpected in all); this checkpoint is not a plain LlamaForCausalLM")
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise MedusaError(f"{where}: tensor {display(missing[0])!r} is missing ({len(missing)} missing in all); "
                          "the checkpoint is incomplete or does not match its config")
    params: dict = {}
    pending: dict[tuple[str, ...], tuple[np.ndarray, int]] = {}  # fused kernels being filled: (array, parts left)

    def put(path: tuple[str, ...], value: Any) -> None:
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    for name, shape in expected.items():
        array = tensors[name]()
        if tuple(array.shape) != shape:
            raise MedusaError(f"{where}: tensor {display(name)!r} has shape {list(array.shape)} but the config "
                              f"implies {list(shape)}; the weights do not match the config")
        fused = _fused(name)
        if fused:
            path, part = fused
            if path not in pending:
                pending[path] = (np.empty(fused_shape(config, path[-2]), array.dtype), len(FUSED_PARTS[path[-2]]))
            kernel, left = pending[path]
            if array.dtype != kernel.dtype and kernel.dtype != np.float32:  # mixed precision: float32 holds all
                kernel = kernel.astype(np.float32)
            index, ours = fused_part(config, part)
            kernel[index] = array.T.reshape(ours)
            if left == 1:
                del pending[path]
                put(path, convert(kernel))
            else:
                pending[path] = (kernel, left - 1)
            continue
        path, transposed = param_path(name)
        put(path, convert(array.T if transposed else array))  # .T is a view: `convert` copies at most once
    return params


def hf_tensor(config: LlamaConfig, base: Mapping, hf_name: str) -> np.ndarray:
    """One HF-named tensor, in HF [out, in] layout, read from Flax params (a view where the layout allows)."""
    fused = _fused(hf_name)
    path, transposed = (fused[0], True) if fused else param_path(hf_name)
    array = base
    for key in path:
        array = array[key]
    array = np.asarray(array)
    if fused:
        index, _ = fused_part(config, fused[1])
        array = array[index].reshape(array.shape[0], -1)  # [in, out]
    return array.T if transposed else array


def params_to_hf(config: LlamaConfig, base: Mapping) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_params`: Flax params -> {HF name: array in [out, in] layout} (tied lm_head omitted)."""
    return {name: np.ascontiguousarray(hf_tensor(config, base, name)) for name in hf_shapes(config)}


def gguf_to_hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> HF name, or None for a name outside the LLaMA layout."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight"
    return None


def hf_to_gguf_name(hf_name: str) -> str:
    """HF name -> llama.cpp tensor name (for messages and for writing test files)."""
    for gguf_name, hf in _GGUF_GLOBAL.items():
        if hf == hf_name:
            return gguf_name
    _, _, n, rest = hf_name.split(".", 3)
    module = rest.rsplit(".", 1)[0]
    short = next(g for g, h in _GGUF_LAYER.items() if h == module)
    return f"blk.{n}.{short}.weight"

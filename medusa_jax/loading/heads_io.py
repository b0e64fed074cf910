"""Medusa head files in the original PyTorch Medusa format: import and export.

File format (state dict of the original `nn.ModuleList` of heads, no prefix), for head i with n residual layers:
  `{i}.{j}.linear.weight` [H, H] and `{i}.{j}.linear.bias` [H] for j < n,
  `{i}.{n}.weight` [V, H], the head's own vocabulary projection; absent in "version 2" files, whose heads reuse
  the base lm_head (our `projection="shared"`).
Heads and layers are counted from the weights: the configs published with the original checkpoints are wrong
(they say 2 heads for files holding 5). Original files with n > 1 store one tensor aliased under every layer key
(the original repeated one module); importing gives every layer its own copy.

A heads directory holds `medusa_lm_head.safetensors` (or `.pt`), `heads_config.json` (informational) and optionally
`tree.json` = {"tree": [[0], [0, 0], ...], "lookup": L}, the default draft tree for these heads and the length of its
lookup chain (optional; 0 when absent).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from medusa_jax.config import HeadsConfig, LlamaConfig
from medusa_jax.errors import MedusaError
from medusa_jax.loading import hf

HEAD_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
_LINEAR = re.compile(r"(\d+)\.(\d+)\.linear\.(weight|bias)")
_PROJ = re.compile(r"(\d+)\.(\d+)\.weight")


def find_head_file(path: str | os.PathLike) -> Path:
    """A head file path, given the file itself or a directory holding one of `HEAD_FILES`."""
    path = Path(path)
    if path.is_dir():
        for name in HEAD_FILES:
            if (path / name).is_file():
                return path / name
        raise MedusaError(f"{path}: no Medusa head file (expected {' or '.join(HEAD_FILES)}); pass the heads "
                          "directory or file")
    if not path.is_file():
        raise MedusaError(f"{path}: file not found; pass a Medusa heads directory or a medusa_lm_head file")
    return path


def _read_state(path: Path) -> dict[str, np.ndarray]:
    if path.suffix in (".pt", ".bin", ".pth"):  # the same weights_only reader as pytorch_model.bin files
        return {k: read() for k, read in hf.torch_reader(path).items()}
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MedusaError(f"{path}: not a readable safetensors file ({e}); re-download it") from None


def read_tree(path: Path, num_heads: int) -> tuple[tuple | None, int]:
    """(paths of `tree.json` as a tuple of tuples, its lookup chain length), or (None, 0) without such a file."""
    from medusa_jax.tree import check_lookup

    if not path.is_file():
        return None, 0
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        paths = tuple(tuple(int(c) for c in p) for p in record["tree"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MedusaError(f"{path}: expected {{\"tree\": [[0], [0, 0], ...]}} ({type(e).__name__}: {e}); "
                          "fix or delete tree.json") from None
    bad = [p for p in paths if not p or len(p) > num_heads or min(p) < 0]
    if bad:
        raise MedusaError(f"{path}: tree path {list(bad[0])} is empty, negative, or deeper than the {num_heads} "
                          "heads; fix tree.json")
    return paths, check_lookup(record.get("lookup", 0), f'{path}: "lookup"')


def state_to_heads(state: Mapping[str, np.ndarray], config: LlamaConfig, where: str) -> tuple[dict, HeadsConfig]:
    """Original-format state dict -> (our head params as float32 numpy, HeadsConfig), validated against the base."""
    if state and all(k.startswith("medusa_head.") for k in state):  # heads saved inside a full Medusa-2 model
        state = {k[len("medusa_head."):]: v for k, v in state.items()}
    linear: dict[tuple[int, int, str], np.ndarray] = {}
    proj: dict[int, tuple[int, np.ndarray]] = {}
    for key, value in state.items():
        if m := _LINEAR.fullmatch(key):
            linear[int(m.group(1)), int(m.group(2)), m.group(3)] = np.asarray(value, np.float32)
        elif m := _PROJ.fullmatch(key):
            proj[int(m.group(1))] = (int(m.group(2)), np.asarray(value, np.float32))
        else:
            raise MedusaError(f"{where}: unexpected key {key!r}; expected Medusa head keys like '0.0.linear.weight'")
    num_heads = len({i for i, _, _ in linear})
    if not linear or {i for i, _, _ in linear} != set(range(num_heads)):
        raise MedusaError(f"{where}: head indices {sorted({i for i, _, _ in linear})} are not 0..K-1; "
                          "the file is not a Medusa head file")
    num_layers = len({j for _, j, _ in linear})
    for i in range(num_heads):
        for j in range(num_layers):
            for part in ("weight", "bias"):
                if (i, j, part) not in linear:
                    raise MedusaError(f"{where}: key '{i}.{j}.linear.{part}' is missing; every head needs "
                                      f"{num_layers} residual layers")
    if proj and (set(proj) != set(range(num_heads)) or any(j != num_layers for j, _ in proj.values())):
        raise MedusaError(f"{where}: projection keys {sorted(f'{i}.{j}.weight' for i, (j, _) in proj.items())} "
                          f"do not match {num_heads} heads of {num_layers} layers")
    h, v = config.hidden_size, config.vocab_size
    for (i, j, part), w in linear.items():
        if w.shape != ((h, h) if part == "weight" else (h,)):
            raise MedusaError(f"{where}: heads have hidden size {w.shape[-1]} ('{i}.{j}.linear.{part}' "
                              f"{list(w.shape)}) but the base model has hidden size {h}; use heads trained for "
                              "this base model")
    for i, (j, w) in proj.items():
        if w.shape != (v, h):
            which = "vocabulary" if w.shape[-1] == h else "hidden size"
            raise MedusaError(f"{where}: heads' {which} does not match: '{i}.{j}.weight' is {list(w.shape)} but the "
                              f"base model has vocabulary {v} and hidden size {h}; use heads trained for this "
                              "base model")
    heads_config = HeadsConfig(num_heads=num_heads, num_layers=num_layers, projection="own" if proj else "shared")
    params = {}
    for j in range(num_layers):
        params[f"res_{j}_kernel"] = np.stack([linear[i, j, "weight"].T for i in range(num_heads)])  # [K, H, H]
        params[f"res_{j}_bias"] = np.stack([linear[i, j, "bias"] for i in range(num_heads)])  # [K, H]
    if proj:
        params["proj"] = np.stack([proj[i][1].T for i in range(num_heads)])  # [K, H, V]
    return params, heads_config


def read_heads(path: str | os.PathLike, config: LlamaConfig) -> tuple[dict, HeadsConfig, tuple[tuple | None, int]]:
    """(float32 numpy head params, HeadsConfig, (tree paths or None, lookup chain)) from a heads directory or head
    file (`read_tree`)."""
    file = find_head_file(path)
    params, heads_config = state_to_heads(_read_state(file), config, str(file))
    return params, heads_config, read_tree(file.parent / "tree.json", heads_config.num_heads)


def heads_to_state(heads: Mapping[str, Any], heads_config: HeadsConfig) -> dict[str, np.ndarray]:
    """Our head params -> original-format state dict (contiguous numpy arrays, dtype kept)."""
    state = {}
    n = heads_config.num_layers
    for i in range(heads_config.num_heads):
        for j in range(n):
            state[f"{i}.{j}.linear.weight"] = np.ascontiguousarray(np.asarray(heads[f"res_{j}_kernel"][i]).T)
            state[f"{i}.{j}.linear.bias"] = np.ascontiguousarray(np.asarray(heads[f"res_{j}_bias"][i]))
        if heads_config.projection == "own":
            state[f"{i}.{n}.weight"] = np.ascontiguousarray(np.asarray(heads["proj"][i]).T)
    return state


def save_heads(bundle_or_params: Any, heads_config: HeadsConfig | None = None,
               out_dir: str | os.PathLike = ".", *, base_config: LlamaConfig | None = None,
               tree: tuple | None = None, lookup: int | None = None) -> Path:
    """Writes `medusa_lm_head.safetensors` + `heads_config.json` (+ `tree.json`) to `out_dir`.

    Args:
      bundle_or_params: a `Bundle` with heads, or a head params dict.
      heads_config: required with a params dict; defaults to the bundle's.
      out_dir: directory to create or fill.
      base_config: the base model's config (taken from the bundle when given one), for heads_config.json.
      tree: default draft tree paths to ship as tree.json (defaults to the bundle's tree).
      lookup: the lookup chain to ship with it (defaults to the bundle's).
    Returns:
      out_dir as a Path.
    """
    from safetensors.numpy import save_file

    from medusa_jax.bundle import Bundle

    if isinstance(bundle_or_params, Bundle):
        if bundle_or_params.heads is None:
            raise MedusaError("save_heads: the bundle has no Medusa heads; attach or train heads first")
        heads = bundle_or_params.heads
        heads_config = heads_config or bundle_or_params.heads_config
        base_config = base_config or bundle_or_params.config
        tree = tree if tree is not None else bundle_or_params.tree
        lookup = lookup if lookup is not None else bundle_or_params.lookup
    else:
        heads = bundle_or_params
    if heads_config is None:
        raise MedusaError("save_heads: pass heads_config together with a head params dict")
    if lookup and tree is None:
        raise MedusaError("save_heads: a lookup chain is saved in tree.json beside a tree; pass tree=PATHS too")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(heads_to_state(heads, heads_config), str(out / HEAD_FILES[0]), metadata={"format": "pt"})
    hidden = int(np.shape(heads["res_0_kernel"])[-1])
    vocab = int(np.shape(heads["proj"])[-1]) if "proj" in heads else (base_config.vocab_size if base_config else None)
    info = {"num_heads": heads_config.num_heads, "num_layers": heads_config.num_layers,
            "projection": heads_config.projection, "hidden_size": hidden, "vocab_size": vocab,
            "base_model_name_or_path": base_config.name if base_config else None,
            # the names the original Medusa / TGI configs use for the same numbers
            "medusa_num_heads": heads_config.num_heads, "medusa_num_layers": heads_config.num_layers}
    with open(out / "heads_config.json", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    if tree is not None:
        with open(out / "tree.json", "w", encoding="utf-8") as f:
            json.dump({"tree": [list(p) for p in tree], **({"lookup": int(lookup)} if lookup else {})}, f)
    return out

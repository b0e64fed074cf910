"""The transformers peer of `infer.bench`: the same weights as a PyTorch `LlamaForCausalLM`, greedy `generate`.

The torch model is read from the bundle's own file when transformers can read it (a `.gguf` through its GGUF
loader, a Hugging Face directory), else exported with `medusa_jax.loading.save_hf` to a temporary directory (the
random `tiny` model). Only `generate` is timed; a first short call warms the model up.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from medusa_jax.bundle import Bundle


def torch_device() -> str:
    """Where the peer runs: CUDA when JAX itself runs on a GPU and torch sees one (the peer a user of that machine
    would otherwise run), else the CPU."""
    import jax
    import torch

    return "cuda" if jax.default_backend() != "cpu" and torch.cuda.is_available() else "cpu"


def load_torch_model(bundle: Bundle, threads: int | None = None) -> tuple[Any, str]:
    """(float32 eval-mode LlamaForCausalLM on `torch_device()`, note) or (None, why it was skipped); `threads`
    sets torch's CPU threads (None keeps torch's default). On CUDA, torch's float32 products stay float32 (its
    default), as ours do (`medusa_jax.model.precision`)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        return None, f"skipped: transformers/torch not importable ({e}); pip install torch transformers"
    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the weights are local
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    source = Path(bundle.source) if bundle.source else None
    try:
        if source is not None and source.is_file() and source.suffix == ".gguf":
            net = transformers.AutoModelForCausalLM.from_pretrained(
                str(source.parent), gguf_file=source.name, dtype=torch.float32, trust_remote_code=False)
            how = f"transformers GGUF loader ({source.name})"
        elif source is not None and source.is_dir():
            net = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32,
                                                             trust_remote_code=False)
            how = f"transformers from {source}"
        else:
            from medusa_jax.loading import save_hf

            with tempfile.TemporaryDirectory() as tmp:
                save_hf(bundle.replace(tokenizer=None), tmp)
                net = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                                     trust_remote_code=False)
            how = "exported with medusa_jax.loading.save_hf"
    except Exception as e:  # any reader failure only drops this row
        return None, f"skipped: the model is not loadable in transformers ({type(e).__name__}: {e})"
    net = net.eval()  # already float32 (dtype= above); a GGUF-loaded model refuses .float()
    device = torch_device()
    if device == "cpu":
        return net, f"{how}; torch {torch.__version__} CPU float32, {torch.get_num_threads()} threads"
    net = net.to(device)
    return net, f"{how}; torch {torch.__version__} {torch.cuda.get_device_name()} float32"


def run_hf(net: Any, prompt: list[int], max_new: int, stops: tuple[int, ...], prefix_cache: bool = False) -> dict:
    """Greedy `generate` from prompt ids: {"tokens" (the stop token included when hit), "wall_s", "reused"}.

    With `prefix_cache`, the key/value cache of this model's previous call (kept on `net` with the ids it holds)
    is cropped to the longest common prefix with `prompt` and passed to `generate`, which then runs only the rest
    of the prompt: what `infer.api`'s prefix cache does for a chat's next turn. `reset_prefix` forgets it.
    """
    import torch

    ids = torch.tensor([prompt], dtype=torch.long, device=net.device)
    sync = torch.cuda.synchronize if net.device.type == "cuda" else (lambda: None)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
              eos_token_id=list(stops) or None, pad_token_id=stops[0] if stops else 0,
              temperature=None, top_p=None, top_k=None, return_dict_in_generate=True)
    if not getattr(net, "_bench_warm", False):
        with torch.inference_mode():
            warm = net.generate(ids, max_new_tokens=4, **kw)
        # recent transformers name the key/value cache `cache` (`past_key_values` in earlier 5.x, now deprecated)
        net._bench_cache_name = "cache" if "cache" in warm else "past_key_values"
        net._bench_warm = True
    name = net._bench_cache_name
    reused = 0
    kept = getattr(net, "_bench_prefix", None)
    if prefix_cache and kept is not None:
        from infer.prefix_cache import common_prefix

        held, cache = kept
        reused = common_prefix(held, prompt[:-1])  # the last prompt token always runs: its logits give token 1
        if reused:
            cache.crop(reused - cache.get_seq_length())  # a negative count drops that many trailing entries
            kw[name] = cache
    net._bench_prefix = None
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = net.generate(ids, max_new_tokens=max_new, **kw)
        sync()  # a GPU may still be running the last step's kernels
        wall = time.perf_counter() - t0
    seq = out.sequences[0].tolist()
    if prefix_cache:
        cache = out[name]
        net._bench_prefix = (seq[:cache.get_seq_length()], cache)
    new = seq[len(prompt):]
    for i, t in enumerate(new):  # generate stops at the first stop id; cut any padding after it
        if t in stops:
            new = new[:i + 1]
            break
    return {"tokens": new, "wall_s": wall, "reused": reused}


def reset_prefix(net: Any) -> None:
    """Forgets the cache `run_hf(..., prefix_cache=True)` kept."""
    if net is not None:
        net._bench_prefix = None

"""End-of-run outputs both stages share: held-out evaluation sums, acceptance measurement, the exported heads,
the summary file and the readable per-head table."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.config import HeadsConfig


def evaluate(put_batch: Callable, eval_step: Callable, ds, batch_size: int, cache=None, cache_key: str = "hidden"):
    """Sum over every row of `ds` of eval_step(device batch) (host numpy pytree); `cache` rows go in
    batch[cache_key]."""
    from train.data import BatchIterator

    it = BatchIterator(ds, batch_size, seed=0, drop_last=False)
    total = None
    for _ in range(it.steps_per_epoch):
        batch = next(it)
        if cache is not None:
            batch[cache_key] = cache.lookup(batch)
        stats = jax.device_get(eval_step(put_batch(batch)))
        total = stats if total is None else jax.tree.map(np.add, total, stats)
    return total


def measure_acceptance(bundle, hc: HeadsConfig, heads, prompts: list[list[int]], max_new: int) -> dict | None:
    """Greedy Medusa decoding of `prompts` with `heads` on `bundle`'s base: Generation stats, or None."""
    try:
        from infer import api
    except ImportError:
        return None
    if not prompts or not hasattr(api, "generate_ids"):
        return None
    heads = jax.tree.map(lambda p: jnp.asarray(p, bundle.dtype), heads)
    gen = api.generate_ids(bundle.with_heads(heads, hc), prompts, max_new_tokens=max_new, temperature=0.0,
                           mode="greedy")
    return {**gen.stats(), "prompts": len(prompts)}


def export_heads(run_dir: str, base_config, hc: HeadsConfig, heads) -> str:
    """Writes `<run>/heads/` (medusa_lm_head.safetensors + heads_config.json) in the original Medusa format."""
    from medusa_jax.loading import heads_io

    path = os.path.join(run_dir, "heads")
    heads_io.save_heads(jax.tree.map(np.asarray, heads), hc, path, base_config=base_config)
    return path


def machine_info(num_devices: int, **more: Any) -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": num_devices, **more}


def write_summary(run_dir: str, summary: dict) -> None:
    """<run>/summary.json without the in-memory "params" entry (primary host only)."""
    summary["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in summary.items() if k != "params"}, f, indent=1)


def head_table(table: dict | None, where: str, num_heads: int) -> list[str]:
    """Lines of the per-head accuracy table (HeadStats.means() dict)."""
    if not table:
        return []
    lines = [f"{where} accuracy ({table['count'][0]} targets for head 0):",
             "  head  predicts   top-1   top-5    loss"]
    for k in range(num_heads):
        lines.append(f"  {k:>4}  t+{k + 2:<7}  {table['top1'][k]:6.3f}  {table['top5'][k]:6.3f}  "
                     f"{table['loss'][k]:6.3f}")
    return lines


def acceptance_line(a: dict | None) -> list[str]:
    if not a:
        return []
    return [f"greedy Medusa decoding of {a['prompts']} held-out prompts: {a['mean_accepted']:.2f} tokens per "
            f"step ({a['new_tokens']} tokens, {a['tokens_per_s']:.1f} tokens/s)"]

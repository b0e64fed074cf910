"""The stage-1 training section of `bench/gpu_7b.py`: train-step tokens/s and model FLOPs utilisation.

MFU counts matmul FLOPs: the base forward 2 * (layer parameters) * tokens (stage 1 never applies the base lm_head
and an embedding lookup is no matmul), plus the heads forward and backward: per token and head 6*H*H per residual
layer and 4*H*V for the frozen shared projection (forward + input gradient only; 6*H*V for an own projection);
`mfu_with_attention` adds the causal attention matmuls (2 * 2 * T/2 * heads * head_dim per token and layer).
"""

from __future__ import annotations

import dataclasses
import time
import types

import jax
import numpy as np

from medusa_jax import model
from medusa_jax.config import HeadsConfig, LlamaConfig


def peak_flops(device_kind: str) -> float | None:
    """bf16 dense peak FLOP/s of a known chip, else None."""
    kind = device_kind.upper()
    if "H100" in kind:
        return 756e12 if "PCIE" in kind else 989e12
    if "H200" in kind or "GH200" in kind:
        return 989e12
    if "A100" in kind:
        return 312e12
    return None


def train_flops(cfg: LlamaConfig, hc: HeadsConfig, tokens: int, seq_len: int) -> tuple[float, float]:
    """(model FLOPs of one stage-1 step without and with attention matmuls) for `tokens` tokens."""
    h, v = cfg.hidden_size, cfg.vocab_size
    layer_params = cfg.num_params - v * h * (1 if cfg.tie_embeddings else 2) - h
    base = 2 * layer_params * tokens
    proj = 6 * h * v if hc.projection == "own" else 4 * h * v
    heads = hc.num_heads * (6 * h * h * hc.num_layers + proj) * tokens
    attention = cfg.num_layers * 2 * 2 * (seq_len / 2) * cfg.num_heads * cfg.head_dim * tokens
    return base + heads, base + heads + attention


def bench_train(args, cfg, base, out: dict) -> None:
    from medusa_jax.bundle import Bundle
    from train import loop, stage1
    from train.parallel import DataParallel

    hc = HeadsConfig(num_heads=4, num_layers=1, projection="shared")
    bundle = Bundle(base=base, config=cfg, source="random")
    dp = DataParallel.create("mesh", 1)
    optimizer, _ = loop.make_optimizer(loop.OptimConfig(total_steps=1000))
    fn_args = types.SimpleNamespace(**{**stage1.DEFAULTS, "chunk": args.chunk})  # the CLI defaults (loss etc.)
    train_step, _, _ = stage1.build_functions(bundle, hc, fn_args, dp, optimizer)
    dev_base = dp.replicate(base)
    kind = getattr(jax.devices()[0], "device_kind", "")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(kind)
    out.update(seq_len=args.seq_len, heads=dataclasses.asdict(hc), peak_flops=peak, batches=[])
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()
    sizes = args.batches or [2 ** i for i in range(args.max_batch.bit_length()) if 2 ** i <= args.max_batch]
    for b in sizes:
        s = args.seq_len
        batch = {"tokens": rng.integers(3, cfg.vocab_size, (b, s)).astype(np.int32),
                 "loss_mask": np.ones((b, s), bool), "segment_ids": np.ones((b, s), np.int32),
                 "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()}
        try:
            heads = model.init_heads(hc, cfg, base, jax.random.PRNGKey(0))  # fresh: each state is donated
            state = dp.replicate(loop.TrainState.create(heads, optimizer, 0))
            dev_batch = dp.put_batch(batch)
            t0 = time.perf_counter()
            state, metrics = train_step(state, dev_base, dev_batch)
            jax.block_until_ready(metrics["loss"])
            first_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.train_steps):
                state, metrics = train_step(state, dev_base, dev_batch)
            jax.block_until_ready((state, metrics))
            step_s = (time.perf_counter() - t0) / args.train_steps
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
            out["batches"].append({"batch": b, "error": "out of memory" if oom else msg[:500]})
            print(f"  train batch {b}: {'out of memory' if oom else msg[:200]}", flush=True)
            break
        tokens = b * s
        flops, flops_attn = train_flops(cfg, hc, tokens, s)
        rec = {"batch": b, "step_s": step_s, "first_step_s": round(first_s, 1), "tokens_per_s": tokens / step_s,
               "loss": float(metrics["loss"]), "model_tflops_per_s": flops / step_s / 1e12,
               "mfu": flops / step_s / peak if peak else None,
               "mfu_with_attention": flops_attn / step_s / peak if peak else None}
        out["batches"].append(rec)
        print(f"  train batch {b}: {rec['tokens_per_s']:.0f} tokens/s, {rec['model_tflops_per_s']:.1f} TFLOP/s"
              + (f", MFU {100 * rec['mfu']:.1f}%" if peak else ""), flush=True)
        del state, metrics, dev_batch, heads
        if time.perf_counter() - t_start > args.train_budget_s:
            out["stopped"] = f"time budget of {args.train_budget_s} s reached"
            break
    ok = [r for r in out["batches"] if "error" not in r]
    if ok:
        out["best"] = max(ok, key=lambda r: r["tokens_per_s"])

"""Stage 1 (Medusa-1): train Medusa heads on a frozen base model.

    python -m train.stage1                      # embedded SmolLM2: distil data, train, evaluate (~15 min, 2 CPUs)
    python -m train.stage1 --model tiny --steps 60 --seq-len 64 --lr 1e-2   # seconds: random model, synthetic data
    python -m train.stage1 --data chats.jsonl --epochs 2 --out checkpoints/mine
    python -m train.stage1 --resume --out checkpoints/mine       # continue from the latest checkpoint

Only the heads are trained: the base runs outside the gradient and has no optimizer state. Its post-norm hidden
states depend on nothing that training changes, so they are computed once per row and kept in host memory
(float32 [rows, seq, hidden]) when they fit in `--cache-gb`; otherwise each step recomputes them.

Without `--data` the run first self-distils a small chat set (`train.distill`; the base answers questions it
wrote itself) into `<out>/distilled.jsonl`. `--model tiny` has no tokenizer: it trains on a synthetic dataset
(`synthetic_dataset`: packed "conversations" whose assistant part walks a fixed cycle of 32 token ids, so token
t + 2 + k is a function of token t and a head can learn it; top-1 accuracy rises from chance within
tens of steps at --lr 1e-2).

Many devices: the step is jit-compiled over a ("data",) device mesh (`--parallel pmap` for pmap); many hosts: run
the same command on every host with `--distributed` (calls `jax.distributed.initialize()`); see `train.parallel`.

Loss, optimizer and their defaults: `train.losses` (lambda_k = 0.8**k; `--lambda-decay 1` is the original code's
plain sum) and `train.loop.OptimConfig` (AdamW lr 1e-3, no weight decay, 10% linear warmup then cosine, gradient
clipping at global norm 1.0). Outputs in the run folder: `ckpt/` (orbax, the last `--keep`), `metrics.jsonl`,
`heads/` (medusa_lm_head.safetensors + heads_config.json, the original Medusa format), `summary.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from medusa_jax import model
from medusa_jax.config import HeadsConfig
from medusa_jax.errors import MedusaError, cli_errors
from train import cli_common, loop, losses, reporting
from train.checkpoint import Checkpoints
from train.hidden_cache import HiddenCache, build_if_it_fits
from train.parallel import DataParallel
from train.run_data import data_summary, load_bundle, prepare_data
from train.synthetic import synthetic_dataset

__all__ = ["DEFAULTS", "HiddenCache", "build_parser", "initial_heads", "load_bundle", "main", "resolve_args",
           "synthetic_dataset", "train"]

DEFAULTS = dict(cli_common.COMMON_DEFAULTS, heads_init=None, num_heads=4, num_layers=1, projection="shared",
                parallel="mesh")
DEFAULT_EPOCHS = 8  # with neither --steps nor --epochs
# Flags a resumed run must keep: they change parameter shapes, the data, or its order.
FIXED_ON_RESUME = cli_common.COMMON_FIXED_ON_RESUME + ("heads_init", "num_heads", "num_layers", "projection")


def initial_heads(args, bundle, hc: HeadsConfig):
    """Fresh heads (residual blocks zero, i.e. identity; `own` projections copy the lm_head) or `--heads-init`."""
    if not args.heads_init:
        return model.init_heads(hc, bundle.config, bundle.base, jax.random.PRNGKey(args.seed))
    from medusa_jax.loading import heads_io

    heads, loaded_hc, _ = heads_io.read_heads(args.heads_init, bundle.config)
    if loaded_hc != hc:
        raise MedusaError(f"--heads-init {args.heads_init} holds {loaded_hc.num_heads} heads x "
                          f"{loaded_hc.num_layers} layers ({loaded_hc.projection} projection), but this run builds "
                          f"{hc.num_heads} x {hc.num_layers} ({hc.projection}); pass matching --num-heads, "
                          "--num-layers and --projection")
    return heads


def build_functions(bundle, hc: HeadsConfig, args, dp: DataParallel, optimizer):
    """(train step, eval step, hidden-state map), compiled for `dp`."""
    config = bundle.config
    weights = losses.head_weights(hc.num_heads, args.lambda_decay)

    def hidden_of(base, batch):
        mask = losses.attention_mask(batch["segment_ids"])  # [B, S, S] causal within each packed conversation
        hidden, _ = model.forward(config, base, batch["tokens"], batch["positions"], mask)
        return hidden.astype(jnp.float32)  # [B, S, H]

    def loss_fn(params, base, batch, rng, axis_name):
        del rng  # stage 1 is deterministic
        hidden = batch["hidden"] if "hidden" in batch else jax.lax.stop_gradient(hidden_of(base, batch))
        teacher = None
        if args.head_targets == "teacher":  # the frozen base is its own teacher
            teacher = losses.Teacher(hidden, model.lm_head_kernel(config, base), args.teacher_temperature)
        return losses.medusa_loss(hc, config, base, params, hidden, batch["tokens"], batch["loss_mask"],
                                  batch["segment_ids"], weights=weights, compute_dtype=bundle.dtype,
                                  chunk=args.chunk or None, axis_name=axis_name, teacher=teacher)

    def eval_fn(params, base, batch, *, axis_name=None):
        _, stats = loss_fn(params, base, batch, None, axis_name)
        return stats if axis_name is None else jax.tree.map(lambda x: jax.lax.psum(x, axis_name), stats)

    train_step = dp.compile_step(loop.make_train_step(loss_fn, optimizer), num_replicated=2)
    eval_step = dp.compile_step(eval_fn, num_replicated=2, donate_first=False)
    return train_step, eval_step, dp.compile_map(hidden_of, num_replicated=1)


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.stage1", description=__doc__.split("\n\n")[0],
                                argument_default=None)
    cli_common.add_common_flags(p, DEFAULTS, DEFAULT_EPOCHS)
    a = p.add_argument
    a("--heads-init", help="Medusa heads to start from (a heads folder or medusa_lm_head file)")
    a("--num-heads", type=int, help="Medusa heads K (default 4)")
    a("--num-layers", type=int, help="residual layers per head (default 1)")
    a("--projection", choices=("own", "shared"), help="own [H, V] projection per head, or the frozen base lm_head "
      "(default shared)")
    a("--parallel", choices=("mesh", "pmap"), help="data parallelism: jit over a device mesh (default) or pmap")
    return p


def resolve_args(argv: Sequence[str] | None):
    """(args namespace with defaults filled, resume checkpoint meta or None)."""
    parser = build_parser()
    args, meta = cli_common.resolve_args(parser, argv, DEFAULTS, FIXED_ON_RESUME)
    for name in ("num_heads", "num_layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args, meta


def train(args, meta: dict | None = None) -> dict:
    """Runs stage 1 with resolved `args`; returns the summary dict (also written to <out>/summary.json)."""
    from train.data import BatchIterator, DataPosition

    t_start = time.monotonic()
    times: dict[str, float] = {}
    bundle = load_bundle(args)
    hc = HeadsConfig(num_heads=args.num_heads, num_layers=args.num_layers, projection=args.projection)
    dp = DataParallel.create(args.parallel, args.devices)
    dp.check_batch_size(args.batch_size)
    if args.seq_len > bundle.config.max_position_embeddings:
        raise MedusaError(f"--seq-len {args.seq_len} is longer than the model's context of "
                          f"{bundle.config.max_position_embeddings} tokens; lower --seq-len")
    heads0 = initial_heads(args, bundle, hc)  # before the run folder exists: a mismatch leaves nothing behind
    run_dir = args.out or os.path.join("checkpoints", f"stage1-{bundle.config.name}-{hc.num_heads}h-"
                                       f"{hc.projection}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = run_dir
    os.makedirs(run_dir, exist_ok=True)
    times["load_s"] = time.monotonic() - t_start

    t0 = time.monotonic()
    train_ds, held_ds, prompts, data_info = prepare_data(args, bundle, run_dir, args.accept_prompts)
    times["data_s"] = time.monotonic() - t0
    print(train_ds.report.summary(), file=sys.stderr)
    it = BatchIterator(train_ds, args.batch_size, args.seed)
    total_steps = args.steps or max(1, int(round((args.epochs or DEFAULT_EPOCHS) * it.steps_per_epoch)))
    optimizer, schedule = loop.make_optimizer(loop.OptimConfig(lr=args.lr, total_steps=total_steps,
                                                               warmup_fraction=args.warmup, clip_norm=args.clip))
    state = loop.TrainState.create(heads0, optimizer, args.seed)
    ckpts = Checkpoints(run_dir, keep=args.keep)
    start_step = 0
    if meta is not None:
        start_step, state, meta = ckpts.restore(state)
        it = BatchIterator(train_ds, args.batch_size, args.seed, DataPosition.from_dict(meta["data_position"]))
        print(f"resuming {run_dir} at step {start_step} of {total_steps}", file=sys.stderr)

    t0 = time.monotonic()
    train_step, eval_step, hidden_map = build_functions(bundle, hc, args, dp, optimizer)
    base = dp.replicate(bundle.base)
    cache = build_if_it_fits([train_ds, held_ds], lambda b: dp.gather_rows(hidden_map(base, dp.put_batch(b))),
                             batch_size=args.batch_size, seq_len=args.seq_len, hidden_size=bundle.config.hidden_size,
                             cache_gb=args.cache_gb, progress=args.progress)
    times["cache_s"] = time.monotonic() - t0

    static_meta = {"heads_config": dataclasses.asdict(hc), "model_source": bundle.source,
                   "model_config": dataclasses.asdict(bundle.config), "args": vars(args), "total_steps": total_steps}

    def save(dev_state, step, position):
        ckpts.save(step, dp.fetch(dev_state), {**static_meta, "data_position": position.to_dict(), "step": step})

    def describe(aux):
        m = aux.means()
        return {"heads": m}, {"top1": "/".join(f"{x:.2f}" for x in m["top1"])}

    def batches():
        for batch in it:
            if cache is not None:
                batch["hidden"] = cache.lookup(batch)
            yield batch

    def held_out(params):
        stats = reporting.evaluate(dp.put_batch, lambda b: dp.fetch(eval_step(params, base, b)), held_ds,
                                   args.batch_size, cache)
        return stats.means()

    cfg = loop.LoopConfig(total_steps=total_steps, log_every=args.log_every, save_every=args.save_every,
                          eval_every=args.eval_every, stop_at=args.stop_at, max_bad_steps=args.max_bad_steps,
                          progress=args.progress)
    t0 = time.monotonic()
    result = loop.run(cfg, dp.replicate(state), start_step, step_fn=lambda s, b: train_step(s, base, b),
                      batches=batches(),
                      position=lambda: it.position, put_batch=dp.put_batch, save=save, describe=describe,
                      metrics_log=loop.MetricsLog(os.path.join(run_dir, "metrics.jsonl")),
                      evaluate=(lambda s, step: {"held_out": held_out(s.params)}) if held_ds else None,
                      schedule=schedule, batch_tokens=lambda b: int((b["segment_ids"] > 0).sum()))
    times["train_s"] = time.monotonic() - t0
    params = dp.fetch(result.state.params)
    summary: dict[str, Any] = {"run_dir": run_dir, "stopped": result.reason, "step": result.step,
                               "total_steps": total_steps, "bad_steps": result.bad_steps, "params": params}
    if result.reason != "done":
        return summary

    t0 = time.monotonic()
    held = held_out(result.state.params) if held_ds else None
    times["eval_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    accept = (reporting.measure_acceptance(bundle, hc, params, prompts, args.accept_tokens)
              if args.accept_prompts else None)
    times["accept_s"] = time.monotonic() - t0
    heads_dir = reporting.export_heads(run_dir, bundle.config, hc, params)
    times["total_s"] = time.monotonic() - t_start
    summary.update({
        "heads_dir": heads_dir, "heads_config": dataclasses.asdict(hc), "model_source": bundle.source,
        "train_last": result.last_record.get("heads"), "held_out": held, "acceptance": accept,
        "data": data_summary(data_info, train_ds, held_ds), "hidden_cache": cache is not None, "times": times,
        "machine": reporting.machine_info(dp.num_devices, parallel=args.parallel), "args": vars(args)})
    reporting.write_summary(run_dir, summary)
    return summary


def format_summary(s: dict) -> str:
    """The readable end-of-run table."""
    hc = s["heads_config"]
    t = s["times"]
    a = s.get("args", {})
    targets = ("the base's distributions (temperature "
               f"{a.get('teacher_temperature', 1.0):g})" if a.get("head_targets") == "teacher" else "the data's tokens")
    lines = [f"stage 1: {hc['num_heads']} heads x {hc['num_layers']} layer(s), {hc['projection']} projection, "
             f"targets {targets}, {s['step']} steps on {s['model_source']}",
             f"time: total {t['total_s']:.0f} s = load {t['load_s']:.0f} + data {t['data_s']:.0f} + hidden-state "
             f"cache {t['cache_s']:.0f} + train {t['train_s']:.0f} + eval {t['eval_s']:.0f} + decode "
             f"{t['accept_s']:.0f}"]
    lines += reporting.head_table(s["held_out"] or s["train_last"],
                                  "held-out" if s["held_out"] else "last training window", hc["num_heads"])
    lines += reporting.acceptance_line(s["acceptance"])
    lines.append(f"heads: {s['heads_dir']}   summary: {os.path.join(s['run_dir'], 'summary.json')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_common.run_cli("stage1", argv, resolve_args, train, format_summary)


if __name__ == "__main__":
    with cli_errors():
        sys.exit(main())

"""Stage 2 (Medusa-2): fine-tune the base model and the Medusa heads together.

    python -m train.stage2                      # embedded SmolLM2: continue its stage-1 run (one epoch, 10 steps)
    python -m train.stage2 --model tiny --steps 20 --seq-len 64 --lr 1e-3    # seconds: random model and heads
    python -m train.stage2 --from checkpoints/stage1-... --epochs 2 --out checkpoints/mine
    python -m train.stage2 --resume checkpoints/mine                          # continue from the latest checkpoint

`--from RUN_DIR` names a stage-1 run (or a heads folder with its train_summary.json): its heads start the run,
and its model, data (the same distilled file and held-out split), sequence length and seed are the defaults.
Without `--from`, the latest embedded-model stage-1 run under checkpoints/ is used, else the heads shipped in
checkpoints/smollm2_135m/ (whose distilled data is re-created when missing); `--model tiny` starts from fresh
heads on synthetic data.

Objective and optimizer: `train.joint` (base term KL(original || current) for self-distilled data, else CE;
lambda0 0.2 with an optional warm-up; lambda_k = 0.8**k; AdamW base lr 1e-5, heads 4x, cosine). The original
base is kept frozen beside the trained copy as the KL teacher; its hidden states are cached on the host like stage
1's. Parameters, gradients and optimizer state are sharded over a (data, fsdp, tensor) mesh
(`train.parallel.Sharded`; `--fsdp`, `--tensor`; all devices on fsdp by default). Quality guard: `train.quality`.

Outputs in the run folder: `ckpt/` (orbax), `metrics.jsonl`, `model/` (the fine-tuned base in Hugging Face
layout), `heads/` (original Medusa format), `summary.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import model
from medusa_jax.config import HeadsConfig
from medusa_jax.errors import MedusaError, cli_errors
from train import cli_common, joint, legacy_layout, loop, quality, reporting
from train.checkpoint import Checkpoints
from train.hidden_cache import build_if_it_fits
from train.parallel import Sharded
from train.run_data import data_summary, load_bundle, prepare_data

DEFAULTS = dict(cli_common.COMMON_DEFAULTS, lr=1e-5, from_run=None, head_lr_mult=4.0, weight_decay=0.0,
                lambda0=0.2, lambda0_warmup="constant", lambda0_ramp=1.0, base_loss="auto", max_kl=0.05,
                fsdp=None, tensor=1, remat=False, guard_prompts=4, guard_tokens=64, keep=2, epochs=None)
# The embedded default: 10 steps of 4 x 512 tokens. Measured on 2 CPU cores shared with other jobs: 82 s per step
# at load average 5 (140 s at 8), plus about 3 minutes of teacher cache, guard, evaluation and decoding: ~15-18 min.
DEFAULT_EPOCHS = 1
FIXED_ON_RESUME = cli_common.COMMON_FIXED_ON_RESUME + ("from_run", "base_loss")
INHERITED = ("model", "data", "seq_len", "seed", "holdout", "distill_prompts", "distill_tokens", "lambda_decay",
             "head_targets", "teacher_temperature")


# ------------------------------------------------------------------------------------------------ --from


def default_from(model_arg: str | None) -> str | None:
    """The stage-1 run stage 2 continues by default: the newest embedded-model run under checkpoints/, else the
    shipped heads; None for other models (`tiny` starts from fresh heads)."""
    if model_arg is not None:
        return None
    runs = sorted(d for d in glob.glob(os.path.join("checkpoints", "stage1-*"))
                  if os.path.isdir(os.path.join(d, "heads")) and os.path.isfile(os.path.join(d, "summary.json")))
    runs = [d for d in runs if _settings(d).get("args", {}).get("model") is None]
    if runs:
        return runs[-1]
    from medusa_jax.loading import DEFAULT_HEADS_DIR

    return str(DEFAULT_HEADS_DIR) if DEFAULT_HEADS_DIR.is_dir() else None


def _settings(run_dir: str) -> dict:
    """A stage-1 run's summary (summary.json, or train_summary.json beside shipped heads), or {}."""
    for name in ("summary.json", "train_summary.json"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return {}


def heads_path(run_dir: str) -> str:
    return os.path.join(run_dir, "heads") if os.path.isdir(os.path.join(run_dir, "heads")) else run_dir


def inherit_from_stage1(given: dict) -> dict:
    """Defaults taken from the stage-1 run (`--from`, or `default_from`), plus the resolved from_run itself."""
    run = given.get("from_run") or default_from(given.get("model"))
    if run is None:
        return {}
    if not os.path.isdir(run):
        raise MedusaError(f"--from {run}: no such folder; give a stage-1 run folder (with heads/) or a heads folder")
    summary = _settings(run)
    saved = summary.get("args", {})
    out = {k: saved[k] for k in INHERITED if k in saved}
    if "model" in given and given["model"] != saved.get("model", given["model"]):
        raise MedusaError(f"--model {given['model']} differs from the stage-1 run's model {saved.get('model')}; "
                          "its heads belong to that base: drop --model or pick another --from")
    data = out.get("data")
    if data and not os.path.isfile(data):  # a moved run folder: its own distilled file
        local = os.path.join(run, os.path.basename(data))
        out["data"] = local if os.path.isfile(local) else None
        if out["data"] is None:
            print(f"note: the stage-1 data {data} is missing; distilling it again", file=sys.stderr)
    out["from_run"] = run
    out["_distilled"] = bool(summary.get("data", {}).get("distilled")) or bool(data and data.endswith(
        "distilled.jsonl"))
    return out


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.stage2", description=__doc__.split("\n\n")[0],
                                argument_default=None)
    cli_common.add_common_flags(p, DEFAULTS, DEFAULT_EPOCHS)
    a = p.add_argument
    a("--from", dest="from_run", metavar="RUN_DIR", help="stage-1 run (or heads folder) to continue; default: "
      "the latest embedded stage-1 run, else the shipped heads")
    a("--head-lr-mult", type=float, help="heads' learning rate = --lr x this (default 4)")
    a("--weight-decay", type=float, help="AdamW weight decay of weight matrices; never norms or biases (default 0)")
    a("--lambda0", type=float, help="weight of the heads' loss against the base term (default 0.2)")
    a("--lambda0-warmup", choices=joint.LAMBDA0_WARMUPS, help="ramp of lambda0: constant, linear or sine "
      "(default constant)")
    a("--lambda0-ramp", type=float, help="fraction of the steps the lambda0 ramp takes (default 1.0)")
    a("--base-loss", choices=("auto",) + joint.BASE_LOSSES, help="base term: kl to the original model or ce on "
      "the labels; auto = kl for self-distilled data, else ce (default auto)")
    a("--max-kl", type=float, help="warn when the held-out KL(original || current) per token ends above this "
      "(default 0.05)")
    a("--fsdp", type=int, help="devices parameters are sharded over (default: all devices / --tensor)")
    a("--tensor", type=int, help="tensor-parallel devices (default 1)")
    a("--remat", action="store_const", const=True, help="large models / long sequences: run the layers as a scan "
      "that gathers one layer's weights at a time and recompute each layer in the backward pass")
    a("--guard-prompts", type=int, help="held-out prompts the original answers greedily for the quality guard, "
      "0 = skip (default 4)")
    a("--guard-tokens", type=int, help="tokens per guard answer (default 64)")
    return p


def resolve_args(argv: Sequence[str] | None):
    """(args with defaults, stage-1 settings and flags resolved; resume checkpoint meta or None)."""
    parser = build_parser()
    args, meta = cli_common.resolve_args(parser, argv, DEFAULTS, FIXED_ON_RESUME, inherit=inherit_from_stage1)
    distilled = vars(args).pop("_distilled", False)
    if args.base_loss == "auto":
        args.base_loss = "kl" if (distilled or (args.model != "tiny" and not args.data)) else "ce"
    for name in ("head_lr_mult", "lambda0_ramp", "max_kl"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.lambda0 < 0 or args.weight_decay < 0 or args.guard_prompts < 0 or args.guard_tokens < 1:
        parser.error("--lambda0, --weight-decay and --guard-prompts must be >= 0, --guard-tokens >= 1")
    return args, meta


# ------------------------------------------------------------------------------------------------ run


def initial_heads(args, bundle) -> tuple[dict, HeadsConfig]:
    """The stage-1 heads of `--from`, or fresh identity heads (4, shared projection) without one."""
    if args.from_run:
        from medusa_jax.loading import heads_io

        heads, hc, _ = heads_io.read_heads(heads_path(args.from_run), bundle.config)
        return heads, hc
    hc = HeadsConfig(num_heads=4)
    return model.init_heads(hc, bundle.config, bundle.base, jax.random.PRNGKey(args.seed)), hc


def _means(stats) -> dict:
    return {"base": stats.base.means(), "heads": stats.heads.means()}


def train(args, meta: dict | None = None) -> dict:
    """Runs stage 2 with resolved `args`; returns the summary dict (also written to <out>/summary.json)."""
    from train.data import BatchIterator, DataPosition

    t_start = time.monotonic()
    times: dict[str, float] = {}
    bundle = load_bundle(args)
    config, teacher = bundle.config, bundle.base
    heads, hc = initial_heads(args, bundle)
    sh = Sharded.create(args.devices, args.fsdp, args.tensor)
    sh.check_batch_size(args.batch_size)
    run_dir = args.out or os.path.join("checkpoints", f"stage2-{config.name}-{hc.num_heads}h-"
                                       f"{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = run_dir
    os.makedirs(run_dir, exist_ok=True)
    times["load_s"] = time.monotonic() - t_start

    t0 = time.monotonic()
    train_ds, held_ds, prompts, data_info = prepare_data(args, bundle, run_dir,
                                                         max(args.accept_prompts, args.guard_prompts))
    times["data_s"] = time.monotonic() - t0
    print(train_ds.report.summary(), file=sys.stderr)
    it = BatchIterator(train_ds, args.batch_size, args.seed)
    total_steps = args.steps or max(1, int(round((args.epochs or DEFAULT_EPOCHS) * it.steps_per_epoch)))
    ocfg = loop.OptimConfig(lr=args.lr, total_steps=total_steps, warmup_fraction=args.warmup, clip_norm=args.clip,
                            weight_decay=args.weight_decay)
    optimizer, schedules = joint.make_joint_optimizer(ocfg, args.lr * args.head_lr_mult)
    lcfg = joint.JointLossConfig(lambda0=args.lambda0, decay=args.lambda_decay, warmup=args.lambda0_warmup,
                                 ramp_steps=max(1, int(round(args.lambda0_ramp * total_steps))),
                                 base_loss=args.base_loss, chunk=args.chunk or None, remat=bool(args.remat),
                                 head_targets=args.head_targets, teacher_temperature=args.teacher_temperature)
    # Host copies: the trained parameters must not share buffers with the teacher or the starting heads (the
    # step donates the state).
    start = jax.tree.map(lambda p: np.array(p, np.float32), {"base": teacher, "heads": heads})
    state = loop.TrainState.create(start, optimizer, args.seed)
    ckpts = Checkpoints(run_dir, keep=args.keep)
    start_step = 0
    if meta is not None:
        start_step, state, meta = ckpts.restore(state, convert=legacy_layout.converters(config))
        it = BatchIterator(train_ds, args.batch_size, args.seed, DataPosition.from_dict(meta["data_position"]))
        print(f"resuming {run_dir} at step {start_step} of {total_steps}", file=sys.stderr)

    def loss_fn(params, frozen, batch, rng, axis_name, step=0):
        del rng, axis_name  # deterministic; sharded jit sees the global batch
        return joint.joint_loss(lcfg, config, hc, params, frozen, batch, step, bundle.dtype, sharded=sh,
                                layerwise_fsdp=bool(args.remat))

    def eval_fn(params, frozen, batch, *, axis_name=None):
        return loss_fn(params, frozen, batch, None, axis_name, total_steps)[1]

    t0 = time.monotonic()
    teacher_dev = sh.place(teacher)
    state = sh.place(state)
    train_step = sh.compile_step(loop.make_train_step(loss_fn, optimizer, with_step=True), state, teacher_dev)
    eval_step = sh.compile_eval(eval_fn, state.params, teacher_dev)
    hidden_map = sh.compile_map(lambda base, b: joint.frozen_hidden(config, base, b).astype(jnp.float32),
                                teacher_dev)
    cache = build_if_it_fits([train_ds, held_ds], lambda b: sh.gather_rows(hidden_map(teacher_dev, sh.put_batch(b))),
                             batch_size=args.batch_size, seq_len=args.seq_len, hidden_size=config.hidden_size,
                             cache_gb=args.cache_gb, progress=args.progress)
    times["cache_s"] = time.monotonic() - t0

    def held_out(params) -> dict | None:
        if held_ds is None:
            return None
        return _means(reporting.evaluate(sh.put_batch, lambda b: eval_step(params, teacher_dev, b), held_ds,
                                         args.batch_size, cache, cache_key="teacher_hidden"))

    guard_prompts = prompts[: args.guard_prompts]
    t0 = time.monotonic()
    answers = quality.greedy_answers(bundle, guard_prompts, args.guard_tokens) if guard_prompts else []
    # The starting point (original base, stage-1 heads), also when resuming; a copy, as the step donates state.
    before_held = held_out(sh.place(jax.tree.map(np.array, {"base": teacher, "heads": heads})))
    before = quality.guard_figures(before_held and before_held["base"],
                                   quality.answer_perplexity(config, teacher, guard_prompts, answers))
    times["guard_s"] = time.monotonic() - t0

    static_meta = {"heads_config": dataclasses.asdict(hc), "model_source": bundle.source,
                   "model_config": dataclasses.asdict(config), "args": vars(args), "total_steps": total_steps}

    def save(dev_state, step, position):
        ckpts.save(step, sh.fetch(dev_state), {**static_meta, "data_position": position.to_dict(), "step": step})

    def describe(aux):
        m = _means(aux)
        return m, {"kl": f"{m['base']['kl']:.4f}", "top1": "/".join(f"{x:.2f}" for x in m["heads"]["top1"])}

    def batches():
        for batch in it:
            if cache is not None:
                batch["teacher_hidden"] = cache.lookup(batch)
            yield batch

    cfg = loop.LoopConfig(total_steps=total_steps, log_every=args.log_every, save_every=args.save_every,
                          eval_every=args.eval_every, stop_at=args.stop_at, max_bad_steps=args.max_bad_steps,
                          progress=args.progress)
    t0 = time.monotonic()
    result = loop.run(cfg, state, start_step, step_fn=lambda s, b: train_step(s, teacher_dev, b),
                      batches=batches(), position=lambda: it.position, put_batch=sh.put_batch, save=save,
                      describe=describe, metrics_log=loop.MetricsLog(os.path.join(run_dir, "metrics.jsonl")),
                      evaluate=(lambda s, step: {"held_out": held_out(s.params)}) if held_ds else None,
                      schedule=schedules["base"], batch_tokens=lambda b: int((b["segment_ids"] > 0).sum()))
    times["train_s"] = time.monotonic() - t0
    params = sh.fetch(result.state.params)
    summary: dict[str, Any] = {"run_dir": run_dir, "stopped": result.reason, "step": result.step,
                               "total_steps": total_steps, "bad_steps": result.bad_steps, "params": params}
    if result.reason != "done":
        return summary

    t0 = time.monotonic()
    held = held_out(result.state.params)
    tuned = bundle.replace(base=jax.tree.map(lambda p: jnp.asarray(p, bundle.dtype), params["base"]))
    after = quality.guard_figures(held and held["base"],
                                  quality.answer_perplexity(config, tuned.base, guard_prompts, answers))
    guard = {"before": before, "after": after, "max_kl": args.max_kl,
             "exceeded": bool(after.get("kl", 0.0) > args.max_kl)}
    if guard["exceeded"]:
        print(f"warning: the held-out KL(original || fine-tuned) is {after['kl']:.4f} nats per token, above "
              f"--max-kl {args.max_kl:g}: the base has drifted; lower --lr or --lambda0, or train fewer steps",
              file=sys.stderr)
    times["eval_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    accept = None
    if args.accept_prompts and prompts:
        accept_prompts = prompts[: args.accept_prompts]
        accept = {"before": reporting.measure_acceptance(bundle, hc, heads, accept_prompts, args.accept_tokens),
                  "after": reporting.measure_acceptance(tuned, hc, params["heads"], accept_prompts,
                                                        args.accept_tokens)}
    times["accept_s"] = time.monotonic() - t0
    from medusa_jax.loading import save_hf

    model_dir = str(save_hf(tuned, os.path.join(run_dir, "model")))
    heads_dir = reporting.export_heads(run_dir, config, hc, params["heads"])
    times["total_s"] = time.monotonic() - t_start
    summary.update({
        "model_dir": model_dir, "heads_dir": heads_dir, "heads_config": dataclasses.asdict(hc),
        "model_source": bundle.source, "from_run": args.from_run, "base_loss": args.base_loss,
        "train_last": result.last_record.get("heads"), "held_out_before": before_held, "held_out": held,
        "quality_guard": guard, "acceptance": accept, "data": data_summary(data_info, train_ds, held_ds),
        "teacher_cache": cache is not None, "times": times,
        "machine": reporting.machine_info(sh.num_devices, mesh=dict(sh.mesh.shape)), "args": vars(args)})
    reporting.write_summary(run_dir, summary)
    return summary


def format_summary(s: dict) -> str:
    """The readable end-of-run report."""
    hc, t = s["heads_config"], s["times"]
    lines = [f"stage 2: base + {hc['num_heads']} heads ({hc['projection']} projection), {s['step']} steps on "
             f"{s['model_source']}, base term {s['base_loss']}, from {s['from_run'] or 'fresh heads'}",
             f"time: total {t['total_s']:.0f} s = load {t['load_s']:.0f} + data {t['data_s']:.0f} + teacher cache "
             f"{t['cache_s']:.0f} + guard {t['guard_s']:.0f} + train {t['train_s']:.0f} + eval {t['eval_s']:.0f} "
             f"+ decode {t['accept_s']:.0f}"]
    before = (s.get("held_out_before") or {}).get("heads")
    lines += reporting.head_table(before, "held-out heads before stage 2", hc["num_heads"])
    after = (s["held_out"] or {}).get("heads") or s["train_last"]
    lines += reporting.head_table(after, "held-out heads after stage 2" if s["held_out"] else
                                  "last training window", hc["num_heads"])
    lines += quality.guard_lines(s["quality_guard"])
    if s["acceptance"]:
        for when in ("before", "after"):
            lines += [f"{when}: " + x for x in reporting.acceptance_line(s["acceptance"][when])]
    lines.append(f"model: {s['model_dir']}   heads: {s['heads_dir']}   summary: "
                 f"{os.path.join(s['run_dir'], 'summary.json')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return cli_common.run_cli("stage2", argv, resolve_args, train, format_summary)


if __name__ == "__main__":
    with cli_errors():
        sys.exit(main())

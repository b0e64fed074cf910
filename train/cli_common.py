"""Command-line pieces both training stages share: the common flags, and resolving them (defaults, --resume).

A stage declares its DEFAULTS (every flag's value when not given) and FIXED_ON_RESUME (flags that change parameter
shapes, the data or its order, so a resumed run must keep them). `resolve_args` fills the defaults, and with
`--resume RUN_DIR` starts from the settings saved in the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Callable, Mapping, Sequence

from medusa_jax.errors import MedusaError
from train import distill as DI
from train.checkpoint import Checkpoints

# Defaults of the shared flags; a stage overrides some (e.g. its learning rate).
COMMON_DEFAULTS: dict[str, Any] = dict(
    model=None, data=None, steps=None, epochs=None, batch_size=4, seq_len=512, lr=1e-3, lambda_decay=0.8,
    warmup=0.1, clip=1.0, dtype="float32", out=None, devices=None, seed=0, keep=3, save_every=50, eval_every=0,
    log_every=10, holdout=0.1, cache_gb=4.0, chunk=256, max_bad_steps=10, head_targets="data",
    teacher_temperature=1.0, stop_at=None, distill_prompts=112,
    distill_tokens=DI.DEFAULT_MAX_NEW_TOKENS, accept_prompts=4, accept_tokens=96, progress=True, distributed=False)
COMMON_FIXED_ON_RESUME = ("model", "data", "batch_size", "seq_len", "dtype", "seed", "holdout", "distill_prompts",
                          "distill_tokens")
HEAD_TARGETS = ("data", "teacher")
POSITIVE_INTS = ("batch_size", "seq_len", "keep", "log_every", "max_bad_steps")
POSITIVE_OR_NONE = ("steps", "epochs", "lr", "stop_at")


def add_common_flags(p: argparse.ArgumentParser, defaults: Mapping[str, Any], default_epochs: float) -> None:
    """Adds the flags both stages take; help texts show the stage's `defaults`."""
    d = defaults
    a = p.add_argument
    a("--model", help="base checkpoint (HF folder, .safetensors, .gguf) or 'tiny' (random test model, synthetic "
      "data); default: the embedded SmolLM2-135M-Instruct")
    a("--data", help="chat data (ShareGPT JSON, chat JSON/JSONL); default: self-distil into <out>/distilled.jsonl")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--epochs", type=float, help=f"passes over the training rows (default {default_epochs:g})")
    a("--batch-size", type=int, help=f"rows per step, all devices together (default {d['batch_size']})")
    a("--seq-len", type=int, help=f"tokens per row; conversations are packed (default {d['seq_len']})")
    a("--lr", type=float, help=f"peak learning rate (default {d['lr']:g})")
    a("--lambda-decay", type=float, help="head k's loss weight is decay**k; 0.8 = paper, 1 = original code "
      f"(default {d['lambda_decay']:g})")
    a("--head-targets", choices=HEAD_TARGETS, help="what each head learns to predict: the data's token t + 2 + k "
      "(data: the original Medusa loss) or the frozen base's own distribution over it (teacher: soft labels, "
      f"self-distillation) (default {d['head_targets']})")
    a("--teacher-temperature", type=float, help="softmax temperature of the teacher's targets, 0 = its argmax "
      f"(default {d['teacher_temperature']:g})")
    a("--warmup", type=float, help=f"linear warmup fraction before the cosine decay (default {d['warmup']:g})")
    a("--clip", type=float, help=f"gradient clipping at this global norm, 0 = off (default {d['clip']:g})")
    a("--dtype", choices=("float32", "bfloat16", "float16"), help="base weights and matmul dtype; trained "
      f"parameters and optimizer state stay float32 (default {d['dtype']})")
    a("--out", help="run folder (default checkpoints/<run-name>/)")
    a("--resume", nargs="?", const="", metavar="RUN_DIR", help="continue the run in RUN_DIR (or --out) from its "
      "latest checkpoint, with its saved settings")
    a("--devices", type=int, help="use the first N devices (default all)")
    a("--distributed", action="store_const", const=True, help="call jax.distributed.initialize() first "
      "(multi-host; pass it again with --resume)")
    a("--seed", type=int, help=f"seed of data order, split and initialisation (default {d['seed']})")
    a("--keep", type=int, help=f"checkpoints to keep (default {d['keep']})")
    a("--save-every", type=int, help=f"checkpoint every N steps, 0 = only at the end (default {d['save_every']})")
    a("--eval-every", type=int, help=f"held-out evaluation every N steps, 0 = only at the end "
      f"(default {d['eval_every']})")
    a("--log-every", type=int, help=f"metrics.jsonl / progress interval in steps (default {d['log_every']})")
    a("--holdout", type=float, help=f"fraction of conversations held out for evaluation (default {d['holdout']:g})")
    a("--cache-gb", type=float, help="host memory for cached frozen hidden states, 0 = recompute "
      f"(default {d['cache_gb']:g})")
    a("--chunk", type=int, help=f"sequence chunk of the fused vocabulary losses, 0 = whole rows "
      f"(default {d['chunk']})")
    a("--max-bad-steps", type=int, help=f"stop after this many non-finite steps (default {d['max_bad_steps']})")
    a("--stop-at", type=int, help="stop after this step with a checkpoint, as if interrupted")
    a("--distill-prompts", type=int, help="self-distillation conversations without --data "
      f"(default {d['distill_prompts']})")
    a("--distill-tokens", type=int, help=f"max new tokens per distilled answer (default {d['distill_tokens']})")
    a("--accept-prompts", type=int, help="held-out prompts decoded with the heads at the end, 0 = skip "
      f"(default {d['accept_prompts']})")
    a("--accept-tokens", type=int, help=f"new tokens per acceptance prompt (default {d['accept_tokens']})")
    a("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")


def resolve_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, defaults: Mapping[str, Any],
                 fixed_on_resume: Sequence[str], inherit: Callable[[dict], dict] | None = None
                 ) -> tuple[argparse.Namespace, dict | None]:
    """(args namespace with defaults filled, resume checkpoint meta or None).

    `inherit(given flags) -> settings` (new runs only) supplies values between the defaults and the given flags,
    e.g. stage 2 taking the data and shapes of the stage-1 run it continues.
    """
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    resume = given.pop("resume", None)
    meta = None
    if resume is not None:
        run_dir = resume or given.get("out")
        if not run_dir:
            parser.error("--resume needs the run folder: --resume RUN_DIR or --resume --out RUN_DIR")
        if not os.path.isdir(run_dir):
            raise MedusaError(f"--resume {run_dir}: no such run folder; give the --out of an earlier run")
        _, meta = Checkpoints(run_dir, create=False).read_meta()
        saved = meta["args"]
        for k in fixed_on_resume:
            if k in given and given[k] != saved.get(k):
                raise MedusaError(f"--{k.replace('_', '-')} {given[k]} differs from the resumed run's "
                                  f"{saved.get(k)}; drop the flag or start a new --out")
        if ("steps" in given or "epochs" in given) and (given.get("steps"), given.get("epochs")) != (
                saved.get("steps"), saved.get("epochs")):
            print("note: the training length differs from the run's, which changes its learning-rate schedule",
                  file=sys.stderr)
            saved = {**saved, "steps": None, "epochs": None}
        given = {**saved, **given, "out": run_dir}
    elif inherit is not None:
        given = {**inherit(given), **given}
    args = argparse.Namespace(**{**defaults, **given})
    if args.model == "tiny" and args.data:
        raise MedusaError("--model tiny has no tokenizer, so it cannot read --data; drop --data (tiny trains on "
                          "synthetic data) or give a real --model")
    for name in POSITIVE_INTS:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in POSITIVE_OR_NONE:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("holdout", "warmup"):
        if hasattr(args, name) and not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} is out of range; use 0 <= {name} < 1")
    if args.teacher_temperature < 0:
        parser.error(f"--teacher-temperature {args.teacher_temperature} is negative; use 0 (the teacher's argmax) "
                     "or a positive temperature")
    if args.steps and args.stop_at and args.stop_at > args.steps:
        parser.error(f"--stop-at {args.stop_at} is after the last step (--steps {args.steps}); lower --stop-at")
    return args, meta


def init_distributed(argv: Sequence[str] | None) -> None:
    """`jax.distributed.initialize()` when --distributed is given, before anything else touches JAX."""
    if "--distributed" in (sys.argv[1:] if argv is None else argv):
        import jax

        jax.distributed.initialize()


def run_cli(stage: str, argv: Sequence[str] | None, resolve_args: Callable, train: Callable,
            format_summary: Callable) -> int:
    """The body of `python -m train.<stage>`: resolve flags (or the resumed run's), train, print the summary;
    an interrupted run prints how to resume and exits 0 (--stop-at) or 128 + the signal number."""
    init_distributed(argv)
    args, meta = resolve_args(argv)
    summary = train(args, meta)
    if summary["stopped"] != "done":
        print(f"stopped at step {summary['step']} of {summary['total_steps']} ({summary['stopped']}); checkpoint in "
              f"{summary['run_dir']}/ckpt. Continue with: python -m train.{stage} --resume {summary['run_dir']}",
              file=sys.stderr)
        return 0 if summary["stopped"] == "stop_at" else 128 + int(signal.Signals[summary["stopped"]])
    print(format_summary(summary))
    return 0

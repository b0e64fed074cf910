"""Own vs shared head projection on the same data: held-out accuracy, decode cost, and the resulting speed.

    python bench/projections.py [--data FILE] [--steps N] [--out DIR] [--model PATH]

For each projection (`shared`: the frozen base lm_head, read once per step for all heads; `own`: one trainable
[H, V] projection per head, initialised from the lm_head, the original Medusa-1 layout) it trains stage-1 heads
with `python -m train.stage1` on the same data, seed and steps, then runs the tree tuner's measurements
(`infer.tune_tree.tune`: per-head accuracy on the tuner's held-out prompts, step time against tree size on this
machine, the best tree, and measured greedy speed against plain decoding). Finished training runs are reused, so
an interrupted comparison continues. Prints a markdown table and writes `<out>/projections.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

PROJECTIONS = ("shared", "own")


def train(projection: str, args: argparse.Namespace) -> dict:
    """Trains (or reuses) one head set; returns its stage-1 summary."""
    run = Path(args.out) / projection
    summary = run / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "-m", "train.stage1", "--projection", projection, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--seed", "0",
               "--accept-prompts", "0", "--out", str(run), "--no-progress"]
        if args.data:
            cmd += ["--data", args.data]
        if args.model:
            cmd += ["--model", args.model]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(summary.read_text())


def measure(projection: str, summary: dict, args: argparse.Namespace) -> dict:
    from infer import tune_tree
    from medusa_jax import load

    bundle = load(args.model, heads=summary["heads_dir"])
    prompts = tune_tree._prompt_ids(bundle, None, args.prompts)
    record = tune_tree.tune(bundle.with_heads(bundle.heads, bundle.heads_config, None), prompts,
                            sizes=tuple(args.sizes), max_new_tokens=args.max_new_tokens)
    steps = {r["nodes"]: r["step_ms"] for r in record["curve"] if r["measured"]}
    return {"projection": projection, "held_out": summary["held_out"], "train_s": summary["times"]["train_s"],
            "tuner_accuracy": record["accuracy"], "step_ms": steps, "tree": record["tree"],
            "measured_ar": record["measured_ar"], "measured_tree": record["measured_tree"],
            "speedup": record["speedup"], "machine": record["machine"], "date": record["date"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="chat data for both runs (default: stage 1 self-distils)")
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=6, help="held-out tuning prompts to measure on")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 4],
                    help="tree sizes (draft nodes) whose step time is measured")
    ap.add_argument("--out", default="runs/projections")
    args = ap.parse_args(argv)
    from medusa_jax.errors import cli_errors

    with cli_errors():
        os.makedirs(args.out, exist_ok=True)
        rows = [measure(p, train(p, args), args) for p in PROJECTIONS]
        Path(args.out, "projections.json").write_text(json.dumps(rows, indent=1))
        sizes = sorted(rows[0]["step_ms"])
        print(f"\nmachine: {rows[0]['machine']}, {rows[0]['date']}; {args.steps} steps of {args.batch_size} x "
              f"{args.seq_len} tokens each\n")
        print("| projection | held-out top-1 (heads 0..K-1) | held-out top-5 | train s | "
              + " | ".join(f"step ms, {n + 1} nodes" for n in sizes)
              + " | chosen tree nodes | Medusa tok/s | plain tok/s | speedup |")
        print("|---" * (8 + len(sizes)) + "|")
        for r in rows:
            h = r["held_out"]
            print(f"| {r['projection']} | {' / '.join(f'{x:.3f}' for x in h['top1'])} | "
                  f"{' / '.join(f'{x:.3f}' for x in h['top5'])} | {r['train_s']:.0f} | "
                  + " | ".join(f"{r['step_ms'][n]:.1f}" for n in sizes)
                  + f" | {len(r['tree']) + 1} | {r['measured_tree']['tokens_per_s']:.1f} | "
                  f"{r['measured_ar']['tokens_per_s']:.1f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()

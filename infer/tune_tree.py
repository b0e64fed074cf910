"""`python -m infer.tune_tree`: build the draft tree that maximises tokens per second on this machine.

Method (measure, predict, choose, measure again):
  1. Per-head, per-rank accuracy of the heads against greedy continuations of held-out prompts
     (`heads_eval.head_accuracy`).
  2. Greedy growth of the tree, one node at a time, by expected accepted length under the original's independence
     assumption (`tree.grow_tree_sequence`): tree n is the best n-node tree.
  3. The measured cost of one decoding step as a function of the number of tree nodes on this machine.
  4. Predicted tokens/s of tree n = (1 + expected accepted length) / step time(n); n = 0 is plain decoding, so the
     chosen tree is never predicted slower than it.
  5. The best tree with draft nodes is decoded for real next to plain decoding, prompt by prompt, with each lookup
     chain of `--lookup` added to it and on its own (`infer.lookup`: draft tokens copied from the context), and
     the fastest of them all is saved (the curve's short runs cannot resolve a few percent); every speed is
     reported.
The tree and its lookup chain are saved as `tree.json` beside the heads; `medusa_jax.load` attaches them and
`generate` uses them by default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from infer.api import generate_ids
from infer.heads_eval import head_accuracy, topk_table
from medusa_jax import chat
from medusa_jax.bundle import Bundle
from medusa_jax.errors import MedusaError, cli_errors, int_list
from medusa_jax.tree import check_lookup, expected_accept_length, grow_tree_sequence

# Held-out tuning prompts, written for this purpose (never used for training; MT-Bench is kept for evaluation).
TUNING_PROMPTS = (
    "Explain how a hash table works and when it is a bad choice.",
    "Write a short poem about the first snow of winter.",
    "What are three practical ways to save money on groceries?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Why is the sky blue? Explain it to a ten-year-old.",
    "Give me a packing list for a weekend hiking trip.",
    "Summarise the causes of the French Revolution in a paragraph.",
    "How do I politely decline a meeting invitation from my manager?",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name and a slogan for a small bakery.",
    "Solve for x: 3x + 7 = 22. Show your steps.",
    "Describe a typical day of a lighthouse keeper in the 1900s.",
)

CPU_SIZES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
DEFAULT_LOOKUPS = (0, 2, 4)  # lookup chains decoded end to end with the best tree (0: none)
# On an accelerator a batch-1 step is bound by reading the weights, so a step of many tree nodes can cost about what
# a one-token step does, and the best tree may be as wide as the original's 64 nodes or wider (up to what the heads'
# top-10 can serve); each size measured is one more compile, so the grid stays sparse above 32.
ACCELERATOR_SIZES = CPU_SIZES + (48, 64, 96, 128)


def default_sizes(backend: str | None = None) -> tuple[int, ...]:
    """Tree sizes (draft nodes) whose step time the tuner measures on `backend` (default: JAX's default backend)."""
    return CPU_SIZES if (backend or jax.default_backend()) == "cpu" else ACCELERATOR_SIZES


def machine_description() -> str:
    """Platform, device and core count, for the records in BENCHMARKS.md."""
    dev = jax.devices()[0]
    return f"{platform.machine()} {dev.platform}:{getattr(dev, 'device_kind', '')} ({os.cpu_count()} cores), jax {jax.__version__}"


def step_time(params: Bundle, paths: Sequence[tuple[int, ...]], prompt: list[int], repeats: int = 2,
              warm_up: bool = True) -> float:
    """Seconds per decoding step with tree `paths` (empty = plain decoding), prefill excluded; the best of
    `repeats`. `warm_up=False` skips the compiling run (the executable must have run before).

    Two generations of different lengths share one compiled executable (same buckets); the difference of their
    wall times over the difference of their step counts is the per-step cost.
    """
    kw = dict(mode="greedy" if paths else "ar", tree=list(paths) if paths else None, stop_ids=(), prefix_cache=False)
    if warm_up:
        generate_ids(params, [prompt], max_new_tokens=70, **kw)  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        short = generate_ids(params, [prompt], max_new_tokens=70, **kw)
        long = generate_ids(params, [prompt], max_new_tokens=128, **kw)
        if long.steps > short.steps and long.wall_s > short.wall_s:
            best = min(best, (long.wall_s - short.wall_s) / (long.steps - short.steps))
        else:  # steps too fast for the wall clock to tell apart (a tiny model): the whole call's mean, an upper bound
            best = min(best, long.wall_s / max(long.steps, 1))
    return best


def choose_tree(accuracy: np.ndarray, step_s: dict[int, float], max_nodes: int,
                min_nodes: int = 0) -> tuple[int, list, list[dict]]:
    """Picks the tree size (at least `min_nodes` draft nodes) with the best predicted tokens/s.

    Step times between measured sizes are interpolated linearly. Returns (size, paths, table rows).
    """
    heads, ranks = accuracy.shape
    max_nodes = min(max_nodes, sum(ranks ** d for d in range(1, heads + 1)))  # every node the heads can draft
    trees = [[]] + grow_tree_sequence(accuracy, max_nodes)
    sizes = sorted(step_s)
    rows = []
    for n, paths in enumerate(trees):
        if n > sizes[-1]:
            break
        t = float(np.interp(n, sizes, [step_s[s] for s in sizes]))
        tokens = 1.0 + (expected_accept_length(paths, accuracy) if paths else 0.0)
        rows.append({"nodes": n, "step_ms": 1e3 * t, "expected_tokens_per_step": tokens,
                     "predicted_tokens_per_s": tokens / t, "measured": n in step_s})
    best = max((r for r in rows if r["nodes"] >= min_nodes), key=lambda r: r["predicted_tokens_per_s"])
    return best["nodes"], [list(p) for p in trees[best["nodes"]]], rows


def best_tree(record: dict, num_heads: int, min_nodes: int = 1) -> list | None:
    """From a saved tuning record (tree.json): the tree with the best predicted tokens/s that uses only the first
    `num_heads` heads and has at least `min_nodes` draft nodes (1: a real Medusa tree even where plain decoding
    is predicted faster). None when the record predates the per-rank accuracy it needs."""
    if "accuracy_ranks" not in record or not record.get("curve"):
        return None
    accuracy = np.asarray(record["accuracy_ranks"], np.float64)[:num_heads]
    step_s = {r["nodes"]: r["step_ms"] / 1e3 for r in record["curve"] if r["measured"]}
    return choose_tree(accuracy, step_s, max(step_s), min_nodes)[1]


def best_lookup(record: dict) -> int | None:
    """From a saved tuning record: the lookup chain that decoded fastest end to end together with the record's
    drafting tree (its head paths), or None when the record has no such measurement."""
    with_heads = [v for v in record.get("variants") or () if v["tree_nodes"] > 1]
    return max(with_heads, key=lambda v: v["tokens_per_s"])["lookup"] if with_heads else None


def measure_speeds(params: Bundle, prompts: list[list[int]], variants: Sequence[tuple[list, int]],
                   max_new_tokens: int) -> list[dict]:
    """Greedy decoding of `prompts` with each (tree paths, lookup chain) of `variants` (([], 0) = plain decoding):
    tokens/s and tokens per step for each. The variants take turns prompt by prompt, so a slow drift of a shared
    machine reaches all alike."""
    kws = [dict(mode="greedy" if paths or chain else "ar", tree=paths or ("ar" if chain else None), lookup=chain,
                prefix_cache=False) for paths, chain in variants]
    for kw in kws:
        generate_ids(params, [prompts[0]], max_new_tokens=max_new_tokens, **kw)  # compile
    sums = [[0, 0, 0.0] for _ in kws]  # tokens, steps, wall seconds
    for p in prompts:
        for kw, acc in zip(kws, sums):
            g = generate_ids(params, [p], max_new_tokens=max_new_tokens, **kw)
            acc[0], acc[1], acc[2] = acc[0] + g.new_tokens, acc[1] + g.steps, acc[2] + g.wall_s
    return [{"tokens_per_s": t / w, "tokens_per_step": t / max(n, 1), "tokens": t} for t, n, w in sums]


def tune(params: Bundle, prompts: list[list[int]], *, sizes: Sequence[int] | None = None,
         max_new_tokens: int = 128, ranks: int = 10, rounds: int = 3, lookups: Sequence[int] = (0,)) -> dict:
    """Runs the whole method; returns the record saved as tree.json. `sizes`: default `default_sizes()`.
    `rounds`: passes over all sizes when timing steps, the median of them kept for each size. `lookups`: lookup
    chains decoded end to end with the best drafting tree and alone (0, none, always)."""
    num_heads = params.heads_config.num_heads
    sizes = tuple(sizes) if sizes is not None else default_sizes()
    lookups = sorted(set(lookups) | {0})
    t0 = time.time()
    accuracy, count = head_accuracy(params, prompts, max_new_tokens=max_new_tokens, ranks=ranks)
    trees = grow_tree_sequence(accuracy, max(sizes))
    # Sizes take turns, round after round (each round's first pass compiles), so a drift of a shared machine's
    # speed bends the whole curve alike instead of the sizes measured while it lasted. Each size keeps its median
    # round: a step time is a difference of two wall times, which a slow spell in the shorter run throws low (a
    # 1-node step once read 4.2 ms, and 15.0 ms in the next run) as surely as one in the longer run
    # throws it high, so the fastest round is no safer than the slowest.
    times: dict[int, list[float]] = {n: [] for n in sizes}
    with tqdm(total=rounds * len(sizes), desc="step time vs tree nodes", unit="tree") as bar:
        for r in range(rounds):
            for n in sizes:
                times[n].append(step_time(params, trees[n - 1] if n else [], prompts[0], repeats=1, warm_up=r == 0))
                bar.update()
    step_s = {n: float(np.median(t)) for n, t in times.items()}
    predicted, _, rows = choose_tree(accuracy, step_s, max(sizes))
    # The step-time curve comes from short differenced runs with a short cache, which a noisy machine can bend
    # and which leave out what whole answers also pay (and the lookup chain's acceptance, which depends on the
    # text); when it ranks the best drafting tree close to plain decoding, only decoding both end to end tells
    # them apart. So that tree (the predicted best when it drafts), with and without each lookup chain, and each
    # chain alone, is decoded next to plain decoding, prompt by prompt, and the fastest is saved: the default is
    # never slower than plain decoding as measured here.
    size, paths, _ = choose_tree(accuracy, step_s, max(sizes), min_nodes=1) if max(sizes) > 0 else (0, [], rows)
    variants = [([], 0)] + [(paths, chain) for chain in lookups if paths] + [([], c) for c in lookups if c]
    speeds = measure_speeds(params, prompts, variants, max_new_tokens)
    ar = speeds[0]
    pick = max(range(len(variants)), key=lambda i: (speeds[i]["tokens_per_s"], -i))  # ties: the simpler one
    chosen, chain = variants[pick]
    rejected = None
    if paths and chosen != paths:  # the drafting tree lost to plain decoding (or to a lookup chain alone)
        best_with = max((i for i, (p, _) in enumerate(variants) if p), key=lambda i: speeds[i]["tokens_per_s"])
        rejected = {"tree": paths, "num_nodes": size + 1, "lookup": variants[best_with][1],
                    "measured": speeds[best_with]}
    return {
        "tree": chosen, "num_nodes": len(chosen) + 1, "lookup": chain, "num_heads": num_heads, "rejected": rejected,
        "predicted_num_nodes": predicted + 1,
        "accuracy": topk_table(accuracy), "accuracy_ranks": np.round(accuracy, 5).tolist(),
        "accuracy_positions": count,
        "curve": rows, "measured_ar": ar, "measured_tree": speeds[pick],
        "variants": [{"tree_nodes": len(p) + 1, "lookup": c, **sp} for (p, c), sp in zip(variants, speeds)],
        "speedup": speeds[pick]["tokens_per_s"] / ar["tokens_per_s"],
        "machine": machine_description(), "date": datetime.date.today().isoformat(),
        "tuning_s": round(time.time() - t0, 1),
    }


def _prompt_ids(params: Bundle, path: str | None, limit: int) -> list[list[int]]:
    if params.tokenizer is None:
        raise MedusaError("tuning needs a model with a tokenizer (not the random tiny model)")
    texts: list = list(TUNING_PROMPTS)
    if path:
        if not Path(path).is_file():
            raise MedusaError(f"prompt file {path} does not exist; give a text file with one prompt per line")
        texts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not texts:
        raise MedusaError(f"prompt file {path} has no prompts")
    return [chat.render_prompt(params.tokenizer, t) for t in texts[:limit]]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m infer.tune_tree", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--heads", default=None, help="Medusa heads (default: the shipped heads)")
    ap.add_argument("--prompts", default=None, help="held-out prompts, one per line (default: built-in)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sizes", default=None,
                    help="tree sizes (draft nodes) whose step time is measured; others are interpolated (default "
                    f"{','.join(map(str, CPU_SIZES))} on a CPU, up to {ACCELERATOR_SIZES[-1]} on an accelerator)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="passes over all sizes when timing steps; the median per size is kept (default 3)")
    ap.add_argument("--lookup", default=",".join(map(str, DEFAULT_LOOKUPS)),
                    help="lookup chains (draft tokens copied from the context) decoded end to end with the best "
                    f"tree and alone; 0 = none, always measured (default {','.join(map(str, DEFAULT_LOOKUPS))})")
    ap.add_argument("--out", default=None, help="where to write tree.json (default: beside the heads)")
    args = ap.parse_args(argv)
    with cli_errors():
        from medusa_jax.loading import DEFAULT_HEADS_DIR, load

        # flags first: the model load is slow
        sizes = sorted(set(default_sizes() if args.sizes is None else int_list(args.sizes, "--sizes", 0)) | {0})
        if min(args.num_prompts, args.max_new_tokens, args.rounds) < 1:
            raise MedusaError("--num-prompts, --max-new-tokens and --rounds must be at least 1")
        lookups = [check_lookup(c, "--lookup") for c in int_list(args.lookup, "--lookup", 0)]
        params = load(args.model, heads=args.heads)
        if params.heads is None:
            raise MedusaError("the model has no Medusa heads to tune a tree for; pass --heads PATH")
        prompts = _prompt_ids(params, args.prompts, args.num_prompts)
        record = tune(params.with_heads(params.heads, params.heads_config, None), prompts, sizes=sizes,
                      max_new_tokens=args.max_new_tokens, rounds=args.rounds, lookups=lookups)
        if args.out:
            out = Path(args.out)
        elif args.heads:
            out = (Path(args.heads) if Path(args.heads).is_dir() else Path(args.heads).parent) / "tree.json"
        elif args.model is None:
            out = DEFAULT_HEADS_DIR / "tree.json"
        else:
            raise MedusaError("say where to save the tree: pass --out PATH (or --heads DIR to save beside them)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out)
        print("\n| nodes | step ms | expected tokens/step | predicted tokens/s |\n|---|---|---|---|")
        for r in record["curve"]:
            if r["measured"]:
                print(f"| {r['nodes'] + 1} | {r['step_ms']:.1f} | {r['expected_tokens_per_step']:.2f} | "
                      f"{r['predicted_tokens_per_s']:.1f} |")
        a, b = record["measured_ar"], record["measured_tree"]
        print(f"\npredicted best: {record['predicted_num_nodes']} node(s)")
        if record["rejected"]:
            r = record["rejected"]
            print(f"best drafting tree: {r['num_nodes']} nodes {r['tree']}, measured "
                  f"{r['measured']['tokens_per_s']:.1f} tok/s at best, against plain decoding's "
                  f"{a['tokens_per_s']:.1f}: not kept")
        print("\n| tree nodes | lookup chain | tokens/s | tokens/step |\n|---|---|---|---|")
        for v in record["variants"]:
            print(f"| {v['tree_nodes']} | {v['lookup']} | {v['tokens_per_s']:.1f} | {v['tokens_per_step']:.2f} |")
        print(f"\nchosen tree: {record['num_nodes']} nodes {record['tree']}, lookup chain {record['lookup']}\n"
              f"measured greedy: plain {a['tokens_per_s']:.1f} tok/s, Medusa {b['tokens_per_s']:.1f} tok/s "
              f"({b['tokens_per_step']:.2f} tokens/step), speedup {record['speedup']:.2f}x on {record['machine']}\n"
              f"saved {out}")


if __name__ == "__main__":
    main()

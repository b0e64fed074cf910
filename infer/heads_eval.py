"""How often each Medusa head's top-k holds the token that greedy decoding will actually produce.

This is the statistic that decides what a draft tree gains: at temperature 0 a draft node is accepted exactly when
its token equals the base model's greedy continuation. So we decode each prompt greedily (plain decoding), run one
cache-free forward over prompt + answer, and compare head k's ranked predictions at position t with the answer's
token at t + 2 + k.

    python -m infer.heads_eval --heads runs/a/heads runs/b/heads     # compare head sets (default: shipped heads)
    python -m infer.heads_eval --questions mt_bench_questions.jsonl --per-category 1 --tree mc_sim_7b_63
    python -m infer.heads_eval --questions mt_bench_questions.jsonl --per-category 1 --grow 16,64,128

For each head set it prints top-1/top-5 per head and the tokens per step of real greedy decoding with `--tree`:
a count that does not depend on the machine, so it is what Medusa's speedup follows where a tree step costs about
what a one-token step does (a GPU). `--grow N,...` also decodes with the best N-node trees grown from the heads'
per-rank accuracy in the tuner's `tree.json` beside them (held-out prompts; without one, the accuracy measured here,
which flatters the trees), printing the expected tokens per step the tuner predicts next to the measured count:
how far wider trees can take these heads, and how well the tuner's independence assumption predicts them.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infer.api import generate_ids
from medusa_jax import model
from medusa_jax.bundle import Bundle
from medusa_jax.config import HeadsConfig, LlamaConfig
from medusa_jax.errors import MedusaError, cli_errors, int_list
from medusa_jax.tree import expected_accept_length, grow_tree_sequence


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _head_ranks(config: LlamaConfig, heads_config: HeadsConfig, ranks: int, base, heads, tokens):
    """tokens [1, T] -> top-`ranks` ids of every head at every position: [T, K, ranks]."""
    t = tokens.shape[1]
    hidden, _ = model.forward(config, base, tokens, jnp.arange(t, dtype=jnp.int32)[None], model.causal_mask(1, t))
    logits = model.head_logits(heads_config, config, base, heads, hidden[0])  # [T, K, V]
    return jax.lax.top_k(logits, ranks)[1]


def head_accuracy(params: Bundle, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                  ranks: int = 10, answers: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, int]:
    """Per-head, per-rank hit rates on the greedy continuations of `prompts` (decoded here with plain decoding,
    or given as `answers`, e.g. from greedy Medusa decoding, which yields the same tokens).

    Returns:
      accuracy: float [K, ranks]; accuracy[k, r] = P(rank r of head k equals the greedy token 2 + k ahead).
        Cumulative sums over r give top-r accuracy.
      count: number of (position, head 0) comparisons made.
    """
    if params.heads is None:
        raise MedusaError("head accuracy needs Medusa heads; load them with medusa_jax.load(..., heads=PATH)")
    k = params.heads_config.num_heads
    hits = np.zeros((k, ranks))
    counts = np.zeros(k)
    for i, ids in enumerate(prompts):
        if answers is not None:
            answer = list(answers[i])
        else:
            answer = generate_ids(params, [list(ids)], max_new_tokens=max_new_tokens, mode="ar").tokens[0]
        full = list(ids) + answer
        # Pad to a multiple of 64 so prompts of similar length share one compiled forward.
        length = -(-len(full) // 64) * 64
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :len(full)] = full
        top = np.asarray(_head_ranks(params.config, params.heads_config, ranks, params.base, params.heads,
                                     jnp.asarray(tokens)))  # [T, K, ranks]
        start = len(ids) - 1  # the last prompt position predicts the first answer token
        for head in range(k):
            positions = np.arange(start, len(full) - 2 - head)
            if positions.size == 0:
                continue
            truth = np.asarray(full)[positions + 2 + head]
            hits[head] += (top[positions, head, :] == truth[:, None]).sum(0)
            counts[head] += positions.size
    return hits / np.maximum(counts, 1)[:, None], int(counts[0])


def topk_table(accuracy: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, list[float]]:
    """{"top1": [per head], "top5": [...]} from a per-rank accuracy matrix."""
    cum = np.cumsum(accuracy, axis=1)
    return {f"top{k}": [round(float(x), 4) for x in cum[:, min(k, cum.shape[1]) - 1]] for k in ks}


def tokens_per_step(params: Bundle, prompts: Sequence[Sequence[int]], tree, max_new_tokens: int) -> dict:
    """Greedy Medusa decoding of `prompts` (one batch) with `tree`: tokens emitted per decoding step (accepted
    drafts + 1, the `mean_accepted` of `Generation.stats`) over all rows' steps."""
    out = generate_ids(params, [list(p) for p in prompts], max_new_tokens=max_new_tokens, mode="greedy",
                       tree=tree, prefix_cache=False)
    ran = out.accepted >= 0  # [B, steps]: -1 once a row had stopped
    return {"tokens": out.new_tokens, "row_steps": int(ran.sum()), "tokens_per_step": out.stats()["mean_accepted"],
            "answers": out.tokens}


def grown_trees(params: Bundle, prompts: Sequence[Sequence[int]], sizes: Sequence[int], accuracy: np.ndarray,
                max_new_tokens: int) -> list[dict]:
    """For each size N: the best N-node tree grown from `accuracy` [K, ranks], its predicted tokens per step
    (1 + expected accepted length) and the tokens per step greedy decoding of `prompts` measures with it."""
    trees = grow_tree_sequence(accuracy, max(sizes))
    rows = []
    for n in sizes:
        paths = [list(p) for p in trees[min(n, len(trees)) - 1]]
        measured = tokens_per_step(params, prompts, paths, max_new_tokens)
        rows.append({"nodes": len(paths) + 1, "depth": max(len(p) for p in paths),
                     "predicted_tokens_per_step": 1.0 + expected_accept_length(paths, accuracy),
                     "tokens_per_step": measured["tokens_per_step"], "tree": paths})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m infer.heads_eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--heads", nargs="+", default=[None], help="head folders or files to compare (default: the "
                    "shipped heads)")
    ap.add_argument("--questions", default=None, help="FastChat question JSONL whose first turns are the prompts "
                    "(default: the tree tuner's built-in held-out prompts)")
    ap.add_argument("--per-category", type=int, default=None, help="with --questions: the first N of each category")
    ap.add_argument("--limit", type=int, default=8, help="number of prompts (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="greedy tokens per prompt (default 128)")
    ap.add_argument("--tree", default="mc_sim_7b_63", help="tree for the tokens-per-step count, or 'none' "
                    "(default mc_sim_7b_63, the original's 64-node tree)")
    ap.add_argument("--grow", default=None, help="comma-separated draft-node counts N: also decode with the best "
                    "N-node trees grown from the heads' tuning record (tree.json)")
    args = ap.parse_args(argv)
    with cli_errors():
        from infer.bench_setup import tuning_record

        grow = int_list(args.grow, "--grow", 1) if args.grow else []
        from infer.tune_tree import TUNING_PROMPTS
        from medusa_jax import chat
        from medusa_jax.loading import load

        if args.limit < 1 or args.max_new_tokens < 1 or (args.per_category is not None and args.per_category < 1):
            raise MedusaError("--limit, --max-new-tokens and --per-category must be at least 1")
        texts: list[str] = list(TUNING_PROMPTS)[: args.limit]
        if args.questions:
            from infer.bench import read_questions

            texts = [q.turns[0] for q in read_questions(args.questions, args.limit, args.per_category)]
        rows = []
        for heads in args.heads:
            params = load(args.model, heads=heads)
            if params.heads is None:
                raise MedusaError(f"{heads or args.model}: no Medusa heads to evaluate; pass --heads PATH")
            prompts = [chat.render_prompt(params.tokenizer, t) for t in texts]
            row: dict = {"heads": heads or "shipped"}
            answers = None
            if args.tree != "none":  # greedy Medusa output is the plain greedy output: reuse it for the accuracy
                decoded = tokens_per_step(params, prompts, args.tree, args.max_new_tokens)
                answers = decoded.pop("answers")
                row.update(tree=args.tree, **decoded)
            acc, count = head_accuracy(params, prompts, max_new_tokens=args.max_new_tokens, answers=answers)
            row.update(positions=count, **topk_table(acc))
            if grow:
                record = tuning_record(heads, args.model)
                held_out = record is not None and "accuracy_ranks" in record
                source = np.asarray(record["accuracy_ranks"]) if held_out else acc
                row["grown_from"] = "tree.json (tuning prompts)" if held_out else "these prompts (no tree.json)"
                row["grown"] = grown_trees(params, prompts, grow, source[:params.heads_config.num_heads],
                                           args.max_new_tokens)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "grown"}))
        k = max(len(r["top1"]) for r in rows)
        print(f"\n{len(texts)} prompts, {args.max_new_tokens} greedy tokens each"
              + (f"; tokens per step of greedy decoding with {args.tree}" if args.tree != "none" else ""))
        print("| heads | " + " | ".join(f"head {i} top-1 / top-5" for i in range(k))
              + (" | tokens per step |" if args.tree != "none" else " |"))
        print("|---" * (k + 1 + (args.tree != "none")) + "|")
        for r in rows:
            cells = [f"{a:.3f} / {b:.3f}" for a, b in zip(r["top1"], r["top5"])]
            tps = [f"{r['tokens_per_step']:.3f}"] if "tokens_per_step" in r else []
            print("| " + " | ".join([r["heads"], *cells, *tps]) + " |")
        for r in rows:
            if "grown" in r:
                print(f"\n{r['heads']}: trees grown from the per-rank accuracy of {r['grown_from']}\n"
                      "| nodes | depth | predicted tokens per step | measured tokens per step |\n|---|---|---|---|")
                for g in r["grown"]:
                    print(f"| {g['nodes']} | {g['depth']} | {g['predicted_tokens_per_step']:.3f} | "
                          f"{g['tokens_per_step']:.3f} |")


if __name__ == "__main__":
    main()

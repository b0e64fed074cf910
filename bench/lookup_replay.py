"""What a lookup chain would accept on recorded greedy answers: tokens per step by chain length and n-gram.

    python -m infer.bench --per-category 1 --max-new-tokens 128 --out runs/bench     # records the answers
    python bench/lookup_replay.py --bench runs/bench/bench.json                       # replays them

Greedy decoding's output does not depend on the drafts, so the ar row's answers in a `bench.json` fix, for every
position, what a lookup chain (`infer.lookup`, on the context up to that position) would have drafted there and
how many of its tokens the answer confirms. Walking each answer from its first token, a step accepts that many
and moves past them and the bonus token: the tokens per step of greedy decoding with the chain alone, for any
chain length L and longest n-gram, without decoding again and without timing anything (a machine-independent
count, as `infer.heads_eval`'s). A step whose context has no match runs without the chain, as the decoder does.
With the tuner's step-time curve (`--curve`, a tree.json; the shipped one by default) it also predicts tokens/s
relative to plain decoding: the tokens over the steps' time, L + 1 nodes for a step with a match and one node
for a step without, relative to one node per token. `--by-match` splits the steps of one chain by the length
of the match they continued, with what a step accepted there; with `--no-gate` a step without a match keeps the
chain (which then repeats the root), as the decoder did before it ran such steps without it.
A bench.json row with the same chain and no head paths (`lookupL`, or a `medusa` row tuned to a chain alone) is
printed beside its replay as a check (`tests/test_lookup.py` checks that both count the same steps). The replay
counts emitted tokens; the bench's tokens per step also counts drafts accepted past the token limit, which the
replay cannot see (the answer ends there), so it may read a little higher.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python bench/x.py`

from medusa_jax.errors import MedusaError, cli_errors  # noqa: E402


def per_position(sequence: Sequence[int], start: int, length: int, max_ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """For each root position r in [start, len(sequence)): (draft tokens the sequence confirms, the match length
    the drafts continued), both int [len(sequence) - start]. Drafts past the sequence's end count as wrong."""
    import jax.numpy as jnp

    from infer import lookup

    seq = np.asarray(sequence, np.int32)
    roots = np.arange(start, len(seq), dtype=np.int32)
    width = len(seq) + length + 1
    history = np.full((len(roots), width), -1, np.int32)  # every row: the whole sequence (drafts read <= root)
    history[:, :len(seq)] = seq
    h, r = jnp.asarray(history), jnp.asarray(roots)
    found = lookup.match(h, r, max_ngram)
    drafted = np.asarray(lookup.drafts(h, r, length, max_ngram, found=found))  # [R, L]
    n = found[1]
    truth = np.take_along_axis(history, roots[:, None] + 1 + np.arange(length)[None, :], axis=1)  # [R, L]
    confirmed = np.cumprod(drafted == truth, axis=1).sum(axis=1)
    return confirmed, np.asarray(n)


def walk(confirmed: np.ndarray) -> list[int]:
    """Indices (into `confirmed`) of the roots greedy decoding steps from, first one 0: each step accepts
    confirmed[i] tokens and its bonus token becomes the next root."""
    i, roots = 0, []
    while i < len(confirmed) - 1:  # the last token needs no step after it
        roots.append(i)
        i += int(confirmed[i]) + 1
    return roots


def replay(answers: list[tuple[list[int], list[int]]], length: int, max_ngram: int, gate: bool = True) -> dict:
    """(prompt ids, answer ids) pairs -> {"steps", "tokens", "tokens_per_step", "by_match": {n: [steps, accepted]}}
    (n = 0: steps without a match, which the decoder runs as plain one-token steps when the chain is alone;
    `gate=False` keeps the chain there)."""
    steps = tokens = 0
    by_match: dict[int, list[int]] = {}
    for prompt, answer in answers:
        if len(answer) < 2:
            continue
        confirmed, n = per_position(list(prompt) + list(answer), len(prompt), length, max_ngram)
        confirmed = np.minimum(confirmed, len(answer) - 1 - np.arange(len(answer)))  # the answer's end caps it
        if gate:  # without a match the decoder runs the step without the chain
            confirmed = np.where(n > 0, confirmed, 0)
        for i in walk(confirmed):
            steps += 1
            tokens += min(int(confirmed[i]) + 1, len(answer) - 1 - i)  # emitted: the last bonus may fall past the end
            slot = by_match.setdefault(int(n[i]), [0, 0])
            slot[0] += 1
            slot[1] += int(confirmed[i])
    return {"steps": steps, "tokens": tokens, "tokens_per_step": tokens / max(steps, 1), "by_match": by_match}


def recorded_answers(record: dict, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The ar row's (prompt ids, answer ids) for every turn of a bench.json, prompts rebuilt as the bench did."""
    from infer.bench import read_questions, turn_prompt

    ids = record.get("question_ids")
    questions = read_questions(record["questions"], None)
    if ids is not None:
        by_id = {q.question_id: q for q in questions}
        questions = [by_id[i] for i in ids]
    else:  # records before question_ids: the bench's selection is not recorded; the first N per category
        per = -(-record["num_questions"] // len({q.category for q in questions}))
        questions = read_questions(record["questions"], None, per_category=per)
    if len(questions) != len(record["outputs"]["ar"]):
        raise MedusaError(f"{len(questions)} questions vs {len(record['outputs']['ar'])} recorded; the bench.json "
                          "predates question_ids: rerun python -m infer.bench")
    pairs = []
    for q, turns in zip(questions, record["outputs"]["ar"]):
        texts = [t["text"] for t in turns]
        for turn, rec in enumerate(turns):
            pairs.append((turn_prompt(tokenizer, q, texts, turn), rec["tokens"]))
    return pairs


def step_curve(path: Path) -> dict[int, float]:
    """{draft nodes: step ms} from a tuner record."""
    record = json.loads(path.read_text())
    return {int(r["nodes"]): float(r["step_ms"]) for r in record.get("curve") or ()}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python bench/lookup_replay.py", description=__doc__.split("\n")[0])
    ap.add_argument("--bench", required=True, help="a bench.json written by python -m infer.bench")
    ap.add_argument("--lengths", default="1,2,3,4,6,8", help="lookup chain lengths L (default 1,2,3,4,6,8)")
    ap.add_argument("--ngrams", default="1,2,3,4", help="longest n-grams matched (default 1,2,3,4)")
    ap.add_argument("--by-match", default="4,3", help="L,n whose steps are split by match length (default 4,3)")
    ap.add_argument("--no-gate", action="store_true", help="steps without a match keep the chain (see above)")
    ap.add_argument("--model", default=None, help="the benchmarked model, for its tokenizer (default: embedded)")
    ap.add_argument("--curve", default=None, help="tree.json with a step-time curve (default: the shipped heads')")
    args = ap.parse_args(argv)
    with cli_errors():
        from infer.lookup import MAX_NGRAM
        from medusa_jax.loading import DEFAULT_HEADS_DIR, embedded

        path = Path(args.bench)
        if not path.is_file():
            raise MedusaError(f"--bench {path}: no such file; run python -m infer.bench first (it writes bench.json)")
        record = json.loads(path.read_text())
        lengths = [int(x) for x in args.lengths.split(",")]
        ngrams = [int(x) for x in args.ngrams.split(",")]
        split_l, split_n = (int(x) for x in args.by_match.split(","))
        curve = step_curve(Path(args.curve) if args.curve else Path(DEFAULT_HEADS_DIR) / "tree.json")
        if args.model is None:  # the embedded model's tokenizer alone: no weights needed
            tokenizer = embedded.load_tokenizer(embedded.gguf_path())
        else:
            from infer.bench_setup import load_model

            tokenizer = load_model(args.model, None).tokenizer
        answers = recorded_answers(record, tokenizer)
    gate = not args.no_gate
    results = {(l, n): replay(answers, l, n, gate) for n in ngrams for l in lengths}
    print(f"## Lookup replay: {len(answers)} recorded greedy answers ({path}; "
          f"{'steps without a match run without the chain' if gate else '--no-gate'})\n")
    print("tokens per step (predicted speed vs plain decoding from the step-time curve)\n")
    print("| longest n-gram | " + " | ".join(f"L = {l}" for l in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for n in ngrams:
        cells = []
        for l in lengths:
            r = results[(l, n)]
            plain = r["by_match"].get(0, [0, 0])[0] if gate else 0  # steps without a match: one-node steps
            pred = (f" ({r['tokens'] * curve[0] / (plain * curve[0] + (r['steps'] - plain) * curve[l]):.2f}x)"
                    if 0 in curve and l in curve else "")
            cells.append(f"{r['tokens_per_step']:.2f}{pred}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for row in record["rows"]:
        if row.get("head_nodes") == 0 and row.get("lookup") and row["mode"] == "greedy":
            print(f"\ncheck: bench row {row['method']} (lookup {row['lookup']}) measured {row['tokens_per_step']:.2f} "
                  f"tokens per step; the replay with n-gram {MAX_NGRAM} gives "
                  f"{replay(answers, row['lookup'], MAX_NGRAM, gate)['tokens_per_step']:.2f}")
    split = replay(answers, split_l, split_n, gate)
    print(f"\nsteps of L = {split_l}, n-gram {split_n}, by the length of the match they continued\n")
    print("| match length | share of steps | draft tokens accepted per step |")
    print("|---|---|---|")
    for m, (steps, acc) in sorted(split["by_match"].items()):
        print(f"| {m} | {steps / split['steps']:.2f} | {acc / steps:.2f} |")
    return {"results": {f"{l},{n}": r for (l, n), r in results.items()}, "split": split}


if __name__ == "__main__":
    main()

"""`python -m infer.bench`: MT-Bench decoding speed of every method, as the table Medusa implementations are
compared by: method | tokens/s | latency per token | speedup vs autoregressive | acceptance rate | tokens per step.

Methods (`--methods`, comma-separated; `ar` always runs, it is the baseline):
  hf            transformers greedy `generate` on the same weights (PyTorch float32; on CUDA when JAX runs on a GPU,
                else on this machine's CPU).
  ar            our plain autoregressive decoding (the root-only tree).
  medusa        what `generate` does by default: greedy Medusa with all heads and the heads' tuned tree and lookup
                chain (which the tuner may shrink to the root alone, i.e. plain decoding, where no tree pays on the
                machine, or to a lookup chain alone, where copied drafts pay better than the heads').
  medusa-kK     greedy Medusa with the first K heads (K = 3, 4, 5) and a tree per K: the best tree for K heads
                from the tuner's `tree.json` with the lookup chain that ran fastest beside it, else
                `default_tree(K)` with the bundle's chain; `--tree` fixes one tree for every row (to compare
                head sets, e.g. after stage 1 and after stage 2, on the same tree).
  typical-t0.7  typical acceptance at temperature 0.7 with all heads and the best tree for them, as medusa-kK.
  sample-t0.7   lossless speculative sampling at temperature 0.7, likewise.
  lookupL       prompt lookup decoding: greedy with a lookup chain of L tokens copied from the context
                (`infer.lookup`) and no heads; any Medusa row takes a "+lookupL" suffix (e.g. medusa+lookup4,
                medusa-k3+lookup0) for that chain instead of the heads' tuned one (tree.json's "lookup").

Each MT-Bench question is answered in both turns; the second turn is conditioned on the method's own first
answer (greedy methods all produce the same text). A second turn reuses the keys and values of its first turn
(prompt and answer), ours through `generate`'s prefix cache (where the prompt runs in prefill chunks: beyond
128 tokens on a CPU, 512 elsewhere) and transformers' through the cache its `generate` returns, so it runs only
its new tokens through the model; `--no-prefix-cache` reruns every prompt whole in both.
Methods take turns question by question, so a machine whose speed drifts during the run slows every row alike.
Times are `Generation.wall_s` (prefill + decoding, never compilation): each executable is compiled and run once
by `infer.api.warm_up` before its first timed call, so every timed call is a warm one. Outputs: a markdown table
on the terminal and in `<out>/bench.md`, `<out>/bench.json` (rows, trees, per-category speeds, per-head accuracy,
answers, machine), and PNG plots (see `infer.bench_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from infer import bench_report
from infer import prefix_cache
from infer.api import default_stop_ids, generate_ids, warm_up
from infer.bench_setup import (ALL_METHODS, Method, load_model, method_bundle, parse_method, parse_tree_option,
                               tuning_record)
from infer.heads_eval import head_accuracy, topk_table
from medusa_jax import chat
from medusa_jax.bundle import Bundle
from medusa_jax.errors import MedusaError, cli_errors

REPO = Path(__file__).resolve().parents[1]
DEFAULT_QUESTIONS = REPO.parent / "shared" / "data" / "mt_bench_questions.jsonl"


@dataclasses.dataclass(frozen=True)
class Question:
    """One MT-Bench question (FastChat format)."""

    question_id: Any
    category: str
    turns: tuple[str, ...]


def read_questions(path: str | Path | None, limit: int | None, per_category: int | None = None) -> list[Question]:
    """The first `limit` questions of a FastChat question file (JSON lines with "turns" and "category"); with
    `per_category`, only the first `per_category` questions of each category count (MT-Bench lists its 80
    questions category by category, so `limit` alone picks one category)."""
    if path is None:
        if not DEFAULT_QUESTIONS.is_file():
            raise MedusaError("no MT-Bench question file given; pass --questions FILE (FastChat JSONL with "
                              "\"turns\" and \"category\")")
        path = DEFAULT_QUESTIONS
    path = Path(path)
    if not path.is_file():
        raise MedusaError(f"question file {path} does not exist; pass --questions FILE (FastChat JSONL)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            turns = tuple(rec["turns"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MedusaError(f"{path}:{n}: not a FastChat question ({type(e).__name__}: {e}); each line needs "
                              "a JSON object with a \"turns\" list") from None
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise MedusaError(f"{path}:{n}: \"turns\" must be a non-empty list of non-empty strings")
        q = Question(rec.get("question_id", n), str(rec.get("category", "unknown")), turns)
        if per_category is not None and sum(o.category == q.category for o in out) >= per_category:
            continue
        out.append(q)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise MedusaError(f"{path} holds no questions; pass a FastChat question file")
    return out


# ------------------------------------------------------------------------------------------------ running


def turn_prompt(tokenizer, question: Question, answers: list[str], turn: int) -> list[int]:
    """Token ids of `question`'s turn `turn` (0-based), after its earlier turns and their `answers`."""
    msgs = []
    for i in range(turn + 1):
        msgs.append({"role": "user", "content": question.turns[i]})
        if i < turn:
            msgs.append({"role": "assistant", "content": answers[i]})
    return chat.render_prompt(tokenizer, msgs)


def _answer_text(tokenizer, ids: list[int], stops: tuple[int, ...]) -> str:
    return tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=False)


def run_ours(bundle: Bundle, method: Method, paths: list, prompt: list[int], max_new: int, seed: int,
             reuse: bool = True) -> dict:
    """One warm, timed `generate_ids` call (`warm_up` compiles and runs its executable first when new)."""
    kw = dict(max_new_tokens=max_new, temperature=method.temperature, mode=method.mode, tree=paths or None,
              seed=seed, prefix_cache=reuse, lookup=method.lookup)
    compile_s = warm_up(bundle, [prompt], **kw)
    g = generate_ids(bundle, [prompt], **kw)
    ran = g.accepted[0] >= 0
    return {"tokens": g.tokens[0], "wall_s": g.wall_s, "steps": int(ran.sum()),
            "accepted": int(g.accepted[0][ran].sum()), "proposed": int(g.proposed[0][ran].sum()),
            "compile_s": compile_s, "reused": g.reused}


def run_question(bundle: Bundle, method: Method, paths: list, question: Question, qi: int, max_new: int,
                 hf_model: Any = None, reuse: bool = True) -> list[dict]:
    """Both turns of one question -> per-turn records (tokens, text, wall_s, reused, ...); the second turn's prompt
    holds this method's own first answer and, with `reuse`, reuses the first turn's keys and values."""
    from infer import bench_hf

    # Each question starts cold: no turn reuses another question's or another method's cache.
    prefix_cache.clear()
    bench_hf.reset_prefix(hf_model)
    stops = default_stop_ids(bundle)
    answers: list[str] = []
    records = []
    for turn in range(len(question.turns)):
        prompt = turn_prompt(bundle.tokenizer, question, answers, turn)
        if method.mode == "hf":
            rec = bench_hf.run_hf(hf_model, prompt, max_new, stops, prefix_cache=reuse)
        else:
            rec = run_ours(bundle, method, paths, prompt, max_new, seed=2 * qi + turn, reuse=reuse)
        rec["text"] = _answer_text(bundle.tokenizer, rec["tokens"], stops)
        answers.append(rec["text"])
        records.append(rec)
    return records


def summarise(method: Method, records: list[list[dict]], questions: list[Question]) -> dict:
    """A table row: totals over every turn of every question, and per-category tokens/s."""
    flat = [r for q in records for r in q]
    tokens = sum(len(r["tokens"]) for r in flat)
    wall = sum(r["wall_s"] for r in flat)
    tps = tokens / max(wall, 1e-9)
    row = {"method": method.name, "mode": method.mode, "temperature": method.temperature, "k": method.k,
           "tokens": tokens, "wall_s": wall, "tokens_per_s": tps, "latency_ms": 1e3 / tps,
           "acceptance_rate": None, "tokens_per_step": None,
           "reused_tokens": sum(r.get("reused", 0) for r in flat)}
    if method.mode != "hf":
        steps = sum(r["steps"] for r in flat)
        proposed = sum(r["proposed"] for r in flat)
        accepted = sum(r["accepted"] for r in flat)
        row["steps"] = steps
        row["tokens_per_step"] = (accepted + steps) / steps if steps else 1.0
        row["acceptance_rate"] = accepted / proposed if proposed else None
    cats: dict[str, list[float]] = {}
    for q, recs in zip(questions, records):
        c = cats.setdefault(q.category, [0, 0.0])
        c[0] += sum(len(r["tokens"]) for r in recs)
        c[1] += sum(r["wall_s"] for r in recs)
    row["category_tokens_per_s"] = {c: n / max(w, 1e-9) for c, (n, w) in cats.items()}
    # By turn: a second turn's prompt carries the first turn and its answer, so its prefill is several times longer.
    turns = [[r for q in records for r in q[t:t + 1]] for t in range(max(len(q) for q in records))]
    row["turn_tokens_per_s"] = [sum(len(r["tokens"]) for r in rs) / max(sum(r["wall_s"] for r in rs), 1e-9)
                                for rs in turns]
    return row


def _parse_methods(text: str) -> list[Method]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise MedusaError("--methods is empty; give a comma-separated subset of " + ", ".join(ALL_METHODS))
    methods = [parse_method(n) for n in dict.fromkeys(names)]
    if not any(m.mode == "ar" for m in methods):  # the baseline every speedup is measured against
        methods.insert(1 if methods[0].mode == "hf" else 0, Method("ar", "ar"))
    return methods


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise MedusaError(f"{name} must be a positive integer, got {value}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    a = p.add_argument
    a("--questions", default=None, help="FastChat question JSONL (default ../shared/data/mt_bench_questions.jsonl "
      "when present)")
    a("--limit", type=int, default=None, help="use the first N questions (default all)")
    a("--per-category", type=int, default=None, help="use the first N questions of each category (a balanced "
      "subset: MT-Bench lists its questions category by category)")
    a("--max-new-tokens", type=int, default=256, help="new tokens per answer at most (default 256)")
    a("--model", default=None, help="HF directory or .gguf, or 'tiny' (random model, SmolLM2 tokenizer, random "
      "heads; seconds); default: the embedded SmolLM2-135M-Instruct")
    a("--heads", default=None, help="Medusa heads directory or file (default: the model's shipped heads)")
    a("--methods", default=",".join(ALL_METHODS), help=f"comma-separated (default {','.join(ALL_METHODS)})")
    a("--tree", default=None, help="one tree for every Medusa row instead of the tuned ones: a name, chain:N, "
      "dense:W1,W2,..., or a JSON list of paths (e.g. '[[0],[1],[0,0]]'); rows with fewer heads than its depth "
      "are skipped; the medusa row keeps generate's default")
    a("--no-hf", action="store_true", help="skip the transformers row")
    a("--no-prefix-cache", action="store_true", help="second turns rerun their whole prompt (ours and transformers) "
      "instead of reusing the first turn's keys and values")
    a("--torch-threads", type=int, default=None, help="torch CPU threads for the hf row (default: torch's own; "
      "use 1 when other processes load the CPU: torch's thread barriers then slow down about 10x)")
    a("--accuracy-prompts", type=int, default=3, help="first-turn prompts for per-head accuracy (default 3)")
    a("--out", default="runs/bench", help="folder for bench.json, bench.md and the PNG plots (default runs/bench)")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with cli_errors():
        return bench(args)


def bench(args: argparse.Namespace) -> dict:
    """Runs the benchmark for parsed arguments; returns the record written to bench.json."""
    from infer import bench_hf

    _positive("--limit", args.limit)
    _positive("--per-category", args.per_category)
    _positive("--max-new-tokens", args.max_new_tokens)
    _positive("--accuracy-prompts", args.accuracy_prompts)
    _positive("--torch-threads", args.torch_threads)
    methods = _parse_methods(args.methods)
    if args.no_hf:
        methods = [m for m in methods if m.mode != "hf"]
    questions = read_questions(args.questions, args.limit, args.per_category)
    t_start = time.time()
    bundle = load_model(args.model, args.heads)
    record = tuning_record(args.heads, args.model)
    fixed = parse_tree_option(args.tree, bundle)
    notes: dict[str, str] = {}

    accuracy = None
    if bundle.heads is not None:
        prompts = [chat.render_prompt(bundle.tokenizer, q.turns[0]) for q in questions[:args.accuracy_prompts]]
        acc, count = head_accuracy(bundle, prompts, max_new_tokens=args.max_new_tokens, ranks=5)
        accuracy = {**topk_table(acc), "positions": count, "prompts": len(prompts)}

    plans = []
    for m in methods:
        if m.mode == "hf":
            hf_model, note = bench_hf.load_torch_model(bundle, args.torch_threads)
            plans.append((m, bundle if hf_model is not None else None, [], note, hf_model))
        else:
            mb, paths, where = method_bundle(bundle, m, record, fixed)
            plans.append((m, mb, paths, where, None))
    for m, mb, _, note, _ in plans:
        if mb is None or m.mode == "hf":  # why a row is missing; how the transformers peer ran
            notes[m.name] = note
    runnable = [p for p in plans if p[1] is not None]
    records: dict[str, list[list[dict]]] = {p[0].name: [] for p in runnable}
    # Question by question, every method in turn: a machine whose speed drifts during the run (a shared CPU,
    # a GPU warming up) then slows every row alike instead of whichever method ran during the slow minutes.
    with tqdm(total=len(runnable) * len(questions), desc="bench", unit="answer pair",
              disable=args.no_progress) as bar:
        for qi, q in enumerate(questions):
            for m, mb, paths, _, hf_model in runnable:
                bar.set_description(f"q{qi + 1} {m.name}")
                records[m.name].append(run_question(mb, m, paths, q, qi, args.max_new_tokens, hf_model,
                                                    reuse=not args.no_prefix_cache))
                bar.update(1)
    rows, outputs, trees = [], {}, {}
    keep = ("tokens", "text", "wall_s", "steps", "accepted", "proposed", "reused")
    for m, mb, paths, where, _ in runnable:
        rows.append(summarise(m, records[m.name], questions))
        outputs[m.name] = [[{k: r[k] for k in keep if k in r} for r in q] for q in records[m.name]]
        if m.mode != "hf":
            chain = 0 if m.mode == "ar" else m.lookup if m.lookup is not None else mb.lookup
            trees[m.name] = {"paths": [list(p) for p in paths], "lookup": chain, "nodes": len(paths) + 1 + chain,
                             "source": where}
            rows[-1].update(head_nodes=len(paths), lookup=chain)  # what drafted: heads' nodes, lookup chain
    ar = next(r for r in rows if r["mode"] == "ar")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / ar["tokens_per_s"]
        r["identical_to_ar"] = _identical(outputs[r["method"]], outputs["ar"])
    record = {
        "model": bundle.source, "config": bundle.config.name,
        "heads": dataclasses.asdict(bundle.heads_config) if bundle.heads_config else None,
        "questions": str(args.questions or DEFAULT_QUESTIONS), "num_questions": len(questions),
        "question_ids": [q.question_id for q in questions],
        "max_new_tokens": args.max_new_tokens, "prefix_cache": not args.no_prefix_cache, "rows": rows,
        "notes": notes, "trees": trees,
        "category_speedup": bench_report.category_speedup(rows), "head_accuracy": accuracy,
        "machine": bench_report.machine_info(), "elapsed_s": round(time.time() - t_start, 1), "outputs": outputs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record["plots"] = bench_report.plots(record, out)
    markdown = bench_report.markdown(record)
    print(markdown)
    (out / "bench.md").write_text(markdown + "\n", encoding="utf-8")
    (out / "bench.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {len(record['plots'])} plots in {out}")
    return record


def _identical(a: list[list[dict]], b: list[list[dict]]) -> float:
    """Fraction of answers (question turns) whose tokens are identical in both runs."""
    pairs = [(x["tokens"], y["tokens"]) for qa, qb in zip(a, b) for x, y in zip(qa, qb)]
    return float(np.mean([x == y for x, y in pairs])) if pairs else 1.0


if __name__ == "__main__":
    main()

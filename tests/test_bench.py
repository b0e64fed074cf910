"""`python -m infer.bench` on the random tiny model (seconds) and `bench/gpu_7b.py --config tiny` on CPU."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from infer import bench
from medusa_jax.errors import MedusaError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("hf", "ar", "medusa", "medusa-k3", "typical-t0.7", "sample-t0.7", "medusa-k6")  # tiny has 5 heads: k6 skips
# First turns of about 70 tokens with the chat template, so both turns' prompts share one length bucket (65-128
# tokens) and each method compiles once.
_LONG = (" Answer in the voice of an old sailor who has seen every harbour on the whole coast and likes telling "
         "long stories.")
QUESTIONS = [
    {"question_id": 1, "category": "writing",
     "turns": ["Write a haiku about the rain on a quiet mountain village." + _LONG, "Now make it rhyme."]},
    {"question_id": 2, "category": "math",
     "turns": ["What is 12 times 7, and how would you check it?" + _LONG, "And divided by 3?"]},
    {"question_id": 3, "category": "coding", "turns": ["Print hello in Python.", "Now in C."]},
]


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "questions.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, questions_file):
    """(record, printed text, out dir, [(question id, method) in the order they ran]) of one tiny smoke run."""
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    order = []
    real = bench.run_question

    def recording(bundle, method, paths, question, *args, **kw):
        order.append((question.question_id, method.name))
        return real(bundle, method, paths, question, *args, **kw)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(bench, "run_question", recording)
        record = bench.main(["--model", "tiny", "--limit", "2", "--max-new-tokens", "16", "--questions",
                             str(questions_file), "--methods", ",".join(METHODS), "--out", str(out),
                             "--no-progress", "--accuracy-prompts", "2"])
    return record, printed.getvalue(), out, order


def test_every_requested_method_has_a_consistent_row(run):
    record, _, out, _ = run
    rows = {r["method"]: r for r in record["rows"]}
    assert set(rows) == set(METHODS) - {"medusa-k6"}
    assert "fewer than 6" in record["notes"]["medusa-k6"]
    assert rows["ar"]["speedup"] == 1.0
    for r in rows.values():
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0
        assert r["latency_ms"] * r["tokens_per_s"] == pytest.approx(1000.0)
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / rows["ar"]["tokens_per_s"])
        if r["tokens_per_step"] is not None:
            assert r["tokens_per_step"] >= 1.0
        if r["acceptance_rate"] is not None:
            assert 0.0 <= r["acceptance_rate"] <= 1.0
    for name in ("medusa-k3", "typical-t0.7", "sample-t0.7"):  # drafts were proposed, so a rate exists
        assert rows[name]["acceptance_rate"] is not None
    assert rows["ar"]["tokens_per_step"] == 1.0 and rows["ar"]["acceptance_rate"] is None
    assert json.loads((out / "bench.json").read_text())["rows"] == record["rows"]


def test_tokens_per_second_by_turn_add_up_to_the_row(run):
    """Each row's per-turn tokens/s is its turn's tokens over its turn's time; together they make the row's."""
    record, printed, _, _ = run
    for r in record["rows"]:
        turns = [[q[t] for q in record["outputs"][r["method"]]] for t in (0, 1)]
        tokens = [sum(len(x["tokens"]) for x in ts) for ts in turns]
        walls = [sum(x["wall_s"] for x in ts) for ts in turns]
        assert r["turn_tokens_per_s"] == pytest.approx([n / w for n, w in zip(tokens, walls)])
        assert sum(tokens) / sum(walls) == pytest.approx(r["tokens_per_s"])
    assert "### Tokens/s by turn" in printed and "| ar | " in printed.split("### Tokens/s by turn")[1]


def test_greedy_medusa_answers_equal_autoregressive_token_for_token(run):
    record, _, _, _ = run
    ar = record["outputs"]["ar"]
    assert len(ar) == 2 and all(len(q) == 2 for q in ar)  # --limit 2, both turns
    assert all(0 < len(t["tokens"]) <= 16 for q in ar for t in q)
    for name in ("medusa", "medusa-k3"):
        medusa = record["outputs"][name]
        assert [[t["tokens"] for t in q] for q in medusa] == [[t["tokens"] for t in q] for q in ar]
        assert {r["method"]: r["identical_to_ar"] for r in record["rows"]}[name] == 1.0


def test_methods_take_turns_question_by_question(run):
    *_, order = run
    ran = [m for m in METHODS if m != "medusa-k6"]  # skipped: tiny has 5 heads
    assert order == [(qid, m) for qid in (1, 2) for m in ran]


def test_medusa_row_decodes_with_generates_default_tree(run):
    from infer.plan import resolve_tree_buffers
    from infer.bench_setup import tiny_bundle

    record, printed, _, _ = run
    default = resolve_tree_buffers(tiny_bundle(), "greedy")  # tiny ships no tuned tree: DEFAULT_TREE cut to 5 heads
    tree = record["trees"]["medusa"]
    assert [tuple(p) for p in tree["paths"]] == list(default.choices) and tree["nodes"] == default.num_nodes
    assert "generate's default tree" in tree["source"]
    speedup = {r["method"]: r["speedup"] for r in record["rows"]}["medusa"]
    verdict = "met" if speedup >= 1 else "NOT met"
    assert f"- never slower than ar (generate's default tree, {default.num_nodes} nodes): {speedup:.2f}x " \
           f"{verdict}" in printed


def test_never_slower_is_judged_on_generates_default_tree():
    from infer.bench_report import _targets

    rows = [{"method": "ar", "mode": "ar", "tokens_per_s": 30.0, "speedup": 1.0},
            {"method": "medusa", "mode": "greedy", "tokens_per_s": 29.7, "speedup": 0.99},
            {"method": "medusa-k3", "mode": "greedy", "tokens_per_s": 25.0, "speedup": 0.83}]
    root_only = _targets(rows, {"medusa": {"nodes": 1}, "medusa-k3": {"nodes": 2}})
    assert "- never slower than ar (generate's default tree, 1 nodes): 0.99x met: the tuned tree is the root " \
           "alone, so generate runs plain decoding's executable" in root_only
    assert "- slower than ar with a forced draft tree: medusa-k3" in root_only
    assert "- target Medusa >= 1.3x ar at T=0 (CPU; 2x on GPU): medusa 0.99x NOT met" in root_only
    drafting = _targets(rows, {"medusa": {"nodes": 3}, "medusa-k3": {"nodes": 2}})
    assert "- never slower than ar (generate's default tree, 3 nodes): 0.99x NOT met" in drafting


def test_trees_categories_and_head_accuracy_are_recorded(run):
    record, _, _, _ = run
    tree = record["trees"]["medusa-k3"]
    assert tree["nodes"] == len(tree["paths"]) + 1 and max(len(p) for p in tree["paths"]) <= 3
    assert record["trees"]["ar"]["paths"] == []
    assert set(record["category_speedup"]["speedup"]) == {"writing", "math"}
    acc = record["head_accuracy"]
    top1, top5 = np.array(acc["top1"]), np.array(acc["top5"])
    assert top1.shape == (5,) and np.all((0 <= top1) & (top1 <= top5) & (top5 <= 1))
    assert {"platform", "cpu", "device", "versions", "date", "git_commit"} <= set(record["machine"])


def test_markdown_table_printed_and_plots_are_pngs(run):
    record, printed, out, _ = run
    assert "| method | tokens/s | latency per token (ms) | speedup vs autoregressive |" in printed
    for r in record["rows"]:
        assert f"| {r['method']} |" in printed
    assert (out / "bench.md").read_text().strip() in printed
    names = {"speedup_vs_k.png", "head_accuracy.png", "category_speedup.png"}
    assert {p.split("/")[-1] for p in record["plots"]} == names
    import matplotlib.image

    for name in names:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(out / name).shape[0] > 100  # decodes to a real image


@pytest.mark.parametrize("argv, message", [
    (["--questions", "/nonexistent/q.jsonl"], "does not exist"),
    (["--limit", "0"], "--limit must be a positive integer"),
    (["--methods", "ar,medusa-fast"], "unknown method 'medusa-fast'"),
    (["--tree", "[[0], [0, 0"], "--tree: tree '[[0], [0, 0' is not valid JSON"),
    (["--tree", "[[1, 0]]"], "needs its prefix [1]"),
    (["--tree", "chain:6"], "tree depth 6 needs at least 6 Medusa heads, the model has 5"),
    (["--methods", "ar,lookup0"], "a lookup row needs at least one draft token"),
    (["--methods", "ar,lookup99"], "the lookup length must be an integer from 0 to"),
    (["--methods", "medusa+lookupx"], "the lookup length must be an integer"),
    (["--methods", "ar+lookup2"], "unknown method 'ar+lookup2'"),
])
def test_bad_input_is_one_error_line(argv, message, capsys, questions_file):
    if "--questions" not in argv:
        argv = argv + ["--questions", str(questions_file)]
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", "tiny"] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_tree_option_fixes_one_tree_for_every_medusa_row():
    from infer.bench_setup import method_bundle, parse_method, parse_tree_option, tiny_bundle

    bundle = tiny_bundle()
    fixed = parse_tree_option("[[0], [1], [0, 0], [0, 0, 0]]", bundle)
    record = {"tree": [[0]], "accuracy_ranks": [[0.9, 0.1]] * 5,
              "curve": [{"nodes": n, "step_ms": 10.0 + n, "measured": True} for n in (1, 2, 3)]}
    for name in ("medusa-k3", "medusa-k5", "typical-t0.7"):  # the tuner's record is ignored under --tree
        mb, paths, where = method_bundle(bundle, parse_method(name), record, fixed)
        assert paths == [(0,), (1,), (0, 0), (0, 0, 0)] and where == "--tree" and mb is not None
    mb, paths, where = method_bundle(bundle, parse_method("medusa-k3"), None, parse_tree_option("chain:4", bundle))
    assert mb is None and "depth 4, more than the row's 3 heads" in where
    assert method_bundle(bundle, parse_method("ar"), None, fixed)[1] == []  # the baseline stays plain
    assert parse_tree_option(None, bundle) is None
    assert method_bundle(bundle, parse_method("medusa-k3"), record)[2].startswith("best tree for 3 heads")


def test_lookup_rows_parse_and_bundle():
    """lookupL: the chain alone on the heads-less base; +lookupL: that chain on a Medusa row's tree."""
    from infer.bench_setup import method_bundle, parse_method, tiny_bundle

    m = parse_method("lookup4")
    assert (m.mode, m.k, m.lookup) == ("greedy", 0, 4)
    assert (parse_method("medusa-k3+lookup2").k, parse_method("medusa-k3+lookup2").lookup) == (3, 2)
    assert parse_method("typical-t0.7+lookup0").lookup == 0 and parse_method("medusa").lookup is None
    mb, paths, where = method_bundle(tiny_bundle(), m, None)
    assert mb.heads is None and paths == [] and "lookup chain of 4 alone" in where


def test_medusa_rows_take_the_chain_that_ran_fastest_with_heads():
    """A tuning record whose default is a lookup chain alone: the medusa-kK rows keep head paths (the record's
    best tree) with the chain measured fastest beside them, not the head-less default's chain; and the Medusa
    target line ignores a row whose tree has no head paths."""
    from infer import bench_report, tune_tree
    from infer.bench_setup import method_bundle, parse_method, tiny_bundle

    record = {"accuracy_ranks": [[0.5, 0.2], [0.3, 0.1]], "curve": [
        {"nodes": n, "step_ms": 10.0 + n, "measured": True} for n in range(4)], "variants": [
        {"tree_nodes": 1, "lookup": 0, "tokens_per_s": 10.0}, {"tree_nodes": 3, "lookup": 0, "tokens_per_s": 11.0},
        {"tree_nodes": 3, "lookup": 2, "tokens_per_s": 13.0}, {"tree_nodes": 1, "lookup": 4, "tokens_per_s": 14.0}]}
    assert tune_tree.best_lookup(record) == 2 and tune_tree.best_lookup({"variants": []}) is None
    bundle = tiny_bundle().replace(tree=(), lookup=4)
    mb, paths, _ = method_bundle(bundle, parse_method("medusa-k2"), record)
    assert paths and mb.lookup == 2
    mb, _, _ = method_bundle(bundle, parse_method("medusa-k2"), None)  # no record: the bundle's chain
    assert mb.lookup == 4
    rows = [{"method": "medusa", "mode": "greedy", "k": None, "head_nodes": 0, "tokens_per_s": 14.0},
            {"method": "medusa-k2", "mode": "greedy", "k": 2, "head_nodes": 2, "tokens_per_s": 13.0}]
    assert bench_report.best_medusa(rows)["method"] == "medusa-k2"


def test_malformed_question_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"turns": ["ok"]}\nnot json\n')
    with pytest.raises(MedusaError, match=r"q.jsonl:2: not a FastChat question"):
        bench.read_questions(path, None)
    assert bench.read_questions(path, 1)[0].turns == ("ok",)


def test_per_category_takes_the_first_questions_of_each_category(questions_file):
    qs = bench.read_questions(questions_file, None, per_category=1)
    assert [q.question_id for q in qs] == [1, 2, 3]
    path = questions_file.parent / "grouped.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": ["q"]}) + "\n"
                            for i, c in enumerate("aaabbbc")))
    assert [q.question_id for q in bench.read_questions(path, None, per_category=2)] == [0, 1, 3, 4, 6]
    assert [q.question_id for q in bench.read_questions(path, 3, per_category=2)] == [0, 1, 3]


def test_gpu_script_smoke_on_cpu(tmp_path, capsys):
    """bench/gpu_7b.py end to end on the tiny shape: every section runs and reports consistent numbers."""
    from bench import gpu_7b

    res = gpu_7b.main(["--config", "tiny", "--dtype", "float32", "--bw-mib", "8", "--prompt-len", "48",
                       "--capacity", "16", "--nodes", "6", "--decode-steps", "3", "--repeats", "1", "--hf-cpu",
                       "--hf-tokens", "4", "--seq-len", "32", "--max-batch", "1", "--train-steps", "1",
                       "--out", str(tmp_path)])
    assert res["errors"] == {}
    bw, dec, hf, tr = (res[k] for k in gpu_7b.SECTIONS)
    assert bw["bandwidth_Bps"] > 0 and bw["floor_ms"] == pytest.approx(1e3 * bw["weight_bytes"] / bw["bandwidth_Bps"])
    assert dec["ar"]["nodes"] == 1 and dec["ar"]["step_ms"] > 0
    (tree,) = dec["trees"]
    assert tree["nodes"] == 6 == len(tree["paths"]) + 1 and tree["vs_ar"] == pytest.approx(
        tree["step_ms"] / dec["ar"]["step_ms"])
    assert hf["device"] == "cpu" and hf["tokens_per_s"] > 0
    # step time from per-token timestamps inside one generate: prefill + the later steps fit in the whole call
    assert 0 < hf["prefill_s"] and hf["prefill_s"] + 1e-3 * hf["step_ms"] * (hf["tokens"] - 1) <= hf["generate_s"]
    (row,) = tr["batches"]
    assert row["batch"] == 1 and row["tokens_per_s"] > 0 and np.isfinite(row["loss"])
    assert json.loads((tmp_path / "gpu_7b.json").read_text())["config"] == "tiny"
    assert "| our tree step, 6 nodes |" in capsys.readouterr().out
    assert dec["ar"]["live_window"] and tree["live_window"]
    full = gpu_7b.main(["--config", "tiny", "--dtype", "float32", "--sections", "decode", "--full-window",
                        "--prompt-len", "48", "--capacity", "16", "--nodes", "6", "--decode-steps", "3", "--repeats",
                        "1", "--out", str(tmp_path / "full")])["decode"]
    assert not full["ar"]["live_window"] and full["ar"]["step_ms"] > 0 and full["trees"][0]["step_ms"] > 0


def test_train_flops_count_base_forward_and_heads():
    from bench import gpu_train
    from medusa_jax.config import HeadsConfig, vicuna_7b

    cfg, hc = vicuna_7b(), HeadsConfig(num_heads=4)
    flops, with_attention = gpu_train.train_flops(cfg, hc, tokens=2048, seq_len=2048)
    h, i = cfg.hidden_size, cfg.intermediate_size
    layers = cfg.num_layers * (4 * h * h + 3 * h * i + 2 * h)  # attention, SwiGLU, two norms (MHA: 32 kv heads)
    heads = 4 * (6 * 4096 ** 2 + 4 * 4096 * 32000) * 2048
    assert flops == 2 * layers * 2048 + heads and with_attention > flops
    assert gpu_train.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and gpu_train.peak_flops("cpu") is None


def test_cpu_matmul_script_times_every_row_count_in_both_libraries(capsys):
    """bench/cpu_matmul.py on the tiny shape: one row per library and dtype, a time for every M, a markdown table."""
    from bench import cpu_matmul

    from medusa_jax import native

    res = cpu_matmul.main(["--config", "tiny", "--rows", "1,3", "--dtypes", "float32", "--repeats", "1"])
    libraries = ["jax"] + (["jax panels"] if native.available() else []) + ["torch"]
    assert [(r["library"], r["dtype"]) for r in res] == [(lib, "float32") for lib in libraries]
    assert all(set(r["ms"]) == {1, 3} and min(r["ms"].values()) > 0 for r in res)
    assert "| jax | float32 | " in capsys.readouterr().out


@pytest.mark.parametrize("rows", ["1,x", "0,2"])
def test_cpu_matmul_script_bad_rows_is_one_error_line(rows, capsys):
    from bench import cpu_matmul

    with pytest.raises(SystemExit) as e:
        cpu_matmul.main(["--config", "tiny", "--rows", rows, "--no-torch"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--rows" in err


def test_step_profile_groups_the_real_step_by_op_kind(capsys):
    """bench/step_profile.py on the tiny shape: the weight matmuls appear as `dot` (`--xla-products`) or as the CPU
    kernel's `ffi_call`, once per projection per layer; control flow (the decoding loop, the attention-window
    switch of a 384-slot cache) is not counted as an op."""
    import jax

    if jax.default_backend() != "cpu":  # started as a script it picks the CPU; here jax has already started
        pytest.skip("step_profile reads XLA:CPU's trace events (a GPU's name kernels, not HLO instructions)")
    from bench import step_profile
    from medusa_jax import model
    from medusa_jax.config import tiny

    from medusa_jax import native

    common = ["--config", "tiny", "--prompt-len", "200", "--capacity", "64", "--decode-steps", "3", "--repeats", "1",
              "--profile-runs", "1"]
    if native.available():  # the default: products (and tiny's head_dim-16 attention) on the CPU kernels
        packed = {r["op"]: r for r in step_profile.main(common)["ops"]}
        assert packed["ffi_call"]["calls_per_step"] >= 5 * tiny().num_layers and "dot" not in packed
    res = step_profile.main(common + ["--xla-products"])
    assert res["cache_len"] == 384 and len(model.window_sizes(384)) == 2
    ops = {r["op"]: r for r in res["ops"]}
    assert ops["dot"]["calls_per_step"] >= 4 * tiny().num_layers  # qkv, o, gate_up, down in every layer
    assert not any(op.startswith(("while", "cond")) for op in ops), sorted(ops)
    assert res["step_ms"] > 0 and res["profiled_ms_per_step"] > 0
    assert "| dot |" in capsys.readouterr().out
    batched = step_profile.main(["--config", "tiny", "--batch", "3", "--temperature", "1", "--top-p", "0.9",
                                 "--prompt-len", "20", "--capacity", "8",
                                 "--decode-steps", "2", "--repeats", "1", "--profile-runs", "1"])
    assert batched["batch"] == 3 and batched["profiled_ms_per_step"] > 0  # rows of the decoded state
    assert "T=1 top-p 0.9" in capsys.readouterr().out


def test_step_profile_leaves_out_control_flow_by_opcode_only():
    """`hlo_ops` marks while / conditional / call instructions as containers, whatever their names, and never a
    custom-call (a real op); `op_kind` folds the `.N` and `.clone` suffixes of copies into one kind."""
    from bench import step_profile

    hlo = """
ENTRY %main (p: f32[4]) -> f32[4] {
  %custom-call.2 = f32[4]{0} custom-call(f32[4]{0} %p), custom_call_target="TopK"
  %cond.13.clone = f32[4]{0} conditional(s32[] %i, f32[4]{0} %p), branch_computations={%b0, %b1}
  %while.3 = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %t), condition=%c, body=%body
  %call = f32[4]{0} call(f32[4]{0} %p), to_apply=%f
  ROOT %dot.3.clone.1 = f32[4]{0} dot(f32[4]{0} %p, f32[4]{0} %p)
}
"""
    names, containers = step_profile.hlo_ops(hlo)
    assert {"custom-call.2", "cond.13.clone", "while.3", "call", "dot.3.clone.1"} <= names
    assert containers == {"cond.13.clone", "while.3", "call"}
    assert [step_profile.op_kind(n) for n in ("dot.3.clone.1", "cond.13.clone", "fusion.12", "dot")] == \
        ["dot", "cond", "fusion", "dot"]


def test_gpu_script_needs_two_hf_tokens(capsys):
    from bench import gpu_7b

    with pytest.raises(SystemExit) as e:
        gpu_7b.main(["--config", "tiny", "--sections", "hf", "--hf-cpu", "--hf-tokens", "1"])
    assert "--hf-tokens must be at least 2" in str(e.value)


def test_prefill_script_compares_chunk_sizes_and_transformers(capsys):
    """bench/prefill.py on the tiny model: a time and a compile time per chunk size, the same first token whatever
    the chunking, the transformers column, a markdown table."""
    from bench import prefill

    res = prefill.main(["--model", "tiny", "--lengths", "20,40", "--chunks", "0,16", "--repeats", "1"])
    assert [(r["tokens"], r["bucket"]) for r in res] == [(20, 32), (40, 64)]
    for r in res:
        assert set(r["ms"]) == {0, 16} and min(r["ms"].values()) > 0 and r["torch_ms"] > 0
        assert r["first_token"][0] == r["first_token"][16]
    out = capsys.readouterr().out
    assert "| 40 | 64 | " in out and "first generated token equal across chunk sizes: yes" in out


@pytest.mark.parametrize("argv,flag", [(["--lengths", "0"], "--lengths"), (["--chunks", "a"], "--chunks")])
def test_prefill_script_bad_input_is_one_error_line(argv, flag, capsys):
    from bench import prefill

    with pytest.raises(SystemExit) as e:
        prefill.main(["--model", "tiny", "--no-torch"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and flag in err


def test_second_turn_reuses_the_first_in_both_libraries():
    """With the prefix cache a second turn runs only its new tokens, ours and transformers' alike, and answers
    exactly as when it reruns its whole prompt."""
    from infer import bench_hf
    from infer.bench_setup import load_model, parse_method

    bundle = load_model("tiny", None)
    net, note = bench_hf.load_torch_model(bundle)
    assert net is not None, note
    # A first turn of about 110 tokens: the second turn's prompt (over 128 tokens) runs in 128-token chunks.
    q = bench.Question(1, "writing", ("Tell me about the sea." + 4 * _LONG, "Shorter, please."))
    for name, model in (("ar", None), ("hf", net)):
        method = parse_method(name)
        reused = bench.run_question(bundle, method, [], q, 0, 16, model, reuse=True)
        whole = bench.run_question(bundle, method, [], q, 0, 16, model, reuse=False)
        assert reused[0]["reused"] == whole[0]["reused"] == whole[1]["reused"] == 0  # each question starts cold
        first_turn = len(chat_prompt(bundle, q.turns[0]))
        assert reused[1]["reused"] >= first_turn, name  # the first turn's prompt, at least
        assert [r["tokens"] for r in reused] == [r["tokens"] for r in whole], name
    # transformers' generate continued the very cache it was given (the same object comes back, grown)
    from infer.api import default_stop_ids

    stops = default_stop_ids(bundle)
    bench_hf.reset_prefix(net)
    p1 = chat_prompt(bundle, q.turns[0])
    first = bench_hf.run_hf(net, p1, 8, stops, prefix_cache=True)
    kept = net._bench_prefix[1]
    second = bench_hf.run_hf(net, p1 + first["tokens"] + p1[-5:], 8, stops, prefix_cache=True)
    assert second["reused"] >= len(p1) and net._bench_prefix[1] is kept


def chat_prompt(bundle, text):
    from medusa_jax import chat

    return chat.render_prompt(bundle.tokenizer, text)


def test_compile_time_script_times_lowering_and_compilation():
    """bench/compile_time.py on the tiny model (its own process: it turns the persistent cache off first)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "bench" / "compile_time.py"), "--model", "tiny", "--lengths",
                          "20"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| 20 |")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("ar", "1"), ("greedy", "9")]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)


def test_first_answer_script_reports_a_streamed_answer():
    """bench/first_answer.py on the tiny model, one fresh process (the cache's effect: tests/test_compile_cache.py)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "bench" / "first_answer.py"), "--model", "tiny", "--processes",
                          "1", "--max-new-tokens", "4", "--cold"], cwd=repo, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1 and 1 <= int(rows[0][4]) <= 4
    load, first, whole = (float(v) for v in rows[0][1:4])
    assert load > 0 and 0 < first <= whole

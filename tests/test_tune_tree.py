"""The tree tuner's choice: best predicted tokens/s from head accuracy and a step-time curve."""

import numpy as np
import pytest

from infer.tune_tree import choose_tree
from medusa_jax.tree import build_tree, expected_accept_length

ACC = np.array([[0.6, 0.15, 0.05], [0.35, 0.1, 0.05], [0.2, 0.05, 0.02]])


def test_flat_step_cost_picks_the_largest_tree():
    size, paths, rows = choose_tree(ACC, {0: 0.01, 8: 0.01}, max_nodes=8)
    assert size == 8 and len(paths) == 8
    build_tree(paths, num_heads=3, topk=3)  # a valid tree the heads can serve
    best = max(rows, key=lambda r: r["predicted_tokens_per_s"])
    assert np.isclose(best["expected_tokens_per_step"], 1 + expected_accept_length(paths, ACC))


def test_expensive_steps_fall_back_to_plain_decoding():
    size, paths, rows = choose_tree(ACC, {0: 0.01, 1: 0.03, 8: 0.05}, max_nodes=8)
    assert size == 0 and paths == []
    assert [r["measured"] for r in rows[:2]] == [True, True] and rows[4]["measured"] is False


def test_step_time_is_interpolated_between_measured_sizes():
    _, _, rows = choose_tree(ACC, {0: 0.010, 4: 0.020}, max_nodes=4)
    assert np.isclose(rows[2]["step_ms"], 15.0)


def test_best_tree_from_a_record_uses_only_the_first_k_heads_and_drafts():
    """The benchmark's per-k tree: from a record whose step curve prefers plain decoding, still a real tree
    (>= 1 draft node) using only heads < k, and the best such tree by predicted tokens/s."""
    from infer.tune_tree import best_tree

    steps = {0: 0.01, 1: 0.03, 8: 0.05}
    record = {"accuracy_ranks": ACC.tolist(),
              "curve": [{"nodes": n, "step_ms": 1e3 * t, "measured": True} for n, t in steps.items()]}
    for k in (1, 2, 3):
        paths = best_tree(record, k)
        assert paths and max(len(p) for p in paths) <= k
        want = choose_tree(ACC[:k], steps, max_nodes=8, min_nodes=1)[1]
        assert paths == want
    assert best_tree({"tree": [[0]]}, 2) is None  # an old record without per-rank accuracy


def test_a_tree_measured_slower_than_plain_decoding_is_not_saved(monkeypatch):
    """The step-time curve predicts a tree wins, but the end-to-end measurement finds it slower: the record
    keeps plain decoding (the default `generate` then uses) and says which tree was rejected and why."""
    from types import SimpleNamespace

    from infer import tune_tree

    monkeypatch.setattr(tune_tree, "head_accuracy", lambda *a, **k: (ACC, 100))
    monkeypatch.setattr(tune_tree, "step_time", lambda *a, **k: 0.01)  # flat curve: the largest tree predicted best
    speeds = {False: 30.0, True: 20.0}  # tokens/s of plain decoding and of any tree, end to end
    monkeypatch.setattr(tune_tree, "measure_speeds", lambda params, prompts, trees, n: [{
        "tokens_per_s": speeds[bool(paths)], "tokens_per_step": 1.0 + bool(paths), "tokens": 10} for paths, _ in trees])
    params = SimpleNamespace(heads_config=SimpleNamespace(num_heads=3))
    record = tune_tree.tune(params, [[1, 2]], sizes=(0, 4))
    assert record["tree"] == [] and record["num_nodes"] == 1 and record["speedup"] == 1.0
    assert record["rejected"]["num_nodes"] == 5 and record["rejected"]["measured"]["tokens_per_s"] == 20.0
    speeds[True] = 40.0  # a tree that is faster end to end is kept
    record = tune_tree.tune(params, [[1, 2]], sizes=(0, 4))
    assert record["num_nodes"] == 5 and record["rejected"] is None and record["speedup"] == 40.0 / 30.0


def test_the_end_to_end_check_decides_when_the_curve_predicts_plain_decoding(monkeypatch):
    """A steep step-time curve predicts plain decoding, but the best drafting tree still runs next to it end to
    end: it is saved when it decodes faster there, and named as rejected when it does not."""
    from types import SimpleNamespace

    from infer import tune_tree

    monkeypatch.setattr(tune_tree, "head_accuracy", lambda *a, **k: (ACC, 100))
    monkeypatch.setattr(tune_tree, "step_time", lambda params, paths, *a, **k: 0.01 * (1 + len(paths)))
    speeds = {False: 30.0, True: 33.0}
    seen = []

    def fake_speeds(params, prompts, trees, n):
        seen.append([len(t) for t, _ in trees])
        return [{"tokens_per_s": speeds[bool(t)], "tokens_per_step": 1.0 + 0.2 * bool(t), "tokens": 10}
                for t, _ in trees]

    monkeypatch.setattr(tune_tree, "measure_speeds", fake_speeds)
    params = SimpleNamespace(heads_config=SimpleNamespace(num_heads=3))
    want = choose_tree(ACC, {0: 0.01, 1: 0.02, 4: 0.05}, 4, min_nodes=1)
    record = tune_tree.tune(params, [[1, 2]], sizes=(0, 1, 4))
    assert record["predicted_num_nodes"] == 1 and seen == [[0, want[0]]]
    assert record["tree"] == want[1] and record["num_nodes"] == want[0] + 1 and record["rejected"] is None
    assert record["speedup"] == pytest.approx(1.1)
    speeds[True] = 29.0
    record = tune_tree.tune(params, [[1, 2]], sizes=(0, 1, 4))
    assert record["tree"] == [] and record["rejected"]["tree"] == want[1]
    record = tune_tree.tune(params, [[1, 2]], sizes=(0,))  # nothing but plain decoding measured: no candidate
    assert record["tree"] == [] and record["rejected"] is None and seen[-1] == [0]


def test_lookup_chains_are_decoded_with_the_tree_and_alone(monkeypatch):
    """With `lookups`, the best drafting tree runs end to end with each chain added and each chain runs alone, next
    to plain decoding; the fastest of them is saved, its chain as "lookup"."""
    from types import SimpleNamespace

    from infer import tune_tree

    monkeypatch.setattr(tune_tree, "head_accuracy", lambda *a, **k: (ACC, 100))
    monkeypatch.setattr(tune_tree, "step_time", lambda *a, **k: 0.01)
    speed = {}
    seen = []

    def fake_speeds(params, prompts, variants, n):
        seen.append([(len(p), c) for p, c in variants])
        return [{"tokens_per_s": speed.get((bool(p), c), 30.0), "tokens_per_step": 1.0, "tokens": 10}
                for p, c in variants]

    monkeypatch.setattr(tune_tree, "measure_speeds", fake_speeds)
    params = SimpleNamespace(heads_config=SimpleNamespace(num_heads=3))
    speed.update({(True, 0): 33.0, (True, 2): 40.0, (True, 4): 38.0, (False, 2): 35.0})
    record = tune_tree.tune(params, [[1, 2]], sizes=(0, 4), lookups=(4, 2))
    assert seen[-1] == [(0, 0), (4, 0), (4, 2), (4, 4), (0, 2), (0, 4)]
    assert record["lookup"] == 2 and len(record["tree"]) == 4 and record["rejected"] is None
    assert record["speedup"] == pytest.approx(40.0 / 30.0) and len(record["variants"]) == 6
    assert {(v["tree_nodes"], v["lookup"]): v["tokens_per_s"] for v in record["variants"]}[(1, 2)] == 35.0
    speed[(False, 4)] = 45.0  # a chain alone beats every tree: the heads' tree is named as not kept
    record = tune_tree.tune(params, [[1, 2]], sizes=(0, 4), lookups=(2, 4))
    assert record["tree"] == [] and record["lookup"] == 4 and record["num_nodes"] == 1
    assert record["rejected"]["measured"]["tokens_per_s"] == 40.0
    record = tune_tree.tune(params, [[1, 2]], sizes=(0, 4))  # no chains asked for: plain and the tree only
    assert seen[-1] == [(0, 0), (4, 0)] and record["lookup"] == 0


def test_sizes_take_turns_and_keep_their_median_round(monkeypatch):
    """Step times are measured round-robin over the sizes (each size compiled only in the first round) and each
    size keeps its median round, so a slow spell of a shared machine cannot bend one size's point alone, whether
    it throws the differenced time high or low."""
    from types import SimpleNamespace

    from infer import tune_tree

    calls = []
    slow = {(0, 4)}  # (round, nodes) measured during a slow spell
    low = {(1, 0)}  # a slow spell in the shorter of the two differenced runs: far too fast

    def fake_step_time(params, paths, prompt, repeats=2, warm_up=True):
        rnd = sum(1 for c in calls if c[1] == len(paths))
        calls.append((rnd, len(paths), warm_up, repeats))
        if (rnd, len(paths)) in low:
            return 0.003
        return 0.010 + 0.001 * len(paths) + (0.05 if (rnd, len(paths)) in slow else 0.0) + 0.0001 * rnd

    monkeypatch.setattr(tune_tree, "head_accuracy", lambda *a, **k: (ACC, 100))
    monkeypatch.setattr(tune_tree, "step_time", fake_step_time)
    monkeypatch.setattr(tune_tree, "measure_speeds", lambda params, prompts, trees, n: [{
        "tokens_per_s": 30.0, "tokens_per_step": 1.0, "tokens": 10} for _ in trees])
    params = SimpleNamespace(heads_config=SimpleNamespace(num_heads=3))
    record = tune_tree.tune(params, [[1, 2]], sizes=(0, 2, 4), rounds=3)
    assert [c[1] for c in calls] == [0, 2, 4] * 3  # turns, not blocks
    assert [c[2] for c in calls] == [True] * 3 + [False] * 6 and {c[3] for c in calls} == {1}
    measured = {r["nodes"]: r["step_ms"] for r in record["curve"] if r["measured"]}
    # Each size's median round: 0 nodes' rounds 0 and 2 around the low one, 4 nodes' rounds 1 and 2 under the slow.
    assert measured == pytest.approx({0: 10.0, 2: 12.1, 4: 14.2})


def test_accelerators_measure_trees_as_wide_as_the_originals_and_wider():
    """On a GPU a many-node step costs about a one-token step, so the tuner must be able to pick the original's
    64-node tree or a wider one; on a CPU the grid stops at 32 nodes (each size is a compile)."""
    import json
    from pathlib import Path

    from infer.tune_tree import default_sizes

    assert max(default_sizes("cpu")) == 32 and 0 in default_sizes("cpu")
    gpu = default_sizes("gpu")
    assert {64, 128} <= set(gpu) and set(default_sizes("cpu")) <= set(gpu)
    # With the shipped heads' measured accuracy and a flat step curve over the accelerator grid, the chosen tree
    # is the widest measured one (expected tokens/step still grows up to 128 nodes).
    record = json.loads((Path(__file__).parents[1] / "checkpoints/smollm2_135m/tree.json").read_text())
    acc = np.asarray(record["accuracy_ranks"])
    size, paths, rows = choose_tree(acc, {n: 0.005 for n in gpu}, max_nodes=max(gpu))
    assert size == 128 and len(paths) == 128
    assert rows[128]["expected_tokens_per_step"] > rows[64]["expected_tokens_per_step"] > rows[32]["expected_tokens_per_step"]
    build_tree(paths, num_heads=acc.shape[0])


def test_step_time_of_a_real_tiny_model_with_and_without_its_warm_up():
    """The unstubbed timing: a compiled run first (warm_up), then a timing-only call on the same executable;
    both give a positive, finite seconds-per-step for plain decoding and for a 2-node tree."""
    import math

    from infer.testing import random_bundle
    from infer.tune_tree import step_time

    params = random_bundle(num_heads=2)
    for paths in ([], [(0,)]):
        first = step_time(params, paths, [1, 2, 3], repeats=1)
        again = step_time(params, paths, [1, 2, 3], repeats=1, warm_up=False)
        assert all(0 < t < math.inf for t in (first, again))

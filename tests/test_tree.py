"""Tree specs, buffers and growth (host-side numpy only)."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest

from medusa_jax.tree import (
    TreeBuffers,
    TreeError,
    build_tree,
    chain,
    dense,
    expected_accept_length,
    grow_tree,
    grow_tree_sequence,
    resolve_tree,
    validate_tree,
)
from medusa_jax.trees_named import NAMED_TREES, default_tree_for_model

WORKED = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def _check_paths(tb: TreeBuffers, expected: list[list[int]], expected_len: list[int]) -> None:
    """Compares only the real entries of each path and checks padding stays in range."""
    assert tb.paths.shape == (len(expected), tb.max_depth + 1)
    assert tb.path_len.tolist() == expected_len
    for row, want, n in zip(tb.paths, expected, expected_len):
        assert row[:n].tolist() == want[:n]
    assert tb.paths.min() >= 0 and tb.paths.max() < tb.num_nodes


# ------------------------------------------------------------------------------------------ reference vectors


def test_worked_example_matches_reference():
    tb = build_tree(WORKED, num_heads=3)
    rows = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 1, 4}, 5: {0, 2, 5}, 6: {0, 1, 3, 6}}
    for i, want in rows.items():
        assert set(np.flatnonzero(tb.attn_mask[i]).tolist()) == want
    assert tb.attn_mask.dtype == bool and tb.attn_mask.shape == (7, 7)
    assert tb.candidate_index.tolist() == [0, 1, 2, 11, 12, 11, 21]
    assert tb.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tb.parent.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tb.head_index.tolist() == [0, 0, 1, 1, 1, 2]
    assert tb.rank_index.tolist() == [0, 1, 0, 1, 0, 0]
    assert (tb.num_nodes, tb.num_paths, tb.max_depth) == (7, 3, 3)
    _check_paths(tb, [[0, 1, 3, 6], [0, 2, 5], [0, 1, 4]], [4, 3, 3])
    assert tb.children.tolist() == [[1, 2], [3, 4], [5, -1], [6, -1], [-1, -1], [-1, -1], [-1, -1]]
    assert tb.num_children.tolist() == [2, 2, 1, 1, 0, 0, 0]
    for a in (tb.attn_mask, tb.depth, tb.candidate_index, tb.paths, tb.children):
        assert a.dtype in (np.int32, np.bool_)
        assert not a.flags.writeable


def test_mc_sim_7b_63_matches_reference():
    tb = build_tree("mc_sim_7b_63", num_heads=5)
    expect = (
        [0, *range(1, 11), *range(11, 21), *range(11, 18), 11, 12, 13, 11, 12, 11, 11, 11, 11, 11, 11]
        + [*range(21, 31), 21, 22, 23, 21, 22, 21, 21, 21, 21, 21, 21, 22, 21, 31, 32]
    )
    assert tb.candidate_index.tolist() == expect
    assert collections.Counter(tb.depth.tolist()) == {0: 1, 1: 10, 2: 28, 3: 23, 4: 2}
    assert tb.paths.shape == (42, 5)
    assert tb.paths[0].tolist() == [0, 1, 11, 39, 63]
    assert tb.paths[1].tolist() == [0, 1, 11, 39, 62]
    assert tb.paths[2, :4].tolist() == [0, 3, 28, 61] and tb.path_len[2] == 4
    assert tb.paths[-1, :3].tolist() == [0, 1, 19] and tb.path_len[-1] == 3
    assert tb.paths.min() >= 0 and tb.paths.max() < 64


# depth -> node count, number of paths, depth (reference §3.1 table).
TABLE = {
    "mc_sim_7b_63": ([10, 28, 23, 2], 42),
    "vicuna_7b_stage2": ([10, 23, 23, 7], 42),
    "vicuna_7b_stage1": ([10, 32, 20, 1], 44),
    "vicuna_7b_stage1_ablation": ([10, 21, 25, 7], 42),
    "vicuna_13b_stage2": ([10, 19, 25, 9], 42),
    "vicuna_13b_stage1": ([10, 29, 23, 1], 44),
    "vicuna_33b_stage2": ([10, 24, 24, 5], 43),
    "vicuna_33b_stage1": ([10, 34, 19], 46),
    "zephyr_stage2": ([10, 27, 23, 3], 44),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_named_trees_match_reference_table(name):
    per_depth, num_paths = TABLE[name]
    tb = build_tree(name, num_heads=5)
    counts = collections.Counter(tb.depth.tolist())
    assert [counts[d] for d in range(1, tb.max_depth + 1)] == per_depth
    assert (tb.num_nodes, tb.num_paths, tb.max_depth) == (64, num_paths, len(per_depth))
    # The lists are greedy-growth output: each node's parent and lower sibling precede it. A transcription slip
    # would almost surely break this.
    seen: set = set()
    for p in NAMED_TREES[name]:
        assert len(p) == 1 or p[:-1] in seen
        assert p[-1] == 0 or p[:-1] + (p[-1] - 1,) in seen
        seen.add(p)


def test_named_tree_set_and_model_dispatch():
    assert set(NAMED_TREES) == set(TABLE)
    assert default_tree_for_model("lmsys/vicuna-7b-v1.3") == "vicuna_7b_stage2"
    assert default_tree_for_model("lmsys/vicuna-13b-v1.3") == "vicuna_13b_stage2"
    assert default_tree_for_model("lmsys/vicuna-33b-v1.3") == "vicuna_33b_stage2"
    assert default_tree_for_model("HuggingFaceH4/zephyr-7b-beta") == "zephyr_stage2"
    assert default_tree_for_model("HuggingFaceTB/SmolLM2-135M") == "mc_sim_7b_63"


# ------------------------------------------------------------------------------------------------ tree specs


def test_chain_dense_and_ar_specs():
    assert chain(3) == [(0,), (0, 0), (0, 0, 0)]
    tb = build_tree("chain:4", num_heads=4)
    assert (tb.num_nodes, tb.num_paths, tb.max_depth) == (5, 1, 4)
    assert tb.paths.tolist() == [[0, 1, 2, 3, 4]]
    assert build_tree([1, 7, 6], num_heads=2).num_nodes == 50
    assert build_tree("dense:7,6", num_heads=2) == build_tree([1, 7, 6], num_heads=2)
    assert dense([2, 3]) == [(0,), (1,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert build_tree("dense:7,6", num_heads=2).num_paths == 42
    for spec in ("ar", "", [], [1], "chain:0"):
        tb = build_tree(spec, num_heads=0)
        assert (tb.num_nodes, tb.num_paths, tb.max_depth) == (1, 1, 0)
        assert tb.paths.tolist() == [[0]] and tb.path_len.tolist() == [1]
        assert tb.attn_mask.tolist() == [[True]] and tb.candidate_index.tolist() == [0]
        assert tb.head_index.shape == (0,) and tb.children.tolist() == [[-1]]
    # Explicit paths: lists or tuples, any order.
    assert resolve_tree(((0,), [0, 0])) == [(0,), (0, 0)]


def test_hash_and_eq_are_by_tree_not_arrays():
    a = build_tree(WORKED, num_heads=3)
    b = build_tree(list(reversed(WORKED)), num_heads=3)
    assert a == b and hash(a) == hash(b)
    assert a != build_tree(WORKED, num_heads=4)
    assert a != build_tree(WORKED, num_heads=3, topk=5)
    assert len({a, b}) == 1
    assert "N=7" in repr(a)


def test_candidate_index_uses_topk_stride():
    tb = build_tree(WORKED, num_heads=3, topk=4)
    assert tb.candidate_index.tolist() == [0, 1, 2, 5, 6, 5, 9]
    assert tb.num_candidates == 13


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ([[0, 0]], {}, "needs its prefix [0]"),
        ([[0], [0, 1, 2], [0, 0]], {}, "path [0, 1, 2] needs its prefix [0, 1]"),
        ([[0], [0]], {}, "duplicate path [0]"),
        ([[0], [-1]], {}, "negative rank in path [-1]"),
        ([[0], []], {}, "empty path []"),
        ([[0], [10]], {}, "heads give only top-10"),
        ([[0], [3]], {"topk": 3}, "rank 3 in path [3]"),
        ("chain:4", {"num_heads": 3}, "tree depth 4 needs at least 4 Medusa heads, the model has 3; pick a shallower"),
        ("mc_sim_7b_63", {"num_heads": 3}, "such as chain:3"),
        ("chain:1", {"num_heads": 0}, "such as ar"),
        ("no_such_tree", {}, "known trees: mc_sim_7b_63"),
        ([2, 7, 6], {}, "first entry is the root count and must be 1"),
        ("dense:7,x", {}, "cannot parse tree spec"),
        ("dense:7,0", {}, "widths must all be >= 1"),
        ("chain:2,3", {}, "write chain:N"),
        ([[0], "ab"], {}, "bad tree path 'ab'"),
        ([[0], [0.5]], {}, "bad tree path"),
        (None, {}, "bad tree spec None"),
    ],
)
def test_validation_errors(spec, kwargs, message):
    kwargs = {"num_heads": 5, **kwargs}
    with pytest.raises(TreeError) as err:
        build_tree(spec, **kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_depth_error_suggests_fitting_named_tree():
    with pytest.raises(TreeError, match="vicuna_33b_stage1"):
        build_tree("vicuna_7b_stage2", num_heads=3)
    build_tree("vicuna_33b_stage1", num_heads=3)  # depth 3 fits 3 heads


# ---------------------------------------------------------------------------------------------- random trees


def _random_tree(rng: random.Random, size: int, max_depth: int, topk: int) -> list[tuple[int, ...]]:
    size = min(size, sum(topk**d for d in range(1, max_depth + 1)))  # no more nodes than exist
    nodes: set = set()
    while len(nodes) < size:
        parent = rng.choice([()] + sorted(n for n in nodes if len(n) < max_depth))
        nodes.add(parent + (rng.randrange(topk),))
    paths = list(nodes)
    rng.shuffle(paths)
    return paths


@pytest.mark.parametrize("seed", range(20))
def test_random_tree_invariants(seed):
    rng = random.Random(seed)
    topk = rng.randint(1, 6)
    max_depth = rng.randint(1, 5)
    paths = _random_tree(rng, rng.randint(1, 30), max_depth, topk)
    tb = build_tree(paths, num_heads=max_depth, topk=topk)
    n = tb.num_nodes
    assert n == len(paths) + 1
    node_path = [()] + list(tb.choices)

    for i in range(n):
        ancestors = {0, i}
        j = i
        while tb.parent[j] >= 0:
            j = int(tb.parent[j])
            ancestors.add(j)
        assert set(np.flatnonzero(tb.attn_mask[i]).tolist()) == ancestors
        assert tb.depth[i] == len(node_path[i])
        if i:
            assert node_path[tb.parent[i]] == node_path[i][:-1]
            assert tb.candidate_index[i] == 1 + tb.head_index[i - 1] * topk + tb.rank_index[i - 1]

    # Children: consistent with parent, in rank order, -1 padded.
    for i in range(n):
        kids = tb.children[i, : tb.num_children[i]].tolist()
        assert kids == sorted(j for j in range(1, n) if tb.parent[j] == i)
        assert [node_path[k][-1] for k in kids] == sorted(node_path[k][-1] for k in kids)
        assert (tb.children[i, tb.num_children[i] :] == -1).all()

    # Paths: one per leaf, each a root-to-leaf chain whose length is the leaf's depth + 1; all nodes covered.
    leaves = [i for i in range(n) if tb.num_children[i] == 0]
    assert tb.num_paths == len(leaves)
    covered = set()
    for row, length in zip(tb.paths, tb.path_len):
        real = row[:length].tolist()
        assert real[0] == 0 and tb.num_children[real[-1]] == 0
        assert length == tb.depth[real[-1]] + 1
        assert all(tb.parent[b] == a for a, b in zip(real, real[1:]))
        assert (row[length:] == real[-1]).all()
        covered.update(real)
    assert covered == set(range(n))
    assert sorted(tb.paths[:, :1].ravel().tolist()) == [0] * tb.num_paths
    assert tb.max_depth == max(len(p) for p in paths)


# ----------------------------------------------------------------------------------------------- tree growth


def _toy_accuracy() -> np.ndarray:
    # Head accuracy decays with rank and with head index, like real Medusa heads.
    return np.array([[0.6, 0.2, 0.1, 0.05], [0.4, 0.15, 0.1, 0.05], [0.3, 0.1, 0.05, 0.02]])


def test_grow_tree_order():
    acc = _toy_accuracy()
    # Values: (0,)=.6, (0,0)=.24, (1,)=.2, (2,)=.1, (0,1)=.09, (1,0)=.08, (0,0,0)=.072, then (0,2)=.06 ...
    assert grow_tree(acc, 7) == [(0,), (0, 0), (1,), (2,), (0, 1), (1, 0), (0, 0, 0)]
    assert grow_tree(acc, 3, max_depth=1) == [(0,), (1,), (2,)]
    assert grow_tree(acc, 0) == []
    # Exact ties resolve like the original's scan: the earlier-added generator wins, siblings before children.
    tied = np.array([[0.5, 0.25, 0.25], [0.5, 0.5, 0.5]])  # (1,), (0,0), (2,), (0,1) all worth 0.25
    assert grow_tree(tied, 5) == [(0,), (1,), (0, 0), (2,), (0, 1)]


def test_grow_tree_sequence_and_expected_length():
    acc = _toy_accuracy()
    seq = grow_tree_sequence(acc, 20)
    assert len(seq) == 20 and [len(t) for t in seq] == list(range(1, 21))
    assert seq[-1] == grow_tree(acc, 20)
    values = [expected_accept_length(t, acc) for t in seq]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(0.6)
    assert expected_accept_length(chain(3), acc) == pytest.approx(0.6 + 0.24 + 0.072)
    assert expected_accept_length([], acc) == 0.0
    for t in seq:
        validate_tree(t, num_heads=3, topk=4)
        build_tree(t, num_heads=3, topk=4)


def test_grow_tree_errors():
    acc = _toy_accuracy()
    with pytest.raises(TreeError, match="cannot grow"):
        grow_tree(acc[:, :2], 20, max_depth=2)  # only 2 + 4 nodes exist
    with pytest.raises(TreeError, match="max_depth"):
        grow_tree(acc, 5, max_depth=4)
    with pytest.raises(TreeError, match="probabilities"):
        grow_tree(acc * 3, 5)
    with pytest.raises(TreeError, match="shape"):
        grow_tree(acc[0], 5)
    with pytest.raises(TreeError, match="outside the accuracy table"):
        expected_accept_length([(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)], acc)

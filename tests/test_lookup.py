"""The lookup branch: draft tokens copied from the context (`infer.lookup`), verified as one more chain of the tree.

Its drafts must follow the stated matching rule (checked against a plain-Python statement of it), the tree must
hold the chain where `build_tree` says, and decoding with it must change nothing but the speed: greedy output
token-for-token plain greedy decoding, sampling the exact distribution of plain sampling.
"""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from infer import generate_ids, lookup
from infer.plan import resolve_tree_buffers
from infer.testing import greedy_reference, shared_bundle
from medusa_jax.errors import MedusaError
from medusa_jax.tree import MAX_LOOKUP, TreeError, build_tree

# A prompt that repeats itself, so the lookup branch has matches from the first step on.
LOOPY = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]
MAX_NEW = 40


def reference_drafts(history: list[int], root_pos: int, length: int, max_ngram: int) -> list[int]:
    """The module docstring's rule, stated in plain Python: the longest n-gram (n <= max_ngram) ending at the root
    that also ends at an earlier position e < root_pos, the latest such e; drafts continue from e + 1, periodically
    once they reach the root; without a match, the root repeated."""
    ctx = history[:root_pos + 1]
    for n in range(min(max_ngram, root_pos + 1), 0, -1):
        tail = ctx[-n:]
        ends = [e for e in range(n - 1, root_pos) if ctx[e - n + 1:e + 1] == tail]
        if ends:
            e = ends[-1]
            period = root_pos - e
            return [ctx[e + 1 + i % period] for i in range(length)]
    return [ctx[root_pos]] * length


def _drafts(history: list[int], root_pos: int, length: int, max_ngram: int = lookup.MAX_NGRAM) -> list[int]:
    h = jnp.asarray([history + [0] * 8], jnp.int32)  # stale slots beyond the root must not matter
    return np.asarray(lookup.drafts(h, jnp.asarray([root_pos], jnp.int32), length, max_ngram))[0].tolist()


@pytest.mark.parametrize("history, root_pos, want", [
    ([1, 2, 3, 9, 9, 1, 2, 3], 7, [9, 9, 1, 2]),  # 3-gram [1, 2, 3] ends at 2: continue from 3
    ([1, 2, 3, 4, 3, 8, 2, 3], 7, [4, 3, 8, 2]),  # [2, 3] ends at 2 (longer than a match of [3] alone at 4)
    ([7, 3, 5, 3, 6, 3], 5, [6, 3, 6, 3]),  # only [3] matches: the latest one (4), then periodic from the root
    ([4, 4, 4, 4], 3, [4, 4, 4, 4]),  # a run: the latest 3-gram match ends at 2, period 1
    ([1, 2, 3, 4], 3, [4, 4, 4, 4]),  # no match anywhere: the root repeated
    ([8], 0, [8, 8]),  # the root alone
])
def test_drafts_follow_the_matching_rule(history, root_pos, want):
    assert _drafts(history, root_pos, len(want)) == want
    assert reference_drafts(history, root_pos, len(want), lookup.MAX_NGRAM) == want


def test_drafts_equal_the_plain_statement_on_random_histories():
    rng = np.random.default_rng(0)
    for trial in range(60):
        vocab = int(rng.integers(2, 6))  # few tokens: many matches, ties and loops
        history = rng.integers(0, vocab, size=int(rng.integers(1, 24))).tolist()
        root_pos = int(rng.integers(0, len(history)))
        for max_ngram in (1, 2, 3):
            got = _drafts(history, root_pos, 5, max_ngram)
            assert got == reference_drafts(history, root_pos, 5, max_ngram), (history, root_pos, max_ngram)


def test_drafts_batch_rows_independently():
    rows = [([1, 2, 3, 1, 2], 4), ([5, 6, 5, 0, 0], 2), ([9, 9, 9, 9, 9], 4)]
    h = jnp.asarray([r for r, _ in rows], jnp.int32)
    got = np.asarray(lookup.drafts(h, jnp.asarray([p for _, p in rows], jnp.int32), 3)).tolist()
    assert got == [reference_drafts(r, p, 3, lookup.MAX_NGRAM) for r, p in rows]


def test_history_records_each_step_after_the_root():
    h = lookup.init_history(jnp.asarray([[3, 4, 0], [5, 0, 0]]), jnp.asarray([2, 1]), jnp.asarray([7, 8]), 10)
    assert np.asarray(h).tolist() == [[3, 4, 7] + [0] * 7, [5, 8] + [0] * 8]
    h = lookup.record(h, jnp.asarray([[1, 2, 3], [4, 5, 6]]), jnp.asarray([2, 1]))
    assert np.asarray(h).tolist() == [[3, 4, 7, 1, 2, 3] + [0] * 4, [5, 8, 4, 5, 6] + [0] * 5]


# ------------------------------------------------------------------------------------------------ the tree


def test_tree_with_a_lookup_chain():
    t = build_tree([[0], [1], [0, 0]], num_heads=2, topk=2, lookup=3)
    assert (t.num_nodes, t.lookup, t.head_depth, t.max_depth, t.num_candidates) == (7, 3, 2, 3, 1 + 2 * 2 + 3)
    assert t.depth.tolist() == [0, 1, 1, 2, 1, 2, 3]
    assert t.parent.tolist() == [-1, 0, 0, 1, 0, 4, 5]
    # Candidates: [root, head0 top-2, head1 top-2, lookup 1..3].
    assert t.candidate_index.tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert t.attn_mask[6].tolist() == [True, False, False, False, True, True, True]
    assert not t.attn_mask[4, 1:4].any() and not t.attn_mask[1:4, 4:].any()  # the chain and the heads' nodes
    assert sorted(map(tuple, (p[:n] for p, n in zip(t.paths.tolist(), t.path_len)))) == \
        [(0, 1, 3), (0, 2), (0, 4, 5, 6)]
    assert t != build_tree([[0], [1], [0, 0]], num_heads=2, topk=2) and t == build_tree(
        [[0], [1], [0, 0]], num_heads=2, topk=2, lookup=3)


def test_lookup_chain_alone():
    t = build_tree([], num_heads=0, topk=1, lookup=4)
    assert (t.num_nodes, t.head_depth, t.max_depth, t.num_candidates) == (5, 0, 4, 5)
    assert t.parent.tolist() == [-1, 0, 1, 2, 3] and t.candidate_index.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("bad", [-1, MAX_LOOKUP + 1, 1.5, True, "2"])
def test_bad_lookup_lengths_are_tree_errors(bad):
    with pytest.raises(TreeError, match="lookup must be an integer"):
        build_tree([[0]], num_heads=1, lookup=bad)


# ------------------------------------------------------------------------------------------------ decoding


oracle = functools.partial(shared_bundle, "oracle")
rand = functools.partial(shared_bundle, "rand")


def plain(which: str, prompt: tuple) -> list[int]:
    return greedy_reference(which, prompt, MAX_NEW)


CASES = [("oracle", "chain:2", 3), ("oracle", "ar", 4), ("rand", [[0], [1], [0, 0]], 2), ("rand", "ar", 6)]


@pytest.mark.parametrize("which, tree, chain", CASES, ids=str)
def test_greedy_with_lookup_equals_plain_greedy(which, tree, chain):
    bundle = oracle() if which == "oracle" else rand()
    out = generate_ids(bundle, [LOOPY], max_new_tokens=MAX_NEW, mode="greedy", tree=tree, lookup=chain,
                       stop_ids=())
    assert out.tokens[0] == plain(which, tuple(LOOPY))
    assert (out.accepted <= out.proposed).all()
    if tree == "ar":  # only the lookup chain drafts, and it is right often enough to show in the counts
        assert (out.accepted > 0).sum() >= 2 and out.steps < MAX_NEW - 1


def test_batch_streaming_and_other_modes_with_lookup_are_greedy_at_t0():
    prompts = [LOOPY, [3, 4, 5], LOOPY[:9]]
    want = [plain("rand", tuple(p)) for p in prompts]
    kw = dict(max_new_tokens=MAX_NEW, tree=[[0], [1]], lookup=3, stop_ids=())
    assert generate_ids(rand(), prompts, mode="greedy", **kw).tokens == want
    pieces: list = []
    assert generate_ids(rand(), prompts, mode="greedy", stream=pieces.append, **kw).tokens == want
    assert [sum((p[i] for p in pieces), []) for i in range(3)] == want
    for mode in ("typical", "sample"):
        assert generate_ids(rand(), prompts[:1], mode=mode, temperature=0.0, **kw).tokens == want[:1]


def test_lookup_without_heads_and_plan_errors():
    base = rand().with_heads(None, None)
    out = generate_ids(base, [LOOPY], max_new_tokens=MAX_NEW, lookup=4, stop_ids=())  # mode None: greedy
    assert out.tokens[0] == plain("rand", tuple(LOOPY)) and (out.accepted > 0).any()
    assert resolve_tree_buffers(base, "greedy", None, 4).head_depth == 0
    with pytest.raises(MedusaError, match="mode 'ar' decodes without drafts"):
        generate_ids(rand(), [LOOPY], max_new_tokens=4, mode="ar", lookup=2)
    with pytest.raises(MedusaError, match="need Medusa heads"):
        generate_ids(base, [LOOPY], max_new_tokens=4, tree="chain:2", lookup=2)
    with pytest.raises(MedusaError, match="needs Medusa heads or a lookup branch"):
        generate_ids(base, [LOOPY], max_new_tokens=4, mode="greedy")
    for bad in (-1, MAX_LOOKUP + 1, 2.0, True):
        with pytest.raises(MedusaError, match="lookup must be an integer"):
            generate_ids(rand(), [LOOPY], max_new_tokens=4, lookup=bad)


def test_bundle_lookup_is_the_default_and_plain_decoding_ignores_it():
    tuned = rand().replace(lookup=3)
    default = generate_ids(tuned, [LOOPY], max_new_tokens=MAX_NEW, stop_ids=())
    explicit = generate_ids(rand(), [LOOPY], max_new_tokens=MAX_NEW, lookup=3, stop_ids=())
    assert default.tokens == explicit.tokens and (default.accepted == explicit.accepted).all()
    assert generate_ids(tuned, [LOOPY], max_new_tokens=MAX_NEW, mode="ar", stop_ids=()).steps == MAX_NEW - 1


# ------------------------------------------------------------------------------------------------ tree.json


def test_tree_json_carries_the_lookup_chain(tmp_path):
    from medusa_jax.loading import attach_heads, heads_io

    bundle = rand()
    heads_io.save_heads(bundle, out_dir=tmp_path, tree=((0,), (1,)), lookup=4)
    assert json.loads((tmp_path / "tree.json").read_text()) == {"tree": [[0], [1]], "lookup": 4}
    loaded = attach_heads(bundle.with_heads(None, None), tmp_path)
    assert loaded.tree == ((0,), (1,)) and loaded.lookup == 4
    heads_io.save_heads(loaded, out_dir=tmp_path / "again")  # the bundle's tree and chain travel along
    assert attach_heads(bundle, tmp_path / "again").lookup == 4
    heads_io.save_heads(bundle, out_dir=tmp_path / "none", tree=((0,),))
    assert "lookup" not in json.loads((tmp_path / "none" / "tree.json").read_text())
    assert attach_heads(bundle, tmp_path / "none").lookup == 0
    with pytest.raises(MedusaError, match="beside a tree"):
        heads_io.save_heads(bundle.with_heads(bundle.heads, bundle.heads_config, None), out_dir=tmp_path / "x",
                            lookup=2)
    (tmp_path / "tree.json").write_text(json.dumps({"tree": [[0]], "lookup": 99}))
    with pytest.raises(MedusaError, match='"lookup" must be an integer'):
        attach_heads(bundle, tmp_path)


# ------------------------------------------------------------------------------------------------ replay


def test_match_length_is_the_rule_s_n():
    """`lookup.match` reports the n of the rule (0 without any match)."""
    history = jnp.asarray([[1, 2, 3, 9, 2, 3, 0, 0], [4, 5, 6, 7, 0, 0, 0, 0]], jnp.int32)
    end, n = lookup.match(history, jnp.asarray([5, 3], jnp.int32))
    assert end.tolist()[0] == 2 and n.tolist() == [2, 0]  # "2 3" ends at 2; row 1's 7 never occurred before


def test_replay_walks_a_periodic_answer():
    from bench.lookup_replay import replay

    # The first root (1) matches the prompt's 1: drafts 2 3 4, all confirmed; the next root (the second 1)
    # matches "3 4 1" and its drafts 2 3 4 are confirmed too; the last token, 5, needs no step.
    r = replay([([1, 2, 3, 4], [1, 2, 3, 4, 1, 2, 3, 4, 5])], length=3, max_ngram=3)
    assert (r["steps"], r["tokens"]) == (2, 8) and r["by_match"] == {1: [1, 3], 3: [1, 3]}
    # The answer stops after the second step's drafts: its bonus token is not emitted.
    r = replay([([1, 2, 3, 4], [1, 2, 3, 4, 1, 2, 3, 4])], length=3, max_ngram=3)
    assert (r["steps"], r["tokens"]) == (2, 7)


@pytest.mark.parametrize("chain", [2, 4])
def test_replay_counts_the_decoder_s_steps(chain):
    """The replay of greedy answers counts exactly the steps the decoder ran with the chain alone."""
    from bench.lookup_replay import replay

    for p in (LOOPY, [3, 9, 4, 9, 3, 9, 4], list(range(3, 23))):  # one at a time: a batch gates its steps together
        out = generate_ids(rand().with_heads(None, None), [p], max_new_tokens=MAX_NEW, tree="ar", lookup=chain,
                           stop_ids=())
        ran = out.accepted[0][out.accepted[0] >= 0]
        r = replay([(p, out.tokens[0])], length=chain, max_ngram=lookup.MAX_NGRAM)
        assert (r["steps"], r["tokens"]) == (len(ran), len(out.tokens[0]) - 1)  # the first token is the prefill's
        assert r["by_match"].get(0, [0, 0])[1] == 0  # a step without a match runs without the chain


@pytest.mark.parametrize("which, tree", [("rand", "ar"), ("rand", [[0], [1], [0, 0]]), ("oracle", "chain:2")])
def test_steps_without_a_match_run_without_the_chain(which, tree):
    """A context with fresh tokens leaves the chain without a match at some steps: those steps verify the tree
    without the chain (a plain step for a chain alone: nothing proposed), the others with it, and the output is
    still plain greedy decoding."""
    prompt = list(range(3, 23))  # 20 distinct tokens: the first roots are often new
    bundle = shared_bundle(which)
    if tree == "ar":
        bundle = bundle.with_heads(None, None)
    out = generate_ids(bundle, [prompt], max_new_tokens=MAX_NEW, tree=tree, lookup=3, stop_ids=())
    assert out.tokens[0] == greedy_reference(which, tuple(prompt), MAX_NEW)
    if tree == "ar":  # a step with the chain proposes its tokens, a plain one none: both kinds ran
        ran = out.proposed[0][out.proposed[0] >= 0]
        assert (ran == 0).any() and (ran > 0).any()


def test_replay_without_a_bench_file_is_one_line(tmp_path, capsys):
    from bench import lookup_replay

    with pytest.raises(SystemExit) as e:
        lookup_replay.main(["--bench", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no such file; run python -m infer.bench first" in err and "\n" not in err

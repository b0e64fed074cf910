"""Greedy Medusa decoding must reproduce plain greedy decoding token for token; stopping rules cut exactly.

Two tiny models: an "oracle" whose heads are often right (long accepted chunks, so acceptance and KV compaction
are exercised), and a random one with identity-plus-noise heads (occasional acceptance).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import decode, generate_ids, state
from medusa_jax import model
from medusa_jax.bundle import forward_logits
from medusa_jax.errors import MedusaError
from infer.plan import make_plan, stream_steps
from infer.testing import greedy_reference, shared_bundle

TREES = ["chain:3", [1, 3, 2], "mc_sim_7b_63", "ar"]
PROMPTS = {1: [7], 7: [3, 4, 5, 6, 7, 8, 9], 20: [(5 * i + 3) % 30 + 1 for i in range(20)]}
MAX_NEW = 48


oracle = functools.partial(shared_bundle, "oracle")
rand = functools.partial(shared_bundle, "rand")


def reference(which: str, prompt: tuple, max_new: int = MAX_NEW, stop: tuple = ()) -> list[int]:
    """Plain greedy decoding (batch 1): the ground truth every mode must match at temperature 0."""
    return greedy_reference(which, prompt, max_new, stop)


def _emitted_per_step(gen, row=0) -> list[int]:
    """Tokens each decoding step emitted before truncation (accepted drafts + the bonus token)."""
    acc = gen.accepted[row]
    return [int(a) + 1 for a in acc if a >= 0]


@pytest.mark.parametrize("which", ["oracle", "rand"])
def test_plain_greedy_matches_a_cache_free_forward(which):
    """The reference itself: each token is the argmax of a full causal forward (no cache, no tree code)."""
    bundle = oracle() if which == "oracle" else rand()
    for prompt in (PROMPTS[1], PROMPTS[20]):
        toks = reference(which, tuple(prompt))
        logits = np.asarray(forward_logits(bundle, [prompt + toks]))[0]  # [T, V]
        assert np.argmax(logits[len(prompt) - 1:-1], axis=-1).tolist() == toks


def test_streamed_batch_equals_the_whole_generation():
    """Streaming runs the prefill and then segments of steps as separate executables (`infer.decode.start_jit`,
    `advance_jit`, `finish_jit`): each row's pieces, in order, are its tokens; tokens, steps and acceptance equal
    the one-executable run's, with multi-token steps, a row that stops early (stop token) and one that runs on."""
    prompts = [PROMPTS[7], PROMPTS[20]]
    ref = reference("oracle", tuple(prompts[0]))
    kw = dict(max_new_tokens=MAX_NEW, mode="greedy", tree="chain:3", stop_ids=(ref[9],))
    pieces: list[list[list[int]]] = []
    streamed = generate_ids(oracle(), prompts, stream=pieces.append, **kw)
    whole = generate_ids(oracle(), prompts, **kw)
    assert streamed.tokens == whole.tokens and streamed.finish == whole.finish == ["stop", "length"]
    assert [sum((p[i] for p in pieces), []) for i in range(2)] == whole.tokens
    assert streamed.steps == whole.steps and (streamed.accepted == whole.accepted).all()
    assert (whole.accepted > 0).sum() >= 3  # multi-token steps were streamed
    # The prefill's token, then one piece per segment that emitted something (one step per segment on a CPU).
    assert len(pieces) == whole.steps + 1 if stream_steps() == 1 else len(pieces) <= whole.steps // stream_steps() + 2
    assert max(len(p[1]) for p in pieces) > 1 and all(any(p) for p in pieces)


@pytest.mark.parametrize("tree", TREES, ids=str)
@pytest.mark.parametrize("plen", sorted(PROMPTS))
def test_greedy_medusa_equals_plain_greedy_oracle(tree, plen):
    prompt = PROMPTS[plen]
    out = generate_ids(oracle(), [prompt], max_new_tokens=MAX_NEW, mode="greedy", tree=tree, stop_ids=())
    assert out.tokens[0] == reference("oracle", tuple(prompt))
    assert out.finish == ["length"]
    ran = out.accepted >= 0
    assert (ran == (out.proposed >= 0)).all() and (out.accepted <= out.proposed).all()
    if tree != "ar":
        # The acceptance and compaction paths ran: several steps accepted drafts, some of them all the way.
        assert (out.accepted > 0).sum() >= 3
        assert out.steps < MAX_NEW - 1
        # Greedy picks a longest-accepting path; its full depth is what was proposed on it.
        assert (out.proposed[ran] >= 1).all() and out.proposed.max() <= 4
        if tree == "chain:3":
            assert (out.proposed[ran] == 3).all()
        assert 0 < out.stats()["acceptance_rate"] <= 1
    else:
        assert out.steps == MAX_NEW - 1 and (out.accepted == 0).all() and (out.proposed[ran] == 0).all()
        assert out.stats()["acceptance_rate"] == 0.0


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", [1, 3, 2], "chain:1"], ids=str)  # chain:1: one projection pass
def test_greedy_medusa_equals_plain_greedy_random_heads(tree):
    prompt = PROMPTS[7]
    out = generate_ids(rand(), [prompt], max_new_tokens=MAX_NEW, mode="greedy", tree=tree, stop_ids=())
    assert out.tokens[0] == reference("rand", tuple(prompt))
    assert (out.accepted > 0).any()


@pytest.mark.parametrize("tree", ["chain:3", "mc_sim_7b_63", "ar"], ids=str)
def test_batch_of_three_prompt_lengths_matches_single_sequences(tree):
    prompts = [PROMPTS[7], PROMPTS[1], PROMPTS[20]]
    out = generate_ids(oracle(), prompts, max_new_tokens=MAX_NEW, mode="greedy", tree=tree, stop_ids=())
    for row, prompt in enumerate(prompts):
        assert out.tokens[row] == reference("oracle", tuple(prompt)), f"row {row}"
        assert out.padded[row].tolist() == out.tokens[row]


@pytest.mark.parametrize("mode", ["typical", "sample"])
def test_other_modes_at_temperature_zero_are_greedy(mode):
    prompt = PROMPTS[7]
    out = generate_ids(oracle(), [prompt], max_new_tokens=MAX_NEW, mode=mode, temperature=0.0, tree="chain:3",
                       stop_ids=())
    assert out.tokens[0] == reference("oracle", tuple(prompt))


def test_stop_token_inside_an_accepted_chunk_truncates():
    prompt, tree = PROMPTS[7], "chain:4"
    full = generate_ids(oracle(), [prompt], max_new_tokens=MAX_NEW, tree=tree, stop_ids=())
    toks, emitted = full.tokens[0], _emitted_per_step(full)
    # Find a token whose first occurrence is an accepted draft (not the bonus, not the last of its chunk).
    start, target = 1, None
    for count in emitted:
        for j in range(count - 1):
            k = start + j
            if toks[k] not in toks[:k]:
                target = k
                break
        if target is not None:
            break
        start += count
    assert target is not None, "the oracle model should accept drafts"
    stop = toks[target]
    out = generate_ids(oracle(), [prompt], max_new_tokens=MAX_NEW, tree=tree, stop_ids=(stop,))
    assert out.tokens[0] == reference("oracle", tuple(prompt), stop=(stop,)) == toks[:target + 1]
    assert out.finish == ["stop"]
    # The last step accepted more tokens than it emitted: the cut fell inside the chunk.
    assert sum(_emitted_per_step(out)) + 1 > len(out.tokens[0])


def test_max_new_tokens_reached_mid_chunk():
    prompt, tree = PROMPTS[7], "chain:4"
    full = generate_ids(oracle(), [prompt], max_new_tokens=MAX_NEW, tree=tree, stop_ids=())
    emitted = _emitted_per_step(full)
    step = next(i for i, c in enumerate(emitted) if c >= 3)
    limit = 1 + sum(emitted[:step]) + 1  # one token into a chunk of >= 3
    out = generate_ids(oracle(), [prompt], max_new_tokens=limit, tree=tree, stop_ids=())
    assert out.tokens[0] == reference("oracle", tuple(prompt))[:limit]
    assert out.finish == ["length"] and len(out.tokens[0]) == limit
    assert out.padded.shape == (1, limit)


@pytest.mark.parametrize("tree", ["chain:4", "ar"], ids=str)
def test_capacity_stop_never_writes_past_the_cache(tree):
    prompts = [PROMPTS[7], [4, 9, 11]]
    slots, nodes = 40, 5 if tree == "chain:4" else 1
    out = generate_ids(oracle(), prompts, max_new_tokens=MAX_NEW, tree=tree, stop_ids=(), cache_length=slots)
    for row, prompt in enumerate(prompts):
        toks = out.tokens[row]
        assert out.finish[row] == "capacity"
        assert toks == reference("oracle", tuple(prompt))[:len(toks)]
        cached = len(prompt) + len(toks) - 1  # the last emitted token is not cached yet
        assert cached <= slots < cached + nodes  # stopped exactly when the next tree would not fit
    if tree == "ar":
        assert [len(t) for t in out.tokens] == [slots - len(p) + 1 for p in prompts]


@pytest.mark.parametrize("tree", ["ar", "mc_sim_7b_63"], ids=str)
def test_long_generation_through_the_attention_windows(tree):
    """Steps attend over the smallest cache window holding the live slots of the unfinished rows
    (model.window_sizes). A batch of two: a long prompt that stops early (its finished row no longer widens the
    window) and a short one that goes on through several windows; both equal plain greedy decoding, and the long
    run equals the argmax of a cache-free forward at every token."""
    bundle, max_new, slots = rand(), 300, 640
    assert model.window_sizes(slots) == (128, 256, 640)  # the short row crosses 128 and 256
    long_prompt, short = [(7 * i + 2) % 200 + 1 for i in range(180)], PROMPTS[20]
    head = reference("rand", tuple(long_prompt), 12)
    cut = next(i for i in range(4, 12) if head[i] not in head[:i])  # stop the long row at its (cut+1)-th token
    out = generate_ids(bundle, [long_prompt, short], max_new_tokens=max_new, mode="greedy", tree=tree,
                       stop_ids=(head[cut],), cache_length=slots)
    assert out.tokens[0] == head[:cut + 1] and out.finish[0] == "stop"
    toks = out.tokens[1]
    assert len(toks) == max_new and out.finish[1] == "length"
    logits = np.asarray(forward_logits(bundle, [short + toks]))[0]  # [T, V]
    assert np.argmax(logits[len(short) - 1:-1], axis=-1).tolist() == toks


@pytest.mark.parametrize("tree,chunk", [("ar", 16), ("mc_sim_7b_63", 32)], ids=str)
def test_chunked_prefill_equals_one_forward(tree, chunk):
    """A prefill in chunks (only those holding real tokens run) decodes exactly as one forward over the bucket,
    for a batch whose prompts end inside the first chunk, at a chunk's last token, at the next chunk's first
    token and further on (bucket 128: up to 8 chunks of 16)."""
    prompts = [[(11 * i + 5) % 200 + 1 for i in range(n)] for n in (5, 32, 33, 70)]
    kw = dict(max_new_tokens=MAX_NEW, mode="greedy", tree=tree, stop_ids=())
    whole = generate_ids(rand(), prompts, prefill_chunk=0, **kw)
    chunked = generate_ids(rand(), prompts, prefill_chunk=chunk, **kw)
    assert chunked.tokens == whole.tokens
    for row, prompt in enumerate(prompts):
        assert chunked.tokens[row] == reference("rand", tuple(prompt)), f"row {row}"


def test_prefill_chunk_must_divide_the_buckets():
    with pytest.raises(MedusaError, match="prefill_chunk must be 0"):
        generate_ids(rand(), [[1, 2, 3]], max_new_tokens=4, prefill_chunk=100)


def test_attention_window_equals_full_attention():
    """`attend_window` over a static or traced window equals `attend` over every slot when the slots beyond the
    window are masked, for windows at and around the block boundaries (every query sees slot 0, as every decoding
    query sees at least itself: a fully masked row is uniform over the slots read)."""
    rng = np.random.default_rng(0)
    b, kv, g, t, d, s = 2, 3, 2, 4, 8, 512
    q = jnp.asarray(rng.standard_normal((b * kv, g * t, d)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((b * kv, d, s)), jnp.float32)  # model.KEY_SLOT_AXIS = 2
    values = jnp.asarray(rng.standard_normal((b * kv, s, d)), jnp.float32)
    windowed = jax.jit(lambda m, w: model.attend_window(q, keys, values, m, 0.3, w))
    assert model.window_sizes(s) == (128, 256, 512)
    for live in (1, 127, 128, 129, 255, 256, 257, 300, 512):
        mask = jnp.asarray(rng.random((b, t, s)) < 0.7) & (jnp.arange(s) < live) | (jnp.arange(s) == 0)
        full = model.attend(q, keys, values, mask, 0.3)
        np.testing.assert_allclose(windowed(mask, jnp.int32(live)), full, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(model.attend_window(q, keys, values, mask, 0.3, live), full, rtol=1e-6,
                                   atol=1e-6)
    for slots in (4096, 32768, 131072):  # windows up to half the cache, then all of it; at most MAX_WINDOWS
        sizes = model.window_sizes(slots)
        assert len(sizes) <= model.MAX_WINDOWS and sizes[-1] == slots and sizes[-2] <= slots // 2
        assert sizes[-2] > slots // 2 - sizes[0] and all(w % model.WINDOW_BLOCK == 0 for w in sizes[:-1])
    assert model.window_sizes(100) == (100,) and model.window_sizes(255) == (255,)


@pytest.mark.parametrize("mode, temperature", [("greedy", 0.0), ("typical", 0.7), ("sample", 0.7)])
@pytest.mark.parametrize("tree, batch", [("chain:2", 1), ([1, 2], 1), ("chain:1", 2)], ids=str)
def test_one_projection_pass_for_base_and_heads_decodes_the_same(monkeypatch, mode, temperature, tree, batch):
    """Small trees read the output projection once for the base logits at the nodes and the heads' logits at all
    of them (`DecodeSpec.fused_head_rows`); the drafts, hence tokens and acceptance at a fixed seed, are those of
    a second pass at the accepted node. (The random bundle's heads share the base projection; the oracle's own.)"""
    prompts = [PROMPTS[7], PROMPTS[20]][:batch]
    kw = dict(max_new_tokens=MAX_NEW, mode=mode, temperature=temperature, tree=tree, stop_ids=(), seed=5)
    runs = []
    for rows in (16, 0):  # one pass (up to 16 rows: every case here), then two
        monkeypatch.setattr(state, "FUSED_HEAD_ROWS", rows)
        spec = make_plan(rand(), prompts, MAX_NEW, temperature, 1.0, mode, tree, (), None, 0.09, 0.3, None).spec
        assert decode._fuse_heads(spec, batch, spec.tree.num_nodes) == (rows > 0)
        runs.append(generate_ids(rand(), prompts, **kw))
    fused, twice = runs
    assert fused.tokens == twice.tokens and (fused.accepted == twice.accepted).all()
    assert (fused.accepted > 0).any()  # drafts were accepted: the heads' logits mattered

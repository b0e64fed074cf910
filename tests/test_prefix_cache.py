"""The prefix cache: a batch-1 call reuses the previous call's keys and values where its prompt starts with the
previous prompt + answer, and then decodes exactly as a call that ran its whole prompt (tiny models, CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import api, prefix_cache
from infer.testing import oracle_bundle, random_bundle

CHUNK = 16  # prefill chunk: prompts above 16 tokens run in chunks, so a reused prefix can skip some


@functools.lru_cache(maxsize=None)
def _random():
    return random_bundle(seed=3)


@functools.lru_cache(maxsize=None)
def _oracle():
    return oracle_bundle(mix=0.15, seed=2)[0]


def _gen(bundle, prompt, mode, reuse, max_new=24, stream=None):
    return api.generate_ids(bundle, [prompt], max_new_tokens=max_new, mode=mode, stop_ids=(), prefill_chunk=CHUNK,
                            prefix_cache=reuse, stream=stream)


def _assert_reused_all(reused, prompt, answer, mode):
    """Every emitted token's keys and values but the last's are cached; a Medusa step cut at max_new_tokens or
    a stop token also cached the last emitted one (and more, unemitted, never claimed)."""
    least = len(prompt) + len(answer) - 1
    assert reused == least if mode == "ar" else least <= reused <= least + 1


def _prompt(bundle, n, seed):
    return np.random.default_rng(seed).integers(3, bundle.config.vocab_size, n).tolist()


@pytest.mark.parametrize("which,mode", [("random", "ar"), ("random", "greedy"), ("oracle", "greedy")])
def test_next_turn_reuses_the_conversation_and_decodes_as_a_whole_prefill(which, mode):
    """Turn 2 = turn 1's prompt + its answer + new tokens: every cached token is reused and the answer equals that
    of a prefill over the whole prompt. The
    oracle model accepts several drafts per step, so its last step's path must have been moved into place."""
    bundle = _oracle() if which == "oracle" else _random()
    prefix_cache.clear()
    p1 = _prompt(bundle, 21, seed=1)
    g1 = _gen(bundle, p1, mode, True)
    if which == "oracle":
        assert (g1.accepted[0] >= 2).any()  # multi-token steps, so the compaction is exercised
    p2 = p1 + g1.tokens[0] + _prompt(bundle, 9, seed=2)
    # The oracle's turn 2 streams, as a chat's turns do: its cache comes out of `decode.finish_jit`, and turn 3
    # below reuses it.
    pieces: list[list[list[int]]] = []
    g2 = _gen(bundle, p2, mode, True, stream=pieces.append if which == "oracle" else None)
    if which == "oracle":
        assert sum((p[0] for p in pieces), []) == g2.tokens[0] and (g2.accepted[0] >= 2).any()
    _assert_reused_all(g2.reused, p1, g1.tokens[0], mode)
    fresh = _gen(bundle, p2, mode, False)
    assert fresh.reused == 0
    assert g2.tokens == fresh.tokens
    # Turn 3 on turn 2's cache, which went through a cache of another size (prompt bucket 64 -> 128).
    p3 = p2 + g2.tokens[0] + _prompt(bundle, 5, seed=3)
    g3 = _gen(bundle, p3, mode, True)
    _assert_reused_all(g3.reused, p2, g2.tokens[0], mode)
    assert g3.tokens == _gen(bundle, p3, mode, False).tokens


def test_a_diverging_prompt_reuses_only_the_common_prefix():
    bundle = _random()
    prefix_cache.clear()
    p1 = _prompt(bundle, 40, seed=4)
    _gen(bundle, p1, "ar", True)
    p2 = p1[:35] + [(t + 1) % bundle.config.vocab_size for t in p1[35:]] + _prompt(bundle, 10, seed=5)
    g2 = _gen(bundle, p2, "ar", True)
    assert g2.reused == 35
    assert g2.tokens == _gen(bundle, p2, "ar", False).tokens


def test_reuse_only_where_it_saves_a_chunk():
    """5 common tokens of 40: 35 new tokens still take 3 chunks of 16, so the prefix is not taken; 8 are."""
    bundle = _random()
    prefix_cache.clear()
    p1 = _prompt(bundle, 40, seed=6)
    _gen(bundle, p1, "ar", True)
    assert _gen(bundle, p1[:5] + _prompt(bundle, 35, seed=7), "ar", True).reused == 0
    _gen(bundle, p1, "ar", True)
    assert _gen(bundle, p1[:8] + _prompt(bundle, 32, seed=7), "ar", True).reused == 8


def test_other_weights_never_reuse_the_cache():
    bundle = _random()
    prefix_cache.clear()
    p1 = _prompt(bundle, 30, seed=8)
    _gen(bundle, p1, "ar", True)
    other = bundle.replace(base=jax.tree.map(lambda x: x * 1.5, bundle.base))  # same config, other weights
    g = _gen(other, p1 + _prompt(bundle, 5, seed=9), "ar", True)
    assert g.reused == 0


def test_calls_without_the_prefix_cache_leave_it_alone():
    """prefix_cache=False calls (the same shape, and a batch) neither reuse, record nor take the kept cache."""
    bundle = _random()
    prefix_cache.clear()
    p1 = _prompt(bundle, 30, seed=10)
    g1 = _gen(bundle, p1, "ar", True)
    assert _gen(bundle, _prompt(bundle, 30, seed=11), "ar", False).reused == 0
    batch = api.generate_ids(bundle, [p1, p1], max_new_tokens=8, mode="ar", stop_ids=(), prefill_chunk=CHUNK)
    assert batch.reused == 0
    p2 = p1 + g1.tokens[0] + _prompt(bundle, 4, seed=12)
    assert _gen(bundle, p2, "ar", True).reused == len(p1) + len(g1.tokens[0]) - 1


def test_stop_token_answer_is_reused_up_to_the_stop():
    """An answer cut at a stop token: the tokens after it in the same step are not emitted, so never reused."""
    bundle = _oracle()
    prefix_cache.clear()
    p1 = _prompt(bundle, 20, seed=13)
    full = _gen(bundle, p1, "greedy", False).tokens[0]
    stop = full[10]  # a token the answer reaches mid-way
    g1 = api.generate_ids(bundle, [p1], max_new_tokens=24, mode="greedy", stop_ids=(stop,), prefill_chunk=CHUNK)
    assert g1.finish == ["stop"]
    p2 = p1 + g1.tokens[0] + _prompt(bundle, 6, seed=14)
    g2 = _gen(bundle, p2, "greedy", True)
    _assert_reused_all(g2.reused, p1, g1.tokens[0], "greedy")
    assert g2.tokens == _gen(bundle, p2, "greedy", False).tokens


def test_the_next_turn_reads_the_kept_cache():
    """Turn 1's keys and values replaced by zeros: turn 2 then answers differently, so it did read them."""
    bundle = _random()
    prefix_cache.clear()
    p1 = _prompt(bundle, 30, seed=15)
    g1 = _gen(bundle, p1, "ar", True)
    p2 = p1 + g1.tokens[0] + _prompt(bundle, 6, seed=16)
    fresh = _gen(bundle, p2, "ar", False)  # leaves the kept prefix alone
    entry = prefix_cache._entry[0]
    entry.cache = jax.tree.map(jnp.zeros_like, entry.cache)
    g2 = _gen(bundle, p2, "ar", True)
    assert g2.reused > 0 and g2.tokens != fresh.tokens


def test_a_last_chunk_past_the_bucket_starts_earlier():
    """60 tokens (bucket 64), 51 of them cached: the one chunk of 16 starts at 48, not 51, and recomputes 3."""
    bundle = _random()
    prefix_cache.clear()
    p1 = _prompt(bundle, 40, seed=17)
    g1 = _gen(bundle, p1, "ar", True, max_new=12)
    p2 = p1 + g1.tokens[0] + _prompt(bundle, 8, seed=18)
    g2 = _gen(bundle, p2, "ar", True)
    assert (len(p2), g2.reused) == (60, 51)
    assert g2.tokens == _gen(bundle, p2, "ar", False).tokens


def test_a_generation_stopped_at_its_prefill_keeps_its_prompt_intact():
    """A prompt that fills the cache (124 tokens + a 9-node tree > 128 slots) stops after its first token; its
    cache, reused by the next turn, holds the prompt unmoved (no path compaction without a step)."""
    bundle = _random()
    prefix_cache.clear()
    p1 = _prompt(bundle, 124, seed=19)
    g1 = api.generate_ids(bundle, [p1], max_new_tokens=24, mode="greedy", stop_ids=(), prefill_chunk=CHUNK,
                          cache_length=128)
    assert g1.finish == ["capacity"] and len(g1.tokens[0]) == 1
    p2 = p1 + g1.tokens[0] + _prompt(bundle, 5, seed=20)
    g2 = _gen(bundle, p2, "greedy", True)
    assert g2.reused == len(p1)
    assert g2.tokens == _gen(bundle, p2, "greedy", False).tokens


@pytest.mark.parametrize("mode", ["sample", "typical"])
def test_sampling_modes_reuse_and_draw_the_same_tokens(mode):
    """At temperature 0.7 with one seed, a reused prefix gives the logits of a whole prefill (up to float
    rounding), hence the same draws."""
    bundle = _random()
    prefix_cache.clear()
    kw = dict(max_new_tokens=16, mode=mode, temperature=0.7, seed=5, stop_ids=(), prefill_chunk=CHUNK)
    p1 = _prompt(bundle, 30, seed=21)
    g1 = api.generate_ids(bundle, [p1], prefix_cache=True, **kw)
    p2 = p1 + g1.tokens[0] + _prompt(bundle, 4, seed=22)
    g2 = api.generate_ids(bundle, [p2], prefix_cache=True, stream=lambda new: None, **kw)  # streamed: same draws
    assert g2.reused >= len(p1) + len(g1.tokens[0]) - 1
    assert g2.tokens == api.generate_ids(bundle, [p2], prefix_cache=False, **kw).tokens

"""Property tests of the decoder: random trees, prompt lengths and limits (hypothesis, derandomized).

Whatever the tree (any valid path set of depth <= 4 with up to 12 nodes), prompt length and `max_new_tokens`:
greedy Medusa decoding returns exactly the plain greedy (autoregressive) tokens, every returned token is an id of
the vocabulary, no more than `max_new_tokens` come back, and decoding stops cleanly ("capacity") instead of
writing past a KV cache that is too small or past the model's context. Each new tree compiles once (seconds), so
the example counts are small.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from infer import generate_ids
from infer.testing import oracle_bundle

MAX_DEPTH, MAX_NODES, MAX_RANK = 4, 12, 4
REF_NEW = 40  # the reference is decoded once per prompt this far; greedy continuations are prefixes of it
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=None)
def bundle(context: int = 512):
    """The oracle model (its heads are often right, so long drafts are accepted), with context `context`."""
    b = oracle_bundle(mix=0.15, seed=2)[0]
    return b.replace(config=dataclasses.replace(b.config, max_position_embeddings=context))


@functools.lru_cache(maxsize=None)
def reference(prompt: tuple[int, ...], context: int = 512) -> list[int]:
    """Plain greedy decoding: the ground truth."""
    return generate_ids(bundle(context), [list(prompt)], max_new_tokens=REF_NEW, mode="ar", stop_ids=()).tokens[0]


@st.composite
def trees(draw) -> list[tuple[int, ...]]:
    """A valid path set: every path's prefix is in the set, ranks < MAX_RANK (gaps allowed), depth <= 4."""
    paths: list[tuple[int, ...]] = []
    for _ in range(draw(st.integers(0, MAX_NODES))):
        parent = draw(st.sampled_from([()] + [p for p in paths if len(p) < MAX_DEPTH]))
        used = {p[-1] for p in paths if p[:-1] == parent}
        free = [r for r in range(MAX_RANK) if r not in used]
        if free:
            paths.append(parent + (draw(st.sampled_from(free)),))
    return paths


def prompts(lo: int, hi: int, vocab: int = 32):
    return st.lists(st.integers(0, vocab - 1), min_size=lo, max_size=hi).map(tuple)


def _check_tokens(out, max_new: int, vocab: int) -> list[int]:
    toks = out.tokens[0]
    assert len(toks) <= max_new
    assert all(isinstance(t, int) and 0 <= t < vocab for t in toks)
    pad = out.padded[0]
    assert pad[: len(toks)].tolist() == toks and (pad[len(toks):] == -1).all()
    return toks


@settings(max_examples=12, **SETTINGS)
@given(tree=trees(), prompt=prompts(1, 40), max_new=st.integers(1, 40))
def test_greedy_medusa_equals_greedy_autoregressive(tree, prompt, max_new):
    b = bundle()
    out = generate_ids(b, [list(prompt)], max_new_tokens=max_new, mode="greedy", tree=tree, stop_ids=())
    toks = _check_tokens(out, max_new, b.config.vocab_size)
    assert toks == reference(prompt)[:max_new]
    assert out.finish == ["length"]
    ran = out.accepted >= 0
    assert (out.accepted[ran] <= out.proposed[ran]).all()
    assert (out.proposed[ran] <= max((len(p) for p in tree), default=0)).all()


@settings(max_examples=4, **SETTINGS)
@given(tree=trees(), gap=st.integers(1, 24), max_new=st.integers(1, 40), data=st.data())
def test_prompt_near_the_context_limit(tree, gap, max_new, data):
    """With `gap` tokens of context left, at most `gap` tokens come back and they are still the greedy ones."""
    context = 48
    prompt = data.draw(prompts(context - gap, context - gap))
    out = generate_ids(bundle(context), [list(prompt)], max_new_tokens=max_new, mode="greedy", tree=tree,
                       stop_ids=())
    toks = _check_tokens(out, min(max_new, gap), 32)
    assert toks == reference(prompt, context)[: len(toks)]
    assert len(toks) == min(max_new, gap) or out.finish == ["capacity"]


@settings(max_examples=4, **SETTINGS)
@given(tree=trees(), prompt=prompts(1, 16), spare=st.integers(0, 40), max_new=st.integers(1, 40))
@example(tree=[(0,), (1,), (0, 0), (0, 0, 0)], prompt=tuple(range(3, 15)), spare=0, max_new=40)  # must stop early
def test_small_cache_stops_with_capacity(tree, prompt, spare, max_new):
    """A KV cache of only 16 + `spare` slots: decoding stops before a step would overrun it."""
    cache_length = 16 + spare  # the prompt bucket is 16 slots
    out = generate_ids(bundle(), [list(prompt)], max_new_tokens=max_new, mode="greedy", tree=tree, stop_ids=(),
                       cache_length=cache_length)
    toks = _check_tokens(out, max_new, 32)
    assert toks == reference(prompt)[: len(toks)]
    assert len(prompt) + len(toks) <= cache_length
    assert out.finish == ["length" if len(toks) == max_new else "capacity"]
    if spare == 0 and max_new == 40:
        assert out.finish == ["capacity"]
    assert np.all(np.asarray(out.accepted) <= max((len(p) for p in tree), default=0))

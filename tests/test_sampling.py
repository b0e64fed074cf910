"""Speculative sampling is lossless: its tokens have exactly the distribution of plain sampling.

A tiny model with a 12-token vocabulary; one batched call draws thousands of independent generations of 3 tokens
from one prompt. The exact distribution of tokens 1-3 is enumerated with cache-free forwards, and chi-square
tests compare both plain sampling (`ar`) and Medusa `sample` against it. `typical`, which is not lossless, must
fail the same test, which shows the test has the power to catch a biased scheme.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from scipy import stats

from infer import generate_ids, sampling
from infer.testing import random_bundle
from medusa_jax.bundle import forward_logits

PROMPT = [3, 4, 5, 6, 7]
TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]  # siblings at two levels and depth 3
DRAWS = 4000
VOCAB = 12
# Each goodness-of-fit p-value must exceed ALPHA. The file computes about 35 of them, so a per-test 0.01 would fail
# a correct sampler about once in five runs of a new random stream; 1e-3 (Bonferroni) keeps that near 2.5%, while
# a biased scheme lands far below it (typical acceptance: < 1e-6, `test_biased_scheme_is_detected`).
ALPHA = 1e-3


@functools.lru_cache(maxsize=None)
def bundle():
    return random_bundle(vocab_size=VOCAB, seed=0)


def _target(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Independent numpy statement of the target distribution: softmax(logits / T) on the top-p nucleus."""
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        before = np.cumsum(sorted_p, -1) - sorted_p
        cutoff = np.min(np.where(before < top_p, sorted_p, np.inf), -1, keepdims=True)
        p = np.where(p >= cutoff, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return p


@functools.lru_cache(maxsize=None)
def exact_joint(temperature: float, top_p: float) -> np.ndarray:
    """P(t1, t2, t3) [V, V, V] by enumeration (cache-free forwards of every 1- and 2-token continuation)."""
    v = VOCAB
    l1 = np.asarray(forward_logits(bundle(), [PROMPT]))[0, -1]
    seq2 = [PROMPT + [a] for a in range(v)]
    l2 = np.asarray(forward_logits(bundle(), seq2))[:, -1]  # [V, V]
    seq3 = [PROMPT + [a, b] for a in range(v) for b in range(v)]
    l3 = np.asarray(forward_logits(bundle(), seq3))[:, -1].reshape(v, v, v)
    p1, p2, p3 = (_target(x.astype(np.float64), temperature, top_p) for x in (l1, l2, l3))
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi2_pvalue(observed: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit; cells expected below 5 are pooled into one."""
    observed, expected = observed.ravel().astype(float), probs.ravel() * observed.sum()
    assert observed[expected == 0].sum() == 0, "a token with probability 0 was drawn"
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


def _draw(mode: str, temperature: float, top_p: float, seed: int = 0, tree=TREE, lookup: int = 0):
    out = generate_ids(bundle(), [PROMPT] * DRAWS, max_new_tokens=3, temperature=temperature, top_p=top_p,
                       mode=mode, tree=None if mode == "ar" else tree, seed=seed, stop_ids=(), cache_length=32,
                       lookup=lookup)
    toks = np.array(out.tokens)
    assert toks.shape == (DRAWS, 3)
    return toks, out


def _pvalues(toks: np.ndarray, joint: np.ndarray) -> dict:
    v = VOCAB
    counts = np.zeros((v, v, v))
    np.add.at(counts, (toks[:, 0], toks[:, 1], toks[:, 2]), 1)
    return {
        "token1": _chi2_pvalue(counts.sum((1, 2)), joint.sum((1, 2))),
        "token2": _chi2_pvalue(counts.sum((0, 2)), joint.sum((0, 2))),
        "token3": _chi2_pvalue(counts.sum((0, 1)), joint.sum((0, 1))),
        "joint12": _chi2_pvalue(counts.sum(2), joint.sum(2)),
    }


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
@pytest.mark.parametrize("mode", ["ar", "sample"])
def test_distribution_matches_exact(mode, temperature, top_p):
    toks, out = _draw(mode, temperature, top_p)
    pvals = _pvalues(toks, exact_joint(temperature, top_p))
    assert min(pvals.values()) > ALPHA, pvals
    if mode == "sample":
        # The speculative path really ran: many steps accepted drafts, some at depth >= 2.
        acc = out.accepted[out.accepted >= 0]
        assert (acc >= 1).mean() > 0.2 and (acc >= 2).sum() > 100


@pytest.mark.parametrize("tree, lookup", [(TREE, 2), ("ar", 3)], ids=["tree+lookup2", "lookup3"])
def test_sampling_with_a_lookup_chain_matches_exact(tree, lookup):
    """The lookup branch's drafts (a function of the context, `infer.lookup`) may repeat a head's sibling token:
    the rejected token's residual mass is 0 then, so the walk stays lossless."""
    toks, out = _draw("sample", 1.0, 1.0, seed=5, tree=tree, lookup=lookup)
    pvals = _pvalues(toks, exact_joint(1.0, 1.0))
    assert min(pvals.values()) > ALPHA, pvals
    # Drafts were accepted: a lookup draft is one guess among 12 tokens, taken in about 1 step in 10 here.
    assert (out.accepted[out.accepted >= 0] >= 1).mean() > 0.05


def test_biased_scheme_is_detected():
    """`typical` accepts drafts deterministically when likely enough, so it is not lossless: the same test
    must reject it (otherwise the test above would prove nothing)."""
    toks, _ = _draw("typical", 1.0, 1.0)
    pvals = _pvalues(toks, exact_joint(1.0, 1.0))
    assert pvals["token1"] > ALPHA  # the first token is sampled from the prefill in every mode
    assert min(pvals["token2"], pvals["joint12"]) < 1e-6, pvals


def test_typical_keeps_diversity_at_positive_temperature():
    """The root of each step is sampled, so different seeds give different continuations."""
    outs = {tuple(generate_ids(bundle(), [PROMPT], max_new_tokens=12, temperature=0.8, mode="typical",
                               tree=TREE, seed=s, stop_ids=()).tokens[0]) for s in range(6)}
    assert len(outs) >= 4


def test_same_seed_same_sample():
    a = generate_ids(bundle(), [PROMPT], max_new_tokens=12, temperature=1.0, mode="sample", tree=TREE, seed=3)
    b = generate_ids(bundle(), [PROMPT], max_new_tokens=12, temperature=1.0, mode="sample", tree=TREE, seed=3)
    assert a.tokens == b.tokens


def test_target_probs_matches_numpy_statement():
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (5, 40))) * 3
    for temperature, top_p in [(1.0, 1.0), (0.5, 0.9), (2.0, 0.3), (1.0, 1e-6)]:
        got = np.asarray(sampling.target_probs(logits, temperature, top_p, use_top_p=top_p < 1))
        np.testing.assert_allclose(got, _target(logits.astype(np.float64), temperature, top_p), atol=1e-5)
    # top_p -> 0 keeps only the most likely token
    kept = np.asarray(sampling.target_probs(logits, 1.0, 1e-6, use_top_p=True)) > 0
    assert (kept.sum(-1) == 1).all() and (kept.argmax(-1) == logits.argmax(-1)).all()


def test_nucleus_search_equals_the_sorted_statement_with_ties():
    """`top_p_keep` (a bisection, no sort) keeps exactly the sorted statement's nucleus, ties at the cutoff
    included, on rows of a real vocabulary size with many tied probabilities, zeros and a one-hot row."""
    rng = np.random.default_rng(0)
    logits = np.round(rng.standard_normal((6, 4096)) * 4) / 2  # steps of 0.5: many exact ties
    logits[1, :2000] = -np.inf  # zero probabilities
    logits[2] = -np.inf
    logits[2, 7] = 0.0  # all mass on one token
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    for top_p in (1e-6, 0.1, 0.5, 0.9, 0.95, 0.999):
        got = np.asarray(jax.jit(sampling.top_p_keep)(probs, top_p))
        want = _target(np.log(np.maximum(probs.astype(np.float64), 1e-300)), 1.0, top_p) > 0  # ties kept
        np.testing.assert_array_equal(got & (probs > 0), want, err_msg=f"top_p={top_p}")
        assert got[np.arange(6), probs.argmax(-1)].all()


@pytest.mark.parametrize("mode", ["sample", "typical"])
def test_proposed_counts_bound_accepted(mode):
    """Per step: 0 <= accepted <= proposed <= tree depth (3); sampling proposes exactly one more than it accepts
    whenever it stopped at a node with children, and never proposes past a leaf."""
    out = generate_ids(bundle(), [PROMPT] * 8, max_new_tokens=12, temperature=1.0, mode=mode, tree=TREE, seed=1,
                       stop_ids=())
    ran = out.accepted >= 0
    a, p = out.accepted[ran], out.proposed[ran]
    assert ((0 <= a) & (a <= p) & (p <= 3)).all()
    if mode == "sample":
        assert ((p == a) | (p == a + 1)).all() and (p[a == 3] == 3).all()
    assert 0 <= out.stats()["acceptance_rate"] <= 1


def test_two_stage_draw_has_exactly_the_given_distribution():
    """`sampling.sample_from` over a vocabulary of 4 blocks (the last one partly padding): mass in every block, at
    block edges, tiny and zero probabilities; 40,000 draws match the distribution (chi-square) and never a zero."""
    v = 3 * sampling.SAMPLE_BLOCK + 40
    rng = np.random.default_rng(0)
    probs = np.zeros(v)
    support = np.r_[0, 5, sampling.SAMPLE_BLOCK - 1, sampling.SAMPLE_BLOCK, 300, 2 * sampling.SAMPLE_BLOCK + 7,
                    3 * sampling.SAMPLE_BLOCK, v - 1, rng.choice(v, 40, replace=False)]
    probs[support] = rng.gamma(0.5, size=support.size) + 1e-3
    probs[3] = 1e-9  # nearly never, but allowed
    probs *= 7.0  # unnormalised
    n = 40_000
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    draws = np.concatenate([np.asarray(sampling.sample_from(k, np.broadcast_to(probs, (n // 8, v)).astype(np.float32)))
                            for k in keys])
    assert draws.min() >= 0 and draws.max() < v
    counts = np.bincount(draws, minlength=v)
    assert _chi2_pvalue(counts, probs / probs.sum()) > ALPHA
    assert counts[v - 1] > 0 and counts[sampling.SAMPLE_BLOCK - 1] > 0 and counts[sampling.SAMPLE_BLOCK] > 0
    one_hot = np.zeros((3, v), np.float32)
    one_hot[[0, 1, 2], [0, sampling.SAMPLE_BLOCK, v - 1]] = 1.0
    assert np.asarray(sampling.sample_from(jax.random.PRNGKey(5), one_hot)).tolist() == [0, sampling.SAMPLE_BLOCK,
                                                                                          v - 1]

"""The Medusa head loss: label offsets, packed-row masking, weights, metrics, and the fused cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import model
from medusa_jax.config import HeadsConfig, LlamaConfig
from train import losses

jax.config.update("jax_enable_x64", False)

SMALL = LlamaConfig(name="small", vocab_size=13, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=4, tie_embeddings=False)


def test_head_targets_offsets_and_segment_boundaries():
    tokens = jnp.arange(10, 20, dtype=jnp.int32)[None]  # token at t is 10 + t
    mask = jnp.ones((1, 10), bool)
    seg = jnp.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 0]])
    labels, valid = losses.head_targets(tokens, mask, seg, num_heads=3)
    for k in range(3):
        for t in range(10):
            target = t + 2 + k
            inside = target < 10
            if inside:
                assert int(labels[0, t, k]) == 10 + target
            expect = inside and int(seg[0, t]) > 0 and int(seg[0, target]) == int(seg[0, t])
            assert bool(valid[0, t, k]) == expect, (t, k)
    # Head 0 at t=4 would predict t=6, which is the next packed conversation: invalid.
    assert not bool(valid[0, 4, 0]) and bool(valid[0, 3, 0])


def test_head_targets_follow_loss_mask():
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    mask = jnp.array([[0, 0, 0, 0, 1, 1, 0, 1]], bool)
    labels, valid = losses.head_targets(tokens, mask, jnp.ones((1, 8), jnp.int32), num_heads=2)
    np.testing.assert_array_equal(np.asarray(valid[0, :, 0]), [0, 0, 1, 1, 0, 1, 0, 0])  # mask[t + 2]
    np.testing.assert_array_equal(np.asarray(valid[0, :, 1]), [0, 1, 1, 0, 1, 0, 0, 0])  # mask[t + 3]


def _one_hot_setup(num_heads=2, seq=6, projection="shared", seed=0):
    """Hidden states equal to scaled one-hot rows, an identity-like projection: logits are easy to reason about."""
    cfg = SMALL
    base = model.init_base(cfg, jax.random.PRNGKey(seed))
    hc = HeadsConfig(num_heads=num_heads, num_layers=1, projection=projection)
    heads = model.init_heads(hc, cfg, base, jax.random.PRNGKey(1))  # zero residual: states == hidden
    return cfg, base, hc, heads


def _naive_loss(hc, cfg, base, heads, hidden, tokens, mask, seg, weights):
    """Reference: full [B, S, K, V] logits from model.head_logits, plain log-softmax."""
    logits = model.head_logits(hc, cfg, base, heads, hidden)  # [B, S, K, V]
    labels, valid = losses.head_targets(tokens, mask, seg, hc.num_heads)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # [B, S, K]
    count = valid.sum((0, 1))
    per_head = (nll * valid).sum((0, 1)) / jnp.maximum(count, 1)
    return jnp.sum(jnp.asarray(weights) * per_head), per_head


def test_label_offsets_with_hand_built_logits():
    """Make the projection the identity on the first H ids so that head logits at t equal hidden[t]."""
    cfg, base, hc, heads = _one_hot_setup(num_heads=2)
    kernel = jnp.zeros((cfg.hidden_size, cfg.vocab_size)).at[:, : cfg.hidden_size].set(jnp.eye(cfg.hidden_size))
    base = dict(base, lm_head={"kernel": kernel})
    s = 7
    tokens = jnp.array([[3, 1, 4, 1, 5, 2, 6]], jnp.int32)
    # hidden[t] = 50 * one_hot(tokens[t + 2]): head 0 is right everywhere, head 1 (target t+3) only by chance.
    target0 = jnp.pad(tokens[:, 2:], ((0, 0), (0, 2)))
    hidden = 50.0 * jax.nn.one_hot(target0, cfg.hidden_size)
    mask = jnp.ones((1, s), bool)
    seg = jnp.ones((1, s), jnp.int32)
    loss, stats = jax.jit(lambda h: losses.medusa_loss(hc, cfg, base, heads, h, tokens, mask, seg,
                                                       weights=(1.0, 1.0)))(hidden)
    m = stats.means()
    assert m["count"] == [5, 4]
    assert m["top1"][0] == 1.0 and m["loss"][0] < 1e-6
    labels, valid = losses.head_targets(tokens, mask, seg, 2)
    expect_hits = sum(int(target0[0, t]) == int(labels[0, t, 1]) for t in range(s) if valid[0, t, 1])
    assert m["top1"][1] == pytest.approx(expect_hits / 4)
    assert m["loss"][1] > 10.0  # wrong guesses at logit margin 50


def _random_batch(projection: str, seed: int, b: int = 2, s: int = 9):
    """3 perturbed heads and a random packed batch: (cfg, base, hc, heads, hidden, tokens, mask, seg, spare key)."""
    cfg, base, hc, heads = _one_hot_setup(num_heads=3, projection=projection)
    rng = jax.random.split(jax.random.PRNGKey(seed), 6)
    heads = jax.tree.map(lambda p, r: p + 0.1 * jax.random.normal(r, p.shape), heads,
                         dict(zip(heads, jax.random.split(rng[0], len(heads)))))
    hidden = jax.random.normal(rng[1], (b, s, cfg.hidden_size))
    tokens = jax.random.randint(rng[2], (b, s), 0, cfg.vocab_size)
    mask = jax.random.bernoulli(rng[3], 0.7, (b, s))
    seg = jnp.array([[1] * 5 + [2] * 4, [1] * 7 + [0] * 2])
    return cfg, base, hc, heads, hidden, tokens, mask, seg, rng[4]


def test_fused_loss_matches_head_logits_values_and_gradients():
    for projection, chunk in (("shared", None), ("own", None), ("shared", 3), ("own", 4)):
        cfg, base, hc, heads, hidden, tokens, mask, seg, _ = _random_batch(projection, seed=7)
        weights = losses.head_weights(3, 0.8)

        def fused(h):
            return losses.medusa_loss(hc, cfg, base, h, hidden, tokens, mask, seg, weights=weights, chunk=chunk)

        def naive(h):
            return _naive_loss(hc, cfg, base, h, hidden, tokens, mask, seg, weights)

        (lf, stats), gf = jax.jit(jax.value_and_grad(fused, has_aux=True))(heads)
        (ln, per_head), gn = jax.jit(jax.value_and_grad(naive, has_aux=True))(heads)
        np.testing.assert_allclose(lf, ln, rtol=1e-5)
        np.testing.assert_allclose(stats.means()["loss"], per_head, rtol=1e-5)
        for key in gn:
            np.testing.assert_allclose(gf[key], gn[key], rtol=1e-4, atol=1e-6, err_msg=f"{projection} {key}")
        if projection == "own":
            assert float(jnp.abs(gf["proj"]).max()) > 0


def _naive_teacher_loss(hc, cfg, base, heads, hidden, tokens, mask, seg, weights, t_hidden, t_kernel, temperature):
    """Reference for soft targets: head k at t against softmax(teacher logits at t + 1 + k / temperature)."""
    logp = jax.nn.log_softmax(model.head_logits(hc, cfg, base, heads, hidden), axis=-1)  # [B, S, K, V]
    t_logits = t_hidden @ t_kernel  # [B, S, V]
    _, valid = losses.head_targets(tokens, mask, seg, hc.num_heads)
    per_head = []
    for k in range(hc.num_heads):
        shifted = jnp.pad(t_logits[:, 1 + k:], ((0, 0), (0, 1 + k), (0, 0)))
        if temperature == 0:
            target = jax.nn.one_hot(jnp.argmax(shifted, -1), cfg.vocab_size)
        else:
            target = jax.nn.softmax(shifted / temperature, -1)
        nll = -jnp.sum(target * logp[:, :, k], -1)  # [B, S]
        per_head.append(jnp.sum(nll * valid[..., k]) / jnp.maximum(valid[..., k].sum(), 1))
    return jnp.sum(jnp.asarray(weights) * jnp.stack(per_head))


def test_teacher_targets_match_a_naive_soft_cross_entropy():
    """Soft targets: values and gradients equal the full-logits reference (chunked or not, both projections, three
    temperatures); the reported ce, top-1 and top-5 stay those against the data's tokens."""
    for projection, chunk, temperature in (("shared", None, 1.0), ("own", 4, 0.5), ("shared", 3, 0.0)):
        cfg, base, hc, heads, hidden, tokens, mask, seg, key = _random_batch(projection, seed=11)
        t_hidden = 3.0 * jax.random.normal(key, hidden.shape)
        t_kernel = model.lm_head_kernel(cfg, base)
        weights = losses.head_weights(3, 0.8)
        teacher = losses.Teacher(t_hidden, t_kernel, temperature)

        def fused(h, teacher=teacher):
            return losses.medusa_loss(hc, cfg, base, h, hidden, tokens, mask, seg, weights=weights, chunk=chunk,
                                      teacher=teacher)

        def naive(h):
            return _naive_teacher_loss(hc, cfg, base, h, hidden, tokens, mask, seg, weights, t_hidden, t_kernel,
                                       temperature)

        (lf, stats), gf = jax.jit(jax.value_and_grad(fused, has_aux=True))(heads)
        ln, gn = jax.jit(jax.value_and_grad(naive))(heads)
        np.testing.assert_allclose(lf, ln, rtol=1e-5)
        for key in gn:
            np.testing.assert_allclose(gf[key], gn[key], rtol=1e-4, atol=1e-6, err_msg=f"{projection} {key}")
        _, data_stats = jax.jit(lambda h: fused(h, None))(heads)
        for name in ("ce", "top1", "top5", "count"):
            np.testing.assert_allclose(getattr(stats, name), getattr(data_stats, name), rtol=1e-6)
        assert abs(float(lf) - float(jax.jit(lambda h: fused(h, None)[0])(heads))) > 1e-3  # the targets differ


def test_argmax_teacher_that_agrees_with_the_data_gives_the_data_loss():
    """At temperature 0 a teacher whose argmax at t + 1 + k is the data's token t + 2 + k is the hard-label loss."""
    cfg, base, hc, heads = _one_hot_setup(num_heads=2)
    tokens = jnp.array([[3, 1, 4, 1, 5, 2, 6, 0, 7]], jnp.int32)
    kernel = model.lm_head_kernel(cfg, base)
    # Teacher state at position p = the kernel's pseudo-inverse applied to a peaked logit row for tokens[p + 1].
    want = 20.0 * jax.nn.one_hot(jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))), cfg.vocab_size)  # [1, S, V]
    t_hidden = want @ jnp.linalg.pinv(kernel)
    t_argmax = jnp.argmax(t_hidden @ kernel, -1)
    assert bool(jnp.all(t_argmax[0, :-1] == tokens[0, 1:]))  # the construction does what it says
    hidden = jax.random.normal(jax.random.PRNGKey(5), (1, 9, cfg.hidden_size))
    ones = jnp.ones((1, 9), bool)
    seg = ones.astype(jnp.int32)

    def loss(teacher):
        return jax.jit(lambda h: losses.medusa_loss(hc, cfg, base, h, hidden, tokens, ones, seg, weights=(1.0, 0.8),
                                                    teacher=teacher)[0])(heads)

    np.testing.assert_allclose(loss(losses.Teacher(t_hidden, kernel, 0.0)), loss(None), rtol=1e-6)


def test_frozen_shared_projection_gets_no_gradient_and_base_is_constant():
    cfg, base, hc, heads = _one_hot_setup(num_heads=2)
    tokens = jnp.arange(8, dtype=jnp.int32)[None] % cfg.vocab_size
    hidden = jax.random.normal(jax.random.PRNGKey(3), (1, 8, cfg.hidden_size))
    ones = jnp.ones((1, 8), bool)

    def f(b):
        return losses.medusa_loss(hc, cfg, b, heads, hidden, tokens, ones, ones.astype(jnp.int32),
                                  weights=(1.0, 1.0))[0]

    g = jax.jit(jax.grad(f))(base)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))


def test_empty_mask_gives_finite_zero_loss_and_zero_gradients():
    cfg, base, hc, heads = _one_hot_setup(num_heads=2)
    tokens = jnp.zeros((2, 5), jnp.int32)
    hidden = jnp.ones((2, 5, cfg.hidden_size))
    seg = jnp.ones((2, 5), jnp.int32)

    def f(h):
        return losses.medusa_loss(hc, cfg, base, h, hidden, tokens, jnp.zeros((2, 5), bool), seg,
                                  weights=(1.0, 0.8))

    (loss, stats), g = jax.jit(jax.value_and_grad(f, has_aux=True))(heads)
    assert float(loss) == 0.0
    assert stats.means()["count"] == [0, 0] and stats.means()["top1"] == [0.0, 0.0]
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(g))


def test_lambda_weights_scale_each_head():
    assert losses.head_weights(4, 0.8) == pytest.approx((1.0, 0.8, 0.64, 0.512))
    assert losses.head_weights(3, 1.0) == (1.0, 1.0, 1.0)
    cfg, base, hc, heads = _one_hot_setup(num_heads=2)
    hidden = jax.random.normal(jax.random.PRNGKey(0), (1, 8, cfg.hidden_size))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, cfg.vocab_size)
    ones = jnp.ones((1, 8), bool)
    seg = ones.astype(jnp.int32)

    def run(w):
        return jax.jit(lambda h: losses.medusa_loss(hc, cfg, base, h, hidden, tokens, ones, seg, weights=w))(heads)

    l10, stats = run((1.0, 0.0))
    l01, _ = run((0.0, 1.0))
    lmix, _ = run((0.5, 0.25))
    per = stats.means()["loss"]
    np.testing.assert_allclose([l10, l01, lmix], [per[0], per[1], 0.5 * per[0] + 0.25 * per[1]], rtol=1e-6)
    with pytest.raises(ValueError):
        run((1.0,))


def test_top_k_metrics_count_ranks():
    # One position, logits chosen so that the target has rank 0, 3, 5 respectively.
    v = 10
    base_logits = jnp.arange(v, dtype=jnp.float32)[::-1]  # id 0 largest, id 9 smallest
    x = base_logits[None, None, :]  # [1, 1, V] as hidden with identity kernel
    kernel = jnp.eye(v)
    for target, top1, top5 in ((0, 1, 1), (3, 0, 1), (5, 0, 0), (9, 0, 0)):
        sums = losses.linear_cross_entropy(x, kernel, jnp.array([[target]]), jnp.array([[True]]),
                                           None, None, None, 1.0, None, False)
        ce = float(jax.nn.logsumexp(base_logits) - base_logits[target])
        assert float(sums[0]) == float(sums[1]) == pytest.approx(ce, rel=1e-6)  # no teacher: objective = ce
        assert (float(sums[2]), float(sums[3])) == (top1, top5)
    # Invalid positions count for nothing.
    sums = losses.linear_cross_entropy(x, kernel, jnp.array([[0]]), jnp.array([[False]]), None, None, None, 1.0,
                                       None, False)
    assert [float(s) for s in sums] == [0.0, 0.0, 0.0, 0.0]


def test_attention_mask_for_packed_rows():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    m = np.asarray(losses.attention_mask(seg)[0])
    expect = np.array([[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(m, expect)

"""The CPU decode-attention kernel (`medusa_jax.panels.attention`): the same softmax attention as `model.attend`
over a runtime window, each query row independent of the others and of the window, and where it does not apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import model, native, panels

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"kernel unavailable here: {native.status()}")


def _case(b: int, kv: int, g: int, t: int, d: int, s: int, visible: int, seed: int = 0):
    """Random q [B*Kv, G*T, D], keys [B*Kv, D, S], values [B*Kv, S, D] and a mask [B, T, S] that shows each token
    a random, non-empty subset of slots [0, visible) (as a tree's tokens see the prefix and their ancestors)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b * kv, g * t, d)).astype(np.float32)
    keys = rng.standard_normal((b * kv, d, s)).astype(np.float32)
    values = rng.standard_normal((b * kv, s, d)).astype(np.float32)
    mask = rng.random((b, t, s)) < 0.6
    mask[..., visible:] = False
    mask[..., 0] = True
    return jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), jnp.asarray(mask)


@needs_kernel
@pytest.mark.parametrize("b, kv, g, t, d, s, window", [
    (1, 3, 3, 1, 64, 64, 37),      # SmolLM2's heads, one token (autoregressive step)
    (1, 3, 3, 9, 64, 256, 100),    # a 9-node tree: 27 query rows, blocks of 6 and a remainder of 3
    (2, 2, 4, 5, 32, 48, 48),      # two sequences, the whole cache
    (1, 1, 1, 64, 16, 32, 17),     # the most rows the kernel takes
    (3, 2, 1, 2, 128, 16, 1),      # one visible slot
])
def test_the_kernel_computes_attend_over_the_window(b, kv, g, t, d, s, window):
    q, keys, values, mask = _case(b, kv, g, t, d, s, window)
    scale = 1 / np.sqrt(d)
    got = np.asarray(jax.jit(lambda *a: panels.attention(*a, scale, window))(q, keys, values, mask))
    want = np.asarray(model.attend(q, keys, values, mask, scale))
    assert got.shape == q.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@needs_kernel
def test_attend_window_with_a_traced_window_runs_the_kernel_and_agrees_with_xla():
    q, keys, values, mask = _case(1, 3, 3, 4, 64, 512, 70, seed=1)
    scale = 0.125

    def both(window):
        kernel = model.attend_window(q, keys, values, mask, scale, window, kernel=True)
        return kernel, model.attend_window(q, keys, values, mask, scale, window)
    kernel, xla = jax.jit(both)(jnp.int32(70))
    assert "medusa_decode_attention" in jax.jit(both).lower(jnp.int32(70)).as_text()
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(xla), rtol=2e-5, atol=2e-6)


@needs_kernel
def test_each_row_is_the_same_whatever_the_other_rows_and_the_window_bit_for_bit():
    """A row's result depends on its query, its mask and the cache only: not on the rows computed with it (blocks
    of 6), nor on how many masked slots past its last visible one the window takes in."""
    q, keys, values, mask = _case(1, 3, 3, 7, 64, 256, 40, seed=2)
    run = jax.jit(panels.attention, static_argnums=(4,))
    base = np.asarray(run(q, keys, values, mask, 0.125, jnp.int32(40)))
    for window in (41, 64, 200, 256):
        assert np.array_equal(np.asarray(run(q, keys, values, mask, 0.125, jnp.int32(window))), base), window
    other = q.at[:, 1:].set(q[:, 1:] * 3.0 + 1.0)  # every row but the first changed
    assert np.array_equal(np.asarray(run(other, keys, values, mask, 0.125, jnp.int32(40)))[:, 0], base[:, 0])


@needs_kernel
def test_a_row_that_sees_no_slot_gets_zeros():
    q, keys, values, mask = _case(1, 2, 2, 3, 32, 32, 32, seed=3)
    mask = mask.at[0, 1].set(False)  # token 1 sees nothing: rows (g, 1) = 1 and 4
    got = np.asarray(panels.attention(q, keys, values, mask, 0.2, None))
    assert np.all(got[:, [1, 4]] == 0.0) and np.all(np.isfinite(got))
    want = np.asarray(model.attend(q, keys, values, mask, 0.2))
    np.testing.assert_allclose(got[:, [0, 2, 3, 5]], want[:, [0, 2, 3, 5]], rtol=2e-5, atol=2e-6)


def test_shapes_the_kernel_does_not_take_go_to_xla(monkeypatch):
    q, keys, values, mask = _case(1, 2, 2, 3, 32, 32, 32, seed=4)
    assert panels.attention_applies(q, keys) == native.available()
    assert not panels.attention_applies(q.astype(jnp.bfloat16), keys.astype(jnp.bfloat16))
    assert not panels.attention_applies(q[..., :24], keys[:, :24])  # head_dim not a multiple of 16
    assert not panels.attention_applies(q, keys[..., :24])  # slots not a multiple of 16
    wide = jnp.zeros((2, panels.ATTENTION_MAX_ROWS + 2, 32), jnp.float32)
    assert not panels.attention_applies(wide, keys)  # a prefill chunk
    monkeypatch.setattr(native, "available", lambda: False)
    assert not panels.attention_applies(q, keys)
    got = jax.jit(lambda *a: model.attend_window(*a, 0.2, jnp.int32(32), kernel=True))(q, keys, values, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(model.attend(q, keys, values, mask, 0.2)),
                               rtol=1e-5, atol=1e-6)

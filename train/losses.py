"""The Medusa-1 head loss: which token each head is trained on, and a fused, memory-light cross-entropy.

Head k (0-based) at position t predicts token t + 2 + k (the base lm_head predicts t + 1). A target is valid only
where that token is supervised (`loss_mask`, i.e. assistant text), lies inside the row, and belongs to the same
packed conversation as position t (`segment_ids`), so a packed row never teaches a head to guess across documents.

Loss = sum_k lambda_k * (masked mean over valid positions of CE_k), lambda_k = decay**k. decay=0.8 is the paper's
weighting; the original repository's code uses an unweighted sum (decay=1.0). The mean divides by max(count, 1), so a
batch with no valid target for some head contributes exactly 0 for that head instead of NaN (reference §6.7).

Memory: materialising head logits [B, S, K, V] in float32 costs 1.6 GB for B=4, S=512, K=4, V=49152, and autodiff
would keep all of it for the backward pass. `linear_cross_entropy` instead handles one head at a time, in chunks of
the sequence, and computes the gradient of the projection in the same sweep as the loss (softmax - one_hot is
known right there), so nothing of size V is kept for the backward pass and the vocabulary matmul runs twice (three
times with a trainable projection) instead of three times plus a rematerialisation. It is exactly the projection
`medusa_jax.model.head_logits` applies (the test compares values and gradients against that function).

Targets: the original trains each head on the data's token t + 2 + k (`teacher=None`). With a `Teacher` the target
is instead the frozen base's own distribution over that token, i.e. its next-token distribution at position
t + 1 + k given the data's prefix (self-distillation with soft labels, as EAGLE trains its draft head): every
position then says how likely each candidate is, not only which one was sampled, and at `temperature=0` the target
is the teacher's argmax, the very token greedy verification will accept. The reported `ce`, top-1 and top-5 stay
measured against the data's tokens in every mode, so runs with different targets compare on the same numbers.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from medusa_jax import model
from medusa_jax.config import HeadsConfig, LlamaConfig

Array = jax.Array
TOPK_METRIC = 5  # the "top-5" accuracy


@struct.dataclass
class HeadStats:
    """Sums over valid target positions, per head; each field float32 [K].

    Sums (not means) so that batches, devices and hosts combine by addition.
    """

    ce: Array  # summed cross-entropy, nats
    top1: Array  # targets that are the head's argmax (ties count as hits)
    top5: Array  # targets among the head's 5 largest logits
    count: Array  # valid targets

    def __add__(self, other: "HeadStats") -> "HeadStats":
        return jax.tree.map(jnp.add, self, other)

    @classmethod
    def zeros(cls, num_heads: int) -> "HeadStats":
        z = jnp.zeros((num_heads,), jnp.float32)
        return cls(ce=z, top1=z, top5=z, count=z)

    def means(self) -> dict[str, list[float]]:
        """Per-head mean loss and accuracies as Python floats (host side)."""
        count = jnp.maximum(self.count, 1.0)
        return {"loss": (self.ce / count).tolist(), "top1": (self.top1 / count).tolist(),
                "top5": (self.top5 / count).tolist(), "count": self.count.astype(jnp.int32).tolist()}


def head_weights(num_heads: int, decay: float) -> tuple[float, ...]:
    """lambda_k = decay**k for k = 0..K-1 (decay 0.8: the paper; 1.0: the original code's plain sum)."""
    return tuple(float(decay) ** k for k in range(num_heads))


def head_targets(tokens: Array, loss_mask: Array, segment_ids: Array, num_heads: int) -> tuple[Array, Array]:
    """Labels and validity of every head at every position.

    Args:
      tokens: int [B, S] token ids.
      loss_mask: bool [B, S], True on supervised (assistant) tokens.
      segment_ids: int [B, S], 0 on padding, 1..n for the packed conversations of a row.
      num_heads: K.
    Returns:
      labels int32 [B, S, K] (tokens[t + 2 + k], 0 where out of the row) and valid bool [B, S, K].
    """
    labels, valid = [], []
    for k in range(num_heads):
        shift = 2 + k  # never cumulative: each head's offset is counted from t (reference §6.1)
        pad = ((0, 0), (0, min(shift, tokens.shape[1])))
        label = jnp.pad(tokens[:, shift:], pad)
        target_mask = jnp.pad(loss_mask[:, shift:], pad)  # False beyond the row end
        target_segment = jnp.pad(segment_ids[:, shift:], pad)  # 0 beyond the row end
        labels.append(label.astype(jnp.int32))
        valid.append(target_mask & (target_segment == segment_ids) & (segment_ids > 0))
    return jnp.stack(labels, axis=-1), jnp.stack(valid, axis=-1)


class Teacher(NamedTuple):
    """Soft targets for the heads: the frozen base's own next-token distributions (see the module docstring).

    hidden: [B, S, H] post-final-norm states of the teacher (stage 1: the frozen base; stage 2: the original).
    kernel: [H, V] the teacher's output projection.
    temperature: Python float; targets are softmax(logits / temperature), 0 = one-hot on the teacher's argmax.
    """

    hidden: Array
    kernel: Array
    temperature: float = 1.0


def shift_left(a: Array, shift: int) -> Array:
    """[B, S, ...] -> [B, S, ...]: row t holds a[t + shift] (zeros past the row end, where no target is valid)."""
    pad = ((0, 0), (0, min(shift, a.shape[1]))) + ((0, 0),) * (a.ndim - 2)
    return jnp.pad(a[:, shift:], pad)


def teacher_argmax(hidden: Array, kernel: Array, chunk: int | None = None) -> Array:
    """The teacher's most likely next token at every position: argmax(hidden @ kernel), int32 [B, S], computed
    `chunk` positions at a time so that no [B, S, V] array exists."""
    b, s, h = hidden.shape
    chunk = s if chunk is None else min(chunk, s)
    n = -(-s // chunk)
    xs = jnp.pad(hidden, ((0, 0), (0, n * chunk - s), (0, 0))).reshape(b, n, chunk, h).swapaxes(0, 1)
    ids = jax.lax.map(lambda x: jnp.argmax(jnp.dot(x, kernel, preferred_element_type=jnp.float32,
                                                   precision=model.precision(x.dtype)), axis=-1), xs)
    return ids.swapaxes(0, 1).reshape(b, n * chunk)[:, :s].astype(jnp.int32)


def _chunk_stats(x: Array, kernel: Array, labels: Array, valid: Array, targets: Array | None, tx: Array | None,
                 tk: Array | None, temperature: float, with_grads: bool, kernel_grad: bool):
    """One chunk: x [C, H], kernel [H, V], labels int [C], valid bool [C], and the targets: ids int [C], or teacher
    states tx [C, H] with kernel tk [H, V] -> sums (+ gradients of the objective sum)."""
    p = model.precision(x.dtype)  # the model's own matmul precision (float32 stays float32 on a GPU)
    logits = jnp.dot(x, kernel, preferred_element_type=jnp.float32, precision=p)  # [C, V]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]  # [C]
    w = valid.astype(jnp.float32)
    rank = jnp.sum(logits > label_logit[:, None], axis=-1)  # logits strictly above the target's: 0 = top-1
    ce = lse - label_logit  # [C], against the data's token
    if tx is None:  # one target id per position
        target = None
        objective = lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    else:
        target = jax.nn.softmax(jnp.dot(tx, tk, preferred_element_type=jnp.float32,
                                        precision=model.precision(tx.dtype)) / temperature, axis=-1)
        objective = lse - jnp.sum(target * logits, axis=-1)  # cross-entropy against the soft target, nats
    sums = (jnp.sum(objective * w), jnp.sum(ce * w), jnp.sum((rank < 1) * w), jnp.sum((rank < TOPK_METRIC) * w))
    if not with_grads:
        return sums, None, None
    # d objective / d logits = softmax - target, zero on invalid rows.
    if target is None:
        target = jax.nn.one_hot(targets, logits.shape[-1])
    dlogits = ((jnp.exp(logits - lse[:, None]) - target) * w[:, None]).astype(x.dtype)
    dx = jnp.dot(dlogits, kernel.T, preferred_element_type=jnp.float32, precision=p)  # [C, H]
    dk = jnp.dot(x.T, dlogits, preferred_element_type=jnp.float32, precision=p) if kernel_grad else None  # [H, V]
    return sums, dx, dk


def _chunked(x, kernel, labels, valid, targets, tx, tk, temperature, chunk, with_grads, kernel_grad):
    """Runs `_chunk_stats` over sequence chunks. x, tx [B, S, H]; labels, valid, targets [B, S]."""
    b, s, h = x.shape
    if chunk is None or chunk >= s:
        flat_tx = None if tx is None else tx.reshape(b * s, h)
        flat_targets = None if targets is None else targets.reshape(-1)
        flat = (x.reshape(b * s, h), kernel, labels.reshape(-1), valid.reshape(-1), flat_targets, flat_tx, tk)
        sums, dx, dk = _chunk_stats(*flat, temperature, with_grads, kernel_grad)
        return sums, (None if dx is None else dx.reshape(b, s, h)), dk
    n = -(-s // chunk)
    pad = n * chunk - s

    def split(a):  # [B, S, ...] -> [n, B, chunk, ...]: chunks along the sequence keep the (sharded) batch axis
        a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return a.reshape(b, n, chunk, *a.shape[2:]).swapaxes(0, 1)

    def body(carry, inp):
        xc, lc, vc, gc, tc = inp
        sums, dx, dk = _chunk_stats(xc.reshape(b * chunk, h), kernel, lc.reshape(-1), vc.reshape(-1),
                                    None if gc is None else gc.reshape(-1),
                                    None if tc is None else tc.reshape(b * chunk, h), tk, temperature,
                                    with_grads, kernel_grad)
        carry_sums, carry_dk = carry
        carry_sums = tuple(a + c for a, c in zip(carry_sums, sums))
        if dk is not None:
            carry_dk = carry_dk + dk
        return (carry_sums, carry_dk), (None if dx is None else dx.reshape(b, chunk, h))

    zero = jnp.zeros((), jnp.float32)
    dk0 = jnp.zeros(kernel.shape, jnp.float32) if (with_grads and kernel_grad) else None
    xs = (split(x), split(labels), split(valid), None if targets is None else split(targets),
          None if tx is None else split(tx))
    (sums, dk), dx = jax.lax.scan(body, ((zero,) * 4, dk0), xs)
    if dx is not None:
        dx = dx.transpose(1, 0, 2, 3).reshape(b, n * chunk, h)[:, :s]
    return sums, dx, dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def linear_cross_entropy(x: Array, kernel: Array, labels: Array, valid: Array, targets: Array | None = None,
                         teacher_x: Array | None = None, teacher_kernel: Array | None = None,
                         temperature: float = 1.0, chunk: int | None = None,
                         kernel_grad: bool = False) -> tuple[Array, Array, Array, Array]:
    """Cross-entropy of softmax(x @ kernel) against its targets, summed over valid positions, plus hit counts.

    Args:
      x: [B, S, H] head states (any float dtype; the matmul accumulates in float32).
      kernel: [H, V] vocabulary projection.
      labels: int [B, S] the data's target ids.
      valid: bool [B, S] which positions count.
      targets: int [B, S] target ids when they are not `labels` (e.g. a teacher's argmax); None: `labels`.
      teacher_x, teacher_kernel: [B, S, H] and [H, V]: soft targets softmax(teacher_x @ teacher_kernel /
        temperature) instead of ids; constants (no gradient).
      temperature: Python float > 0, see above.
      chunk: sequence positions per chunk (None: the whole sequence at once); bounds the [B * chunk, V] temporaries.
      kernel_grad: whether the kernel is trained (the `own` projection); a frozen kernel gets a zero cotangent and
        its gradient matmul is skipped.
    Returns:
      (objective_sum, ce_sum, top1_hits, top5_hits), float32 scalars: the objective is the cross-entropy against
      the targets (= ce_sum without a teacher); ce and the hits are against `labels`. Only the objective is
      differentiable.
    """
    if targets is None and teacher_x is None:
        targets = labels
    sums, _, _ = _chunked(x, kernel, labels, valid, targets, teacher_x, teacher_kernel, temperature, chunk,
                          with_grads=False, kernel_grad=False)
    return sums


def _lce_fwd(x, kernel, labels, valid, targets, teacher_x, teacher_kernel, temperature, chunk, kernel_grad):
    if targets is None and teacher_x is None:
        targets = labels
    sums, dx, dk = _chunked(x, kernel, labels, valid, targets, teacher_x, teacher_kernel, temperature, chunk,
                            with_grads=True, kernel_grad=kernel_grad)
    return sums, (dx.astype(x.dtype), dk, kernel)


def _lce_bwd(temperature, chunk, kernel_grad, res, cotangents):
    dx, dk, kernel = res
    g = cotangents[0]  # only the objective is differentiable
    d_kernel = (g * dk).astype(kernel.dtype) if kernel_grad else jnp.zeros_like(kernel)
    return (g.astype(dx.dtype) * dx, d_kernel, None, None, None, None, None)


linear_cross_entropy.defvjp(_lce_fwd, _lce_bwd)


def medusa_loss(heads_config: HeadsConfig, config: LlamaConfig, base: Any, heads: Any, hidden: Array,
                tokens: Array, loss_mask: Array, segment_ids: Array, *, weights: Sequence[float],
                compute_dtype: Any = None, chunk: int | None = None, axis_name: str | None = None,
                train_base: bool = False, teacher: Teacher | None = None) -> tuple[Array, HeadStats]:
    """The stage-1 loss of all heads from post-final-norm hidden states.

    Args:
      heads_config, config: the heads' and the base model's configs.
      base: frozen base params (only the lm_head / tied embedding is read, for the `shared` projection).
      heads: trainable head params.
      hidden: [B, S, H] post-final-norm hidden states of the base (treated as constants).
      tokens, loss_mask, segment_ids: [B, S] the batch (see `head_targets`).
      weights: lambda_k per head (len K).
      compute_dtype: dtype of the vocabulary matmul (default: the base params' dtype); accumulation is float32.
      chunk: sequence chunk of the fused cross-entropy (None: whole rows).
      axis_name: under `pmap`, the device axis: the per-head means then divide by the count over all devices, and
        the loss is scaled by the device count, so that `lax.pmean` of the gradients is the gradient of the global
        masked mean (a mean of per-device means would over-weight devices with few valid targets).
      train_base: stage 2: gradients also flow into `hidden` and, for the shared projection, into the base
        lm_head (stage 1 treats both as constants).
      teacher: soft targets (the teacher's distribution over token t + 2 + k, read at position t + 1 + k) instead
        of the data's tokens; None = the data's tokens (the original Medusa-1 loss).
    Returns:
      (loss, HeadStats) with stats summed over this call's (local) batch; the stats' `ce` is against the data's
      tokens whatever the targets.
    """
    k_heads = heads_config.num_heads
    if len(weights) != k_heads:
        raise ValueError(f"got {len(weights)} head weights for {k_heads} heads")
    compute_dtype = compute_dtype or jax.tree.leaves(base)[0].dtype
    frozen = (lambda x: x) if train_base else jax.lax.stop_gradient
    hidden = frozen(hidden).astype(jnp.float32)
    states = model.head_states(heads_config, config, heads, hidden)  # [B, S, K, H]
    labels, valid = head_targets(tokens, loss_mask, segment_ids, k_heads)  # [B, S, K]
    own = heads_config.projection == "own"
    shared_kernel = None if own else frozen(model.lm_head_kernel(config, base))  # [H, V]
    t_hidden = t_kernel = t_ids = None
    soft = teacher is not None and teacher.temperature > 0
    if teacher is not None:
        t_hidden = jax.lax.stop_gradient(teacher.hidden).astype(compute_dtype)
        t_kernel = jax.lax.stop_gradient(teacher.kernel).astype(compute_dtype)
        if not soft:  # argmax targets: one projection per position serves every head
            t_ids = teacher_argmax(t_hidden, t_kernel, chunk)  # [B, S]
    objective, ce, top1, top5 = [], [], [], []
    for k in range(k_heads):
        kernel = heads["proj"][k] if own else shared_kernel
        # Head k's target token t + 2 + k is what the teacher predicts at position t + 1 + k.
        sums = linear_cross_entropy(states[:, :, k].astype(compute_dtype), kernel.astype(compute_dtype),
                                    labels[..., k], valid[..., k],
                                    None if t_ids is None else shift_left(t_ids, 1 + k),
                                    shift_left(t_hidden, 1 + k) if soft else None, t_kernel if soft else None,
                                    float(teacher.temperature) if soft else 1.0, chunk, own or train_base)
        for acc, value in zip((objective, ce, top1, top5), sums):
            acc.append(value)
    count = jnp.sum(valid, axis=(0, 1)).astype(jnp.float32)  # [K]
    sg = jax.lax.stop_gradient
    stats = HeadStats(ce=sg(jnp.stack(ce)), top1=sg(jnp.stack(top1)), top5=sg(jnp.stack(top5)), count=count)
    denom, scale = count, 1.0
    if axis_name is not None:
        denom = jax.lax.psum(count, axis_name)
        scale = jax.lax.psum(1, axis_name)
    loss = scale * jnp.sum(jnp.asarray(weights, jnp.float32) * jnp.stack(objective) / jnp.maximum(denom, 1.0))
    return loss, stats


def attention_mask(segment_ids: Array) -> Array:
    """Mask for packed rows: causal AND same segment AND not padding. segment_ids [B, S] -> bool [B, S, S]."""
    s = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((s, s), bool))[None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same & (segment_ids[:, None, :] > 0)


# ------------------------------------------------------------------------------------------------ stage 2: base term


@struct.dataclass
class BaseStats:
    """Sums for the base model's own next-token output (stage 2); float32 scalars, summed like HeadStats.

    kl: KL(original || current) in nats, summed over the `count` real positions.
    agree: positions where the current argmax equals the original's.
    ce: cross-entropy of the next token, summed over the `label_count` supervised next tokens.
    """

    kl: Array
    agree: Array
    count: Array
    ce: Array
    label_count: Array

    def means(self) -> dict[str, float]:
        """Per-token KL, argmax agreement and CE as Python floats (host side)."""
        n, m = max(float(self.count), 1.0), max(float(self.label_count), 1.0)
        return {"kl": float(self.kl) / n, "agree": float(self.agree) / n, "ce": float(self.ce) / m,
                "count": int(self.count), "label_count": int(self.label_count)}


def next_token_targets(tokens: Array, loss_mask: Array, segment_ids: Array) -> tuple[Array, Array]:
    """The base lm_head's labels (token t + 1) and validity, int32 / bool [B, S], with the same rules as the
    heads' (supervised, inside the row, same packed conversation)."""
    label = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))).astype(jnp.int32)
    target_mask = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1)))
    target_segment = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
    return label, target_mask & (target_segment == segment_ids) & (segment_ids > 0)


def base_terms(hidden: Array, kernel: Array, teacher_hidden: Array, teacher_kernel: Array, labels: Array,
               label_valid: Array, kl_valid: Array, chunk: int | None = None) -> BaseStats:
    """KL(original || current) and next-token CE of the base output, chunked over the sequence.

    Args:
      hidden, teacher_hidden: [B, S, H] post-final-norm states of the current and the original (frozen) base.
      kernel, teacher_kernel: [H, V] their output projections (the teacher's gets no gradient).
      labels, label_valid: [B, S] next-token targets (`next_token_targets`).
      kl_valid: bool [B, S] positions whose KL counts (all real tokens: the base should answer as before
        everywhere, not only on supervised text).
      chunk: sequence positions per chunk; each chunk's [B, chunk, V] logits are recomputed in the backward pass
        (jax.checkpoint), so no [B, S, V] array is ever kept.
    Returns:
      BaseStats with differentiable `kl` and `ce` sums.
    """
    b, s, h = hidden.shape
    chunk = s if chunk is None or chunk >= s else chunk
    n = -(-s // chunk)
    pad = n * chunk - s
    teacher_kernel = jax.lax.stop_gradient(teacher_kernel)
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)

    def split(x):  # [B, S, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(xs, ts, ls, lv, kv):
        p = model.precision(xs.dtype)
        student = jax.nn.log_softmax(jnp.einsum("bch,hv->bcv", xs, kernel.astype(xs.dtype),
                                                preferred_element_type=jnp.float32, precision=p))  # [B, C, V]
        teacher = jax.nn.log_softmax(jnp.einsum("bch,hv->bcv", ts, teacher_kernel.astype(ts.dtype),
                                                preferred_element_type=jnp.float32, precision=p))
        kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)  # [B, C]
        ce = -jnp.take_along_axis(student, ls[..., None], axis=-1)[..., 0]
        agree = jnp.argmax(student, -1) == jnp.argmax(teacher, -1)
        kw, lw = kv.astype(jnp.float32), lv.astype(jnp.float32)
        return jnp.sum(kl * kw), jax.lax.stop_gradient(jnp.sum(agree * kw)), jnp.sum(ce * lw)

    def body(carry, inp):
        return tuple(c + x for c, x in zip(carry, one(*inp))), None

    zero = jnp.zeros((), jnp.float32)
    (kl, agree, ce), _ = jax.lax.scan(body, (zero, zero, zero), tuple(
        split(x) for x in (hidden, teacher_hidden, labels, label_valid, kl_valid)))
    return BaseStats(kl=kl, agree=agree, count=jnp.sum(kl_valid).astype(jnp.float32), ce=ce,
                     label_count=jnp.sum(label_valid).astype(jnp.float32))

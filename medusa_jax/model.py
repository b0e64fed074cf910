"""The LLaMA/Vicuna decoder and the Medusa heads: the one model definition for training and inference.

Shape legend: B batch, T new tokens in this call, S key/value slots (the KV cache length, or T without a cache;
attention may read only a prefix of the cache: `attend_window`), H hidden size, N query heads, Kv key/value heads, G = N / Kv query heads per KV head, D head_dim,
V vocabulary, K Medusa heads.

The forward takes explicit absolute positions and an explicit boolean mask, and reads/writes a preallocated KV
cache at a given slot. That is what tree verification needs: the nodes of a draft tree sit at positions
`n + depth` and each may see the cached prefix plus its own ancestors only.

Layers are separate modules (`layers_0`, `layers_1`, ...) run by a Python loop, i.e. unrolled: batch-1 decoding is
bound by streaming the weights, and a `lax.scan` over stacked weights measured 2.2x slower on an H200
(shared/reference/JAX_GPU_NOTES.md).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medusa_jax import panels
from medusa_jax.config import HeadsConfig, LlamaConfig

Array = jax.Array
# Per layer (keys [B*Kv, D, S], values [B*Kv, S, D]); post-RoPE keys; row b*Kv + h is sequence b, KV head h.
# One batch axis: a [B, S, Kv, D] cache made XLA transpose (copy) every layer's whole cache on every decode step,
# and a separate size-1 batch axis made it duplicate each cache write into a reshaped copy of the whole cache. Keys
# with the slot axis last and values with it in the middle are what XLA's CPU batched dots read fastest: both
# products then stream [D, S] / [S, D] panels with S as the long axis (BENCHMARKS.md, "KV-cache layout" and
# "KV-cache layout, second round": attention 3x cheaper than with keys [B*Kv, S, D], values [B*Kv, D, S]).
KEY_SLOT_AXIS, VALUE_SLOT_AXIS = 2, 1
KVCache = tuple[tuple[Array, Array], ...]
_NEG_INF = -1e30  # a large finite negative: a fully masked row gives a uniform softmax instead of NaN


def precision(dtype: Any) -> jax.lax.Precision | None:
    """Matmul precision for operands of `dtype`: float32 products are computed in float32 on every backend.

    JAX's default lets a GPU round float32 operands to TensorFloat32 (10 mantissa bits) inside a product; then a
    tree-verification forward (several rows) and a one-token forward round differently far more often, and greedy
    Medusa would stop matching plain greedy decoding at near-ties it should resolve, as would logits parity with
    PyTorch (whose float32 CUDA products are float32 by default). A model loaded in float32 asks for exactness;
    bfloat16/float16 operands keep the backend's default (and its speed). CPUs compute float32 either way.
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class Linear(nn.Module):
    """x [..., in] @ kernel [in, *features], no bias: `nn.DenseGeneral`'s parameter, initialisation and product.

    A kernel that `panels.for_decoding` replaced by a `panels.Panels` runs on the packed-panel CPU kernel
    (decoding on a CPU); training and every other backend keep the plain kernel and XLA's product.
    """

    features: tuple[int, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.has_variable("params", "kernel"):
            packed = self.get_variable("params", "kernel")
            if isinstance(packed, panels.Panels):
                return panels.matmul(x, packed).astype(x.dtype)
        shape = (x.shape[-1],) + tuple(self.features)
        init = lambda rng, shape: nn.initializers.lecun_normal()(rng, (shape[0], math.prod(shape[1:]))).reshape(shape)
        kernel = self.param("kernel", init, shape)
        dtype = jnp.result_type(x, kernel)
        return jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                   precision=precision(dtype))


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as transformers does."""

    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(x.dtype)


def rope(x: Array, positions: Array, theta: float, scaling: float | None) -> Array:
    """Rotary embedding in the "rotate half" layout of Hugging Face LLaMA.

    Args:
      x: [B, T, heads, D]
      positions: [B, T] absolute positions (int).
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    pos = positions.astype(jnp.float32)
    if scaling:
        pos = pos / scaling  # linear RoPE scaling stretches the position axis
    freqs = pos[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    x32 = x.astype(jnp.float32)
    half = jnp.concatenate([-x32[..., d // 2:], x32[..., : d // 2]], axis=-1)
    return (x32 * jnp.cos(emb) + half * jnp.sin(emb)).astype(x.dtype)


def write_cache(cache: Array, new: Array, index: Array, slot_axis: int) -> Array:
    """Writes `new` into `cache` at slots [index, index + T) along `slot_axis`.

    `new` has the cache's layout with T slots (keys [B*Kv, D, T] into [B*Kv, D, S] along KEY_SLOT_AXIS, values
    [B*Kv, T, D] into [B*Kv, S, D] along VALUE_SLOT_AXIS). `index` is a scalar (one slot for the whole batch:
    the batch-1 fast path, a single dynamic_update_slice) or [B].
    """
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, slot_axis)
    b = index.shape[0]
    per_seq = lambda x: x.reshape((b, -1) + x.shape[1:])  # [B, Kv, ...]
    out = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, slot_axis))(
        per_seq(cache), per_seq(new), index)
    return out.reshape(cache.shape)


WINDOW_BLOCK = 128  # live-window granularity in cache slots (`window_sizes`)
MAX_WINDOWS = 16  # at most this many window sizes per cache length: branches of one `lax.switch` per layer
# A window is a static slice, which XLA copies before the attention products read it: reading a window of W slots
# costs about what attending over 2-3 W slots would, so windows beyond half the cache are dropped and such steps
# attend over every slot (BENCHMARKS.md, "KV-cache layout, second round").
WINDOW_MAX_FRACTION = 0.5


def window_sizes(slots: int) -> tuple[int, ...]:
    """The attention windows a cache of `slots` slots offers: multiples of a block (128 slots, coarser for long
    caches) up to half the cache, then the whole cache. A decoding step attends over the smallest one holding
    every live slot."""
    limit = int(slots * WINDOW_MAX_FRACTION)
    block = WINDOW_BLOCK * max(1, -(-limit // (WINDOW_BLOCK * (MAX_WINDOWS - 1))))
    return tuple(range(block, limit + 1, block)) + (slots,)


def attend(q: Array, keys: Array, values: Array, mask: Array, scale: float) -> Array:
    """Softmax attention of grouped queries over cache slots.

    Args:
      q: [B*Kv, G*T, D] queries, grouped by KV head (row b*Kv + h), rows ordered (group member, token).
      keys: [B*Kv, D, S]; values: [B*Kv, S, D]; mask: [B, T, S] bool, True where token t may attend slot s.
    Returns:
      [B*Kv, G*T, D].
    """
    rows, gt, d = q.shape
    b, t, s = mask.shape
    kv_heads, g = rows // b, gt // t
    scores = jnp.einsum("nqd,nds->nqs", q, keys.astype(q.dtype), preferred_element_type=jnp.float32,
                        precision=precision(q.dtype))
    scores = scores.reshape(b, kv_heads, g, t, s) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype).reshape(rows, gt, s)
    return jnp.einsum("nqs,nsd->nqd", probs, values, precision=precision(values.dtype))


def attend_window(q: Array, keys: Array, values: Array, mask: Array, scale: float,
                  window: int | Array | None, kernel: bool = False) -> Array:
    """`attend` over slots [0, window) only: the slots at and beyond `window` must be masked for every query whose
    output is used (decoding lets finished rows, whose outputs are discarded, see a truncated cache).

    Decoding preallocates the cache for the longest generation, but early steps use a fraction of it and
    attention's cost grows with the slots it reads (BENCHMARKS.md, "Attention over the live window"). `window`
    is None (all slots), a Python int (a static slice) or a traced scalar: then `lax.switch` runs the branch
    of the smallest `window_sizes` entry >= window, each branch a static slice of the same cache buffers.
    `kernel`: run the CPU attention kernel where it takes the shapes (`panels.attention`: a decoding step's few
    query rows), which reads the window in place.
    """
    s = keys.shape[KEY_SLOT_AXIS]
    if kernel and panels.attention_applies(q, keys):
        return panels.attention(q, keys, values, mask, scale, window)
    if window is None:
        return attend(q, keys, values, mask, scale)
    if isinstance(window, int):
        w = min(max(window, 1), s)
        return attend(q, keys[:, :, :w], values[:, :w], mask[..., :w], scale)
    sizes = window_sizes(s)
    if len(sizes) == 1:
        return attend(q, keys, values, mask, scale)
    branches = _window_branches(sizes, scale)
    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), jnp.asarray(window, jnp.int32))  # first size >= window
    return jax.lax.switch(jnp.minimum(index, len(sizes) - 1), branches, q, keys, values, mask)


@functools.lru_cache(maxsize=None)
def _window_branches(sizes: tuple[int, ...], scale: float) -> tuple:
    """`attend_window`'s switch branches, one per window size: the same function objects for every layer, so
    that JAX traces each branch once per shape rather than once per layer."""
    def branch(w: int):
        return lambda q, k, v, m: attend(q, k[:, :, :w], v[:, :w], m[..., :w], scale)
    return tuple(branch(w) for w in sizes)


class Attention(nn.Module):
    """Grouped-query attention with RoPE over an optional preallocated KV cache."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, kv: tuple[Array, Array] | None,
                 cache_index: Array | None, window: int | Array | None = None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        cfg = self.config
        b, t, _ = x.shape
        n, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = n // kv_heads
        # Q, K and V in one matmul (and gate/up in one, `MLP`): a batch-1 SmolLM2 decoding step on CPU is about 3 ms
        # faster with 120 weight-matmul calls instead of 210 (BENCHMARKS.md, "Fused QKV and gate/up projections").
        # The kernel [H, Kv, G + 2, D] keeps each KV group's G query heads, its key and its value together, so
        # tensor parallelism over the Kv axis splits it into whole groups and attention needs no communication.
        # That holds when the tensor size divides Kv; otherwise the kernel is replicated (SmolLM2: Kv = 3).
        qkv = Linear((kv_heads, g + 2, d), name="qkv")(x)  # [B, T, Kv, G+2, D]
        q = qkv[:, :, :, :g].reshape(b, t, n, d)  # query head h uses KV head h // G, as in HF
        k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]  # [B, T, Kv, D]
        q = rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
        k = rope(k, positions, cfg.rope_theta, cfg.rope_scaling)
        keys = k.transpose(0, 2, 3, 1).reshape(b * kv_heads, d, t)  # [B*Kv, D, T]
        values = v.transpose(0, 2, 1, 3).reshape(b * kv_heads, t, d)  # [B*Kv, T, D]
        if kv is not None:
            keys = write_cache(kv[0], keys, cache_index, KEY_SLOT_AXIS)  # [B*Kv, D, S]
            values = write_cache(kv[1], values, cache_index, VALUE_SLOT_AXIS)  # [B*Kv, S, D]
            kv = (keys, values)
        q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kv_heads, g * t, d)  # [B*Kv, G*T, D]
        # Decoding on packed weights (a CPU: `panels.for_decoding`) also runs the CPU attention kernel.
        packed = isinstance(self.variables.get("params", {}).get("qkv", {}).get("kernel"), panels.Panels)
        out = attend_window(q, keys, values, mask, 1 / math.sqrt(d), window, kernel=packed)  # [B*Kv, G*T, D]
        out = out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n * d)
        return Linear((cfg.hidden_size,), name="o")(out.astype(x.dtype)), kv


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gate_up = Linear((2, self.config.intermediate_size), name="gate_up")(x)  # [B, T, 2, I]
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]  # kernel [H, 2, I]
        return Linear((self.config.hidden_size,), name="down")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv, cache_index, window=None):
        eps = self.config.rms_norm_eps
        h, kv = Attention(self.config, name="attn")(RMSNorm(eps, name="attn_norm")(x), positions, mask, kv,
                                                   cache_index, window)
        x = x + h
        x = x + MLP(self.config, name="mlp")(RMSNorm(eps, name="mlp_norm")(x))
        return x, kv


class Llama(nn.Module):
    """The base model. `__call__` returns post-norm hidden states; `logits` applies the output projection.

    The two are separate so that callers compute logits only where they need them (the last prompt position
    at prefill, the tree nodes at verification).
    """

    config: LlamaConfig
    remat: bool = False  # recompute each layer's activations in the backward pass (long training sequences)

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02))
        layer = nn.remat(DecoderLayer, static_argnums=()) if self.remat else DecoderLayer
        self.layers = [layer(cfg) for _ in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = Linear((cfg.vocab_size,))

    def __call__(self, tokens: Array, positions: Array, mask: Array, cache: KVCache | None = None,
                 cache_index: Array | None = None, window: int | Array | None = None
                 ) -> tuple[Array, KVCache | None]:
        """Runs the decoder.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] int absolute positions (RoPE).
          mask: [B, T, S] bool, True where query t may attend slot s. S is the cache length, or T without a cache.
          cache: per-layer (keys [B*Kv, D, S], values [B*Kv, S, D]), or None for a cache-free causal forward.
          cache_index: scalar or [B] int, the slot where this call's T new entries are written.
          window: None (read every slot), or a bound such that no query attends a slot >= window. A Python int
            reads exactly slots [0, window); an int scalar array reads the smallest of `window_sizes(S)` covering
            it (one `lax.switch` per layer: `attend_window`).
        Returns:
          hidden [B, T, H] after the final norm, and the updated cache (None without one).
        """
        x = self.embed(tokens)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, positions, mask, None if cache is None else cache[i], cache_index, window)
            new_cache.append(kv)
        return self.final_norm(x), (None if cache is None else tuple(new_cache))

    def forward_with_logits(self, tokens: Array, positions: Array, mask: Array) -> Array:
        """Cache-free forward to logits [B, T, V]; also used to create every parameter at init."""
        hidden, _ = self(tokens, positions, mask)
        return self.logits(hidden)

    def logits(self, hidden: Array) -> Array:
        """[..., H] -> [..., V] float32 logits."""
        if self.config.tie_embeddings:
            if self.has_variable("params", panels.TIED):  # the embedding's transpose, packed for decoding
                return panels.matmul(hidden, self.get_variable("params", panels.TIED))
            # Contract H against the embedding [V, H] as stored: `embed.attend` (hidden @ E.T) made XLA's CPU backend
            # transpose E inside a slow loop fusion (BENCHMARKS.md, "Tied output projection").
            embedding = self.embed.embedding.astype(hidden.dtype)
            return jnp.einsum("...h,vh->...v", hidden, embedding, precision=precision(hidden.dtype)).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)


class MedusaHeads(nn.Module):
    """K Medusa heads' residual stacks, all heads at once: hidden [..., H] -> head states [..., K, H].

    Each layer of head k computes x + SiLU(W x + b), every layer with its own weights (the original shared one
    module across layers by accident). W and b start at zero, so a fresh head is exactly the identity and, with the
    shared projection, predicts what the base lm_head predicts. Weights are stacked over heads ([K, H, H]) so all
    heads run as one batched matmul. The vocabulary projection is applied by `head_logits`.
    """

    config: HeadsConfig
    hidden_size: int

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        k, h = self.config.num_heads, self.hidden_size
        x = jnp.broadcast_to(hidden[..., None, :], hidden.shape[:-1] + (k, h))  # [..., K, H]
        for j in range(self.config.num_layers):
            w = self.param(f"res_{j}_kernel", nn.initializers.zeros, (k, h, h))
            b = self.param(f"res_{j}_bias", nn.initializers.zeros, (k, h))
            x = x + jax.nn.silu(jnp.einsum("...kh,khg->...kg", x, w.astype(x.dtype), precision=precision(x.dtype))
                                + b.astype(x.dtype))
        return x


def causal_mask(batch: int, length: int) -> Array:
    """[B, T, T] lower-triangular boolean mask."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))


def init_cache(config: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    """A zeroed KV cache of `length` slots: per layer (keys [B*Kv, D, length], values [B*Kv, length, D])."""
    rows, d = batch * config.num_kv_heads, config.head_dim
    return tuple((jnp.zeros((rows, d, length), dtype), jnp.zeros((rows, length, d), dtype))
                 for _ in range(config.num_layers))


def init_base(config: LlamaConfig, rng: Array, dtype: Any = jnp.float32) -> dict:
    """Random base parameters (for tests and the `tiny` model)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = Llama(config).init(rng, tokens, tokens, jnp.ones((1, 1, 1), bool),
                                method=Llama.forward_with_logits)["params"]
    return jax.tree.map(lambda p: p.astype(dtype), params)


def init_heads(heads_config: HeadsConfig, config: LlamaConfig, base: dict, rng: Array | None = None) -> dict:
    """Fresh Medusa head parameters; an `own` projection starts as a copy of the base lm_head (as Medusa-1)."""
    dtype = jax.tree.leaves(base)[0].dtype
    params = MedusaHeads(heads_config, config.hidden_size).init(
        rng if rng is not None else jax.random.PRNGKey(0), jnp.zeros((1, config.hidden_size)))["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), dict(params))
    if heads_config.projection == "own":
        params["proj"] = jnp.broadcast_to(lm_head_kernel(config, base), (heads_config.num_heads,
                                                                         config.hidden_size, config.vocab_size))
    return params


def lm_head_kernel(config: LlamaConfig, base: dict) -> Array:
    """The base output projection as an [H, V] matrix."""
    return base["embed"]["embedding"].T if config.tie_embeddings else base["lm_head"]["kernel"]


def forward(config: LlamaConfig, base: dict, tokens: Array, positions: Array, mask: Array,
            cache: KVCache | None = None, cache_index: Array | None = None, remat: bool = False,
            window: int | Array | None = None):
    """Pure-function form of `Llama.__call__`: returns (hidden [B, T, H], cache)."""
    return Llama(config, remat=remat).apply({"params": base}, tokens, positions, mask, cache, cache_index, window)


def logits(config: LlamaConfig, base: dict, hidden: Array) -> Array:
    """Base logits [..., V] (float32) from post-norm hidden states [..., H]."""
    return Llama(config).apply({"params": base}, hidden, method=Llama.logits)


def head_states(heads_config: HeadsConfig, config: LlamaConfig, heads: dict, hidden: Array) -> Array:
    """Medusa heads' residual stacks: hidden [..., H] -> [..., K, H]."""
    params = {k: v for k, v in heads.items() if k != "proj"}
    return MedusaHeads(heads_config, config.hidden_size).apply({"params": params}, hidden)


def head_logits(heads_config: HeadsConfig, config: LlamaConfig, base: dict, heads: dict, hidden: Array) -> Array:
    """Medusa head logits [..., K, V] (float32) from post-norm hidden states [..., H].

    `shared`: one matmul of all K head states against the base lm_head, so its weights are read once.
    `own`: each head its own [H, V] projection, batched over heads.
    """
    states = head_states(heads_config, config, heads, hidden)  # [..., K, H]
    if heads_config.projection == "shared":
        return logits(config, base, states)
    return jnp.einsum("...kh,khv->...kv", states, heads["proj"].astype(states.dtype),
                      preferred_element_type=jnp.float32, precision=precision(states.dtype))

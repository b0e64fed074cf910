"""One jitted function runs a whole generation (a prefill, then tree-verification steps in `lax.while_loop`), or,
streaming, a few: the prefill, segments of steps, the output.

Shape legend: B batch, Tb bucketed prompt length, S cache slots, N tree nodes, D tree depth, P tree paths,
V vocabulary, H hidden size, Kd heads used by the tree, k top-k per head, C output capacity.

Conventions. After the prefill the cache holds the prompt (length n = prompt length) and the first generated token
(the "root") is already emitted but not cached. Each step feeds the tree [root, drafts...] at positions n + depth,
writes its N key/value entries at slots [n, n + N), verifies the drafts against the base logits at the nodes,
and emits the `a` accepted drafts plus the bonus token predicted at the last accepted node (which becomes the next
root); n += a + 1. The cache is compacted at the start of the NEXT step, before its forward: the entries of the
accepted path's nodes are gathered and written to slots [n_old, n_old + D], of which the first a + 1 are valid
(the rest are stale, then overwritten by the new tree). Compacting after the attention reads of the same step
made XLA copy every cache buffer on every step (an in-place write after in-place reads of the loop carry);
before the forward, all writes precede all reads and the cache stays in place. When the loop ends, the last
step's path is compacted too, so that the cache can serve the next call as a prefix (`infer.prefix_cache`).
The next drafts come from the Medusa heads applied to the hidden state at the last accepted node of the same pass:
no extra forward. A tree's lookup branch (`TreeBuffers.lookup`) takes its tokens from the token history the state
carries instead (`infer.lookup`). Plain decoding is the same loop over the root-only tree (N = 1, no heads).
The cache is sized for the longest generation, but each forward's attention reads only the smallest window of it
that holds the live slots (`model.window_sizes`), so early steps of a long generation stay cheap.

Nothing leaves the device per step. Streaming runs the same pieces as separate executables instead of one:
`start_jit` (the prefill), then `advance_jit` (a few steps) again and again, each returning the state and a small
`View` of the emitted tokens that the host reads while the next segment runs, then `finish_jit`. A host callback
per step would do without the segments, but JAX never writes an executable holding one to its persistent
compilation cache, so every new process would compile the streamed generation again.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from infer import acceptance, lookup, sampling
from infer.state import DecodeOutput, DecodeSpec, DecodeState
from medusa_jax import model
from medusa_jax.tree import TreeBuffers, without_lookup

Array = jax.Array

_traces = 0  # times a generation (`generate`, or a streamed one's `_start`) was traced; tests check the caches


def trace_count() -> int:
    """How many generations have been traced (one per compiled shape/spec; none for a stored executable)."""
    return _traces


def _cache_index(start: Array) -> Array:
    """A scalar write index for batch 1 (one dynamic_update_slice per layer), else per-sequence [B]."""
    return start[0] if start.shape[0] == 1 else start


def tree_mask(spec: DecodeSpec, start: Array, tree: TreeBuffers | None = None) -> Array:
    """bool [B, N, S]: node i of `tree` (default `spec.tree`) sees slots < start (the cached prefix) and the tree
    slots of its ancestors and itself (slot start + j for attn_mask[i, j]). Requires start + N <= S."""
    tree = spec.tree if tree is None else tree
    n, s = tree.num_nodes, spec.cache_len
    prefix = jnp.arange(s)[None, :] < start[:, None]  # [B, S]
    full = jnp.broadcast_to(prefix[:, None, :], (start.shape[0], n, s))
    block = jnp.asarray(tree.attn_mask)  # [N, N]
    return jax.vmap(lambda m, i: jax.lax.dynamic_update_slice(m, block, (0, i)))(full, start)


def _compact(cache: model.KVCache, start: Array, slots: Array) -> model.KVCache:
    """Moves the accepted path's entries (cache slots `slots` [B, D+1]) to slots [start, start + D]."""
    index = _cache_index(start)
    out = []
    rows = jnp.repeat(slots, cache[0][0].shape[0] // slots.shape[0], axis=0)  # [B*Kv, D+1]: each KV head's row
    ka, va = model.KEY_SLOT_AXIS, model.VALUE_SLOT_AXIS
    for keys, values in cache:  # [B*Kv, Dh, S], [B*Kv, S, Dh]
        # Gather first, then write: sources (start + node) are never below their destinations (start + depth).
        k_path = jnp.take_along_axis(keys, rows[:, None, :], axis=ka)  # [B*Kv, Dh, D+1]
        v_path = jnp.take_along_axis(values, rows[:, :, None], axis=va)  # [B*Kv, D+1, Dh]
        out.append((model.write_cache(keys, k_path, index, ka), model.write_cache(values, v_path, index, va)))
    return tuple(out)


def _used_heads(spec: DecodeSpec, heads):
    """(heads config, parameters) of the Kd heads the tree uses: every head leaf is stacked on axis 0."""
    kd = spec.num_heads_used
    return dataclasses.replace(spec.heads_config, num_heads=kd), jax.tree.map(lambda p: p[:kd], heads)


def _top(spec: DecodeSpec, head_logits: Array) -> Array:
    """Head logits [B, Kd, V] -> each head's top-k tokens, int32 [B, Kd, k]."""
    if spec.tree.topk == 1:  # an argmax: XLA:CPU's top_k call costs 3x the reduction (BENCHMARKS.md)
        return sampling.greedy_token(head_logits)[..., None]
    return jax.lax.top_k(head_logits, spec.tree.topk)[1].astype(jnp.int32)


def _drafts(spec: DecodeSpec, base, heads, hidden: Array) -> Array:
    """Each used head's top-k tokens from hidden [B, H] -> int32 [B, Kd, k]."""
    if spec.num_heads_used == 0:
        return jnp.zeros((hidden.shape[0], 0, spec.tree.topk), jnp.int32)
    used, sliced = _used_heads(spec, heads)
    return _top(spec, model.head_logits(used, spec.config, base, sliced, hidden))  # logits [B, Kd, V]


def _fuse_heads(spec: DecodeSpec, batch: int, n: int) -> bool:
    """Whether a step over n nodes gets the base logits at its nodes and the heads' logits at all of them (it keeps
    the accepted node's) from one pass over the shared output projection rather than two: the heads' rows wait
    for acceptance otherwise, and each pass reads the whole [H, V] matrix. Pays while the n * Kd extra rows are
    nearly free, i.e. for small trees (`DecodeSpec.fused_head_rows`)."""
    kd = spec.num_heads_used
    return kd > 0 and spec.heads_config.projection == "shared" and batch * n * (1 + kd) <= spec.fused_head_rows


def _record(spec: DecodeSpec, st: DecodeState, chunk: Array, count: Array, max_new: Array):
    """Appends chunk[b, :count[b]] of each running sequence, cut after a stop token and at max_new.

    Returns (tokens, num_new [B], finished [B]).
    """
    active = ~st.done
    j = jnp.arange(chunk.shape[1])[None, :]
    if spec.stop_ids:
        is_stop = jnp.any(chunk[:, :, None] == jnp.asarray(spec.stop_ids)[None, None, :], axis=-1)
        is_stop = is_stop & (j < count[:, None])
    else:
        is_stop = jnp.zeros(chunk.shape, bool)
    has_stop = jnp.any(is_stop, axis=-1)
    count = jnp.where(has_stop, jnp.argmax(is_stop, axis=-1) + 1, count)
    count = jnp.minimum(count, max_new - st.num_new)
    # Finished sequences write into the slack after the capacity, so the update needs no mask.
    at = jnp.where(active, st.num_new, spec.capacity)
    tokens = jax.vmap(lambda buf, c, i: jax.lax.dynamic_update_slice(buf, c, (i,)))(st.tokens, chunk, at)
    num_new = st.num_new + jnp.where(active, count, 0)
    finished = active & (has_stop | (num_new >= max_new))
    return tokens, num_new, finished


def _root(spec: DecodeSpec, key: Array, logits: Array, temperature: Array, top_p: Array) -> Array:
    """The first generated token from the last prompt position's logits [B, V]."""
    if spec.rule == "greedy":
        return sampling.greedy_token(logits)
    return sampling.sample_from(key, sampling.target_probs(logits, temperature, top_p, spec.use_top_p))


def _prefill_forward(spec: DecodeSpec, base, prompt: Array, prompt_len: Array, cache: model.KVCache,
                     reused: Array | int = 0) -> tuple[Array, model.KVCache]:
    """Runs the right-padded prompt [B, Tb] through the model, writing its keys and values into the cache.

    Returns (hidden [B, H] at each sequence's last real position, cache). With `spec.prefill_chunk` = c < Tb
    (Tb a multiple of c), a `fori_loop` runs c-token chunks from token `reused` (int32 []: the leading prompt
    tokens whose keys and values the cache already holds, from an earlier call: `infer.api`'s prefix cache;
    below every prompt_len) up to the longest prompt, so the matmuls' cost follows the new tokens rather than the
    prompt's bucket; slots beyond a sequence's prompt keep stale values, which nothing reads (every later mask
    stops at the sequence's length). Each chunk attends over the live window (`spec.live_window`; else the
    bucket's Tb slots). Otherwise one forward over the whole bucket from slot 0 (`reused` is then ignored).
    """
    b, tb = prompt.shape
    s, c = spec.cache_len, spec.prefill_chunk
    rows = jnp.arange(b)

    def forward_span(begin: Array, size: int, window: int | Array, cache: model.KVCache
                     ) -> tuple[Array, model.KVCache]:
        """Tokens [begin, begin + size) of every prompt -> (hidden [B, size, H], cache)."""
        tokens = jax.lax.dynamic_slice_in_dim(prompt, begin, size, axis=1)  # [B, size]
        positions = jnp.broadcast_to(begin + jnp.arange(size, dtype=jnp.int32), (b, size))
        mask = jnp.arange(s)[None, None, :] <= positions[:, :, None]  # [B, size, S]: causal over the prefix
        return model.forward(spec.config, base, tokens, positions, mask, cache, begin, window=window)

    if not c or tb <= c or tb % c:
        hidden, cache = forward_span(jnp.int32(0), tb, tb, cache)
        return hidden[rows, prompt_len - 1], cache

    def forward_chunk(begin: Array, cache: model.KVCache) -> tuple[Array, model.KVCache]:
        # The live window: a chunk reads slots [0, begin + c) (rounded up to a `model.window_sizes` entry), not
        # the whole bucket, whose attention would dominate the early chunks of a long prompt.
        return forward_span(begin, c, begin + c if spec.live_window else tb, cache)

    reused = jnp.asarray(reused, jnp.int32)

    def chunk(i: Array, carry: tuple[Array, model.KVCache]) -> tuple[Array, model.KVCache]:
        last, cache = carry
        # The last chunk may end past the bucket: it then starts earlier and recomputes a few cached tokens (the
        # same keys and values again), so that every chunk is a static c-token slice of the prompt.
        begin = jnp.minimum(reused + i * c, tb - c)
        hidden, cache = forward_chunk(begin, cache)  # [B, c, H]
        at = prompt_len - 1 - begin  # [B]: each sequence's last real token, if it falls in this chunk
        here = (at >= 0) & (at < c)
        return jnp.where(here[:, None], hidden[rows, jnp.clip(at, 0, c - 1)], last), cache

    hidden = jax.eval_shape(forward_chunk, jnp.int32(0), cache)[0]
    last = jnp.zeros((b, hidden.shape[-1]), hidden.dtype)
    count = (jnp.max(prompt_len) - reused + c - 1) // c  # chunks holding new tokens (prompt_len > reused)
    return jax.lax.fori_loop(0, count, chunk, (last, cache))


def prefill(spec: DecodeSpec, base, heads, prompt: Array, prompt_len: Array, cache: model.KVCache,
            max_new: Array, temperature: Array, top_p: Array, rng: Array, reused: Array | int = 0) -> DecodeState:
    """Runs the right-padded prompt [B, Tb] (real lengths prompt_len [B]; the first `reused` tokens already
    cached) through the model (`_prefill_forward`); emits the first token. Logits only at each sequence's last
    real position."""
    b = prompt.shape[0]
    n, d = spec.tree.num_nodes, spec.tree.max_depth
    s = spec.cache_len
    last, cache = _prefill_forward(spec, base, prompt, prompt_len, cache, reused)  # [B, H]
    rng, key = jax.random.split(rng)
    root = _root(spec, key, model.logits(spec.config, base, last), temperature, top_p)
    history = (lookup.init_history(prompt, prompt_len, root, s + lookup.slack(d)) if spec.tree.lookup
               else jnp.zeros((b, 0), jnp.int32))
    st = DecodeState(
        cache=cache, length=prompt_len.astype(jnp.int32), root=root, drafts=_drafts(spec, base, heads, last),
        # Identity: the first step's compaction moves slots [n, n + D] onto themselves.
        path_slots=prompt_len[:, None].astype(jnp.int32) + jnp.arange(d + 1, dtype=jnp.int32)[None, :],
        tokens=jnp.full((b, spec.capacity + d + 1), -1, jnp.int32), num_new=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool), step=jnp.int32(0), steps=jnp.zeros((b,), jnp.int32),
        accepted=jnp.full((b, spec.capacity), -1, jnp.int32), proposed=jnp.full((b, spec.capacity), -1, jnp.int32),
        history=history, rng=rng)
    chunk = jnp.pad(root[:, None], ((0, 0), (0, d)))  # [B, D+1]; only column 0 is emitted
    tokens, num_new, finished = _record(spec, st, chunk, jnp.ones((b,), jnp.int32), max_new)
    done = finished | (st.length + n > s)
    return st.replace(tokens=tokens, num_new=num_new, done=done)


def step(spec: DecodeSpec, base, heads, st: DecodeState, max_new: Array, temperature: Array,
         top_p: Array) -> DecodeState:
    """One tree verification: compact the previous path, forward N nodes, accept, emit a + 1 tokens.

    A tree with a lookup chain runs it only when the context holds a match for some running row; otherwise the
    step verifies the tree without the chain (`tree.without_lookup`; for a chain alone, a plain one-token step):
    a match-less chain repeats the root, which is almost never right, and its nodes cost the forward rows. The
    choice depends on the context alone, so greedy output and the sampled distribution stay exact."""
    if not spec.tree.lookup:
        return _verify(spec, spec.tree, base, heads, st, max_new, temperature, top_p, None)
    found = lookup.match(st.history, st.length)  # ([B], [B])
    chain = lookup.drafts(st.history, st.length, spec.tree.lookup, found=found)  # [B, L]
    return jax.lax.cond(
        jnp.any((found[1] > 0) & ~st.done),
        lambda: _verify(spec, spec.tree, base, heads, st, max_new, temperature, top_p, chain),
        lambda: _verify(spec, without_lookup(spec.tree), base, heads, st, max_new, temperature, top_p, None))


def _verify(spec: DecodeSpec, tree: TreeBuffers, base, heads, st: DecodeState, max_new: Array,
            temperature: Array, top_p: Array, chain: Array | None) -> DecodeState:
    """`step` over `tree`: `spec.tree`, or `spec.tree` without its lookup chain (same heads, depth <= D), whose
    path and chunk are padded to the state's D + 1. `chain`: the lookup drafts [B, L] when `tree` has them."""
    s, d = spec.cache_len, spec.tree.max_depth
    b, n = st.root.shape[0], tree.num_nodes
    rows = jnp.arange(b)
    rng, key = jax.random.split(st.rng)
    # Finished sequences still run (static shapes); clamp their slot so nothing is written past the cache (for
    # the largest tree, so that either tree of a lookup step leaves the same room).
    start = jnp.minimum(st.length, s - spec.tree.num_nodes)  # [B]
    cache = st.cache
    if d > 0:
        # Destination of the previous path: its root slot (the previous start; for a finished sequence a
        # harmless in-range rewrite of its own stale slots).
        cache = _compact(cache, st.path_slots[:, 0], st.path_slots)
    candidates = [st.root[:, None], st.drafts.reshape(b, -1)]  # [B, 1], [B, Kd*k]
    if tree.lookup:
        candidates.append(chain)  # [B, L]
    tokens = jnp.concatenate(candidates, axis=1)[:, tree.candidate_index]  # [B, N]
    positions = start[:, None] + jnp.asarray(tree.depth)[None, :]
    # Attention reads only the live part of the cache: no node of an unfinished row sees a slot at or beyond
    # max(start) + N. Finished rows (whose outputs are discarded) do not widen the window.
    window = jnp.max(jnp.where(st.done, 0, start)) + n if spec.live_window else None
    hidden, cache = model.forward(spec.config, base, tokens, positions, tree_mask(spec, start, tree), cache,
                                  _cache_index(start), window=window)
    fused = _fuse_heads(spec, b, n)
    if fused:
        used, sliced = _used_heads(spec, heads)
        states = model.head_states(used, spec.config, sliced, hidden)  # [B, N, Kd, H]
        both = model.logits(spec.config, base, jnp.concatenate([hidden[:, :, None], states], axis=2))
        logits = both[:, :, 0]  # [B, N, V]: base logits at the tree nodes; both[:, :, 1:] the heads'
    else:
        logits = model.logits(spec.config, base, hidden)  # [B, N, V]: base logits at the tree nodes only
    if spec.rule == "greedy":
        acc = acceptance.greedy(tree, tokens, logits)
    elif spec.rule == "typical":
        acc = acceptance.typical(tree, key, tokens, logits, temperature, top_p, spec.use_top_p, spec.epsilon,
                                 spec.delta)
    else:
        acc = acceptance.speculative_sample(tree, key, tokens, logits, temperature, top_p, spec.use_top_p)
    last = acc.nodes[rows, acc.length]
    drafts = _top(spec, both[rows, last, 1:]) if fused else _drafts(spec, base, heads, hidden[rows, last])

    # chunk[j] = the accepted draft at depth j + 1 for j < a, then the bonus token at j = a.
    j = jnp.arange(tree.max_depth + 1)[None, :]
    path_tokens = jnp.take_along_axis(tokens, acc.nodes, axis=1)  # [B, D'+1]
    chunk = jnp.where(j == acc.length[:, None], acc.next_token[:, None], jnp.roll(path_tokens, -1, axis=1))
    # A tree shallower than the state's (no chain this step): pad to D + 1. The padding lies past the accepted
    # path: its slots (the root's, copied) and tokens are stale, as the unaccepted entries of a full path are.
    nodes = jnp.pad(acc.nodes, ((0, 0), (0, d - tree.max_depth)))  # [B, D+1]
    chunk = jnp.pad(chunk, ((0, 0), (0, d - tree.max_depth)))
    count = acc.length + 1
    out, num_new, finished = _record(spec, st, chunk, count, max_new)

    active = ~st.done
    history = lookup.record(st.history, chunk, st.length) if spec.tree.lookup else st.history
    length = jnp.where(active, st.length + count, st.length)
    # No room for the next step's (largest) tree: stop before writing.
    done = st.done | finished | (active & (length + spec.tree.num_nodes > s))
    keep = lambda new, old: jnp.where(active.reshape((b,) + (1,) * (new.ndim - 1)), new, old)
    return st.replace(
        cache=cache, length=length, root=keep(acc.next_token, st.root), drafts=keep(drafts, st.drafts),
        path_slots=keep(start[:, None] + nodes, st.path_slots), history=keep(history, st.history),
        tokens=out, num_new=num_new, done=done, step=st.step + 1, steps=st.steps + active.astype(jnp.int32),
        accepted=st.accepted.at[:, st.step].set(jnp.where(active, acc.length, -1)),
        proposed=st.proposed.at[:, st.step].set(jnp.where(active, acc.proposed, -1)), rng=rng)


def advance(spec: DecodeSpec, base, heads, st: DecodeState, max_new: Array, temperature: Array, top_p: Array,
            steps: int | None = None) -> DecodeState:
    """Runs decoding steps until every sequence is done, the output capacity is reached, or (with `steps`)
    `steps` more steps have run."""
    until = spec.capacity if steps is None else jnp.minimum(st.step + steps, spec.capacity)
    return jax.lax.while_loop(lambda st: (st.step < until) & ~jnp.all(st.done),
                              lambda st: step(spec, base, heads, st, max_new, temperature, top_p), st)


def finish(spec: DecodeSpec, st: DecodeState) -> DecodeOutput:
    """The outputs of a generation whose loop has ended; moves the last step's accepted path into place."""
    if spec.tree.max_depth > 0:  # the last step's accepted path, whose move is deferred to a next step: do it now
        # Only after a step: a generation that stopped at its prefill has no path, and its identity path may then
        # reach past the cache's end (a prompt that filled it).
        cache = jax.lax.cond(st.step > 0, lambda c: _compact(c, st.path_slots[:, 0], st.path_slots), lambda c: c,
                             st.cache)
        st = st.replace(cache=cache)
    valid = jnp.arange(spec.capacity)[None, :] < st.num_new[:, None]
    return DecodeOutput(tokens=jnp.where(valid, st.tokens[:, :spec.capacity], -1), num_new=st.num_new,
                        step=st.step, steps=st.steps, accepted=st.accepted,
                        proposed=st.proposed, length=st.length, cache=st.cache)


def generate(spec: DecodeSpec, base, heads, prompt: Array, prompt_len: Array, cache: model.KVCache,
             max_new: Array, temperature: Array, top_p: Array, rng: Array, reused: Array | int = 0
             ) -> DecodeOutput:
    """A whole generation on device: `prefill`, `advance` to the end, `finish`.

    Args:
      spec: static description (tree, rule, capacity C, cache length S, stop ids).
      base, heads: parameters (heads may be None when the tree has no draft nodes).
      prompt: int32 [B, Tb] right-padded prompts; prompt_len: int32 [B] real lengths (1 <= len <= Tb).
      cache: a KV cache of S slots (donated; contents beyond the first `reused` slots are ignored).
      max_new: int32 [] tokens to generate at most (<= C); temperature, top_p: float32 [].
      rng: PRNG key.
      reused: int32 []: the first `reused` prompt tokens' keys and values are already in `cache` (slots
        [0, reused)), below every prompt length; only the chunked prefill skips them (`_prefill_forward`).
    Returns the outputs and the cache, whose slots [0, length) then hold the keys and values of the prompt and
    every token the last step built on (batch 1: exactly; a row that finished while others ran may have had
    later steps' compactions overwrite its slots).
    """
    global _traces
    _traces += 1
    st = prefill(spec, base, heads, prompt, prompt_len, cache, max_new, temperature, top_p, rng, reused)
    return finish(spec, advance(spec, base, heads, st, max_new, temperature, top_p))


@struct.dataclass
class View:
    """What a streaming host reads after each segment (fresh buffers: the state itself is donated onward).

    Attributes:
      tokens: int32 [B, C + D + 1]; emitted tokens so far (`DecodeState.tokens`).
      num_new: int32 [B]; tokens emitted so far.
      over: bool []; every sequence is done or the capacity is reached: no later segment changes anything.
    """

    tokens: Array
    num_new: Array
    over: Array


def _view(spec: DecodeSpec, st: DecodeState) -> View:
    return View(tokens=st.tokens, num_new=st.num_new, over=jnp.all(st.done) | (st.step >= spec.capacity))


def _start(spec: DecodeSpec, *args) -> tuple[DecodeState, View]:
    global _traces
    _traces += 1
    st = prefill(spec, *args)
    return st, _view(spec, st)


def _advance(spec: DecodeSpec, steps: int, base, heads, st: DecodeState, max_new: Array, temperature: Array,
             top_p: Array) -> tuple[DecodeState, View]:
    st = advance(spec, base, heads, st, max_new, temperature, top_p, steps)
    return st, _view(spec, st)


generate_jit = jax.jit(generate, static_argnums=0, donate_argnums=5)
# Streaming: start_jit(spec, *generate's arguments) -> (state, view); advance_jit(spec, steps, base, heads, state,
# max_new, temperature, top_p) -> (state, view) runs `steps` more steps; finish_jit (below) -> DecodeOutput.
start_jit = jax.jit(_start, static_argnums=0, donate_argnums=5)
advance_jit = jax.jit(_advance, static_argnums=(0, 1), donate_argnums=4)
finish_jit = jax.jit(lambda spec, cache, st: finish(spec, st.replace(cache=cache)), static_argnums=0,
                     donate_argnums=1)  # finish_jit(spec, state.cache, state.replace(cache=None)): the cache donated

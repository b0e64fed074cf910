"""Which drafted tree tokens to accept, and the bonus token that becomes the next root.

Every rule takes the tree tokens [B, N] of one verification pass and the base logits [B, N, V] at those nodes
(the logits at node j predict the token after node j) and returns an `Accepted`: the accepted path's nodes, the
number `a` of accepted draft tokens, and the bonus token drawn at the last accepted node. A step emits the `a`
accepted drafts plus the bonus token; the root itself was emitted by the previous step (or the prefill).

Rules:

* `greedy` (temperature 0): draft node j is correct iff its token equals the argmax of the base logits at its
  parent. A path's accept length is its number of leading correct nodes (only nodes before `path_len`: padding is
  never accepted); the first path of maximal length wins; the bonus is the argmax at its last accepted node.
  The output is token-for-token plain greedy decoding.

* `typical` (the original's typical acceptance, made temperature-aware): with p_T = softmax(logits / T) at the
  parent (no top-p) and H its entropy (-sum p log(p + 1e-5), as the original), draft token x is accepted iff
  p_T(x) > min(epsilon, delta * exp(-H)) (strict; defaults epsilon 0.09, delta 0.3). The best path is the
  longest, ties broken by the largest sum of log p_T over its accepted tokens. Unlike the original, which takes
  the root greedily at every temperature (so its T > 0 output is deterministic), the bonus token (the next
  root) is SAMPLED from the shared target distribution (temperature + top-p, `sampling.target_probs`) at the
  last accepted node, so outputs keep the diversity of the temperature. At T = 0 the decoder uses `greedy`.

* `speculative_sample` (lossless): the drafts are deterministic top-k tokens, i.e. point-mass proposals, so
  speculative sampling reduces to recursive rejection over siblings. At a node with target distribution p
  (`target_probs`, exactly as plain sampling), the residual r starts as p; its children are tried in rank order:
  child token x is accepted with probability r(x) / sum(r); on rejection r(x) is set to 0 and the next child is
  tried. An accepted child becomes the current node (r restarts from its p); when every child is rejected or the
  node is a leaf, the bonus token is drawn from r. Each emitted token is then distributed exactly as under plain
  sampling from p (the standard speculative-sampling argument with q = a point mass at each tried token).

All loops (over depth D and over the children of a node) are static Python loops over vectorised [B, V] ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from infer import sampling
from medusa_jax.tree import TreeBuffers

Array = jax.Array


@struct.dataclass
class Accepted:
    """The outcome of verifying one tree.

    Attributes:
      nodes: int32 [B, D+1]; tree nodes of the accepted path, root first. Entries after index `length` are
        stale (valid node indices, to be ignored).
      length: int32 [B]; accepted draft tokens a in [0, D].
      next_token: int32 [B]; the bonus token predicted at node nodes[length], the next step's root.
      proposed: int32 [B]; draft tokens proposed on the chosen path, for the acceptance rate length / proposed:
        the chosen path's depth for `greedy` and `typical`; for `speculative_sample` the drafts tried in order
        along the walk (length, plus one when the walk stopped at a node with children).
    """

    nodes: Array
    length: Array
    next_token: Array
    proposed: Array


def _rows(batch: int) -> Array:
    return jnp.arange(batch)[:, None]


def _pick_path(tree: TreeBuffers, accept_len: Array, best: Array) -> tuple[Array, Array]:
    """accept_len [B, P], best [B] -> (nodes [B, D+1], a [B])."""
    rows = jnp.arange(best.shape[0])
    return jnp.asarray(tree.paths)[best], accept_len[rows, best]


def _path_accept_length(tree: TreeBuffers, node_ok: Array) -> Array:
    """Per-path accept length [B, P] from per-node acceptance [B, N] (root entry ignored)."""
    paths = jnp.asarray(tree.paths)  # [P, D+1]
    real = np.arange(1, tree.max_depth + 1)[None, :] < tree.path_len[:, None]  # [P, D]; False on padding
    ok = node_ok[:, paths[:, 1:]] & real  # [B, P, D]
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)


def _path_depth(tree: TreeBuffers, best: Array) -> Array:
    """Draft tokens on path `best` [B] -> int32 [B]."""
    return jnp.asarray(tree.path_len - 1, jnp.int32)[best]


def greedy(tree: TreeBuffers, tokens: Array, logits: Array) -> Accepted:
    """Greedy verification. tokens [B, N] int32, logits [B, N, V] -> Accepted."""
    b = tokens.shape[0]
    pred = sampling.greedy_token(logits)  # [B, N]: the base's greedy choice after each node
    if tree.max_depth == 0:
        zeros = jnp.zeros((b,), jnp.int32)
        return Accepted(nodes=zeros[:, None], length=zeros, next_token=pred[:, 0], proposed=zeros)
    parent = np.maximum(tree.parent, 0)
    node_ok = tokens == pred[:, parent]  # [B, N]
    accept_len = _path_accept_length(tree, node_ok)  # [B, P]
    best = jnp.argmax(accept_len, axis=-1)  # first path of maximal length
    nodes, a = _pick_path(tree, accept_len, best)
    last = nodes[jnp.arange(b), a]
    return Accepted(nodes=nodes, length=a, next_token=pred[jnp.arange(b), last], proposed=_path_depth(tree, best))


def typical(tree: TreeBuffers, key: Array, tokens: Array, logits: Array, temperature: Array, top_p: Array,
            use_top_p: bool, epsilon: float, delta: float) -> Accepted:
    """Typical acceptance at temperature T > 0 (see the module docstring). Returns Accepted."""
    b = tokens.shape[0]
    rows = jnp.arange(b)
    if tree.max_depth == 0:
        nodes = jnp.zeros((b, 1), jnp.int32)
        length = proposed = jnp.zeros((b,), jnp.int32)
    else:
        logp = sampling.tempered_log_probs(logits, temperature)  # [B, N, V]
        probs = jnp.exp(logp)
        entropy = -jnp.sum(probs * jnp.log(probs + 1e-5), axis=-1)  # [B, N]
        threshold = jnp.minimum(epsilon, delta * jnp.exp(-entropy))  # [B, N]
        parent = np.maximum(tree.parent, 0)
        q_logp = logp[_rows(b), parent[None, :], tokens]  # [B, N]: log p_T(token | parent)
        node_ok = jnp.exp(q_logp) > threshold[:, parent]
        accept_len = _path_accept_length(tree, node_ok)  # [B, P]
        paths = jnp.asarray(tree.paths)
        within = jnp.arange(tree.max_depth)[None, None, :] < accept_len[:, :, None]  # [B, P, D]
        score = jnp.sum(jnp.where(within, q_logp[:, paths[:, 1:]], 0.0), axis=-1)  # [B, P]
        longest = accept_len == jnp.max(accept_len, axis=-1, keepdims=True)
        best = jnp.argmax(jnp.where(longest, score, -jnp.inf), axis=-1)
        nodes, length = _pick_path(tree, accept_len, best)
        proposed = _path_depth(tree, best)
    last = nodes[rows, length]
    probs_last = sampling.target_probs(logits[rows, last], temperature, top_p, use_top_p)  # [B, V]
    return Accepted(nodes=nodes, length=length, next_token=sampling.sample_from(key, probs_last), proposed=proposed)


def speculative_sample(tree: TreeBuffers, key: Array, tokens: Array, logits: Array, temperature: Array,
                       top_p: Array, use_top_p: bool) -> Accepted:
    """Lossless recursive rejection sampling over the tree (see the module docstring). Returns Accepted."""
    b, _, v = logits.shape
    rows = jnp.arange(b)
    vocab = jnp.arange(v, dtype=jnp.int32)[None, :]
    children = jnp.asarray(tree.children)  # [N, C], -1 padded
    # Widest fan-out among the nodes of each depth: deeper levels usually try far fewer children.
    fan_out = [int(tree.num_children[tree.depth == d].max()) for d in range(tree.max_depth)]
    keys = jax.random.split(key, 1 + sum(fan_out))
    key_i = 1

    cur = jnp.zeros((b,), jnp.int32)  # current node
    walking = jnp.ones((b,), bool)  # still descending
    length = jnp.zeros((b,), jnp.int32)
    visited = [cur]
    residual = sampling.target_probs(logits[:, 0], temperature, top_p, use_top_p)  # [B, V]
    for d in range(tree.max_depth):
        kids = children[cur]  # [B, C]
        moved = jnp.zeros((b,), bool)
        nxt = cur
        for i in range(fan_out[d]):
            child = kids[:, i]
            trying = walking & ~moved & (child >= 0)
            x = tokens[rows, jnp.maximum(child, 0)]  # [B]
            u = jax.random.uniform(keys[key_i], (b,))
            key_i += 1
            take = trying & (u * jnp.sum(residual, axis=-1) < residual[rows, x])
            reject = trying & ~take
            residual = jnp.where(reject[:, None] & (vocab == x[:, None]), 0.0, residual)
            nxt = jnp.where(take, child, nxt)
            moved = moved | take
        walking = walking & moved
        cur = nxt
        length = length + moved.astype(jnp.int32)
        visited.append(cur)
        fresh = sampling.target_probs(logits[rows, cur], temperature, top_p, use_top_p)
        residual = jnp.where(moved[:, None], fresh, residual)
    nodes = jnp.stack(visited, axis=1)  # [B, D+1]; after a stop the last node repeats (stale entries)
    stopped_early = jnp.asarray(tree.num_children)[cur] > 0  # a child was tried and rejected
    return Accepted(nodes=nodes, length=length, next_token=sampling.sample_from(keys[0], residual),
                    proposed=length + stopped_early.astype(jnp.int32))

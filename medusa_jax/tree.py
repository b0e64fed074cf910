"""Medusa token trees: specs, validation, the static index buffers, and greedy tree growth.

A tree is a list of paths over head ranks: path `(a, b)` is "rank-a token of head 0, then rank-b token of head 1".
The root (node 0) is the base model's own next token and is implicit. Everything here is host-side numpy computed
once per tree; the decoding step closes over the resulting `TreeBuffers` as static data.

Node order follows the original (`generate_medusa_buffers`): root first, then `sorted(paths, key=(len, path))`,
i.e. depth-major then lexicographic, so a node's children follow it and siblings appear in rank order.

A tree may also carry a lookup branch (`build_tree(..., lookup=L)`): a chain of L nodes under the root whose tokens
are not a head's guesses but the tokens that followed the latest earlier occurrence of the context's last few
tokens (`infer.lookup`). Its nodes come after the heads' nodes; verification treats them like any other branch.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import json
from typing import Sequence, Union

import numpy as np

from medusa_jax.errors import MedusaError
from medusa_jax.trees_named import NAMED_TREES, Path

# What `resolve_tree` accepts: a built-in name or "chain:N" / "dense:7,6" / "ar"; a v0.1 dense list like [1, 7, 6];
# or an explicit list of paths.
TreeSpec = Union[str, Sequence[int], Sequence[Sequence[int]]]

DEFAULT_TOPK = 10  # the original's TOPK: each head always offers its top-10, whatever the tree uses.


class TreeError(MedusaError):
    """A tree spec that is malformed or that the heads cannot serve. Subclass of ValueError; message is one line."""


# --------------------------------------------------------------------------------------------------- tree specs


def chain(n: int) -> list[Path]:
    """The greedy chain `[(0,), (0, 0), ...]` of depth n: one draft token per head (n = 0 is plain decoding)."""
    if n < 0:
        raise TreeError(f"chain length must be >= 0, got {n}")
    return [(0,) * d for d in range(1, n + 1)]


def dense(widths: Sequence[int]) -> list[Path]:
    """Cartesian tree: top-widths[0] of head 0, each followed by top-widths[1] of head 1, and so on.

    `dense([7, 6])` has 7 + 42 = 49 draft nodes (the v0.1 `[1, 7, 6]` spec without its root entry).
    """
    if any(int(w) < 1 for w in widths):
        raise TreeError(f"dense tree widths must all be >= 1, got {list(widths)}")
    paths: list[Path] = []
    for d in range(1, len(widths) + 1):
        paths.extend(itertools.product(*(range(int(w)) for w in widths[:d])))
    return paths


def _parse_ints(text: str, spec: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TreeError(f"cannot parse tree spec {spec!r}: expected comma-separated integers after the colon") from None


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def resolve_tree(spec: TreeSpec) -> list[Path]:
    """Turns any tree spec into a validated list of paths (tuples), in the order given.

    Accepted: a built-in name (see `NAMED_TREES`); "ar" or "" (no draft nodes); "chain:N"; "dense:7,6";
    a v0.1 dense list of ints whose first entry is the root count 1 (`[1, 7, 6]`); an explicit list of paths;
    either list as JSON text (a string starting with "[", as a command line passes it). Checks structure only;
    `build_tree` also checks the tree against the number of heads and top-k.
    """
    if isinstance(spec, str):
        s = spec.strip()
        if s in ("", "ar"):
            return []
        if s.startswith("["):
            try:
                return resolve_tree(json.loads(s))
            except json.JSONDecodeError as e:
                raise TreeError(f"tree {spec!r} is not valid JSON ({e.msg}); write paths like [[0],[0,0],[1]]") from None
        if s in NAMED_TREES:
            return list(NAMED_TREES[s])
        kind, sep, rest = s.partition(":")
        if sep and kind == "chain":
            n = _parse_ints(rest, spec)
            if len(n) != 1:
                raise TreeError(f"cannot parse tree spec {spec!r}: write chain:N, e.g. chain:4")
            return chain(n[0])
        if sep and kind == "dense":
            return dense(_parse_ints(rest, spec))
        known = ", ".join(sorted(NAMED_TREES))
        raise TreeError(f"unknown tree {spec!r}; known trees: {known}; or use ar, chain:N, dense:W1,W2,...")
    if not isinstance(spec, (Sequence, np.ndarray)):
        raise TreeError(f"bad tree spec {spec!r}: pass a tree name, chain:N, dense:7,6, [1, 7, 6] or a list of paths")
    items = list(spec)
    if items and all(_is_int(x) for x in items):
        # v0.1 format: entry 0 counts root tokens, so it must be 1; the rest are per-depth widths.
        if int(items[0]) != 1:
            raise TreeError(
                f"bad dense tree spec {items}: the first entry is the root count and must be 1, e.g. [1, 7, 6]"
            )
        return dense([int(w) for w in items[1:]])
    paths: list[Path] = []
    for p in items:
        if isinstance(p, str) or not isinstance(p, (Sequence, np.ndarray)) or not all(_is_int(x) for x in p):
            raise TreeError(f"bad tree path {p!r}: each path must be a list of integer ranks, e.g. [0, 1]")
        paths.append(tuple(int(x) for x in p))
    validate_tree(paths)
    return paths


def tree_option(text: str | None, num_heads: int | None = None) -> list[Path] | None:
    """A `--tree` command-line value as validated paths (None when the flag was not given); errors are one
    line prefixed with the flag."""
    if text is None:
        return None
    try:
        paths = resolve_tree(text)
        if num_heads is not None:
            validate_tree(paths, num_heads)
    except TreeError as e:
        raise TreeError(f"--tree: {e}") from None
    return paths


def validate_tree(paths: Sequence[Path], num_heads: int | None = None, topk: int | None = None) -> None:
    """Raises TreeError (one line) unless `paths` is a prefix-closed set of rank paths the heads can serve.

    With `num_heads`/`topk` given, also checks depth <= num_heads and every rank < topk.
    """
    seen: set[Path] = set()
    for p in paths:
        if len(p) == 0:
            raise TreeError("empty path [] in the tree: the root is implicit; use 'ar' for a tree without draft nodes")
        if min(p) < 0:
            raise TreeError(f"negative rank in path {list(p)}: ranks index each head's top-k and start at 0")
        if p in seen:
            raise TreeError(f"duplicate path {list(p)} in the tree")
        seen.add(p)
    for p in paths:
        for d in range(1, len(p)):
            if p[:d] not in seen:
                raise TreeError(f"path {list(p)} needs its prefix {list(p[:d])}, which is not in the tree; add it")
    if topk is not None:
        if topk < 1:
            raise TreeError(f"topk must be >= 1, got {topk}")
        for p in paths:
            if max(p) >= topk:
                raise TreeError(
                    f"rank {max(p)} in path {list(p)} is out of range: "
                    f"the heads give only top-{topk} (ranks 0..{topk - 1})"
                )
    if num_heads is not None:
        depth = max((len(p) for p in paths), default=0)
        if depth > num_heads:
            raise TreeError(
                f"tree depth {depth} needs at least {depth} Medusa heads, the model has {num_heads}; "
                f"pick a shallower tree such as {_shallow_suggestions(num_heads)}"
            )


def _shallow_suggestions(num_heads: int) -> str:
    if num_heads == 0:
        return "ar"
    fits = [n for n, t in NAMED_TREES.items() if max(len(p) for p in t) <= num_heads]
    return " or ".join([f"chain:{num_heads}", f"dense:{','.join(['3'] * min(num_heads, 2))}", *fits])


# ------------------------------------------------------------------------------------------------ tree buffers


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TreeBuffers:
    """Static index arrays for one tree (N nodes incl. the root, P root-to-leaf paths, max depth D).

    Equality and hashing use only (choices, num_heads, topk, lookup), which determine every array, so a
    TreeBuffers can be a static argument of `jax.jit`. Arrays are read-only.

    Attributes:
      choices: the draft paths sorted by (len, path); node i in [1, len(choices)] is choices[i - 1].
      num_heads, topk: K heads, each offering its top-`topk` tokens.
      lookup: L, nodes of the lookup chain under the root (nodes len(choices) + 1 .. len(choices) + L, depths 1..L).
      head_depth: Kd, the deepest head path (heads 0..Kd-1 are the ones the tree reads; 0 without head paths).
      num_nodes, num_paths, max_depth: N, P, D (D = max(Kd, L)).
      attn_mask: bool [N, N]; row i is True at i, its ancestors and the root (node 0).
      depth: int32 [N]; root 0, else len(path). Position id of node i is n + depth[i] (n = tokens cached).
      candidate_index: int32 [N]; index into the flat candidates `[root, head0_top{topk}, ..., head{Kd-1}_top{topk},
        lookup_1, ..., lookup_L]` (length 1 + Kd*topk + L): root -> 0, path p -> 1 + (len(p)-1)*topk + p[-1] (the
        original's tree_indices), lookup node at depth d -> 1 + Kd*topk + d - 1.
      head_index, rank_index: int32 [N-1]; for non-root node i, its token is top-k[head_index[i-1], rank_index[i-1]]
        (-1 and the depth - 1 for lookup nodes).
      parent: int32 [N]; root -> -1, depth-1 nodes -> 0.
      paths: int32 [P, D+1]; node indices of each root-to-leaf path, root first, in the original's
        retrieve_indices order (deepest / last-sorted leaf first). Entries at j >= path_len[p] are padding equal to
        the path's last real node: always a valid index, but MEANINGLESS — consumers must mask with path_len.
        (The original pads with -1, which silently reads the last tree node and token id 0.)
      path_len: int32 [P]; nodes on each path including the root (1..D+1).
      children: int32 [N, C]; children of each node in rank order, -1 padded (C = max(1, max children)).
      num_children: int32 [N].
    """

    choices: tuple[Path, ...]
    num_heads: int
    topk: int
    lookup: int
    head_depth: int
    num_nodes: int
    num_paths: int
    max_depth: int
    attn_mask: np.ndarray
    depth: np.ndarray
    candidate_index: np.ndarray
    head_index: np.ndarray
    rank_index: np.ndarray
    parent: np.ndarray
    paths: np.ndarray
    path_len: np.ndarray
    children: np.ndarray
    num_children: np.ndarray

    @property
    def num_candidates(self) -> int:
        """Length of the decoder's flat candidate vector: 1 + head_depth * topk + lookup."""
        return 1 + self.head_depth * self.topk + self.lookup

    def _key(self) -> tuple:
        return (self.choices, self.num_heads, self.topk, self.lookup)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TreeBuffers) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"TreeBuffers(N={self.num_nodes}, P={self.num_paths}, D={self.max_depth}, "
            f"num_heads={self.num_heads}, topk={self.topk}, lookup={self.lookup})"
        )


def _frozen(a: np.ndarray) -> np.ndarray:
    # Buffers are shared through a hash keyed on the tree, so an in-place edit would silently desync them.
    a.setflags(write=False)
    return a


MAX_LOOKUP = 16  # longest lookup chain `build_tree` accepts


def check_lookup(value: object, name: str = "lookup") -> int:
    """A lookup chain length (`build_tree(lookup=...)`) as an int; a one-line `TreeError` naming `name` (the
    argument, option or file entry it came from) otherwise."""
    if not _is_int(value) or not 0 <= value <= MAX_LOOKUP:
        raise TreeError(f"{name} must be an integer from 0 to {MAX_LOOKUP} (draft tokens copied from the context "
                        f"per step; 0 for none), got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=64)
def without_lookup(tree: TreeBuffers) -> TreeBuffers:
    """The same tree without its lookup chain (the root alone for a chain alone): what a step runs when the
    context offers the chain nothing to copy."""
    return build_tree(list(tree.choices), num_heads=tree.num_heads if tree.choices else 0,
                      topk=tree.topk if tree.choices else 1)


def build_tree(spec: TreeSpec, num_heads: int, topk: int = DEFAULT_TOPK, lookup: int = 0) -> TreeBuffers:
    """Builds the static buffers for a tree spec (anything `resolve_tree` accepts) served by `num_heads` heads,
    plus a lookup chain of `lookup` nodes under the root (0: none; see the module docstring)."""
    if num_heads < 0:
        raise TreeError(f"num_heads must be >= 0, got {num_heads}")
    lookup = check_lookup(lookup)
    paths = resolve_tree(spec)
    validate_tree(paths, num_heads=num_heads, topk=topk)
    choices = tuple(sorted(paths, key=lambda p: (len(p), p)))
    m = len(choices)
    n = m + 1 + lookup
    node_of: dict[Path, int] = {(): 0, **{p: i + 1 for i, p in enumerate(choices)}}
    head_depth = max((len(p) for p in choices), default=0)

    chain_depths = np.arange(1, lookup + 1)
    depth = np.concatenate([[0], [len(p) for p in choices], chain_depths]).astype(np.int32)
    # The lookup chain: node m + d at depth d, under the root (d = 1) or the chain's previous node.
    parent = np.concatenate([[-1], [node_of[p[:-1]] for p in choices],
                             np.where(chain_depths == 1, 0, m + chain_depths - 1)]).astype(np.int32)
    head_index = np.concatenate([[len(p) - 1 for p in choices], np.full(lookup, -1)]).astype(np.int32)
    rank_index = np.concatenate([[p[-1] for p in choices], chain_depths - 1]).astype(np.int32)
    # Fixed stride `topk` per head, independent of the tree's branching (reference §6 item 9); the lookup tokens
    # follow the heads' Kd * topk candidates.
    candidate_index = np.concatenate([[0], 1 + head_index[:m] * topk + rank_index[:m],
                                      1 + head_depth * topk + chain_depths - 1]).astype(np.int32)

    attn_mask = np.eye(n, dtype=bool)
    attn_mask[:, 0] = True
    for i, p in enumerate(choices, start=1):
        for d in range(1, len(p)):
            attn_mask[i, node_of[p[:d]]] = True
    for d in chain_depths:
        attn_mask[m + d, m + 1:m + d] = True  # the chain's earlier nodes

    kids: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        kids[parent[i]].append(i)  # ascending node index == ascending rank among siblings
    num_children = np.array([len(k) for k in kids], dtype=np.int32)
    children = np.full((n, max(1, int(num_children.max()))), -1, dtype=np.int32)
    for i, k in enumerate(kids):
        children[i, : len(k)] = k

    # The original emits, walking sorted choices backwards, every path not a prefix of one already emitted; since
    # descendants sort after their ancestors, that is exactly the leaves in descending node order.
    leaves = [i for i in range(n - 1, -1, -1) if num_children[i] == 0]
    max_depth = int(depth.max())
    paths_arr = np.empty((len(leaves), max_depth + 1), dtype=np.int32)
    for row, leaf in enumerate(leaves):
        chain_nodes = [leaf]
        while chain_nodes[-1] != 0:
            chain_nodes.append(int(parent[chain_nodes[-1]]))
        chain_nodes.reverse()
        paths_arr[row] = chain_nodes + [leaf] * (max_depth + 1 - len(chain_nodes))
    path_len = depth[leaves] + 1

    return TreeBuffers(
        choices=choices,
        num_heads=num_heads,
        topk=topk,
        lookup=lookup,
        head_depth=head_depth,
        num_nodes=n,
        num_paths=len(leaves),
        max_depth=max_depth,
        attn_mask=_frozen(attn_mask),
        depth=_frozen(depth),
        candidate_index=_frozen(candidate_index),
        head_index=_frozen(head_index),
        rank_index=_frozen(rank_index),
        parent=_frozen(parent),
        paths=_frozen(paths_arr),
        path_len=_frozen(path_len.astype(np.int32)),
        children=_frozen(children),
        num_children=_frozen(num_children),
    )


# ------------------------------------------------------------------------------------------------- tree growth


def _check_accuracy(accuracy: np.ndarray) -> np.ndarray:
    acc = np.asarray(accuracy, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[0] < 1 or acc.shape[1] < 1:
        raise TreeError(f"accuracy must be a [num_heads, num_ranks] array, got shape {acc.shape}")
    if not np.all(np.isfinite(acc)) or acc.min() < 0 or acc.max() > 1:
        raise TreeError("accuracy entries must be probabilities in [0, 1] (per-head, per-rank hit rates)")
    return acc


def _path_value(acc: np.ndarray, p: Path) -> float:
    # Independence assumption: the path survives iff every head's rank-p[d] guess is right.
    return float(np.prod([acc[d, r] for d, r in enumerate(p)]))


def grow_tree(accuracy: np.ndarray, num_nodes: int, max_depth: int | None = None) -> list[Path]:
    """Greedy tree growth of the original's tuner (`medusa/eval/gen_results.py`).

    Starting from (0,), repeatedly adds the frontier node with the largest expected value prod_d acc[d, p[d]],
    where the frontier is every tree node's next-higher sibling rank and its rank-0 child (if depth < max_depth).
    Exact ties resolve as in the original's scan; unlike it, all-zero frontiers do not crash.

    Args:
      accuracy: float [K, R]; accuracy[k, r] = P(rank r of head k is the correct token). Ranks are < R, so pass
        accuracy[:, :topk] to get a tree `build_tree(..., topk=topk)` accepts.
      num_nodes: number of draft (non-root) nodes to return; 63 reproduces the original's 64-token trees.
      max_depth: deepest path allowed; defaults to K (one head per depth).
    Returns:
      paths in the order they were added; every prefix of that list is itself a valid tree.
    """
    acc = _check_accuracy(accuracy)
    depth_cap = acc.shape[0] if max_depth is None else max_depth
    if not 0 <= depth_cap <= acc.shape[0]:
        raise TreeError(f"max_depth must be in [0, {acc.shape[0]}] (the accuracy table's heads), got {max_depth}")
    if num_nodes < 0:
        raise TreeError(f"num_nodes must be >= 0, got {num_nodes}")
    out: list[Path] = []
    # Max-heap on value. Ties break like the original's scan (accepted nodes in the order they were added, each
    # offering its sibling before its child; first strictly-best wins): key = (-value, generator's index, kind).
    frontier: list[tuple[float, int, int, Path]] = []
    if depth_cap >= 1:
        frontier.append((-_path_value(acc, (0,)), -1, 0, (0,)))
    while len(out) < num_nodes:
        if not frontier:
            raise TreeError(
                f"cannot grow {num_nodes} nodes: only {len(out)} exist "
                f"with max_depth={depth_cap} and {acc.shape[1]} ranks"
            )
        p = heapq.heappop(frontier)[-1]
        out.append(p)
        # Each candidate has exactly one generator (its lower sibling or, for rank 0, its parent): no duplicates.
        if p[-1] + 1 < acc.shape[1]:
            q = p[:-1] + (p[-1] + 1,)
            heapq.heappush(frontier, (-_path_value(acc, q), len(out) - 1, 0, q))
        if len(p) < depth_cap:
            q = p + (0,)
            heapq.heappush(frontier, (-_path_value(acc, q), len(out) - 1, 1, q))
    return out


def grow_tree_sequence(accuracy: np.ndarray, max_nodes: int, max_depth: int | None = None) -> list[list[Path]]:
    """Greedy trees of every size 1..max_nodes: element k-1 has k draft nodes.

    Greedy growth is incremental, so these are the prefixes of one `grow_tree` run.
    """
    order = grow_tree(accuracy, max_nodes, max_depth)
    return [order[:k] for k in range(1, max_nodes + 1)]


def expected_accept_length(paths: Sequence[Sequence[int]], accuracy: np.ndarray) -> float:
    """Expected number of accepted draft tokens per step, sum over nodes of prod_d acc[d, p[d]] (independence).

    Add 1 for the base model's own token to get expected tokens per step.
    """
    acc = _check_accuracy(accuracy)
    total = 0.0
    for p in paths:
        p = tuple(int(x) for x in p)
        if len(p) > acc.shape[0] or (p and max(p) >= acc.shape[1]):
            raise TreeError(f"path {list(p)} is outside the accuracy table of shape {acc.shape}")
        total += _path_value(acc, p) if p else 0.0
    return total

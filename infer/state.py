"""The decoding loop's carry and its static description.

Shape legend: B batch, S cache slots, C output capacity (max new tokens, bucketed), D tree depth, Kd heads the
tree uses, k top-k per head, N tree nodes.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import struct

from medusa_jax.config import HeadsConfig, LlamaConfig
from medusa_jax.model import KVCache
from medusa_jax.tree import TreeBuffers

Array = jax.Array

MODES = ("greedy", "typical", "sample", "ar")

# `DecodeSpec.fused_head_rows`' default. A second pass over SmolLM2's 113 MB output projection costs as much as a
# one-row pass, and the CPU kernel's product costs about the same for 1 to 6 rows but more from there (a 3-node
# chain, 9 rows, measured no faster in one pass: BENCHMARKS.md, "One pass over the output projection"). Read when
# a plan is made (tests change it).
FUSED_HEAD_ROWS = 6


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Everything static about one compiled generation (hashable: a `jax.jit` static argument).

    Attributes:
      config: the base model.
      heads_config: the bundle's heads, or None when the tree has no draft nodes.
      tree: the draft tree (the root-only tree for plain decoding).
      rule: acceptance rule actually run: "greedy" (also every mode at T = 0), "typical" or "sample"
        ("ar" at T > 0 is "sample" over the root-only tree).
      use_top_p: apply the nucleus filter (top_p < 1).
      capacity: C, the output buffer length (max new tokens rounded up to a bucket).
      cache_len: S, KV cache slots.
      stop_ids: token ids that end a sequence (emitted, then the sequence stops).
      epsilon, delta: typical acceptance parameters.
      live_window: decoding steps and prefill chunks attend over the live window of the cache only
        (`model.window_sizes`, one `lax.switch` per layer); False makes steps read every slot and chunks the
        prompt bucket's slots (a measurement baseline: `bench/gpu_7b.py --full-window`).
      prefill_chunk: c, tokens per prefill forward: the prompt bucket Tb (a multiple of c when larger) runs as
        ceil((longest prompt - reused prefix) / c) forwards of c tokens in a loop, so the prefill costs what the
        new tokens need rather than the prompt's power-of-two bucket; 0 (or c >= Tb) runs one forward over the
        whole bucket.
      fused_head_rows: most output-projection rows (B * N * (1 + Kd)) for which a step gets the base logits at
        its N nodes and the heads' logits at all of them from one pass over the shared projection, instead of a
        second pass for the heads at the accepted node (`decode._fuse_heads`); 0 never fuses.
    """

    config: LlamaConfig
    heads_config: HeadsConfig | None
    tree: TreeBuffers
    rule: str
    use_top_p: bool
    capacity: int
    cache_len: int
    stop_ids: tuple[int, ...]
    epsilon: float = 0.09
    delta: float = 0.3
    live_window: bool = True
    prefill_chunk: int = 0
    fused_head_rows: int = FUSED_HEAD_ROWS

    @property
    def num_heads_used(self) -> int:
        """Kd: heads needed to fill the tree (head d-1 drafts depth d; the lookup branch needs none)."""
        return self.tree.head_depth


@struct.dataclass
class DecodeState:
    """Loop carry of one batched generation.

    Attributes:
      cache: per-layer (keys [B*Kv, Dh, S], values [B*Kv, S, Dh]).
      length: int32 [B]; tokens in the cache. The root, already emitted, sits at position `length`.
      root: int32 [B]; the next tree's root token.
      drafts: int32 [B, Kd, k]; each head's top-k tokens from the hidden state at the last accepted node.
      path_slots: int32 [B, D+1]; cache slots of the previous step's accepted path, root first, still to be
        moved to slots [length - a - 1, length - a + D) (the KV compaction, deferred to the next step).
      tokens: int32 [B, C + D + 1]; emitted tokens; each step writes a whole D+1 chunk at `num_new`, so the buffer
        has D+1 slots of slack (also the write target of finished sequences).
      num_new: int32 [B]; tokens emitted so far.
      done: bool [B]; the sequence stopped (stop token, max_new_tokens, or no room for another tree).
      step: int32 []; decoding steps run (the prefill is not a step).
      steps: int32 [B]; steps in which each sequence was still running.
      accepted: int32 [B, C]; draft tokens accepted at each step (-1 once the sequence is done).
      proposed: int32 [B, C]; draft tokens proposed on the chosen path at each step (`acceptance.Accepted`).
      history: int32 [B, S + D + 2]; every token by position (the prompt, then each emitted token, the root at
        `length`), which the lookup branch searches (`infer.lookup`); [B, 0] for a tree without one.
      rng: PRNG key.
    """

    cache: KVCache
    length: Array
    root: Array
    drafts: Array
    path_slots: Array
    tokens: Array
    num_new: Array
    done: Array
    step: Array
    steps: Array
    accepted: Array
    proposed: Array
    history: Array
    rng: Array


@struct.dataclass
class DecodeOutput:
    """What one jitted generation returns (device arrays).

    Attributes:
      tokens: int32 [B, C]; generated tokens, -1 after `num_new`. A stop token, when hit, is included.
      num_new: int32 [B].
      step: int32 []; decoding steps run.
      steps: int32 [B]; steps each sequence took part in.
      accepted: int32 [B, C]; draft tokens accepted per step (-1 where the sequence was done).
      proposed: int32 [B, C]; draft tokens proposed on the chosen path per step (-1 where done).
      length: int32 [B]; final cache length (prompt + generated tokens, minus the last one, not yet cached).
      cache: the KV cache; slots [0, length) hold the keys and values of the prompt and the generated tokens
        but the last (exactly for batch 1: `decode.generate`), which `infer.api` reuses as a prefix cache.
    """

    tokens: Array
    num_new: Array
    step: Array
    steps: Array
    accepted: Array
    proposed: Array
    length: Array
    cache: KVCache

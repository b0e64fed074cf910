"""Checking and bucketing a generation call: arguments in, the static `DecodeSpec` of its compiled generation out.

Every bad argument is a one-line `MedusaError` naming the fix. Buckets: prompt length -> max(16, next power of
two) up to 1024, then multiples of 512; max_new_tokens -> the same power-of-two rule (the real limit is a runtime
argument); cache slots S = bucketed prompt + bucketed max_new + N (tree nodes) rounded up to a multiple of 128.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infer import state
from infer.state import DecodeSpec
from medusa_jax import chat, model, panels
from medusa_jax.bundle import Bundle
from medusa_jax.errors import MedusaError
from medusa_jax.tree import TreeBuffers, build_tree, check_lookup, resolve_tree

# A small tree (9 nodes) for CPU, where a forward of 8 tokens costs about twice one token: the top-3 of head 0;
# under its rank 0 the top-2 of head 1, under rank 1 the top-1; then a chain on the best path to depth 4. Cut to
# the heads available. Bundles may ship a tuned tree (`Bundle.tree`), which takes precedence.
DEFAULT_TREE = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0))
MEDUSA_MODES = ("greedy", "typical", "sample")


PREFILL_CHUNKS = (0, 16, 32, 64, 128, 256, 512)  # each divides every prompt bucket larger than itself


def default_prefill_chunk() -> int:
    """Tokens per prefill forward on the default JAX backend: 128 on a CPU, where a prefill is compute-bound
    from about 64 tokens on and padding to the power-of-two bucket cost up to 2x (BENCHMARKS.md, "Chunked
    prefill"); 512 on accelerators, where each chunk streams every weight again."""
    return 128 if jax.default_backend() == "cpu" else 512


def stream_steps() -> int:
    """Decoding steps per streamed segment (`infer.decode.advance_jit`) on the default JAX backend: 1 on a CPU,
    where a step takes tens of milliseconds and each token shows as it comes; 4 on accelerators, where a step
    takes a few and a host round trip per step would be a visible share of it (the host reads a segment's
    tokens while the next one runs, so the round trip itself is hidden)."""
    return 1 if jax.default_backend() == "cpu" else 4


def bucket(n: int) -> int:
    """The bucket of a prompt length or token budget (module docstring)."""
    if n <= 1024:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 512) * 512


def _check_heads(params: Bundle) -> None:
    """Heads must match the base: hidden size, vocabulary (own projection), head count."""
    hc, cfg = params.heads_config, params.config
    if hc is None:
        raise MedusaError("the bundle has heads but no heads_config; load heads with medusa_jax.load(heads=...)")
    kernel = np.shape(params.heads.get("res_0_kernel")) if isinstance(params.heads, dict) else None
    want = (hc.num_heads, cfg.hidden_size, cfg.hidden_size)
    if kernel != want:
        raise MedusaError(f"the Medusa heads do not match the base model: head kernel shape {kernel}, expected "
                          f"{want} (hidden size {cfg.hidden_size}); load heads trained for this base")
    if hc.projection == "own" and np.shape(params.heads.get("proj")) != (hc.num_heads, cfg.hidden_size,
                                                                           cfg.vocab_size):
        raise MedusaError(f"the Medusa heads' vocabulary projection {np.shape(params.heads.get('proj'))} does not "
                          f"match the base vocabulary of {cfg.vocab_size}; load heads trained for this base")


def _resolve_lookup(params: Bundle, lookup: int | None) -> int:
    """The lookup chain a call drafts: `lookup`, else the bundle's tuned one (`Bundle.lookup`)."""
    return params.lookup if lookup is None else check_lookup(lookup)


def _resolve_mode(params: Bundle, mode: str | None, temperature: float, lookup: int = 0) -> str:
    drafts = params.heads is not None or lookup > 0  # a lookup branch drafts without heads
    if mode is None:
        return ("greedy" if temperature == 0 else "sample") if drafts else "ar"
    if mode not in MEDUSA_MODES + ("ar",):
        raise MedusaError(f"unknown mode {mode!r}; use one of greedy, typical, sample, ar")
    if mode in MEDUSA_MODES and not drafts:
        raise MedusaError(f"mode {mode!r} needs Medusa heads or a lookup branch but the bundle has no heads; load "
                          f"heads (medusa_jax.load(..., heads=PATH)), pass lookup=N, or use mode 'ar'")
    if mode == "greedy" and temperature != 0:
        raise MedusaError(f"mode 'greedy' is for temperature 0, got {temperature}; use mode 'sample' or 'typical'")
    return mode


def resolve_tree_buffers(params: Bundle, mode: str, tree: Any = None, lookup: int = 0) -> TreeBuffers:
    """The tree a call runs: root-only for `ar`; else `tree`, the bundle's tree, or `DEFAULT_TREE` cut to the
    heads (none without heads), with a lookup chain of `lookup` nodes. Top-k is the largest rank used + 1 (each
    head offers no more tokens than the tree reads)."""
    if mode == "ar":
        if tree is not None and resolve_tree(tree.choices if isinstance(tree, TreeBuffers) else tree):
            raise MedusaError("mode 'ar' decodes without a tree; drop the tree argument or pick a Medusa mode")
        if lookup:
            raise MedusaError("mode 'ar' decodes without drafts; pass lookup=0 or pick a Medusa mode")
        return build_tree([], num_heads=0, topk=1)
    num_heads = params.heads_config.num_heads if params.heads is not None else 0
    if tree is None:
        paths = (list(params.tree) if params.tree is not None else
                 [p for p in DEFAULT_TREE if len(p) <= num_heads])
    else:
        paths = list(tree.choices) if isinstance(tree, TreeBuffers) else resolve_tree(tree)
    if paths and params.heads is None:
        raise MedusaError("the tree's head paths need Medusa heads but the bundle has none; load heads "
                          "(medusa_jax.load(..., heads=PATH)) or pass tree='ar' to draft from the lookup alone")
    # The root-only tree (no paths, no lookup) is plain decoding's, so it shares its executable.
    topk = max((max(p) + 1 for p in paths), default=1)
    return build_tree(paths, num_heads=num_heads if paths else 0, topk=topk, lookup=lookup)  # TreeError if too deep


def _as_batch(prompt_ids) -> list[list[int]]:
    arr = prompt_ids.tolist() if isinstance(prompt_ids, (np.ndarray, jax.Array)) else prompt_ids
    if isinstance(arr, (list, tuple)) and arr and all(isinstance(t, (int, np.integer)) for t in arr):
        arr = [arr]
    if isinstance(arr, str):
        raise MedusaError("generate_ids takes token ids, got a string; use generate for text prompts")
    if not isinstance(arr, (list, tuple)) or not arr:
        raise MedusaError("empty prompt: pass token ids as a list of lists of ints (one list per sequence)")
    out = []
    for i, seq in enumerate(arr):
        if not isinstance(seq, (list, tuple)) or not all(isinstance(t, (int, np.integer)) for t in seq):
            raise MedusaError(f"prompt {i} is not a list of token ids")
        if not seq:
            raise MedusaError(f"prompt {i} is empty; give at least one token")
        out.append([int(t) for t in seq])
    return out


def default_stop_ids(params: Bundle) -> tuple[int, ...]:
    """The config's EOS ids plus, with a tokenizer, its chat template's end-of-turn ids."""
    ids = list(params.config.eos_token_ids)
    if params.tokenizer is not None:
        try:
            ids += [i for i in chat.stop_token_ids(params.tokenizer) if i not in ids]
        except chat.ChatError:
            pass
    return tuple(ids)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked call of `infer.api.generate_ids`: the compiled generation's spec and its prompt arguments.

    Attributes:
      spec: the static description of the generation (the executable's key with the argument shapes).
      prompts: the prompts as lists of ids; max_new: new tokens at most (max_new_tokens capped by the context).
      heads: the heads the tree needs (None for plain decoding); padded: int32 [B, Tb] right-padded prompts.
    """

    spec: DecodeSpec
    prompts: list[list[int]]
    max_new: int
    heads: Any
    padded: np.ndarray  # int32 [B, Tb]

    def args(self, params: Bundle, cache: model.KVCache, max_new: int, seed: int, temperature: float,
             top_p: float, reused: int) -> tuple:
        """The positional arguments of `decode.generate` after its spec (the base weights packed for the CPU
        kernel where it applies: `panels.for_decoding`)."""
        return (panels.for_decoding(params.config, params.base), self.heads, jnp.asarray(self.padded),
                jnp.asarray([len(p) for p in self.prompts], jnp.int32), cache, jnp.int32(max_new),
                jnp.float32(temperature), jnp.float32(top_p), jax.random.PRNGKey(seed), jnp.int32(reused))


def make_plan(params: Bundle, prompt_ids, max_new_tokens: int, temperature: float, top_p: float,
              mode: str | None, tree: Any, stop_ids: Sequence[int] | None, cache_length: int | None,
              typical_epsilon: float, typical_delta: float, prefill_chunk: int | None,
              lookup: int | None = None) -> Plan:
    """Checks the arguments of `generate_ids` (one-line `MedusaError`s) and buckets them into a `DecodeSpec`."""
    if not isinstance(params, Bundle):
        raise MedusaError(f"params must be a medusa_jax Bundle (from medusa_jax.load), got {type(params).__name__}")
    cfg = params.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise MedusaError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise MedusaError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise MedusaError(f"top_p must be in (0, 1], got {top_p}")
    if prefill_chunk is None:
        prefill_chunk = default_prefill_chunk()
    if prefill_chunk not in PREFILL_CHUNKS:
        raise MedusaError(f"prefill_chunk must be 0 (one forward over the whole prompt) or one of "
                          f"{', '.join(map(str, PREFILL_CHUNKS[1:]))}, got {prefill_chunk!r}")
    chain = _resolve_lookup(params, lookup)
    mode = _resolve_mode(params, mode, temperature, chain)
    if params.heads is not None and mode != "ar":
        _check_heads(params)
    # Plain decoding ignores the bundle's tuned lookup chain, not one asked for.
    tree_buf = resolve_tree_buffers(params, mode, tree, chain if mode != "ar" or lookup is not None else 0)
    prompts = _as_batch(prompt_ids)
    lengths = [len(p) for p in prompts]
    context = cfg.max_position_embeddings
    if max(lengths) >= context:
        raise MedusaError(f"prompt of {max(lengths)} tokens does not fit the model's context of {context} tokens "
                          f"(it needs room for at least one new token); shorten the prompt")
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise MedusaError(f"token id {bad[0]} is outside the vocabulary of {cfg.vocab_size}")
    bad = [t for t in (stop_ids or ()) if not 0 <= t < cfg.vocab_size]
    if bad:
        raise MedusaError(f"stop id {bad[0]} is outside the vocabulary of {cfg.vocab_size}; pass ids of real tokens")
    max_new = int(min(max_new_tokens, context - max(lengths)))

    rule = "greedy" if temperature == 0 else ("typical" if mode == "typical" else "sample")
    tb, capacity, n = bucket(max(lengths)), bucket(max_new), tree_buf.num_nodes
    if cache_length is None:
        cache_length = -(-(tb + capacity + n) // 128) * 128
    elif cache_length < tb:
        raise MedusaError(f"cache_length {cache_length} is shorter than the padded prompt ({tb} tokens)")
    spec = DecodeSpec(
        config=cfg, heads_config=params.heads_config if tree_buf.head_depth else None, tree=tree_buf, rule=rule,
        use_top_p=top_p < 1, capacity=capacity, cache_len=int(cache_length),
        stop_ids=tuple(int(i) for i in (default_stop_ids(params) if stop_ids is None else stop_ids)),
        epsilon=float(typical_epsilon), delta=float(typical_delta),
        prefill_chunk=int(prefill_chunk), fused_head_rows=state.FUSED_HEAD_ROWS)
    padded = np.zeros((len(prompts), tb), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    return Plan(spec, prompts, max_new, params.heads if tree_buf.head_depth else None, padded)

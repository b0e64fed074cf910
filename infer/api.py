"""The user-facing generation API: prompts in, text (and stats) out.

`generate` renders chat prompts, `generate_ids` takes token ids (benchmarks, distillation, tests). Both pick the
mode and tree, bucket the shapes so similar calls reuse one compiled executable, and run `decode.generate` once.

Buckets: prompt length -> max(16, next power of two) up to 1024, then multiples of 512; max_new_tokens -> the same
power-of-two rule (the real limit is a runtime argument); cache slots S = bucketed prompt + bucketed max_new +
N (tree nodes) rounded up to a multiple of 128. The KV cache of each shape is kept after a call and donated to the
next one of the same shape, so repeated calls allocate nothing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infer import decode
from infer.state import DecodeSpec
from medusa_jax import chat, model
from medusa_jax.bundle import Bundle
from medusa_jax.errors import MedusaError
from medusa_jax.tree import TreeBuffers, build_tree, resolve_tree

# A small tree (9 nodes) for CPU, where a forward of 8 tokens costs about twice one token: the top-3 of head 0;
# under its rank 0 the top-2 of head 1, under rank 1 the top-1; then a chain on the best path to depth 4. Cut to
# the heads available. Bundles may ship a tuned tree (`Bundle.tree`), which takes precedence.
DEFAULT_TREE = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0))
MEDUSA_MODES = ("greedy", "typical", "sample")

_executables: dict[tuple, Any] = {}  # compiled generations by (spec, argument shapes)
_cache_pool: dict[tuple, Any] = {}  # a spare KV cache per (config, batch, slots, dtype), donated to the next call
_compiles = [0]


def compile_count() -> int:
    """Executables compiled by this process (a second similar call must not add one)."""
    return _compiles[0]


def clear_caches() -> None:
    """Drops compiled executables and the kept KV caches (frees their memory)."""
    _executables.clear()
    _cache_pool.clear()


@dataclasses.dataclass
class Generation:
    """Result of `generate_ids`.

    Attributes:
      tokens: per sequence, the generated ids (a final stop token included when one was hit).
      padded: int32 [B, max_new], -1 padded (max_new = max_new_tokens, capped by the model's context).
      steps: decoding steps run (tree verifications; the prefill is not counted).
      accepted: int32 [B, steps]; draft tokens accepted per step, -1 once a sequence had finished.
      proposed: int32 [B, steps]; draft tokens proposed on the chosen path per step (-1 likewise).
      finish: per sequence "stop" (stop token), "length" (max_new_tokens) or "capacity" (context full).
      wall_s: seconds of the generation itself (prefill + decoding + transfer; excludes compilation).
      compile_s: seconds spent compiling for this call (0 when reused).
    """

    tokens: list[list[int]]
    padded: np.ndarray
    steps: int
    accepted: np.ndarray
    proposed: np.ndarray
    finish: list[str]
    wall_s: float
    compile_s: float

    @property
    def new_tokens(self) -> int:
        return int(sum(len(t) for t in self.tokens))

    def stats(self) -> dict:
        """tokens_per_s, steps, mean_accepted (tokens emitted per decoding step, accepted drafts + 1),
        acceptance_rate (accepted draft tokens / draft tokens proposed on the chosen paths; 0 without drafts),
        new_tokens, wall_s, compile_s."""
        ran = self.accepted >= 0
        per_step = float((self.accepted[ran] + 1).mean()) if ran.any() else 1.0
        proposed = int(self.proposed[ran].sum()) if ran.any() else 0
        rate = float(self.accepted[ran].sum()) / proposed if proposed else 0.0
        return {"tokens_per_s": self.new_tokens / max(self.wall_s, 1e-9), "steps": self.steps,
                "mean_accepted": per_step, "acceptance_rate": rate, "new_tokens": self.new_tokens,
                "wall_s": self.wall_s, "compile_s": self.compile_s}


PREFILL_CHUNKS = (0, 16, 32, 64, 128, 256, 512)  # each divides every prompt bucket larger than itself


def default_prefill_chunk() -> int:
    """Tokens per prefill forward on the default JAX backend: 128 on a CPU, where a prefill is compute-bound
    from about 64 tokens on and padding to the power-of-two bucket cost up to 2x (BENCHMARKS.md, "Chunked
    prefill"); 512 on accelerators, where each chunk streams every weight again."""
    return 128 if jax.default_backend() == "cpu" else 512


def _bucket(n: int) -> int:
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


def _resolve_mode(params: Bundle, mode: str | None, temperature: float) -> str:
    if mode is None:
        return ("greedy" if temperature == 0 else "sample") if params.heads is not None else "ar"
    if mode not in MEDUSA_MODES + ("ar",):
        raise MedusaError(f"unknown mode {mode!r}; use one of greedy, typical, sample, ar")
    if mode in MEDUSA_MODES and params.heads is None:
        raise MedusaError(f"mode {mode!r} needs Medusa heads but the bundle has none; load heads "
                          f"(medusa_jax.load(..., heads=PATH)) or use mode 'ar'")
    if mode == "greedy" and temperature != 0:
        raise MedusaError(f"mode 'greedy' is for temperature 0, got {temperature}; use mode 'sample' or 'typical'")
    return mode


def resolve_tree_buffers(params: Bundle, mode: str, tree: Any = None) -> TreeBuffers:
    """The tree a call runs: root-only for `ar`; else `tree`, the bundle's tree, or `DEFAULT_TREE` cut to the
    heads. Top-k is the largest rank used + 1 (each head offers no more tokens than the tree reads)."""
    if mode == "ar":
        if tree is not None and resolve_tree(tree.choices if isinstance(tree, TreeBuffers) else tree):
            raise MedusaError("mode 'ar' decodes without a tree; drop the tree argument or pick a Medusa mode")
        return build_tree([], num_heads=0, topk=1)
    num_heads = params.heads_config.num_heads
    if tree is None:
        paths = list(params.tree) if params.tree is not None else [p for p in DEFAULT_TREE if len(p) <= num_heads]
    else:
        paths = list(tree.choices) if isinstance(tree, TreeBuffers) else resolve_tree(tree)
    if not paths:  # the root-only tree: identical to plain decoding's, so it shares its executable
        return build_tree([], num_heads=0, topk=1)
    topk = max(max(p) + 1 for p in paths)
    return build_tree(paths, num_heads=num_heads, topk=topk)  # TreeError (a MedusaError) if too deep


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


def _executable(spec: DecodeSpec, args: tuple) -> tuple[Any, float]:
    shapes = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args))
    key = (spec, jax.tree.structure(args), shapes)
    if key in _executables:
        return _executables[key], 0.0
    t0 = time.perf_counter()
    exe = decode.generate_jit.lower(spec, *args).compile()
    _compiles[0] += 1
    _executables[key] = exe
    return exe, time.perf_counter() - t0


def default_stop_ids(params: Bundle) -> tuple[int, ...]:
    """The config's EOS ids plus, with a tokenizer, its chat template's end-of-turn ids."""
    ids = list(params.config.eos_token_ids)
    if params.tokenizer is not None:
        try:
            ids += [i for i in chat.stop_token_ids(params.tokenizer) if i not in ids]
        except chat.ChatError:
            pass
    return tuple(ids)


def generate_ids(params: Bundle, prompt_ids, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, mode: str | None = None, tree: Any = None, seed: int = 0,
                 stream: Callable[[list[list[int]]], None] | None = None,
                 stop_ids: Sequence[int] | None = None, cache_length: int | None = None,
                 typical_epsilon: float = 0.09, typical_delta: float = 0.3,
                 prefill_chunk: int | None = None) -> Generation:
    """Generates from token ids: one sequence (list of ints) or a batch (list of lists, any lengths).

    Args:
      params: a `Bundle`.
      max_new_tokens: tokens to generate at most per sequence (capped by the model's context).
      temperature: 0 for greedy; > 0 samples (or, in `typical`, samples the root of each step).
      top_p: nucleus of the sampling distribution, in (0, 1].
      mode: "greedy", "typical", "sample", "ar" or None (greedy/sample with heads, ar without).
      tree: a tree spec (name, "chain:N", dense list, paths or TreeBuffers); None for the bundle's default.
      seed: PRNG seed (sampling).
      stream: called after the prefill and each step with each sequence's newly emitted ids.
      stop_ids: ids ending a sequence; None for `default_stop_ids`, () to never stop early.
      cache_length: KV cache slots (default: enough for prompt + max_new_tokens + one tree); generation stops
        when the next tree would not fit.
      typical_epsilon, typical_delta: typical acceptance thresholds.
      prefill_chunk: tokens per prefill forward, a power of two from 16 to 512, or 0 for one forward over the
        whole prompt bucket; None for `default_prefill_chunk()`. Chunks make the prefill cost follow the real
        prompt length instead of its power-of-two bucket.
    """
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
    mode = _resolve_mode(params, mode, temperature)
    if params.heads is not None and mode != "ar":
        _check_heads(params)
    tree_buf = resolve_tree_buffers(params, mode, tree)
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
    tb, capacity, n = _bucket(max(lengths)), _bucket(max_new), tree_buf.num_nodes
    if cache_length is None:
        cache_length = -(-(tb + capacity + n) // 128) * 128
    elif cache_length < tb:
        raise MedusaError(f"cache_length {cache_length} is shorter than the padded prompt ({tb} tokens)")
    spec = DecodeSpec(
        config=cfg, heads_config=params.heads_config if tree_buf.max_depth else None, tree=tree_buf, rule=rule,
        use_top_p=top_p < 1, capacity=capacity, cache_len=int(cache_length),
        stop_ids=tuple(int(i) for i in (default_stop_ids(params) if stop_ids is None else stop_ids)),
        stream=stream is not None, epsilon=float(typical_epsilon), delta=float(typical_delta),
        prefill_chunk=int(prefill_chunk))

    b = len(prompts)
    padded = np.zeros((b, tb), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    pool_key = (cfg, b, spec.cache_len, str(params.dtype))
    cache = _cache_pool.pop(pool_key, None)
    if cache is None:
        cache = model.init_cache(cfg, b, spec.cache_len, params.dtype)
    heads = params.heads if tree_buf.max_depth else None
    args = (params.base, heads, jnp.asarray(padded), jnp.asarray(lengths, jnp.int32), cache,
            jnp.int32(max_new), jnp.float32(temperature), jnp.float32(top_p), jax.random.PRNGKey(seed))
    exe, compile_s = _executable(spec, args)

    def on_chunk(chunk: np.ndarray, count: np.ndarray) -> None:
        stream([chunk[i, :count[i]].tolist() for i in range(b)])

    t0 = time.perf_counter()
    if stream is not None:
        with decode.stream_to(on_chunk):
            out = exe(*args)
            jax.block_until_ready(out)
    else:
        out = jax.block_until_ready(exe(*args))
    wall = time.perf_counter() - t0
    _cache_pool[pool_key] = out.cache

    tokens_np = np.asarray(out.tokens)[:, :max_new]
    num_new = np.asarray(out.num_new)
    steps = int(out.step)
    seqs = [tokens_np[i, :num_new[i]].tolist() for i in range(b)]
    finish = ["stop" if s and s[-1] in spec.stop_ids else "length" if len(s) >= max_new else "capacity"
              for s in seqs]
    return Generation(tokens=seqs, padded=np.where(np.arange(max_new) < num_new[:, None], tokens_np, -1),
                      steps=steps, accepted=np.asarray(out.accepted)[:, :steps],
                      proposed=np.asarray(out.proposed)[:, :steps], finish=finish, wall_s=wall,
                      compile_s=compile_s)


# ------------------------------------------------------------------------------------------------ text prompts


class _TextStream:
    """Turns streamed ids into text pieces whose concatenation is the decoded answer.

    Decodes everything so far and sends the new suffix; holds back text ending in an incomplete UTF-8
    character (U+FFFD) until the next tokens complete it. Stop tokens are not part of the answer.
    """

    def __init__(self, tokenizer: Any, stop_ids: tuple[int, ...], sink: Callable[[str], None]):
        self.tokenizer, self.stop_ids, self.sink = tokenizer, stop_ids, sink
        self.ids: list[int] = []
        self.sent = ""

    def __call__(self, new: list[list[int]]) -> None:
        self.ids += [t for t in new[0] if t not in self.stop_ids]
        text = _decode(self.tokenizer, self.ids)
        if not text.endswith("\ufffd"):
            self.flush(text)

    def flush(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.sink(text[len(self.sent):])
            self.sent = text


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def _render(tokenizer: Any, prompt: Any, index: int) -> list[int]:
    if isinstance(prompt, str) and not prompt.strip():
        raise MedusaError(f"prompt {index} is empty; give some text")
    try:
        return chat.render_prompt(tokenizer, prompt)
    except chat.ChatError as e:
        raise MedusaError(f"prompt {index}: {e}") from None


def _is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)


def generate(params: Bundle, prompt: Any, *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, mode: str | None = None, tree: Any = None, seed: int = 0,
             stream: Callable[[str], None] | None = None, return_stats: bool = False):
    """Answers a chat prompt.

    Args:
      params: a `Bundle` with a tokenizer (`medusa_jax.load()`).
      prompt: a string (one user turn), a list of {"role", "content"} messages, or a list of those (a batch,
        answered together; the result is then a list).
      max_new_tokens, temperature, top_p, mode, tree, seed: as `generate_ids`.
      stream: called with successive pieces of the answer text as it is accepted (single prompt only).
      return_stats: also return a stats dict (see `Generation.stats`).
    Returns:
      the answer text without the stop token (a list for a batch), and the stats when asked.
    """
    if not isinstance(params, Bundle):
        raise MedusaError(f"params must be a medusa_jax Bundle (from medusa_jax.load), got {type(params).__name__}")
    tokenizer = params.tokenizer
    if tokenizer is None:
        raise MedusaError("this bundle has no tokenizer; use infer.generate_ids with token ids")
    if isinstance(prompt, str) or _is_conversation(prompt):
        prompts, batched = [prompt], False
    elif isinstance(prompt, (list, tuple)) and prompt:
        prompts, batched = list(prompt), True
    else:
        raise MedusaError("empty prompt: pass a string, a list of messages, or a list of those")
    if stream is not None and len(prompts) > 1:
        raise MedusaError("stream works with a single prompt; call generate once per prompt to stream a batch")
    ids = [_render(tokenizer, p, i) for i, p in enumerate(prompts)]
    stops = default_stop_ids(params)
    text_stream = _TextStream(tokenizer, stops, stream) if stream is not None else None
    result = generate_ids(params, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          mode=mode, tree=tree, seed=seed, stream=text_stream, stop_ids=stops)
    answers = [_decode(tokenizer, [t for t in seq if t not in stops]) for seq in result.tokens]
    if text_stream is not None:
        text_stream.flush(answers[0])
    out = answers if batched else answers[0]
    return (out, result.stats()) if return_stats else out

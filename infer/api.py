"""The user-facing generation API: prompts in, text (and stats) out.

`generate` renders chat prompts, `generate_ids` takes token ids (benchmarks, distillation, tests). Both pick the
mode and tree, bucket the shapes so similar calls reuse one compiled executable, and run `decode.generate` once
(or, streaming, its pieces: `decode.start_jit`, `advance_jit` per segment, `finish_jit`).

Arguments are checked and bucketed by `infer.plan`. The KV cache of each shape is kept after a call and donated
to the next one of the same shape, so repeated calls of one shape allocate no cache. A batch-1 call also reuses
the keys and values of the previous batch-1 call's prompt and answer where its prompt starts with them
(`infer.prefix_cache`; the kept cache then stays out of other calls, which may allocate their own).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from infer import decode, prefix_cache as prefixes
from infer.plan import default_stop_ids, make_plan, stream_steps
from infer.state import DecodeSpec
from medusa_jax import chat, model
from medusa_jax.bundle import Bundle
from medusa_jax.errors import MedusaError

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
    prefixes.clear()


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
      reused: prompt tokens whose keys and values came from the prefix cache instead of a forward (batch 1).
    """

    tokens: list[list[int]]
    padded: np.ndarray
    steps: int
    accepted: np.ndarray
    proposed: np.ndarray
    finish: list[str]
    wall_s: float
    compile_s: float
    reused: int = 0

    @property
    def new_tokens(self) -> int:
        return int(sum(len(t) for t in self.tokens))

    def stats(self) -> dict:
        """tokens_per_s, steps, mean_accepted (tokens emitted per decoding step, accepted drafts + 1),
        acceptance_rate (accepted draft tokens / draft tokens proposed on the chosen paths; 0 without drafts),
        new_tokens, wall_s, compile_s, reused_tokens."""
        ran = self.accepted >= 0
        per_step = float((self.accepted[ran] + 1).mean()) if ran.any() else 1.0
        proposed = int(self.proposed[ran].sum()) if ran.any() else 0
        rate = float(self.accepted[ran].sum()) / proposed if proposed else 0.0
        return {"tokens_per_s": self.new_tokens / max(self.wall_s, 1e-9), "steps": self.steps,
                "mean_accepted": per_step, "acceptance_rate": rate, "new_tokens": self.new_tokens,
                "wall_s": self.wall_s, "compile_s": self.compile_s, "reused_tokens": self.reused}


_JITTED = {"generate": decode.generate_jit, "start": decode.start_jit, "advance": decode.advance_jit,
           "finish": decode.finish_jit}


def _executable(kind: str, spec: DecodeSpec, args: tuple, *static) -> tuple[Any, float]:
    """The compiled `decode.<kind>_jit` for these argument shapes (arrays or ShapeDtypeStructs); compile seconds."""
    shapes = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(args))
    key = (kind, spec, static, jax.tree.structure(args), shapes)
    if key in _executables:
        return _executables[key], 0.0
    t0 = time.perf_counter()
    exe = _JITTED[kind].lower(spec, *static, *args).compile()
    _compiles[0] += 1
    _executables[key] = exe
    return exe, time.perf_counter() - t0


def _prepare(spec: DecodeSpec, args: tuple, streaming: bool) -> tuple[tuple, float]:
    """The executables one generation (`plan.args`) runs, compiled if new; compile seconds. Plain: `generate`.
    Streaming: `start`, `advance` (segments of `stream_steps()` steps) and `finish`, whose argument shapes come
    from `start`'s outputs."""
    if not streaming:
        exe, compile_s = _executable("generate", spec, args)
        return (exe,), compile_s
    base, heads, max_new, temperature, top_p = args[0], args[1], args[5], args[6], args[7]
    start, c0 = _executable("start", spec, args)
    state = start.out_info[0]
    advance, c1 = _executable("advance", spec, (base, heads, state, max_new, temperature, top_p), stream_steps())
    finish, c2 = _executable("finish", spec, (state.cache, state.replace(cache=None)))
    return (start, advance, finish), c0 + c1 + c2


def _run(exes: tuple, args: tuple, stream: Callable[[list[list[int]]], None] | None) -> tuple[Any, float]:
    """Runs one generation with `_prepare`'s executables; returns (DecodeOutput, seconds).

    Streaming dispatches each segment before reading the previous one's tokens, so the device runs the next
    segment while the host turns tokens into text (one segment ahead: a host slower than a segment stalls it;
    `infer.decode`'s docstring says why segments and not a host callback)."""
    t0 = time.perf_counter()
    if stream is None:
        return jax.block_until_ready(exes[0](*args)), time.perf_counter() - t0
    start, advance, finish = exes
    base, heads, max_new, temperature, top_p = args[0], args[1], args[5], args[6], args[7]
    state, view = start(*args)
    sent = np.zeros(len(args[2]), np.int64)
    while True:
        state, queued = advance(base, heads, state, max_new, temperature, top_p)
        tokens, num_new, over = jax.device_get((view.tokens, view.num_new, view.over))  # one transfer per segment
        if (num_new > sent).any():
            stream([tokens[i, sent[i]:num_new[i]].tolist() for i in range(len(sent))])
            sent = num_new
        if over:  # then `queued` ran no step
            break
        view = queued
    return jax.block_until_ready(finish(state.cache, state.replace(cache=None))), time.perf_counter() - t0


def generate_ids(params: Bundle, prompt_ids, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, mode: str | None = None, tree: Any = None, seed: int = 0,
                 stream: Callable[[list[list[int]]], None] | None = None,
                 stop_ids: Sequence[int] | None = None, cache_length: int | None = None,
                 typical_epsilon: float = 0.09, typical_delta: float = 0.3,
                 prefill_chunk: int | None = None, prefix_cache: bool = True, lookup: int | None = None) -> Generation:
    """Generates from token ids: one sequence (list of ints) or a batch (list of lists, any lengths).

    Args:
      params: a `Bundle`.
      max_new_tokens: tokens to generate at most per sequence (capped by the model's context).
      temperature: 0 for greedy; > 0 samples (or, in `typical`, samples the root of each step).
      top_p: nucleus of the sampling distribution, in (0, 1].
      mode: "greedy", "typical", "sample", "ar" or None (greedy/sample with heads, ar without).
      tree: a tree spec (name, "chain:N", dense list, paths or TreeBuffers); None for the bundle's default.
      lookup: draft tokens per step copied from the context (a chain under the root, verified with the tree:
        `infer.lookup`); works without heads too (prompt lookup decoding); 0 for none; None for the bundle's
        tuned default (`tree.json`'s "lookup", else 0).
      seed: PRNG seed (sampling).
      stream: called after the prefill and after each segment of decoding steps (`infer.plan.stream_steps()`:
        every step on a CPU) that emitted tokens, with each sequence's newly emitted ids.
      stop_ids: ids ending a sequence; None for `default_stop_ids`, () to never stop early.
      cache_length: KV cache slots (default: enough for prompt + max_new_tokens + one tree); generation stops
        when the next tree would not fit.
      typical_epsilon, typical_delta: typical acceptance thresholds.
      prefill_chunk: tokens per prefill forward, a power of two from 16 to 512, or 0 for one forward over the
        whole prompt bucket; None for `infer.plan.default_prefill_chunk()`. Chunks make the prefill cost follow the real
        prompt length instead of its power-of-two bucket.
      prefix_cache: batch 1 only: take the keys and values of the longest common prefix of this prompt and the
        previous batch-1 call's prompt + answer (same weights) from that call's kept cache instead of running
        them through the model (a chat's next turn then runs only its new tokens), and keep this call's for the
        next one (`infer.prefix_cache`). False neither reads nor records the kept prefix.
    """
    plan = make_plan(params, prompt_ids, max_new_tokens, temperature, top_p, mode, tree, stop_ids, cache_length,
                     typical_epsilon, typical_delta, prefill_chunk, lookup)
    spec, prompts, max_new = plan.spec, plan.prompts, plan.max_new
    b = len(prompts)
    pool_key = (spec.config, b, spec.cache_len, str(params.dtype))
    prefix = prefix_cache and b == 1
    reused, cache = prefixes.take(spec.config, params.base, prompts[0], _cache_pool, spec.prefill_chunk,
                                  plan.padded.shape[1], spec.cache_len) if prefix else (0, None)
    if cache is None:
        cache = _cache_pool.pop(pool_key, None)
        if not prefix and prefixes.holds(cache):  # leave the kept prefix to a later call that reuses it
            _cache_pool[pool_key], cache = cache, None
    if cache is None:
        cache = model.init_cache(spec.config, b, spec.cache_len, params.dtype)
    args = plan.args(params, cache, max_new, seed, temperature, top_p, reused)
    exes, compile_s = _prepare(spec, args, stream is not None)
    out, wall = _run(exes, args, stream)
    _cache_pool[pool_key] = out.cache

    tokens_np = np.asarray(out.tokens)[:, :max_new]
    num_new = np.asarray(out.num_new)
    steps = int(out.step)
    seqs = [tokens_np[i, :num_new[i]].tolist() for i in range(b)]
    if prefix:  # slots [0, length) hold the prompt and the answer but its last token (maybe more, unemitted)
        prefixes.keep(spec.config, params.base, prompts[0] + seqs[0][:int(out.length[0]) - len(prompts[0])],
                      out.cache, pool_key)
    finish = ["stop" if s and s[-1] in spec.stop_ids else "length" if len(s) >= max_new else "capacity"
              for s in seqs]
    return Generation(tokens=seqs, padded=np.where(np.arange(max_new) < num_new[:, None], tokens_np, -1),
                      steps=steps, accepted=np.asarray(out.accepted)[:, :steps],
                      proposed=np.asarray(out.proposed)[:, :steps], finish=finish, wall_s=wall,
                      compile_s=compile_s, reused=reused)


def warm_up(params: Bundle, prompt_ids, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
            mode: str | None = None, tree: Any = None, stream: Callable | None = None,
            stop_ids: Sequence[int] | None = None, cache_length: int | None = None, typical_epsilon: float = 0.09,
            typical_delta: float = 0.3, prefill_chunk: int | None = None, seed: int = 0,
            prefix_cache: bool = True, lookup: int | None = None) -> float:
    """Compiles what `generate_ids` with the same arguments would run, if not compiled yet, and then runs it once
    for at most 2 new tokens on a scratch cache (an executable's first run carries one-off costs), leaving the
    kept caches and the prefix cache as they were. Returns the seconds spent compiling (0: nothing was done).
    `seed` and `prefix_cache` do not change the compiled generation and are accepted and ignored, so a benchmark
    passes one set of keyword arguments to both; its timed call then neither compiles nor runs cold."""
    del seed, prefix_cache
    plan = make_plan(params, prompt_ids, max_new_tokens, temperature, top_p, mode, tree, stop_ids, cache_length,
                     typical_epsilon, typical_delta, prefill_chunk, lookup)
    cache = model.init_cache(plan.spec.config, len(plan.prompts), plan.spec.cache_len, params.dtype)
    args = plan.args(params, cache, min(2, plan.max_new), 0, temperature, top_p, 0)
    before = compile_count()
    exes, compile_s = _prepare(plan.spec, args, stream is not None)
    if compile_count() == before:
        return 0.0
    _run(exes, args, None if stream is None else lambda new: None)
    return compile_s


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
             stream: Callable[[str], None] | None = None, return_stats: bool = False, lookup: int | None = None):
    """Answers a chat prompt.

    Args:
      params: a `Bundle` with a tokenizer (`medusa_jax.load()`).
      prompt: a string (one user turn), a list of {"role", "content"} messages, or a list of those (a batch,
        answered together; the result is then a list).
      max_new_tokens, temperature, top_p, mode, tree, seed, lookup: as `generate_ids`.
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
                          mode=mode, tree=tree, seed=seed, stream=text_stream, stop_ids=stops, lookup=lookup)
    answers = [_decode(tokenizer, [t for t in seq if t not in stops]) for seq in result.tokens]
    if text_stream is not None:
        text_stream.flush(answers[0])
    out = answers if batched else answers[0]
    return (out, result.stats()) if return_stats else out

"""Self-distillation: the base model answers prompts, giving chat data in its own distribution for the heads.

Medusa heads predict what the base model will say, so the best training data is the base model's own answers
(reference §2.2). For each prompt the base model writes the assistant turns with the batched, jitted generator
of `infer.api` (plain autoregressive sampling); for a multi-turn prompt every user turn is answered in order,
each answer conditioned on the regenerated earlier ones (like the original's `create_data.py`). An answer that
hits `max_new_tokens` is kept but ends its conversation (the original's `--chat` mode stops at
`finish_reason == "length"`).

Prompts come from `--prompts FILE` (see `train.prompts.read_prompts`) or, without a file, from the base model
itself: one question per task kind (`train.prompts.TASK_KINDS`), sampled hot, cleaned and de-duplicated.

Defaults: temperature 0.3 (the original's `generate.py`), top_p 1.0 (the original's vLLM default; at T = 0.3 the
tail is already negligible, and top_p = 1 skips a vocabulary sort per step), 192 new tokens, batches of 16, and
32 self-generated prompts: about 4 CPU-minutes with the embedded SmolLM2-135M (answers average ~150 tokens).

Output: chat JSONL, one ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}`` per line, the
format `train.data.load_dataset` reads. Written atomically (temporary file + rename) after a batch when
`flush_every_s` has passed, at the end, and on interruption, so a stopped run keeps its work. With `resume` (the
default) prompts already answered in an existing output file are skipped (matched by `prompts.prompt_key`) and
the file is extended; `--no-resume` overwrites it.

    python -m train.distill [--model PATH|tiny] [--prompts FILE] [--num-prompts N] [--out FILE] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Sequence

from medusa_jax import chat
from medusa_jax.errors import MedusaError, cli_errors
from train import prompts as P
from train.data_formats import JsonlWriter, SkipLog, iter_records

log = logging.getLogger("train.distill")

DEFAULT_NUM_PROMPTS = 32
DEFAULT_MAX_NEW_TOKENS = 192
DEFAULT_TEMPERATURE = 0.3
DEFAULT_TOP_P = 1.0
DEFAULT_BATCH_SIZE = 16
_MAX_PROMPT_ROUNDS = 6  # rounds of self-prompting before settling for fewer unique questions


@dataclasses.dataclass
class DistillStats:
    """Counts for the summary line: prompts used (after de-duplication); answered now / found in the output file
    (resumed) / dropped (no usable answer); answers (turns); tokens: generated answer tokens (incl. the stop
    token) this run; seconds: time spent answering (not loading or writing prompts); prompt_seconds: time the
    model spent writing its own prompts (0 with given prompts)."""

    prompts: int = 0
    answered: int = 0
    resumed: int = 0
    answers: int = 0
    tokens: int = 0
    dropped: int = 0
    seconds: float = 0.0
    prompt_seconds: float = 0.0


def _generate(params: Any, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
              seed: int, stop_ids: tuple[int, ...], width: int) -> list[tuple[list[int], bool]]:
    """Samples one continuation per prompt: (ids up to and including the first stop id, whether it stopped).

    A short batch is padded to `width` rows with copies of its first prompt (answers discarded): every batch of
    a run then has one shape, so the jitted generator compiles once per prompt-length bucket, not per batch size.
    """
    from infer import api  # the decoder lives in infer; imported late so `train.data` users never need it

    n = len(prompt_ids)
    padded = list(prompt_ids) + [prompt_ids[0]] * max(0, width - n)
    gen = api.generate_ids(params, padded, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, mode="ar", seed=seed, stop_ids=stop_ids)
    results = []
    for row in gen.tokens[:n]:
        ids = [int(t) for t in row][:max_new_tokens]
        stop = next((i for i, t in enumerate(ids) if t in stop_ids), None)
        results.append((ids[: stop + 1], True) if stop is not None else (ids, False))
    return results


def _answer_text(tokenizer: Any, ids: list[int], stop_ids: tuple[int, ...]) -> str:
    return tokenizer.decode([t for t in ids if t not in stop_ids], skip_special_tokens=True).strip()


def _batch_seed(seed: int, counter: int) -> int:
    return (int(seed) * 1_000_003 + counter) % 2**31


def self_prompts(params: Any, num: int, *, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                 exclude: Sequence[str] = (), template: Any = None, progress: bool = True) -> list[str]:
    """`num` distinct questions written by the base model itself (fewer, with a warning, if it keeps repeating).

    Each round asks for the missing number (plus a margin) with `prompts.meta_prompts`, samples at
    `prompts.PROMPT_TEMPERATURE`, cleans with `prompts.clean_prompt` and drops duplicates (normalised text), also
    of `exclude` (questions answered earlier).
    """
    import tqdm

    tokenizer = _tokenizer(params)
    template, stop_ids = _template(tokenizer, template)
    seen = {P.normalise(e) for e in exclude}
    out: list[str] = []
    counter = 0
    bar = tqdm.tqdm(total=num, desc="prompts", unit="prompt", disable=not progress)
    # One batch width for every round (later rounds ask for fewer), so the generator compiles once.
    width = min(batch_size, num + num // 4 + 2)
    for r in range(_MAX_PROMPT_ROUNDS):
        need = num - len(out)
        if need <= 0:
            break
        # Ask for a margin (some replies are unusable or repeats), in whole batches: extra rows cost nothing.
        count = -(-(need + need // 4 + 2) // width) * width
        metas = P.meta_prompts(count, seed=_batch_seed(seed, 7919 * (r + 1)))
        for b in range(0, len(metas), width):
            chunk = metas[b: b + width]
            ids = [_with_prefix(tokenizer, chat.render_prompt(tokenizer, text, template)) for _, text in chunk]
            gens = _generate(params, ids, max_new_tokens=P.PROMPT_MAX_NEW_TOKENS, temperature=P.PROMPT_TEMPERATURE,
                             top_p=P.PROMPT_TOP_P, seed=_batch_seed(seed + 1, counter), stop_ids=stop_ids,
                             width=width)
            counter += 1
            cleaned = [P.clean_prompt(_answer_text(tokenizer, g, stop_ids)) for g, _ in gens]
            new = P.dedupe([c for c in cleaned if c], seen)[: num - len(out)]
            out += new
            bar.update(len(new))
            if len(out) >= num:
                break
    bar.close()
    if len(out) < num:
        log.warning("the model wrote only %d distinct usable questions of %d asked for; continuing with those",
                    len(out), num)
    return out


def _with_prefix(tokenizer: Any, ids: list[int]) -> list[int]:
    """Prompt ids followed by `prompts.ANSWER_PREFIX`, the start of the reply (space-separated unless the
    generation prompt ends in whitespace, as ChatML's header does)."""
    sep = "" if tokenizer.decode(ids[-1:]).endswith((" ", "\n")) else " "
    return ids + list(tokenizer(sep + P.ANSWER_PREFIX, add_special_tokens=False)["input_ids"])


def _template(tokenizer: Any, template: Any) -> tuple[Any, tuple[int, ...]]:
    """The resolved chat template and its stop ids; template errors become MedusaError."""
    try:
        if not isinstance(template, chat.ChatTemplate):
            template = chat.template_for(tokenizer, template or "auto")
        return template, chat.stop_token_ids(tokenizer, template)
    except chat.ChatError as e:
        raise MedusaError(str(e)) from None


def _tokenizer(params: Any) -> Any:
    tok = getattr(params, "tokenizer", None)
    if tok is None:
        raise MedusaError(f"model {getattr(params, 'source', '') or '?'} has no tokenizer, which distillation needs "
                          "to render prompts; load a checkpoint with its tokenizer")
    return tok


def answered_in(path: str) -> dict[str, list[dict]]:
    """Conversations already in an output file, by `prompts.prompt_key`; unreadable lines are warned about."""
    if not os.path.exists(path):
        return {}
    skips = SkipLog(path)
    done = {P.prompt_key(msgs): msgs for _, msgs in iter_records(path, skips)}
    skips.warn()
    return done


def _own_prompts(params: Any, num: int, out: str | None, resume: bool, **kwargs) -> list[Any]:
    """`num` self-generated prompts, counting (and not repeating) those already answered in `out`."""
    done = list(answered_in(out).values()) if (out and resume) else []
    items = [[m for m in c if m["role"] != "assistant"] for c in done if any(m["role"] == "user" for m in c)][:num]
    firsts = [next(m["content"] for m in c if m["role"] == "user") for c in items]
    if len(items) < num:
        items += self_prompts(params, num - len(items), exclude=firsts, **kwargs)
    return items


def check_settings(max_new_tokens: int, batch_size: int, temperature: float, top_p: float,
                   num_prompts: int | None) -> None:
    """Raises MedusaError for out-of-range settings (the CLI calls it before the slow model load)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise MedusaError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be at least 1")
    if not temperature >= 0 or not 0 < top_p <= 1:
        raise MedusaError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if num_prompts is not None and num_prompts < 1:
        raise MedusaError(f"num_prompts={num_prompts} must be at least 1")


def distill_with_stats(params: Any, prompts: Sequence[Any] | None = None, *, num_prompts: int | None = None,
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = DEFAULT_TEMPERATURE,
                       top_p: float = DEFAULT_TOP_P, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                       template: Any = None, out: str | None = None, resume: bool = True,
                       flush_every_s: float = 30.0, progress: bool = True) -> tuple[list[list[dict]], DistillStats]:
    """`distill`, also returning the counts for a summary line."""
    import tqdm

    check_settings(max_new_tokens, batch_size, temperature, top_p, num_prompts)
    prompt_seconds = 0.0
    if prompts is None:
        start = time.monotonic()
        prompts = _own_prompts(params, num_prompts or DEFAULT_NUM_PROMPTS, out, resume, seed=seed,
                               batch_size=batch_size, template=template, progress=progress)
        prompt_seconds = time.monotonic() - start
    else:
        prompts = list(prompts)[:num_prompts]
    start = time.monotonic()
    tokenizer = _tokenizer(params)
    template, stop_ids = _template(tokenizer, template)
    items, keys = [], set()
    for p in prompts:  # the same question twice would only duplicate training data
        item = P.as_prompt(p)
        if P.prompt_key(item) not in keys:
            keys.add(P.prompt_key(item))
            items.append(item)
    if len(items) < len(prompts):
        log.warning("dropped %d repeated prompts (same system + first user turn)", len(prompts) - len(items))
    stats = DistillStats(prompts=len(items), prompt_seconds=prompt_seconds)
    previous = answered_in(out) if (out and resume) else {}
    results: list[list[dict] | None] = [previous.get(P.prompt_key(p)) for p in items]
    stats.resumed = sum(r is not None for r in results)
    todo = [i for i, r in enumerate(results) if r is None]
    writer = JsonlWriter(out, keep_existing=resume, flush_every_s=flush_every_s) if out else None

    # Per conversation: the history so far and the user turns still to answer (system turns ride along).
    history: dict[int, list[dict]] = {i: [] for i in todo}
    pending: dict[int, list[dict]] = {i: list(items[i]) for i in todo}
    max_len = getattr(getattr(params, "config", None), "max_position_embeddings", None)
    bar = tqdm.tqdm(total=sum(sum(m["role"] == "user" for m in items[i]) for i in todo), desc="answers",
                    unit="answer", disable=not progress)
    counter = 0
    width = min(batch_size, len(todo))

    def finish(i: int) -> None:
        conv = history.pop(i)
        pending.pop(i, None)
        if any(m["role"] == "assistant" for m in conv):
            while conv[-1]["role"] != "assistant":  # drop unanswered trailing turns
                conv.pop()
            results[i] = conv
            stats.answered += 1
            if writer:
                writer.add({"messages": conv})
        else:
            stats.dropped += 1

    try:
        while pending:
            active = list(pending)
            for b in range(0, len(active), batch_size):
                chunk, ids = [], []
                for i in active[b: b + batch_size]:
                    while pending[i] and pending[i][0]["role"] != "user":
                        history[i].append(pending[i].pop(0))
                    history[i].append(pending[i].pop(0))
                    try:
                        prompt_ids = chat.render_prompt(tokenizer, history[i], template)
                    except chat.ChatError as e:  # e.g. a template that rejects this turn order
                        log.warning("prompt %d cannot be rendered (%s); keeping its answers so far", i, e)
                        prompt_ids = None
                    if prompt_ids is None or (max_len and len(prompt_ids) + max_new_tokens > max_len):
                        history[i].pop()  # unrenderable, or it outgrew the context: keep what it has
                        finish(i)
                        continue
                    chunk.append(i)
                    ids.append(prompt_ids)
                if not chunk:
                    continue
                gens = _generate(params, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=_batch_seed(seed, counter), stop_ids=stop_ids, width=width)
                counter += 1
                for i, (gen, stopped) in zip(chunk, gens):
                    text = _answer_text(tokenizer, gen, stop_ids)
                    stats.tokens += len(gen)
                    bar.update(1)
                    if not text:  # an empty reply teaches nothing; end the conversation before this turn
                        history[i].pop()
                        finish(i)
                        continue
                    history[i].append({"role": "assistant", "content": text})
                    stats.answers += 1
                    if not stopped or not any(m["role"] == "user" for m in pending[i]):
                        finish(i)
    finally:
        bar.close()
        if writer:
            writer.flush()
    stats.seconds = time.monotonic() - start
    return [r for r in results if r is not None], stats


def distill(params: Any, prompts: Sequence[Any] | None = None, **kwargs) -> list[list[dict]]:
    """The base model's answers to `prompts`, as conversations (lists of {"role", "content"} messages).

    Args:
      params: a `medusa_jax.Bundle` with a tokenizer (heads are not used).
      prompts: strings (one user turn each) or conversations (assistant turns are regenerated, in order); None:
        the model writes `num_prompts` questions itself (`self_prompts`; with `resume`, prompts already answered
        in `out` count towards them).
      num_prompts: use at most this many prompts (default: all given, or DEFAULT_NUM_PROMPTS self-generated).
      max_new_tokens, temperature, top_p, batch_size, seed: generation settings (module defaults).
      template: chat template kind or `chat.ChatTemplate` (default: the tokenizer's own, else Vicuna).
      out: chat JSONL file to write progressively (None: write nothing); resume: skip prompts already in `out`.
      flush_every_s: rewrite `out` at most this often (and always at the end or on interruption).
      progress: show a tqdm bar.
    Returns:
      one conversation per prompt that got a non-empty answer, in prompt order (including, with `resume`,
      those found in `out`).
    """
    return distill_with_stats(params, prompts, **kwargs)[0]


@functools.lru_cache(maxsize=1)
def _load_model(source: str | None) -> Any:
    if source == "tiny":
        from infer.bench_setup import tiny_bundle

        return tiny_bundle(num_heads=0)
    import medusa_jax

    return medusa_jax.load(source)


def main(argv: Sequence[str] | None = None) -> DistillStats:
    p = argparse.ArgumentParser(prog="python -m train.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (Hugging Face directory or .gguf file), or 'tiny' "
                   "(random model with the SmolLM2 tokenizer, for smoke tests); default: the embedded SmolLM2-135M")
    p.add_argument("--prompts", default=None, help="text file (one prompt per line) or JSON/JSONL of "
                   "{\"prompt\": ...}, {\"turns\": [...]} or chat conversations; default: the model writes them")
    p.add_argument("--num-prompts", type=int, default=None,
                   help=f"prompts to answer (default: all in --prompts, else {DEFAULT_NUM_PROMPTS} self-generated)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"answer length cap in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"answer sampling temperature, 0 = greedy (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help=f"nucleus (default {DEFAULT_TOP_P})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"prompts generated together (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--template", default="auto", choices=("auto", "tokenizer", "vicuna"),
                   help="chat template (default auto: the tokenizer's own, else Vicuna v1.1)")
    p.add_argument("--out", default=None, help="output chat JSONL (default: runs/distill/<model>.jsonl)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip prompts already answered in --out and extend it (default); --no-resume overwrites")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.num_prompts is not None and args.num_prompts < 1:
        raise MedusaError(f"--num-prompts {args.num_prompts} must be at least 1")
    check_settings(args.max_new_tokens, args.batch_size, args.temperature, args.top_p, args.num_prompts)

    start = time.monotonic()
    items = P.read_prompts(args.prompts) if args.prompts else None  # before the slow model load: fail fast
    params = _load_model(args.model)
    out = args.out or os.path.join("runs", "distill", f"{params.config.name}.jsonl")
    _, stats = distill_with_stats(params, items, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                                  seed=args.seed, template=args.template, out=out, resume=args.resume,
                                  progress=not args.no_progress)
    seconds = time.monotonic() - start
    rate = stats.tokens / stats.seconds if stats.seconds else 0.0
    print(f"distill: {stats.prompts} prompts, {stats.answered} answered now ({stats.resumed} already in the file, "
          f"{stats.dropped} dropped), {stats.answers} answers, {stats.tokens} tokens; {seconds:.0f} s in all, "
          + (f"{stats.prompt_seconds:.0f} s writing prompts, " if items is None else "")
          + f"{stats.seconds:.0f} s answering ({rate:.1f} tokens/s) -> {out}")
    return stats


if __name__ == "__main__":
    with cli_errors():
        main()

"""Prompts for self-distillation: task kinds, the meta-prompt, cleaning and de-duplication, prompt files.

Without a prompt file, `train.distill` asks the base model itself for questions: one meta-prompt per task kind
(`META_PROMPT`), sampled at a high temperature, cleaned by `clean_prompt` and de-duplicated by `normalise`. The
kinds cover what chat users ask so that the heads see the base model's own answers across its range.

A prompt is a list of messages whose assistant turns (if any) will be regenerated: ``[{"role": "user", ...}]`` for
a plain question, or a whole conversation.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, Sequence

import numpy as np

from medusa_jax.errors import MedusaError
from train.data_formats import ROLE_ALIASES, SkipLog, detect_jsonl, read_text

TASK_KINDS: tuple[str, ...] = (
    "coding", "maths", "advice", "writing", "explanation", "roleplay", "summarisation", "science", "history",
    "brainstorming", "cooking", "travel", "health and fitness", "personal finance", "language learning",
    "grammar and editing", "geography", "philosophy", "technology", "career", "productivity", "logic puzzles",
    "everyday tasks", "comparing two things",
)

META_PROMPT = "Write one question a user might ask an AI assistant about {kind}. Only the question."
# Appended after the assistant header: small models otherwise tend to answer the meta-prompt with commentary
# ("A user might ask: ...", "I'm here to help!"); starting the reply with this label makes most replies a question.
ANSWER_PREFIX = "Question:"

# Self-generated questions: sampled hot for variety (the answers use the distillation temperature).
PROMPT_TEMPERATURE = 1.0
PROMPT_TOP_P = 0.95
PROMPT_MAX_NEW_TOKENS = 64

_MIN_WORDS, _MAX_WORDS, _MAX_CHARS = 3, 80, 500
_LABEL = re.compile(r"^\s*(?:\d+[.)]\s*|[-*]\s+|(?:question|q|user|ex|example)\s*\d*\s*[:.-]\s*)", re.IGNORECASE)
_LEAD_IN = re.compile(r"^([^:?\n]{1,60}):\s+(?=\S)")  # "A user might ask: ...", "Linguistics: ..."
_QUOTES = "\"'`“”‘’«»"

Prompt = list  # list of {"role", "content"} messages


def meta_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (kind, meta-prompt text) pairs: every kind once per round of len(TASK_KINDS), each round shuffled."""
    rng = np.random.default_rng([int(seed) % 2**64, 17])
    kinds: list[str] = []
    while len(kinds) < n:
        kinds += [TASK_KINDS[i] for i in rng.permutation(len(TASK_KINDS))]
    return [(k, META_PROMPT.format(kind=k)) for k in kinds[:n]]


def normalise(text: str) -> str:
    """Key for de-duplication: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def clean_prompt(text: str) -> str | None:
    """The question in a generated reply, or None when it is empty or degenerate.

    Keeps the first non-empty line; strips list markers, labels ("Question:", "Q:") and a short lead-in before a
    colon ("A user might ask: ..."), and surrounding quotes; cuts after the first question mark (small models
    run on past the question). Rejects a lead-in with nothing after it, text with too few or too many words,
    mostly non-letters, or heavy repetition (few distinct words).
    """
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = _LABEL.sub("", line).strip()
    lead = _LEAD_IN.match(line)
    if lead and len(lead.group(1).split()) <= 6:
        line = line[lead.end():]
    line = line.strip().strip(_QUOTES).strip()
    if "?" in line:
        line = line[: line.index("?") + 1].strip(_QUOTES).strip()
    if line.endswith(":"):
        return None
    words = line.split()
    if not _MIN_WORDS <= len(words) <= _MAX_WORDS or len(line) > _MAX_CHARS:
        return None
    letters = sum(c.isalpha() for c in line)
    if letters < 0.6 * len(line.replace(" ", "")):
        return None
    distinct = len({normalise(w) for w in words})
    if len(words) >= 8 and distinct < 0.5 * len(words):  # "the the the ..." style loops
        return None
    return line


def dedupe(candidates: Sequence[str], seen: set[str]) -> list[str]:
    """Candidates whose `normalise` key is new (first occurrence wins); adds their keys to `seen`."""
    out = []
    for c in candidates:
        key = normalise(c)
        if key and key not in seen:
            seen.add(key)
            out.append(c)
    return out


def prompt_key(prompt: Sequence[dict]) -> str:
    """Identity of a prompt for resuming: its messages up to the first user turn (system + first question),
    normalised. A conversation cut short after its first answer still maps to the same key."""
    head = []
    for m in prompt:
        if m["role"] == "assistant":
            continue
        head.append(m["role"] + ":" + normalise(m["content"]))
        if m["role"] == "user":
            break
    return "\n".join(head)


def as_prompt(item: Any) -> Prompt:
    """A str (one user turn) or a list of messages -> a validated prompt, assistant turns removed."""
    if isinstance(item, str):
        if not item.strip():
            raise MedusaError("a prompt is empty; give non-empty prompt text")
        return [{"role": "user", "content": item}]
    msgs = []
    for m in item:
        if not isinstance(m, dict):
            raise MedusaError(f"a prompt message is a {type(m).__name__}; use {{'role': ..., 'content': ...}} dicts")
        role = ROLE_ALIASES.get(str(m.get("role", m.get("from", ""))).lower())
        content = m.get("content", m.get("value"))
        if role is None or not isinstance(content, str):
            raise MedusaError(f"prompt message {m!r:.80} has no usable role/content; use "
                              "{'role': 'user'|'system'|'assistant', 'content': str}")
        if role != "assistant":
            msgs.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in msgs):
        raise MedusaError("a prompt conversation has no user turn; give at least one user message")
    return msgs


def read_prompts(path: str) -> list[Prompt]:
    """Prompts from a file: plain text (one prompt per line), or JSON/JSONL records that are ``{"prompt": str}``,
    ``{"turns": [str, ...]}`` (MT-Bench), or chat conversations (their assistant turns are regenerated).

    Unusable records are skipped and warned about like training data; no prompt at all is a MedusaError.
    """
    text = read_text(path, "prompts file", "a text file (one prompt per line) or JSONL of prompts")
    skips = SkipLog(path)
    out: list[Prompt] = []
    if path.lower().endswith((".json", ".jsonl", ".ndjson")):
        jsonl, parsed = detect_jsonl(path, text)
        if jsonl:
            records = []
            for n, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        records.append((f"line {n}", json.loads(line)))
                    except json.JSONDecodeError:
                        skips.add("invalid_json", f"line {n}")
        else:
            records = [(f"record {i}", r) for i, r in enumerate(parsed if isinstance(parsed, list) else [parsed])]
        for where, record in records:
            prompt = _record_prompt(record)
            if prompt is None:
                skips.add("missing_fields", where)
            else:
                out.append(prompt)
    else:
        out = [[{"role": "user", "content": ln.strip()}] for ln in text.splitlines() if ln.strip()]
    skips.warn()
    if not out:
        raise MedusaError(f"{path}: no prompts found; give one prompt per line, or JSONL of {{\"prompt\": ...}} "
                          "or chat conversations")
    return out


def _record_prompt(record: Any) -> Prompt | None:
    try:
        if isinstance(record, str):
            return as_prompt(record)
        if isinstance(record, dict):
            if isinstance(record.get("prompt"), str):
                return as_prompt(record["prompt"])
            if isinstance(record.get("turns"), list) and all(isinstance(t, str) for t in record["turns"]):
                return as_prompt([{"role": "user", "content": t} for t in record["turns"]])
            record = record.get("messages", record.get("conversations"))
        if isinstance(record, list) and all(isinstance(m, dict) for m in record):
            return as_prompt(record)
    except MedusaError:
        return None
    return None

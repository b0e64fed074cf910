"""Conversation files: format detection, per-record normalisation, the skip log, and an atomic JSONL writer.

Accepted layouts (one conversation per record):

* ShareGPT JSON: ``[{"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}, ...]``
* chat JSON: ``[[{"role", "content"}, ...], ...]`` or ``[{"messages": [...]}, ...]``
* chat JSONL: one conversation per line, a list of messages or ``{"messages": [...]}`` (or ShareGPT's
  ``{"conversations": [...]}``).

Messages may use either key pair (``role``/``content`` or ``from``/``value``); roles are mapped through
`ROLE_ALIASES`. A record that cannot be used is skipped with a reason from `SKIP_REASONS` and reported by
`SkipLog`: one warning line per reason, with the count and the first few record locations. JSONL locations are
1-based line numbers; JSON locations are 0-based indices into the top-level list.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Iterator

from medusa_jax.errors import MedusaError

log = logging.getLogger("train.data")

SKIP_REASONS: dict[str, str] = {
    "invalid_json": "invalid JSON",
    "missing_fields": "missing fields",
    "empty": "empty conversation",
    "unknown_role": "unknown role",
    "non_string_content": "non-string content",
    "no_assistant_turn": "no assistant turn",
    "template_error": "chat template failed",
    "truncated_away": "no assistant token within seq_len",
}

# ShareGPT dumps name the assistant after the product that wrote it; all are assistant turns.
ROLE_ALIASES: dict[str, str] = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "system": "system",
}

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SHOW = 5  # record locations listed per warning line


class Skip(Exception):
    """A record that cannot be used; `reason` is a key of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or SKIP_REASONS[reason])
        self.reason = reason


OnSkip = Callable[[str, str], None]  # (reason key, location such as "data.jsonl line 7")


class SkipLog:
    """Counts skipped records per reason and remembers the first few locations of each."""

    def __init__(self, source: str, on_skip: OnSkip | None = None):
        self.source = source
        self.on_skip = on_skip
        self.where: dict[str, list[str]] = collections.defaultdict(list)
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.where[reason]) < _SHOW:
            self.where[reason].append(where)
        if self.on_skip is not None:
            self.on_skip(reason, f"{self.source} {where}".strip())

    def warn(self) -> None:
        """One warning line per reason: count, description and the first locations."""
        for reason, n in self.counts.items():
            shown = ", ".join(self.where[reason]) + (", ..." if n > len(self.where[reason]) else "")
            prefix = f"{self.source}: " if self.source else ""
            log.warning("%sskipped %d record%s with %s (%s)", prefix, n, "" if n == 1 else "s",
                        SKIP_REASONS[reason], shown)

    def describe(self) -> str:
        """"3 unknown role, 1 invalid JSON" (empty when nothing was skipped)."""
        return ", ".join(f"{n} {SKIP_REASONS[r]}" for r, n in self.counts.items())


def normalise_messages(record: Any) -> list[dict]:
    """One record (any accepted layout) -> ``[{"role", "content"}, ...]``; raises `Skip` when unusable."""
    if isinstance(record, dict):
        for key in ("messages", "conversations"):
            if key in record:
                record = record[key]
                break
        else:
            raise Skip("missing_fields", "no 'messages' or 'conversations' key")
    if not isinstance(record, list):
        raise Skip("missing_fields", f"expected a list of messages, got {type(record).__name__}")
    if not record:
        raise Skip("empty")
    out = []
    for m in record:
        if not isinstance(m, dict):
            raise Skip("missing_fields", f"a message is a {type(m).__name__}, not a dict")
        if "role" in m and "content" in m:
            role, content = m["role"], m["content"]
        elif "from" in m and "value" in m:
            role, content = m["from"], m["value"]
        else:
            raise Skip("missing_fields", "a message lacks role/content (or from/value)")
        role = ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        if role is None:
            raise Skip("unknown_role")
        if not isinstance(content, str):
            raise Skip("non_string_content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise Skip("no_assistant_turn")
    return out


def read_text(path: str, what: str = "data file", expect: str = "a ShareGPT/chat JSON or JSONL file") -> str:
    """The UTF-8 text of `path`; MedusaError naming `what` when it is missing, a directory or not UTF-8."""
    if not os.path.exists(path):
        raise MedusaError(f"{what} {path} does not exist; pass {expect}")
    if os.path.isdir(path):
        raise MedusaError(f"{what} {path} is a directory; pass {expect}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise MedusaError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _json_error(path: str, e: json.JSONDecodeError) -> MedusaError:
    return MedusaError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the file, or "
                       "write JSONL (one conversation per line) so that bad lines are skipped instead")


def detect_jsonl(path: str, text: str) -> tuple[bool, Any]:
    """Decides the layout; returns (is_jsonl, parsed whole-file JSON when it is not JSONL)."""
    if path.lower().endswith(_JSONL_SUFFIXES):
        return True, None
    try:
        return False, json.loads(text)
    except json.JSONDecodeError as e:
        # "Extra data" after a complete first value is the signature of JSONL saved as .json.
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        if e.msg == "Extra data":
            try:
                json.loads(first)
                return True, None
            except json.JSONDecodeError:
                pass
        raise _json_error(path, e) from None


def iter_records(path: str, skips: SkipLog) -> Iterator[tuple[str, list[dict]]]:
    """Yields (location, messages) for each usable record of `path`; unusable ones go to `skips`.

    Blank JSONL lines are not records. Records read = records yielded + records skipped.
    """
    text = read_text(path)
    jsonl, parsed = detect_jsonl(path, text)
    if jsonl:
        raw: Iterator[tuple[str, Any]] = _jsonl_records(text, skips)
    elif isinstance(parsed, list):
        raw = ((f"record {i}", r) for i, r in enumerate(parsed))
    elif isinstance(parsed, dict):
        raw = iter([("record 0", parsed)])  # a file holding one conversation object
    else:
        raise MedusaError(f"{path}: top-level JSON is a {type(parsed).__name__}; expected a list of conversations")
    for where, record in raw:
        try:
            yield where, normalise_messages(record)
        except Skip as s:
            skips.add(s.reason, where)


def _jsonl_records(text: str, skips: SkipLog) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line)
        except json.JSONDecodeError:
            skips.add("invalid_json", f"line {n}")


class JsonlWriter:
    """Extends a JSONL file atomically: each flush writes the old content plus the new lines to `path.tmp`, fsyncs
    and renames it over `path`, so the file is always whole (never a torn last line)."""

    def __init__(self, path: str, keep_existing: bool, flush_every_s: float):
        self.path, self.flush_every_s = path, flush_every_s
        self._base = keep_existing and os.path.exists(path)
        self._pending: list[str] = []
        self._last = time.monotonic()
        self.written = 0

    def add(self, record: dict) -> None:
        self._pending.append(json.dumps(record, ensure_ascii=False))
        if time.monotonic() - self._last >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if not self._pending and self._base:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            if self._base:
                with open(self.path, encoding="utf-8") as old:
                    shutil.copyfileobj(old, f)
                    if old.tell() > 0:
                        old.seek(old.tell() - 1)
                        if old.read(1) != "\n":
                            f.write("\n")
            f.writelines(line + "\n" for line in self._pending)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.written += len(self._pending)
        self._pending, self._base, self._last = [], True, time.monotonic()

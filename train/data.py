"""Chat data for training Medusa heads: read conversations, tokenize with loss masks, pack, split and batch.

Pipeline: `load_conversations` (file -> validated messages; see `train.data_formats` for the layouts and skip
reasons) -> `tokenize_dataset` (chat template ids + assistant loss mask via `medusa_jax.chat.render_conversation`,
truncation to `seq_len`, packing) -> `split_holdout` -> `BatchIterator` (deterministic per-epoch shuffle,
resumable from a `DataPosition` stored in checkpoints). `load_dataset` does the first two steps.

Packed rows hold several conversations. They must not attend to each other: training builds the attention mask
from `segment_ids` (query and key in the same non-zero segment, key not after query), and RoPE uses `positions`,
which restart at 0 in every segment. A Medusa label at t + 2 + k is only valid when it lies in the same segment as
t: the loss must check `segment_ids[t + 2 + k] == segment_ids[t]` as well as `loss_mask[t + 2 + k]`.

Padding uses `PAD_ID` with segment 0, position 0 and no loss. Nothing attends to it, so any valid id works; the
original's pad = EOS together with `attention_mask = ids != pad` also hid real EOS tokens (reference §6.27).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from medusa_jax import chat
from medusa_jax.errors import MedusaError
from train.data_formats import SKIP_REASONS, OnSkip, Skip, SkipLog, iter_records, normalise_messages

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class DataReport:
    """What was read, for the summary line. `skipped` maps a reason (`SKIP_REASONS` key) to a count.

    records: records in the file (or conversations given); used: conversations in the dataset; examples: rows;
    tokens: real (non-pad) tokens; supervised_tokens: tokens with loss.
    """

    path: str
    records: int
    used: int
    skipped: dict[str, int]
    examples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {SKIP_REASONS.get(r, r)}" for r, n in self.skipped.items() if n)
        return (f"data {self.path or '<memory>'}: {self.used}/{self.records} conversations -> {self.examples} rows, "
                f"{self.tokens} tokens ({self.supervised_tokens} supervised)"
                + (f"; skipped {skipped}" if skipped else ""))


@dataclasses.dataclass(frozen=True)
class TokenDataset:
    """Tokenized, padded (optionally packed) training rows.

    Attributes:
      tokens: int32 [num_examples, seq_len], padded with `PAD_ID`.
      loss_mask: bool [num_examples, seq_len], True on assistant tokens (content and end-of-turn token).
      attn_len: int32 [num_examples], real tokens per row (all segments of a packed row).
      segment_ids: int32 [num_examples, seq_len], 0 = padding, 1..n = the row's n-th conversation.
      positions: int32 [num_examples, seq_len], position within the token's own conversation.
      report: what was read.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    attn_len: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    report: DataReport

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def subset(self, rows: np.ndarray) -> "TokenDataset":
        """The given rows (int indices), with the report's counts recomputed for them."""
        rows = np.asarray(rows, dtype=np.int64)
        seg = self.segment_ids[rows]
        report = dataclasses.replace(self.report, used=int(seg.max(axis=1, initial=0).sum()), examples=len(rows),
                                     tokens=int(self.attn_len[rows].sum()),
                                     supervised_tokens=int(self.loss_mask[rows].sum()))
        return TokenDataset(self.tokens[rows], self.loss_mask[rows], self.attn_len[rows], seg,
                            self.positions[rows], report)


# ------------------------------------------------------------------------------------------------ reading


def _read(path: str, on_skip: OnSkip | None) -> tuple[list[list[dict]], list[str], DataReport, SkipLog]:
    path = str(path)
    skips = SkipLog(path, on_skip)
    convs, where = [], []
    for loc, messages in iter_records(path, skips):
        convs.append(messages)
        where.append(loc)
    skips.warn()
    report = DataReport(path=path, records=len(convs) + sum(skips.counts.values()), used=len(convs),
                        skipped=dict(skips.counts))
    return convs, where, report, skips


def load_conversations(path: str, *, on_skip: OnSkip | None = None) -> tuple[list[list[dict]], DataReport]:
    """Reads a ShareGPT / chat JSON / chat JSONL file into lists of ``{"role", "content"}`` messages.

    Unusable records are skipped, counted in the report and warned about (one line per reason with the first
    locations); `on_skip(reason, location)` is also called for each. Invalid JSON in a JSON (not JSONL) file,
    a missing file, or a file with no usable record raises MedusaError. The report's token counts are 0.
    """
    convs, _, report, skips = _read(path, on_skip)
    if not convs:
        raise _empty_error(report.path, report.records, skips)
    return convs, report


def _empty_error(source: str, records: int, skips: SkipLog) -> MedusaError:
    why = f" ({skips.describe()})" if skips.counts else ""
    where = source or "the data"
    return MedusaError(f"{where}: no usable conversation in {records} record{'s' if records != 1 else ''}{why}; "
                       "give chat data with assistant turns (ShareGPT JSON, chat JSON or JSONL)")


# ------------------------------------------------------------------------------------------------ tokenizing


def tokenize_dataset(conversations: Sequence[Sequence[dict]], tokenizer: Any, *, seq_len: int, pack: bool = True,
                     template: Any = None, source: str = "", labels: Sequence[str] | None = None,
                     on_skip: OnSkip | None = None) -> TokenDataset:
    """Renders conversations with the chat template and lays them out as training rows.

    Each conversation is validated (same rules as the file reader), rendered to ids and an assistant mask by
    `medusa_jax.chat.render_conversation`, and truncated to its first `seq_len` tokens; one with no assistant
    token left is skipped. With `pack`, conversations share rows (best-fit decreasing by length, conversations
    kept whole); otherwise one conversation per row. `labels[i]` names conversation i in warnings (default
    "conversation i"). Raises MedusaError when nothing is left.
    """
    if seq_len < 2:
        raise MedusaError(f"seq_len={seq_len} is too short; use at least 2 tokens (typically 512-2048)")
    if template is None or isinstance(template, str):
        try:
            template = chat.template_for(tokenizer, template or "auto")
        except chat.ChatError as e:
            raise MedusaError(str(e)) from None
    skips = SkipLog(source, on_skip)
    pieces: list[tuple[np.ndarray, np.ndarray]] = []  # (ids int32 [T], mask bool [T]) with T <= seq_len
    for i, conv in enumerate(conversations):
        where = labels[i] if labels is not None else f"conversation {i}"
        try:
            messages = normalise_messages(list(conv) if isinstance(conv, tuple) else conv)
            ids, mask = chat.render_conversation(tokenizer, messages, template)
        except Skip as s:
            skips.add(s.reason, where)
            continue
        except chat.ChatError:
            skips.add("template_error", where)
            continue
        ids, mask = ids[:seq_len], mask[:seq_len]
        if not mask.any():
            skips.add("truncated_away", where)
            continue
        pieces.append((ids, mask))
    skips.warn()
    report = DataReport(path=source, records=len(conversations), used=len(pieces), skipped=dict(skips.counts))
    if not pieces:
        raise _empty_error(source, len(conversations), skips)

    rows = _pack([len(ids) for ids, _ in pieces], seq_len) if pack else [[i] for i in range(len(pieces))]
    n = len(rows)
    tokens = np.full((n, seq_len), PAD_ID, np.int32)
    loss_mask = np.zeros((n, seq_len), bool)
    segment_ids = np.zeros((n, seq_len), np.int32)
    positions = np.zeros((n, seq_len), np.int32)
    attn_len = np.zeros((n,), np.int32)
    for r, members in enumerate(rows):
        start = 0
        for seg, i in enumerate(members, start=1):
            ids, mask = pieces[i]
            end = start + len(ids)
            tokens[r, start:end] = ids
            loss_mask[r, start:end] = mask
            segment_ids[r, start:end] = seg
            positions[r, start:end] = np.arange(len(ids), dtype=np.int32)
            start = end
        attn_len[r] = start
    report = dataclasses.replace(report, examples=n, tokens=int(attn_len.sum()),
                                 supervised_tokens=int(loss_mask.sum()))
    return TokenDataset(tokens, loss_mask, attn_len, segment_ids, positions, report)


def _pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: rows of conversation indices whose lengths sum to <= seq_len.

    Each conversation (longest first) goes to the open row with the least room that still fits it. Members of a
    row are listed in input order. O(n log n) apart from list insertion, fine for ~1e5 conversations.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index) of rows with room
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        j = bisect.bisect_left(free, (need, -1))
        if j < len(free):
            room, r = free.pop(j)
            rows[r].append(i)
        else:
            room, r = seq_len, len(rows)
            rows.append([i])
        if room - need > 0:
            bisect.insort(free, (room - need, r))
    return [sorted(members) for members in rows]


def load_dataset(path: str, tokenizer: Any, *, seq_len: int, pack: bool = True, template: Any = None,
                 on_skip: OnSkip | None = None) -> TokenDataset:
    """`load_conversations` then `tokenize_dataset`; the report counts skips of both steps against the file."""
    convs, where, read, skips = _read(path, on_skip)
    if not convs:
        raise _empty_error(read.path, read.records, skips)
    ds = tokenize_dataset(convs, tokenizer, seq_len=seq_len, pack=pack, template=template, source=read.path,
                          labels=where, on_skip=on_skip)
    skipped = dict(read.skipped)
    for reason, n in ds.report.skipped.items():
        skipped[reason] = skipped.get(reason, 0) + n
    return dataclasses.replace(ds, report=dataclasses.replace(ds.report, records=read.records, skipped=skipped))


def split_holdout(ds: TokenDataset, fraction: float, seed: int) -> tuple[TokenDataset, TokenDataset]:
    """Splits rows at random into (train, holdout); the holdout gets round(fraction * n) rows, at least one.

    fraction 0 gives an empty holdout. Rows keep their original order within each part.
    """
    n = len(ds)
    if not 0.0 <= fraction < 1.0:
        raise MedusaError(f"holdout fraction {fraction} is out of range; use 0 <= fraction < 1 (e.g. 0.05)")
    k = 0 if fraction == 0 else max(1, int(round(n * fraction)))
    if k >= n:
        raise MedusaError(f"cannot hold out {k} of {n} rows and still train; use more data or a smaller holdout")
    perm = np.random.default_rng(_seed(seed)).permutation(n)
    return ds.subset(np.sort(perm[k:])), ds.subset(np.sort(perm[:k]))


def _seed(seed: int, *more: int) -> list[int]:
    return [int(seed) % 2**64, *more]  # SeedSequence wants non-negative entries


# ------------------------------------------------------------------------------------------------ batching


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the next batch starts: the epoch, and the index of its first row in that epoch's permutation."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), int(d["index"]))


BATCH_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")


class BatchIterator:
    """Infinite iterator of batches: dicts of numpy arrays {tokens, loss_mask, segment_ids, positions} [B, seq_len].

    Epoch e visits the rows in the order `permutation(n)` of a generator seeded with (seed, e), so batches depend
    only on (seed, position): an iterator started from a saved `position` yields exactly the batches the
    uninterrupted one would have. With `drop_last`, rows that do not fill a last batch are left out of that epoch
    (a different permutation next epoch); without it the last batch is filled with padding rows (segment 0, no
    loss), so every batch has the same shape and a jitted step never recompiles.
    """

    def __init__(self, ds: TokenDataset, batch_size: int, seed: int, position: DataPosition = DataPosition(0, 0),
                 drop_last: bool = True):
        n = len(ds)
        if batch_size < 1:
            raise MedusaError(f"batch size {batch_size} must be at least 1")
        if drop_last and n < batch_size:
            raise MedusaError(f"the dataset has {n} rows, fewer than the batch size {batch_size}; "
                              "lower the batch size or give more data")
        if position.epoch < 0 or position.index < 0:
            raise MedusaError(f"data position {position} is invalid; epoch and index must be >= 0")
        self.ds, self.batch_size, self.seed, self.drop_last = ds, batch_size, seed, drop_last
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._epoch, self._index = position.epoch, position.index
        self._perm_epoch, self._perm = -1, np.zeros((0,), np.int64)
        self._roll()

    @property
    def position(self) -> DataPosition:
        """Position of the next batch (save it in checkpoints)."""
        return DataPosition(self._epoch, self._index)

    def _roll(self) -> None:
        # A batch starting at index exists while it fits (drop_last) or while any row is left; a position saved
        # with another batch size may land past that point, which also means "next epoch".
        n = len(self.ds)
        if (self._index + self.batch_size > n) if self.drop_last else (self._index >= n):
            self._epoch, self._index = self._epoch + 1, 0

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(_seed(self.seed, epoch)).permutation(len(self.ds))
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self._permutation(self._epoch)[self._index: self._index + self.batch_size]
        batch = {k: getattr(self.ds, k)[rows] for k in BATCH_KEYS}
        short = self.batch_size - len(rows)
        if short:  # only without drop_last: pad with rows that attend nothing and carry no loss
            for k, v in batch.items():
                fill = PAD_ID if k == "tokens" else 0
                batch[k] = np.concatenate([v, np.full((short,) + v.shape[1:], fill, v.dtype)])
        self._index += self.batch_size
        self._roll()
        return batch

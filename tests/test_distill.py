"""Tests for train.distill and train.prompts: the CLI on a tiny random model, output format, resume, interruption,
multi-turn regeneration and de-duplication of self-generated prompts.

The CLI tests run the real jitted generator (`infer.api.generate_ids`) on `--model tiny`: a random 2-layer model
with the embedded SmolLM2 tokenizer (its vocabulary sized to match), so the text is meaningless but every step of
the plumbing is real. Tests of conversation logic replace the generator with a scripted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from medusa_jax import tiny
from medusa_jax.loading import embedded
from medusa_jax.errors import MedusaError
from train import data, distill, prompts

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Explain recursion briefly.",
             "Name three primes."]


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_chat_jsonl(path):
    records = _lines(path)
    for r in records:
        assert set(r) == {"messages"}
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and "user" in roles
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"]
                   for m in r["messages"] if m["role"] == "assistant")
    convs, report = data.load_conversations(path)  # the training reader accepts it as is
    assert len(convs) == len(records) and report.skipped == {}
    return records


# ------------------------------------------------------------------------------------------------ real generator


def test_cli_tiny_writes_chat_jsonl_and_resumes(tmp_path, capsys):
    prompt_file, out = tmp_path / "p.txt", tmp_path / "out" / "d.jsonl"
    prompt_file.write_text("\n".join(QUESTIONS[:2]) + "\n\n")
    args = ["--model", "tiny", "--out", str(out), "--max-new-tokens", "6", "--batch-size", "2", "--no-progress"]
    stats = distill.main(args + ["--prompts", str(prompt_file)])
    first = _check_chat_jsonl(out)
    assert [r["messages"][0]["content"] for r in first] == QUESTIONS[:2]
    assert (stats.prompts, stats.answered, stats.resumed) == (2, 2, 0)
    assert 0 < stats.tokens <= 2 * 6
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("distill: 2 prompts") and str(out) in summary
    assert "writing prompts" not in summary and stats.prompt_seconds == 0  # given prompts: none written
    assert not os.path.exists(str(out) + ".tmp")

    # Resume with more prompts: the answered ones are skipped, the file is extended, old lines stay as they were.
    before = out.read_text()
    prompt_file.write_text("\n".join(QUESTIONS) + "\n")
    stats = distill.main(args + ["--prompts", str(prompt_file)])
    assert (stats.prompts, stats.answered, stats.resumed) == (4, 2, 2)
    assert out.read_text().startswith(before)
    assert [r["messages"][0]["content"] for r in _check_chat_jsonl(out)] == QUESTIONS

    # --no-resume starts over.
    prompt_file.write_text("\n".join(QUESTIONS[2:]) + "\n")
    distill.main(args + ["--prompts", str(prompt_file), "--no-resume"])
    assert [r["messages"][0]["content"] for r in _check_chat_jsonl(out)] == QUESTIONS[2:]


def test_cli_tiny_self_generated_prompts(tmp_path, capsys):
    out = tmp_path / "self.jsonl"
    stats = distill.main(["--model", "tiny", "--out", str(out), "--num-prompts", "2", "--max-new-tokens", "4",
                          "--batch-size", "2", "--no-progress"])
    assert f"{stats.prompt_seconds:.0f} s writing prompts" in capsys.readouterr().out and stats.prompt_seconds > 0
    records = _check_chat_jsonl(out)
    questions = [r["messages"][0]["content"] for r in records]
    assert len(records) == stats.answered <= 2
    assert len({prompts.normalise(q) for q in questions}) == len(questions)
    assert all(prompts.clean_prompt(q) == q for q in questions)


def test_cli_errors(tmp_path):
    with pytest.raises(MedusaError, match="prompts file .* does not exist"):
        distill.main(["--model", "tiny", "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(MedusaError, match="num-prompts"):
        distill.main(["--model", "tiny", "--num-prompts", "0"])


# ------------------------------------------------------------------------------------------------ scripted generator


@pytest.fixture(scope="module")
def stub_params():
    tok = embedded.load_tokenizer(embedded.gguf_path())
    return types.SimpleNamespace(tokenizer=tok, config=dataclasses.replace(tiny(), vocab_size=len(tok)),
                                 source="stub")


class Script:
    """Stands in for `distill._generate`: answers with `reply(prompt_text)`, remembers the prompts it saw."""

    def __init__(self, tok, reply, fail_on_call=None):
        self.tok, self.reply, self.fail_on_call = tok, reply, fail_on_call
        self.prompts: list[str] = []
        self.calls = 0

    def __call__(self, params, prompt_ids, *, max_new_tokens, temperature, top_p, seed, stop_ids, width):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        assert len(prompt_ids) <= width
        out = []
        for ids in prompt_ids:
            text = self.tok.decode(ids)
            self.prompts.append(text)
            reply = self.tok(self.reply(text), add_special_tokens=False)["input_ids"]
            cut = len(reply) >= max_new_tokens
            out.append((reply[:max_new_tokens], False) if cut else (reply + [stop_ids[0]], True))
        return out


def _last_user(text):
    return text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]


def test_multi_turn_prompts_are_regenerated_in_order(tmp_path, stub_params, monkeypatch):
    script = Script(stub_params.tokenizer, lambda t: "Reply to " + _last_user(t))
    monkeypatch.setattr(distill, "_generate", script)
    conv = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "First?"},
            {"role": "assistant", "content": "OLD ANSWER"}, {"role": "user", "content": "Second?"},
            {"role": "assistant", "content": "OLD TOO"}]
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"prompt": "Solo?"}) + "\n"
                           + json.dumps({"turns": ["A?", "B?"]}) + "\n" + "{not json\n")
    items = prompts.read_prompts(str(prompt_file))
    assert len(items) == 3
    convs = distill.distill(stub_params, items, out=str(tmp_path / "o.jsonl"), batch_size=2, progress=False)
    assert convs[0] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "First?"},
                        {"role": "assistant", "content": "Reply to First?"}, {"role": "user", "content": "Second?"},
                        {"role": "assistant", "content": "Reply to Second?"}]
    assert [m["content"] for m in convs[2]] == ["A?", "Reply to A?", "B?", "Reply to B?"]
    # The second turn was generated after the regenerated first answer, never after the file's old one.
    second = next(p for p in script.prompts if p.endswith("Second?<|im_end|>\n<|im_start|>assistant\n"))
    assert "Reply to First?" in second and "OLD" not in second
    assert sorted(map(json.dumps, _lines(tmp_path / "o.jsonl"))) == sorted(json.dumps({"messages": c}) for c in convs)


def test_length_cut_answer_ends_the_conversation_and_empty_answers_are_dropped(stub_params, monkeypatch):
    replies = {"Long?": "word " * 50, "Empty?": "", "Fine?": "ok"}
    monkeypatch.setattr(distill, "_generate", Script(stub_params.tokenizer, lambda t: replies[_last_user(t)]))
    items = [[{"role": "user", "content": "Long?"}, {"role": "user", "content": "Never asked?"}], "Empty?", "Fine?"]
    convs, stats = distill.distill_with_stats(stub_params, items, max_new_tokens=8, progress=False)
    assert [len(c) for c in convs] == [2, 2]  # Long? keeps its cut answer only; Empty? is dropped
    assert convs[1][1]["content"] == "ok"
    assert (stats.answered, stats.dropped) == (2, 1)


def test_interrupted_run_keeps_finished_batches(tmp_path, stub_params, monkeypatch):
    out = str(tmp_path / "o.jsonl")
    script = Script(stub_params.tokenizer, lambda t: "A: " + _last_user(t), fail_on_call=2)
    monkeypatch.setattr(distill, "_generate", script)
    with pytest.raises(KeyboardInterrupt):
        distill.distill(stub_params, QUESTIONS, out=out, batch_size=2, flush_every_s=1e9, progress=False)
    assert [r["messages"][0]["content"] for r in _lines(out)] == QUESTIONS[:2]
    monkeypatch.setattr(distill, "_generate", Script(stub_params.tokenizer, lambda t: "B: " + _last_user(t)))
    convs, stats = distill.distill_with_stats(stub_params, QUESTIONS, out=out, batch_size=2, progress=False)
    assert (stats.resumed, stats.answered) == (2, 2)
    assert [c[1]["content"][:2] for c in convs] == ["A:", "A:", "B:", "B:"]
    assert len(_lines(out)) == 4


def test_self_prompts_are_cleaned_and_deduplicated(stub_params, monkeypatch):
    # Replies cycle through duplicates (case, punctuation, labels, quotes) and degenerate text.
    canned = iter(["What is a black hole?", "what is a BLACK hole", "Question: What is a black hole ?",
                   "", "?!?! 123 ...", "la la la la la la la la la", '"How do I boil an egg?"',
                   "1. How do I boil an egg?", "Explain photosynthesis to a child.", "hi"] * 20)
    monkeypatch.setattr(distill, "_generate", Script(stub_params.tokenizer, lambda t: next(canned)))
    got = distill.self_prompts(stub_params, 5, batch_size=4, exclude=["explain photosynthesis to a child"],
                               progress=False)
    assert got == ["What is a black hole?", "How do I boil an egg?"]  # fewer than asked: only 2 distinct new ones


def test_self_generated_prompts_count_those_already_answered(tmp_path, stub_params, monkeypatch):
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"messages": [{"role": "user", "content": "What is a black hole?"},
                                            {"role": "assistant", "content": "A region of space."}]}) + "\n")
    questions = iter(["What is a black hole?", "Why is the sea salty?", "How do bees fly?"] * 5)

    def reply(prompt):  # meta-prompts get a question, real questions an answer
        return next(questions) if prompts.META_PROMPT[:20] in prompt else "Answer."

    monkeypatch.setattr(distill, "_generate", Script(stub_params.tokenizer, reply))
    convs, stats = distill.distill_with_stats(stub_params, None, num_prompts=3, out=str(out), batch_size=2,
                                              progress=False)
    assert [c[0]["content"] for c in convs] == ["What is a black hole?", "Why is the sea salty?", "How do bees fly?"]
    assert (stats.prompts, stats.resumed, stats.answered) == (3, 1, 2)
    assert convs[0][1]["content"] == "A region of space."  # kept from the file, not regenerated


def test_meta_prompts_cover_every_kind():
    pairs = prompts.meta_prompts(2 * len(prompts.TASK_KINDS), seed=3)
    kinds = [k for k, _ in pairs]
    assert all(kinds.count(k) == 2 for k in prompts.TASK_KINDS)
    assert all(text == prompts.META_PROMPT.format(kind=k) for k, text in pairs)
    assert pairs == prompts.meta_prompts(2 * len(prompts.TASK_KINDS), seed=3)


@pytest.mark.parametrize("raw, want", [
    ("  Q: How do tides work?\nBecause the moon...", "How do tides work?"),
    ("'Why is the sky blue?'", "Why is the sky blue?"),
    ("- Suggest a name for my cat", "Suggest a name for my cat"),
    ('A user might ask: "What is DNA made of?" Then the assistant...', "What is DNA made of?"),
    ("Q: Can cats swim? A: Most can.", "Can cats swim?"),
    ("Here is one question you could ask about maths:\n\nWhat is pi?", None),
    ("Hi", None),
    ("", None),
    ("12 + 34 = ??", None),
    ("go go go go go go go go go go", None),
])
def test_clean_prompt(raw, want):
    assert prompts.clean_prompt(raw) == want

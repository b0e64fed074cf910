"""Chat prompts: validate messages, render them with a chat template, and tokenize them.

Two kinds of template are supported:

* ``TokenizerTemplate`` -- the tokenizer's own Jinja chat template (``tokenizer.chat_template``), rendered by
  ``tokenizer.apply_chat_template``. SmolLM2-Instruct (ChatML) ships one.
* ``VicunaTemplate`` -- FastChat's ``vicuna_v1.1`` conversation, for Vicuna checkpoints whose tokenizers have no
  template. FastChat (``fastchat/conversation.py``) registers it as ``sep_style=ADD_COLON_TWO, sep=" ",
  sep2="</s>", roles=("USER", "ASSISTANT")`` and renders it as::

      ret = system + sep
      for i, (role, message) in enumerate(messages):
          ret += role + ": " + message + (sep, sep2)[i % 2]   # a finished turn
          # or, for the open assistant turn:  ret += role + ":"

  i.e. ``"<system> USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"`` -- a space after user turns, ``</s>`` and
  *no* space after assistant turns, and the tokenizer adds BOS (``<s>``) in front.

Public API: ``render_prompt`` (token ids to generate from), ``render_conversation`` (token ids plus a loss mask
over the assistant's replies, for training Medusa heads on chat data), ``stop_token_ids`` and ``template_for``.
Every malformed input raises ``ChatError`` with one line naming the problem.

This module depends only on numpy and transformers (jinja2 through transformers), so it can be imported and
tested without JAX.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Mapping, Sequence, Union

import numpy as np

from medusa_jax.errors import MedusaError

Message = dict
"""A chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""

Messages = Union[str, Sequence[Mapping[str, Any]]]
"""What the public functions accept: a list of messages, or a plain string meaning one user turn."""

ROLES = ("system", "user", "assistant")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# End-of-turn markers of common Jinja templates that differ from the tokenizer's EOS. A marker counts only when
# the template text mentions it and the tokenizer has it as one token (see `stop_token_ids`).
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class ChatError(MedusaError):
    """A malformed conversation or an unusable template; the message is one line naming the problem."""


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def validate_messages(messages: Messages) -> list[Message]:
    """Checks `messages` and returns them as a fresh list of ``{"role", "content"}`` dicts.

    A plain string becomes one user turn. Extra keys on a message are dropped: no template here uses them, and
    copying only the two known keys keeps renderings deterministic.
    """
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
        raise ChatError(f"messages must be a list of {{'role', 'content'}} dicts or a string, "
                        f"got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatError("messages is empty; give at least one message")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ChatError(f"message {i} has no {key!r} key")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatError(f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"message {i} content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


# ----------------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------------


class ChatTemplate(abc.ABC):
    """Turns validated messages into prompt text; tokenization is shared by all kinds (see `_tokenize`)."""

    #: Short name used in errors and reports ("tokenizer", "vicuna").
    name: str = "template"
    #: Whether the rendered text lacks BOS, so tokenization must prepend it. Jinja templates write BOS
    #: themselves when the model wants it; FastChat's Vicuna text relies on the tokenizer adding it.
    prepend_bos: bool = False

    @abc.abstractmethod
    def render_text(self, tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        """Renders already-validated `messages` (possibly an empty prefix) to text."""

    def end_of_turn_markers(self, tokenizer: Any) -> tuple[str, ...]:
        """Marker strings other than EOS that this template writes at the end of each assistant turn."""
        return ()


@dataclasses.dataclass(frozen=True)
class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own Jinja chat template, rendered by ``tokenizer.apply_chat_template``."""

    source: str
    name: str = "tokenizer"
    prepend_bos: bool = False

    def render_text(self, tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(list(messages), chat_template=self.source, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as e:  # Jinja templates raise their own errors (e.g. raise_exception on bad roles)
            raise ChatError(f"the tokenizer's chat template failed: {type(e).__name__}: {e}".splitlines()[0]) from e
        if not isinstance(text, str):
            raise ChatError(f"the tokenizer's chat template returned {type(text).__name__}, not text")
        return text

    def end_of_turn_markers(self, tokenizer: Any) -> tuple[str, ...]:
        # Only markers the template actually writes: a ChatML model stops on <|im_end|> even when the
        # tokenizer's EOS is <|endoftext|>.
        return tuple(m for m in _END_OF_TURN_MARKERS if m in self.source)


@dataclasses.dataclass(frozen=True)
class VicunaTemplate(ChatTemplate):
    """FastChat's ``vicuna_v1.1`` conversation (ADD_COLON_TWO, sep=" ", sep2="</s>"); see the module docstring.

    A leading system message replaces `system`. The turn separator after assistant replies is the tokenizer's
    EOS text (``</s>`` for LLaMA), so it tokenizes to the EOS id the model was trained to stop on.
    """

    system: str = VICUNA_SYSTEM
    name: str = "vicuna"
    prepend_bos: bool = True

    def render_text(self, tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        sep2 = _eos_text(tokenizer)
        system = self.system
        for i, m in enumerate(messages):
            if m["role"] == "system" and i != 0:
                raise ChatError(f"message {i} is a system message; the vicuna template allows one only first")
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        parts = [system, " "]
        for m in messages:
            if m["role"] == "user":
                parts += ["USER: ", m["content"], " "]
            else:
                parts += ["ASSISTANT: ", m["content"], sep2]
        if add_generation_prompt:
            parts.append("ASSISTANT:")
        return "".join(parts)


def template_for(tokenizer: Any, kind: str = "auto") -> ChatTemplate:
    """Picks the chat template for `tokenizer`.

    kind: "auto" -- the tokenizer's Jinja template when it has one, else Vicuna v1.1 (Vicuna tokenizers ship
    none); "tokenizer" -- the tokenizer's template, an error if it has none; "vicuna" -- Vicuna v1.1 always.
    """
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # some tokenizers carry several named templates; "default" is the chat one
        source = source.get("default")
    has_own = isinstance(source, str) and source.strip() != ""
    if kind == "auto":
        return TokenizerTemplate(source) if has_own else VicunaTemplate()
    if kind == "tokenizer":
        if not has_own:
            raise ChatError("the tokenizer has no chat template; use template 'vicuna' or 'auto'")
        return TokenizerTemplate(source)
    if kind == "vicuna":
        return VicunaTemplate()
    raise ChatError(f"unknown chat template kind {kind!r}; expected 'auto', 'tokenizer' or 'vicuna'")


def _resolve(tokenizer: Any, template: ChatTemplate | str | None) -> ChatTemplate:
    if template is None:
        return template_for(tokenizer, "auto")
    if isinstance(template, str):
        return template_for(tokenizer, template)
    if not isinstance(template, ChatTemplate):
        raise ChatError(f"template must be a ChatTemplate, a kind name or None, got {type(template).__name__}")
    return template


# ----------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------


def _eos_text(tokenizer: Any) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not isinstance(eos, str) or not eos:
        raise ChatError("the tokenizer has no EOS token, which the vicuna template needs to end assistant turns")
    return eos


def _tokenize(tokenizer: Any, template: ChatTemplate, text: str,
              with_offsets: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of rendered `text` (plus character offsets when asked).

    Special tokens are never added by the tokenizer: Jinja templates write BOS into the text themselves
    (this matches ``apply_chat_template(tokenize=True)``), and for templates that want BOS prepended we
    prepend the id ourselves rather than trust each tokenizer's post-processor configuration.
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=with_offsets)
    except NotImplementedError as e:  # slow (Python) tokenizers cannot report offsets
        raise ChatError("render_conversation needs a fast tokenizer (one that reports character offsets)") from e
    ids = [int(t) for t in enc["input_ids"]]
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]] if with_offsets else []
    if template.prepend_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None:
            ids.insert(0, int(bos))
            if with_offsets:
                offsets.insert(0, (0, 0))  # covers no text, so it is never in an assistant span
    return ids, offsets


def stop_token_ids(tokenizer: Any, template: ChatTemplate | str | None = None) -> tuple[int, ...]:
    """Ids that end an assistant turn: EOS, plus the template's end-of-turn marker (e.g. ChatML's
    ``<|im_end|>``) when the tokenizer has it as one token. Order: EOS first, no duplicates."""
    tpl = _resolve(tokenizer, template)
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for e in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    unk = getattr(tokenizer, "unk_token_id", None)
    for marker in tpl.end_of_turn_markers(tokenizer):
        # A marker split into several tokens cannot be matched as one stop id; skip it (EOS still stops).
        toks = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(toks) == 1 and toks[0] != unk and int(toks[0]) not in ids:
            ids.append(int(toks[0]))
    if not ids:
        raise ChatError("the tokenizer has no EOS token and the template no end-of-turn token; "
                        "generation would never stop")
    return tuple(ids)


def _stop_texts(tokenizer: Any, template: ChatTemplate) -> tuple[str, ...]:
    """The text each stop id is written as in rendered prompts (special tokens appear literally)."""
    texts = []
    for i in stop_token_ids(tokenizer, template):
        tok = tokenizer.convert_ids_to_tokens(i)
        if isinstance(tok, str) and tok:
            texts.append(tok)
    return tuple(texts)


# ----------------------------------------------------------------------------------------------------------
# Public rendering
# ----------------------------------------------------------------------------------------------------------


def render_prompt(tokenizer: Any, messages: Messages, template: ChatTemplate | str | None = None) -> list[int]:
    """Token ids of the conversation followed by the assistant generation prompt, ready to generate from.

    `messages` is a list of messages or a plain string (one user turn). The conversation must not end with an
    assistant message: the prompt asks for the next assistant reply.
    """
    msgs = validate_messages(messages)
    if msgs[-1]["role"] == "assistant":
        raise ChatError(f"message {len(msgs) - 1} is the assistant's; a prompt must end with a user turn "
                        f"(the generation prompt opens the next assistant reply)")
    tpl = _resolve(tokenizer, template)
    text = tpl.render_text(tokenizer, msgs, add_generation_prompt=True)
    return _tokenize(tokenizer, tpl, text, with_offsets=False)[0]


def render_conversation(tokenizer: Any, messages: Messages,
                        template: ChatTemplate | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole conversation as token ids (int32 [T]) and a loss mask (bool [T]).

    The mask is True exactly on what the model must generate for each assistant reply: its content and the
    end-of-turn token that closes it (``<|im_end|>``, ``</s>``), so the model learns to stop. Template text
    (system/user turns, the assistant header such as ``<|im_start|>assistant\\n`` or ``ASSISTANT:``, and
    anything after the end-of-turn token such as ChatML's trailing newline) is False.

    Method -- character spans, then token offsets, because token-level prefix arithmetic breaks whenever a
    tokenizer merges across a turn boundary, while text is exact for any Jinja template:

    1. Render the full conversation text once.
    2. For the i-th message, if it is the assistant's, render ``messages[:i]`` with the generation prompt: when
       that text is a prefix of the full text (true for ChatML, Vicuna and most templates), the reply starts
       where it ends -- exactly where generation from `render_prompt(messages[:i])` starts. Otherwise (a
       template that rewrites history) fall back to searching the content after the previous reply.
    3. The reply ends after the first stop-token text (`stop_token_ids`) that follows the content inside this
       turn's rendering (``messages[:i+1]``), or at the end of the content if the template writes none.
    4. Tokenize the full text with offsets; a token is masked when its characters overlap a reply span. A token
       that straddles the header and the reply (rare) is masked, since it carries reply text.
    """
    msgs = validate_messages(messages)
    tpl = _resolve(tokenizer, template)
    full = tpl.render_text(tokenizer, msgs, add_generation_prompt=False)
    stops = _stop_texts(tokenizer, tpl)

    spans: list[tuple[int, int]] = []
    cursor = 0  # replies are located left to right and never overlap
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        spans.append(_reply_span(tokenizer, tpl, msgs, i, full, cursor, stops))
        cursor = spans[-1][1]

    ids, offsets = _tokenize(tokenizer, tpl, full, with_offsets=True)
    mask = np.zeros(len(ids), dtype=bool)
    for t, (s, e) in enumerate(offsets):
        for a, b in spans:
            # Zero-width offsets (tokens whose text was trimmed) count when they sit inside the span.
            if (s < b and e > a) if e > s else (a <= s < b):
                mask[t] = True
                break
    return np.asarray(ids, dtype=np.int32), mask


def _reply_span(tokenizer: Any, tpl: ChatTemplate, msgs: list[Message], i: int, full: str, cursor: int,
                stops: tuple[str, ...]) -> tuple[int, int]:
    """Character span [start, end) in `full` of assistant message i's reply plus its end-of-turn text."""
    content = msgs[i]["content"]
    prompt = tpl.render_text(tokenizer, msgs[:i], add_generation_prompt=True)
    turn = tpl.render_text(tokenizer, msgs[: i + 1], add_generation_prompt=False)
    window_end = len(turn) if full.startswith(turn) and len(turn) > cursor else len(full)
    prefix_stable = full.startswith(prompt) and len(prompt) >= cursor

    search_from = len(prompt) if prefix_stable else cursor
    found = -1
    for candidate in (content, content.strip()):  # templates often trim content
        if candidate == "":
            found, content = search_from, ""
            break
        found = full.find(candidate, search_from, window_end)
        if found >= 0:
            content = candidate
            break
    if found < 0:
        raise ChatError(f"cannot find the content of message {i} in the text the {tpl.name} chat template "
                        f"rendered (the template rewrites it), so the loss mask cannot be placed")
    # Prefix-stable: everything after the generation prompt is what the model generates (e.g. Vicuna's space
    # before the reply). Otherwise we only know where the content is.
    start = len(prompt) if prefix_stable else found
    content_end = found + len(content)
    end = content_end
    hits = [(full.find(s, content_end, window_end), s) for s in stops]
    hits = [(p, s) for p, s in hits if p >= 0]
    if hits:
        p, s = min(hits)
        end = p + len(s)
    return start, end


__all__ = ["ChatError", "ChatTemplate", "Message", "Messages", "TokenizerTemplate", "VICUNA_SYSTEM",
           "VicunaTemplate", "render_conversation", "render_prompt", "stop_token_ids", "template_for",
           "validate_messages"]

"""Conversations rendered with a tokenizer's chat template, with a per-token training target.

A conversation is a list of ``{"role", "content"}`` messages (:func:`parse_messages`). It renders
to token ids plus ``target``: ``target[t]`` is True when the student learns to produce token t.
With ``train_on="assistant"`` the targets are the assistant turns (their content and the
end-of-turn token that follows it); system, user and tool turns, the role headers and the
template's own text are context. With ``train_on="all"`` every token but the first is a target.

How the assistant tokens are found (``RenderedExample.mask_method``):

* ``generation-markers``: the template wraps assistant turns in ``{% generation %}`` blocks, and
  transformers' ``apply_chat_template(return_assistant_tokens_mask=True)`` marks every token that
  overlaps one.
* ``prefix-diff``: any other template (SmolLM2's has no markers, and with it transformers returns
  an all-zero mask after one warning). The conversation is rendered prefix by prefix: for
  assistant message i, ``A = render(m[:i], add_generation_prompt=True)`` and
  ``B = render(m[:i+1])``; the turn is the characters ``[len(A), len(A) + len(B[len(A):].rstrip()))``
  of the full rendering, and a token is a target when its character offsets overlap a turn
  (transformers' own rule). A template whose renderings are not prefixes of each other (one that
  rewrites earlier turns, as Qwen3's drops earlier reasoning) is refused, naming the message.

In both methods trailing whitespace after a turn (ChatML's ``\\n`` after ``<|im_end|>``) is
context: the model stops at the end-of-turn token and never generates it. Then every assistant
turn must have a target, and its last target must be an added or special token (the model has to
learn to stop); otherwise the conversation is refused. The rendering is tokenized once, without
special tokens, exactly as ``apply_chat_template(tokenize=True)`` does.

:data:`PROBE_CONVERSATION` and :func:`template_probe` give a fixed conversation's ids, to compare
two tokenizers' templates by what they produce rather than by their text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from unidistill.errors import DataError

CONTEXT_ROLES = ("system", "user", "tool")
# accepted as tool turns (context); the template still sees the role as written
TOOL_ALIASES = ("ipython", "function")
ROLES = (*CONTEXT_ROLES, "assistant", *TOOL_ALIASES)
TRAIN_ON = ("assistant", "all")
GENERATION_MARKERS = "generation-markers"
PREFIX_DIFF = "prefix-diff"
EVERY_TOKEN = "every-token"
# transformers' own test for the keyword (chat_template_utils.render_jinja_template)
_GENERATION_TAG = re.compile(r"\{\%-?\s*generation\s*-?\%\}")

PROBE_CONVERSATION = (
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3, with the tool?"},
    {"role": "tool", "content": "6"},
    {"role": "assistant", "content": "6."},
)


class ChatTemplateError(DataError):
    """A tokenizer's chat template cannot give a training mask for a conversation."""


@dataclass(frozen=True)
class RenderedExample:
    """One conversation rendered: ``ids`` and ``target`` have one entry per token; ``turns`` holds,
    per assistant message, the ``[start, end)`` token range of its targets (empty for
    ``train_on="all"``); ``text`` is the rendering the ids tokenize."""

    ids: tuple[int, ...]
    target: tuple[bool, ...]
    turns: tuple[tuple[int, int], ...]
    text: str
    mask_method: str


def parse_messages(value, where: str) -> list[dict]:
    """Check one conversation: a list of ``{"role": str, "content": str}`` dicts whose roles are
    in :data:`ROLES`. ``where`` names it in errors (e.g. "row 3, field 'messages' of data.jsonl").
    Other keys are refused unless None (a data set's columns give every message every key of any
    message, as None where it has none). Returns new dicts with just the two keys."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where} holds {type(value).__name__} {_short(value)}; expected a non-empty "
                        "list of messages, each {'role': ..., 'content': ...}")
    messages = []
    for i, message in enumerate(value):
        keys = {k for k, v in message.items() if v is not None} if isinstance(message, dict) else None
        if keys != {"role", "content"}:
            got = sorted(keys) if keys is not None else type(message).__name__
            raise DataError(f"message {i} of {where} has {got}; expected a dict with exactly the keys "
                            "'role' and 'content' (tool calls and names are not supported: put them "
                            "in the content)")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"message {i} of {where} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"message {i} of {where} has content of type {type(content).__name__}; "
                            "expected a string (multimodal content parts are not supported)")
        messages.append({"role": role, "content": content})
    return messages


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def check_chat_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer that cannot give a mask: no chat template, or no character offsets."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"the tokenizer {type(tokenizer).__name__} has no chat template, which "
                                "conversations are rendered with; use a chat model's tokenizer, or "
                                "set tokenizer.chat_template to the template the model was trained with")
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(f"the tokenizer {type(tokenizer).__name__} is a slow (Python) tokenizer "
                                "and gives no character offsets, which the training mask is computed "
                                "from; load the fast one (AutoTokenizer.from_pretrained(..., use_fast=True))")


def has_generation_markers(tokenizer) -> bool:
    return bool(_GENERATION_TAG.search(tokenizer.chat_template or ""))


def render_text(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def render_conversation(tokenizer, messages, train_on: str = "assistant") -> RenderedExample:
    """Render ``messages`` (already checked by :func:`parse_messages`) with the tokenizer's chat
    template and mark the targets (module docstring). Raises :class:`ChatTemplateError` when the
    template cannot give a trustworthy mask."""
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on is {train_on!r}; expected one of {TRAIN_ON}")
    check_chat_tokenizer(tokenizer)
    messages = list(messages)
    full = render_text(tokenizer, messages)
    ids, offsets = _tokenize(tokenizer, full)
    if train_on == "all":
        return RenderedExample(tuple(ids), tuple(t > 0 for t in range(len(ids))), (), full, EVERY_TOKEN)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise ChatTemplateError(f"the conversation has no assistant message (roles "
                                f"{[m['role'] for m in messages]}), so nothing in it is trained with "
                                "train_on='assistant'; drop it, or train on every token (--train-on all)")
    if has_generation_markers(tokenizer):
        target = _marker_mask(tokenizer, messages, ids)
        method = GENERATION_MARKERS
    else:
        spans = [_assistant_span(tokenizer, messages, i, full) for i in assistant]
        target = _overlap_mask(offsets, spans)
        method = PREFIX_DIFF
    target = _strip_trailing_whitespace(target, offsets, full)
    turns = _turns(target)
    _check_turns(tokenizer, ids, turns, assistant, method)
    return RenderedExample(tuple(ids), tuple(target), tuple(turns), full, method)


def _marker_mask(tokenizer, messages, ids: list[int]) -> list[bool]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    if list(out["input_ids"]) != ids:  # cannot differ today; the mask is only valid for these ids
        raise ChatTemplateError("apply_chat_template(tokenize=True) gave other ids than tokenizing its "
                                "rendering without special tokens; the generation-marker mask cannot "
                                "be matched to the tokens")
    return [bool(m) for m in out["assistant_masks"]]


def _assistant_span(tokenizer, messages, i: int, full: str) -> tuple[int, int]:
    """The characters of assistant message i in ``full`` (section 1.2 of the design)."""
    from jinja2 import TemplateError

    try:
        before = render_text(tokenizer, messages[:i], add_generation_prompt=True)
    except (ValueError, TemplateError) as e:  # transformers refuses an empty conversation
        raise ChatTemplateError(f"the chat template cannot render the messages before message {i} "
                                f"(assistant) with the generation prompt ({type(e).__name__}: {e}), "
                                "which is how the prefix-diff method finds where the turn starts; "
                                "start the conversation with a system or user message, or add "
                                "{% generation %} markers to the template") from e
    upto = render_text(tokenizer, messages[:i + 1])
    if not upto.startswith(before) or not full.startswith(upto):
        later = "the conversation up to it" if not upto.startswith(before) else "the whole conversation"
        raise ChatTemplateError(
            f"the chat template is not prefix-stable at message {i} (assistant): rendering the "
            f"messages before it with the generation prompt gives {_short(before[-40:])} at the end, "
            f"which is not where {later} renders it (the template rewrites earlier turns, or renders a "
            "message differently once others follow). Its assistant tokens cannot be found without "
            "{% generation %} markers: add them around each assistant turn's content and end-of-turn "
            "token in the template, or train on every token (--train-on all)")
    turn = upto[len(before):].rstrip()
    return len(before), len(before) + len(turn)


def _overlap_mask(offsets, spans) -> list[bool]:
    """A token is a target when its characters overlap a span (transformers' rule for
    ``return_assistant_tokens_mask``); spans and offsets are both in order."""
    mask, k = [False] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[t] = end > spans[k][0]
    return mask


def _strip_trailing_whitespace(target: list[bool], offsets, text: str) -> list[bool]:
    """Untrain the whitespace-only tokens that end a run of targets: the newline after an
    end-of-turn token is template text the model never generates."""
    target = list(target)
    for t in range(len(target) - 1, -1, -1):  # backwards: an untrained end makes t - 1 the end
        ends_run = target[t] and (t + 1 == len(target) or not target[t + 1])
        if ends_run and not text[offsets[t][0]:offsets[t][1]].strip():
            target[t] = False
    return target


def _turns(target: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for t, on in enumerate([*target, False]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            runs.append((start, t))
            start = None
    return runs


def _check_turns(tokenizer, ids, turns, assistant: list[int], method: str) -> None:
    """Each assistant message has its own run of targets, ending in an added or special token."""
    if len(turns) != len(assistant):
        raise ChatTemplateError(
            f"the {method} mask has {len(turns)} runs of target tokens for {len(assistant)} assistant "
            f"messages (indices {assistant}): an assistant turn with empty content renders no target, "
            "or the template's markers do not wrap each turn once. Drop empty assistant messages, or "
            "fix the template's {% generation %} blocks")
    stops = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for i, (_, end) in zip(assistant, turns):
        if ids[end - 1] not in stops:
            last = tokenizer.convert_ids_to_tokens(ids[end - 1])
            raise ChatTemplateError(
                f"assistant message {i} ends in token {last!r} (id {ids[end - 1]}), which is not an "
                "added or special token: the template renders no end-of-turn token inside the turn, "
                "so the model would never learn to stop. Use a template that closes each assistant "
                "turn with an end-of-turn token (ChatML's <|im_end|>), inside its {% generation %} "
                "block if it has one")


def last_answer_index(messages: list[dict]) -> int:
    """The index of the last assistant message: where a prompt ends (``len(messages)`` when there
    is no assistant message)."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return answers[-1] if answers else len(messages)


def render_prompt(tokenizer, messages) -> list[int]:
    """The ids of what a model answers: the messages before the last assistant message (all of
    them when there is none), with the generation prompt. When an assistant message follows,
    these ids must be a token prefix of the conversation up to it, or the answer's tokens would
    differ from the trained ones."""
    check_chat_tokenizer(tokenizer)
    messages = list(messages)
    cut = last_answer_index(messages)
    answered = cut < len(messages)
    if cut == 0:
        raise DataError("the conversation starts with its only assistant message; a prompt needs "
                        "at least one message (a user question) before the answer")
    prompt, _ = _tokenize(tokenizer, render_text(tokenizer, messages[:cut], add_generation_prompt=True))
    if answered:
        whole, _ = _tokenize(tokenizer, render_text(tokenizer, messages[:cut + 1]))
        if whole[:len(prompt)] != prompt:
            raise ChatTemplateError(
                f"the prompt (messages 0-{cut - 1} with the generation prompt) tokenizes to ids that "
                f"are not a prefix of the ids of the conversation up to its answer (message {cut}): "
                "the text at the boundary merges into other tokens, or the template renders the "
                "prompt differently. Use a template whose generation prompt ends in a special token")
    return prompt


def template_probe(tokenizer) -> list[int]:
    """The ids of :data:`PROBE_CONVERSATION` rendered with the tokenizer's chat template."""
    check_chat_tokenizer(tokenizer)
    ids, _ = _tokenize(tokenizer, render_text(tokenizer, PROBE_CONVERSATION))
    return ids

"""``unidistill generate``: the same held-out prompt continued by several models, side by side.

Perplexity says how far a student is from its teacher; reading what each writes after the same
prompt says whether it is usable. Decoding is greedy, so a run is reproducible. Two modes:

* plain text: the prompt is the start of a held-out document (never trained on) or text given on
  the command line, and each model continues it for ``max_new_tokens`` tokens;
* conversations (``--messages-field``): for each of the first N held-out conversations, each
  model answers the prompt :func:`unidistill.text.chat.render_prompt` renders with its *own*
  tokenizer (the messages before the last assistant message, with the generation prompt) until
  its stop token, and the answers are shown beside the conversation's own last assistant message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unidistill.errors import ConfigError, DataError


@dataclass(frozen=True)
class Continuation:
    name: str
    model: str
    text: str  # the generated text only, without the prompt


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """``["teacher=builtin:smollm2", "out/student"]`` -> {name: model}; a bare path is named by
    itself. Names must be unique."""
    if not specs:
        raise ConfigError("no model to generate with; pass --model NAME=PATH (repeatable)")
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, model = spec.partition("=")
        if not sep:
            name, model = spec, spec
        if not name or not model:
            raise ConfigError(f"--model {spec!r} is not NAME=PATH or PATH, e.g. teacher=builtin:smollm2")
        if name in models:
            raise ConfigError(f"--model name {name!r} is given twice; give each model its own name")
        models[name] = model
    return models


DEFAULT_PROMPT_TOKENS = 48
DEFAULT_N_PROMPTS = 3
# the conversation whose rendering names a template's end-of-turn token (the last token of the
# assistant turn, which render_conversation checks is an added or special token)
_STOP_PROBE = ({"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."})


def held_out_prompt(data: str, tokenizer, *, split: str = "heldout", n_tokens: int = 48,
                    document: int = 0) -> str:
    """The first ``n_tokens`` tokens of held-out document number ``document``, as text."""
    from itertools import islice

    from unidistill.text.data import check_data_split, iter_documents

    if n_tokens < 1:
        raise ConfigError(f"--prompt-tokens must be >= 1, got {n_tokens}")
    check_data_split(data, split)
    try:
        docs = list(islice(iter_documents(data, split=split), document + 1))
    except DataError as e:
        if "Pass --text-field" not in str(e):
            raise
        # generate has no --text-field: the documents are the rows' 'text' column
        raise DataError(str(e).replace("Pass --text-field with one of them.", "")
                        + "generate reads plain text from the column 'text'; if the rows hold "
                        "conversations, pass --messages-field with the column that holds them") from e
    if len(docs) <= document:
        raise ConfigError(f"{data} split {split!r} has {len(docs)} documents; --document {document} "
                          "does not exist")
    ids = tokenizer(docs[document], add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


@torch.no_grad()
def continue_prompt(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (the new text only)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generate_side_by_side(models: dict[str, str], *, prompt: str | None = None,
                          data: str | None = None, split: str = "heldout",
                          prompt_tokens: int | None = None, max_new_tokens: int = 40,
                          device: str = "auto", messages_field: str | None = None,
                          n_prompts: int | None = None):
    """Plain text: (prompt, one continuation per model). With ``messages_field``: the list of
    :class:`ChatExample` of :func:`generate_chat_side_by_side`. Every model is loaded in turn and
    freed after use."""
    if messages_field is not None:
        if prompt is not None:
            raise ConfigError(f"--prompt {prompt!r} was given with --messages-field {messages_field!r}; "
                              "--messages-field reads the prompts from the held-out conversations of "
                              "--data. Drop --prompt, or drop --messages-field to continue the text")
        if prompt_tokens is not None:
            raise ConfigError(f"--prompt-tokens {prompt_tokens} was given with --messages-field: a "
                              "conversation's prompt is every message before its last assistant "
                              "message, not a number of tokens. Drop --prompt-tokens")
        if data is None:
            raise ConfigError(f"--messages-field {messages_field!r} needs --data, the source of the "
                              "conversations (e.g. --data builtin:python_qa --split heldout)")
        return generate_chat_side_by_side(
            models, data=data, split=split, messages_field=messages_field,
            n_prompts=DEFAULT_N_PROMPTS if n_prompts is None else n_prompts,
            max_new_tokens=max_new_tokens, device=device)
    if n_prompts is not None:
        raise ConfigError(f"--n-prompts {n_prompts} was given without --messages-field; it counts "
                          "held-out conversations. Plain text continues one prompt: drop --n-prompts, "
                          "or pass --messages-field for a source of conversations")
    if data is not None and _is_builtin_conversations(data):
        raise ConfigError(f"--data {data} holds conversations, and no --messages-field was given, so "
                          "it would be read as plain text, which it is not; expected --messages-field "
                          "for a conversation source. Pass --messages-field messages (its column)")
    return _generate_text(models, prompt=prompt, data=data, split=split,
                          prompt_tokens=DEFAULT_PROMPT_TOKENS if prompt_tokens is None else prompt_tokens,
                          max_new_tokens=max_new_tokens, device=device)


def _is_builtin_conversations(data: str) -> bool:
    from unidistill.text.builtin_text import BUILTIN_TEXTS, CONVERSATIONS
    from unidistill.text.data import source_kind

    return (source_kind(data) == "builtin" and data in BUILTIN_TEXTS
            and BUILTIN_TEXTS[data].kind == CONVERSATIONS)


def _generate_text(models: dict[str, str], *, prompt: str | None, data: str | None, split: str,
                   prompt_tokens: int, max_new_tokens: int,
                   device: str) -> tuple[str, list[Continuation]]:
    from unidistill.models.loading import load_model, load_tokenizer, resolve_device, resolve_model_source

    if (prompt is None) == (data is None):
        raise ConfigError("give either --prompt TEXT or --data SOURCE (its held-out split's first "
                          "document starts the prompt), not both and not neither")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    sources = {name: resolve_model_source(model) for name, model in models.items()}  # bad paths first
    dev = str(resolve_device(device))
    out = []
    for name, source in sources.items():
        tokenizer = load_tokenizer(source)
        if prompt is None:
            prompt = held_out_prompt(data, tokenizer, split=split, n_tokens=prompt_tokens)
        model = load_model(source, "float32", dev)
        out.append(Continuation(name, models[name], continue_prompt(model, tokenizer, prompt, max_new_tokens)))
        del model
    return prompt, out


# --- conversations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatAnswer:
    name: str
    model: str
    text: str  # the answer, without the prompt and without the stop token
    new_tokens: int  # generated tokens, the stop token included
    stopped: bool  # False: cut at max_new_tokens before a stop token
    prompt_tokens: int


@dataclass(frozen=True)
class ChatExample:
    index: int  # the conversation's position in the split
    question: str | None  # the last user message of the prompt
    reference: str | None  # the conversation's last assistant message (None: it has none)
    answers: tuple[ChatAnswer, ...]


def held_out_conversations(data: str, *, split: str = "heldout", messages_field: str = "messages",
                           n: int = DEFAULT_N_PROMPTS) -> list[list[dict]]:
    """The first ``n`` conversations of ``split`` (fewer when the split holds fewer; none is
    refused), each a checked list of ``{role, content}`` messages."""
    from itertools import islice

    from unidistill.text.builtin_text import BUILTIN_TEXTS, CONVERSATIONS
    from unidistill.text.data import iter_conversations, source_kind

    if n < 1:
        raise ConfigError(f"--n-prompts must be >= 1, got {n}")
    if source_kind(data) == "builtin" and data in BUILTIN_TEXTS:
        if BUILTIN_TEXTS[data].kind != CONVERSATIONS:
            convs = sorted(k for k, t in BUILTIN_TEXTS.items() if t.kind == CONVERSATIONS)
            raise ConfigError(f"--data {data} is plain text, but --messages-field {messages_field!r} "
                              f"asks for conversations; expected a source of conversations "
                              f"({', '.join(convs)}, or a file or hub data set whose rows hold a list "
                              "of messages). Pass one of those, or drop --messages-field to continue "
                              "a held-out document of the text")
        if messages_field != "messages":
            raise ConfigError(f"--messages-field {messages_field!r} was given for {data}, whose "
                              "conversations are in the column 'messages'; pass --messages-field "
                              "messages")
    convs = list(islice(iter_conversations(data, split=split, messages_field=messages_field), n))
    if not convs:
        raise DataError(f"{data} split {split!r} holds no conversations; expected at least one to "
                        "answer. Pass a split that has some (--split)")
    return convs


def question_and_reference(messages: list[dict]) -> tuple[str | None, str | None]:
    """(the last user message before the last assistant message, that assistant message)."""
    from unidistill.text.chat import last_answer_index

    cut = last_answer_index(messages)
    users = [m["content"] for m in messages[:cut] if m["role"] == "user"]
    return (users[-1] if users else None), (messages[cut]["content"] if cut < len(messages) else None)


def stop_token_ids(tokenizer) -> list[int]:
    """The ids a chat answer stops at: the template's end-of-turn token (the last token of an
    assistant turn, rendered from a fixed two-message conversation) and the tokenizer's EOS."""
    from unidistill.text.chat import render_conversation

    rendered = render_conversation(tokenizer, _STOP_PROBE)
    stops = [rendered.ids[rendered.turns[-1][1] - 1]]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    return stops


@torch.no_grad()
def answer_greedily(model, tokenizer, prompt_ids: list[int], max_new_tokens: int,
                    stop_ids: list[int]) -> tuple[list[int], bool]:
    """(the new ids up to and including the first stop token, whether one came) of greedy
    decoding after ``prompt_ids``. The model's own generation config is set aside for the call
    (a hub config's repetition penalty or n-gram ban would make "greedy" something else)."""
    from transformers import GenerationConfig

    from unidistill.cache_builder.generation import cut_answer

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    own, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=list(stop_ids),
                             pad_token_id=pad)
    finally:
        model.generation_config = own
    return cut_answer(out[0, ids.shape[1]:].tolist(), stop_ids)


def generate_chat_side_by_side(models: dict[str, str], *, data: str, split: str = "heldout",
                               messages_field: str = "messages", n_prompts: int = DEFAULT_N_PROMPTS,
                               max_new_tokens: int = 40, device: str = "auto") -> list[ChatExample]:
    """Each model's greedy answer to each of the first ``n_prompts`` conversations of ``split``,
    beside the conversation's question and reference answer."""
    from unidistill.models.loading import load_model, load_tokenizer, resolve_device, resolve_model_source
    from unidistill.text.chat import render_prompt

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    conversations = held_out_conversations(data, split=split, messages_field=messages_field, n=n_prompts)
    sources = {name: resolve_model_source(model) for name, model in models.items()}  # bad paths first
    dev = str(resolve_device(device))
    answers: list[list[ChatAnswer]] = [[] for _ in conversations]
    for name, source in sources.items():
        tokenizer = load_tokenizer(source)
        prompts = [render_prompt(tokenizer, messages) for messages in conversations]  # refusals first
        stops = stop_token_ids(tokenizer)
        model = load_model(source, "float32", dev)
        for i, prompt_ids in enumerate(prompts):
            new, stopped = answer_greedily(model, tokenizer, prompt_ids, max_new_tokens, stops)
            text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
            answers[i].append(ChatAnswer(name, models[name], text, len(new), stopped, len(prompt_ids)))
        del model
    return [ChatExample(i, *question_and_reference(messages), tuple(answers[i]))
            for i, messages in enumerate(conversations)]


def format_side_by_side(prompt: str, continuations: list[Continuation]) -> str:
    width = max(len(c.name) for c in continuations)
    lines = ["prompt: " + " ".join(prompt.split()), ""]
    for c in continuations:
        lines.append(f"{c.name:<{width}} | ..." + " ".join(c.text.split()))
    return "\n".join(lines) + "\n"


def format_chat_side_by_side(examples: list[ChatExample], *, asked: int | None = None) -> str:
    """Each conversation: its question, the reference answer, then each model's answer; an answer
    cut at --max-new-tokens before its stop token is marked."""
    def flat(text):
        return " ".join(text.split())

    width = max([len("reference"), *(len(a.name) for e in examples for a in e.answers)])
    lines = []
    if asked is not None and len(examples) < asked:
        lines += [f"(the split holds {len(examples)} conversations; {asked} were asked for)", ""]
    for e in examples:
        lines.append(f"conversation {e.index}")
        lines.append("question: " + (flat(e.question) if e.question is not None else "(no user message)"))
        ref = flat(e.reference) if e.reference is not None else "(none: no assistant message)"
        lines.append(f"{'reference':<{width}} | {ref}")
        for a in e.answers:
            cut = "" if a.stopped else f" [cut at {a.new_tokens} tokens, no stop token]"
            lines.append(f"{a.name:<{width}} | {flat(a.text)}{cut}")
        lines.append("")
    return "\n".join(lines)

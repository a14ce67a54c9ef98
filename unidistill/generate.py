"""``unidistill generate``: the same held-out prompt continued by several models, side by side.

Perplexity says how far a student is from its teacher; reading what each writes after the same
prompt says whether it is usable. The prompt is the start of a held-out document (never trained
on) or text given on the command line; decoding is greedy, so a run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unidistill.errors import ConfigError


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


def held_out_prompt(data: str, tokenizer, *, split: str = "heldout", n_tokens: int = 48,
                    document: int = 0) -> str:
    """The first ``n_tokens`` tokens of held-out document number ``document``, as text."""
    from itertools import islice

    from unidistill.text.data import check_data_split, iter_documents

    if n_tokens < 1:
        raise ConfigError(f"--prompt-tokens must be >= 1, got {n_tokens}")
    check_data_split(data, split)
    docs = list(islice(iter_documents(data, split=split), document + 1))
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
                          data: str | None = None, split: str = "heldout", prompt_tokens: int = 48,
                          max_new_tokens: int = 40, device: str = "auto") -> tuple[str, list[Continuation]]:
    """(prompt, one continuation per model), every model loaded in turn and freed after use."""
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


def format_side_by_side(prompt: str, continuations: list[Continuation]) -> str:
    width = max(len(c.name) for c in continuations)
    lines = ["prompt: " + " ".join(prompt.split()), ""]
    for c in continuations:
        lines.append(f"{c.name:<{width}} | ..." + " ".join(c.text.split()))
    return "\n".join(lines) + "\n"

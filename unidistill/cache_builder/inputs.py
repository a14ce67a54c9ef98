"""What a build reads before its teacher loads: the teacher's config and tokenizer, and the data
rendered and packed into rows (spooled to a temporary file, :mod:`.packed`).

Plain text with ``--packing stream`` (the default) is packed exactly as it always was
(:func:`unidistill.text.data.iter_packed`). Conversations (``--messages-field``, or a built-in
source of conversations) are rendered with the **teacher's** chat template
(:mod:`unidistill.text.chat`), and with plain text under ``--packing documents|none`` packed by
:mod:`unidistill.text.packing`; the rows then carry a target mask and document ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from unidistill.cache_builder.config import BuildConfig
from unidistill.cache_builder.generation import Prompts, conversation_prompts, unit_rows, usable_prompts
from unidistill.cache_builder.packed import spool_packed_rows, spool_sequences
from unidistill.errors import ConfigError
from unidistill.models.loading import (
    TeacherSource, load_config, load_tokenizer, resolve_device, resolve_model_source,
)
from unidistill.storage.codecs.registry import logit_codec_class
from unidistill.text.chat import (
    EVERY_TOKEN, GENERATION_MARKERS, PREFIX_DIFF, check_chat_tokenizer, has_generation_markers,
    template_probe,
)
from unidistill.text.data import iter_conversations, iter_documents, iter_packed, resolve_heldout_share
from unidistill.text.packing import (
    PackedTokens, PackStats, conversation_examples, iter_packed_rows, text_examples,
)

STREAM_PACKING = "documents joined with EOS, remainder dropped"  # settings.data.packing of a stream cache


@dataclass
class PreparedBuild:
    """What :func:`prepare` checked and loaded: everything but the teacher's weights."""

    source: TeacherSource
    device: torch.device
    model_config: object  # the teacher's transformers config
    layers: list[int]  # teacher hidden_states indices to cache
    tokenizer: object
    tokens: PackedTokens  # the rows (N, seq_len): read-only maps of a temporary file
    ids_fingerprint: str  # sha256 of the rows (packed.spool_sequences / spool_packed_rows)
    data_settings: dict  # settings.data (compared on resume, part of the fingerprint)
    prompts: Prompts | None = None  # --generate: the prompts the teacher answers, one per row

    @property
    def ids(self) -> np.ndarray:
        return self.tokens.input_ids


def prepare(cfg: BuildConfig, log=print) -> PreparedBuild:
    """Everything that can fail on bad input, before any output is written."""
    source = resolve_model_source(cfg.teacher, cfg.gguf_file)
    device = resolve_device(cfg.device)
    model_config = load_config(source)
    vocab = model_config.vocab_size
    layers = cfg.resolve_layers(model_config.num_hidden_layers)
    if logit_codec_class(cfg.logits).has_top_k and cfg.top_k > vocab:
        raise ConfigError(f"top_k={cfg.top_k} is larger than the teacher's vocabulary ({vocab}); "
                          f"use 1 <= --top-k <= {vocab}")
    tokenizer = load_tokenizer(source)
    packing = cfg.resolved_packing
    log(f"packing {cfg.data} into sequences of {cfg.seq_len} tokens ({packing}) ...")
    settings = {"source": cfg.data, "config": cfg.data_config, "split": cfg.split,
                "heldout_share": resolve_heldout_share(cfg.data, cfg.heldout_share),
                "text_field": cfg.text_field, "max_sequences": cfg.max_sequences}
    if cfg.generate:
        tokens, fingerprint, packed, prompts = _generation_prompts(cfg, tokenizer, log)
        settings.update(packed, ids_fingerprint=fingerprint)
        return PreparedBuild(source, device, model_config, layers, tokenizer, tokens, fingerprint,
                             settings, prompts)
    if packing == "stream":
        docs = iter_documents(cfg.data, data_config=cfg.data_config, split=cfg.split,
                              text_field=cfg.text_field, heldout_share=cfg.heldout_share)
        # one streaming pass: count, hash and spool the packed ids (see cache_builder.packed)
        ids, fingerprint = spool_sequences(iter_packed(docs, tokenizer, cfg.seq_len, cfg.max_sequences),
                                           cfg.seq_len)
        tokens = PackedTokens(ids)
        settings.update(packing=STREAM_PACKING, ids_fingerprint=fingerprint)
    else:
        tokens, fingerprint, packed = _pack_examples(cfg, tokenizer, log)
        settings.update(packed, ids_fingerprint=fingerprint)
    return PreparedBuild(source, device, model_config, layers, tokenizer, tokens, fingerprint, settings)


def _pack_examples(cfg: BuildConfig, tokenizer, log) -> tuple[PackedTokens, str, dict]:
    """Render and pack the examples; the rows, their fingerprint and the data settings they add."""
    train_on = cfg.resolved_train_on
    settings = {"format": "conversations" if cfg.conversations else "text",
                "messages_field": cfg.resolved_messages_field, "train_on": train_on,
                "packing": cfg.resolved_packing, "pack_window": cfg.pack_window,
                "long_examples": "truncate" if cfg.conversations else "split"}
    if cfg.conversations:
        settings.update(_chat_settings(tokenizer, train_on))
        conversations = _conversations(cfg)
        examples = conversation_examples(conversations, tokenizer, train_on)
    else:
        settings["mask_method"] = EVERY_TOKEN
        examples = text_examples(iter_documents(cfg.data, data_config=cfg.data_config, split=cfg.split,
                                                text_field=cfg.text_field,
                                                heldout_share=cfg.heldout_share), tokenizer)
    pad_id = _pad_id(tokenizer)
    stats = PackStats()
    rows = iter_packed_rows(examples, cfg.seq_len, cfg.resolved_packing, pad_id=pad_id, stats=stats,
                            window=cfg.pack_window, long_examples=settings["long_examples"],
                            max_sequences=cfg.max_sequences)
    tokens, fingerprint = spool_packed_rows(rows, cfg.seq_len)
    settings["stats"] = stats.to_dict()
    log(f"{stats.examples} examples in {stats.rows} rows ({stats.segments} segments): "
        f"{stats.targets} target tokens, {stats.padding} padding, {stats.truncated} truncated, "
        f"{stats.dropped} dropped")
    return PackedTokens(tokens.input_ids, tokens.target_mask, tokens.document_ids,
                        settings["stats"]), fingerprint, settings


def _pad_id(tokenizer) -> int:
    """What fills a row after its last example: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _chat_settings(tokenizer, train_on: str) -> dict:
    """The teacher's chat template and how targets are found in it (settings.data)."""
    check_chat_tokenizer(tokenizer)
    template = tokenizer.chat_template
    method = EVERY_TOKEN if train_on == "all" else (
        GENERATION_MARKERS if has_generation_markers(tokenizer) else PREFIX_DIFF)
    return {"chat_template": template, "mask_method": method,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "probe_ids": template_probe(tokenizer)}


def _conversations(cfg: BuildConfig):
    return iter_conversations(cfg.data, data_config=cfg.data_config, split=cfg.split,
                              messages_field=cfg.resolved_messages_field,
                              heldout_share=cfg.heldout_share)


def _generation_prompts(cfg: BuildConfig, tokenizer, log) -> tuple[PackedTokens, str, dict, Prompts]:
    """``--generate``: every conversation's prompt (the messages before its last assistant
    message, with the generation prompt), those too long for an answer of ``--max-new-tokens``
    dropped; the first ``--max-sequences`` of the rest, one per row. The rows of the start-up
    checks are the prompts alone; the fingerprint covers the prompt ids (the answers are the
    build's output)."""
    settings = {"format": "conversations", "messages_field": cfg.resolved_messages_field,
                "train_on": cfg.resolved_train_on, "packing": "none",
                **_chat_settings(tokenizer, cfg.resolved_train_on)}
    if cfg.prompt_field is None:
        settings["prompts"] = "the messages before each conversation's last assistant message"
        conversations = _conversations(cfg)
    else:
        settings.update(format="prompts", prompt_field=cfg.prompt_field,
                        prompts=f"column {cfg.prompt_field!r} as one user message")
        conversations = ([{"role": "user", "content": text}] for text in iter_documents(
            cfg.data, data_config=cfg.data_config, split=cfg.split, text_field=cfg.prompt_field,
            heldout_share=cfg.heldout_share))
    found = conversation_prompts(tokenizer, conversations)
    prompts = usable_prompts(found, cfg.seq_len, cfg.max_new_tokens)
    if cfg.max_sequences is not None and len(prompts.ids) > cfg.max_sequences:
        prompts = Prompts(prompts.ids[:cfg.max_sequences], prompts.source_index[:cfg.max_sequences],
                          prompts.dropped)
    pad_id = _pad_id(tokenizer)
    ids, target, docs = unit_rows(prompts.ids, [()] * len(prompts.ids), 0, cfg.seq_len, pad_id,
                                  cfg.resolved_train_on)
    digest = hashlib.sha256()
    for p in prompts.ids:
        digest.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
    settings["stats"] = {"conversations": len(found), "prompts": len(prompts.ids),
                         "dropped": prompts.dropped}
    log(f"{len(found)} {'conversations' if cfg.prompt_field is None else 'prompts'}: {len(prompts.ids)} prompts to answer, {prompts.dropped} "
        f"dropped (longer than --seq-len {cfg.seq_len} - --max-new-tokens {cfg.max_new_tokens})")
    return PackedTokens(ids, target, docs), digest.hexdigest(), settings, prompts

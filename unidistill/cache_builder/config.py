"""Settings of one ``cache-build``, checked before anything is loaded or written."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path

from unidistill.cache_builder.generation import DecodingSettings
from unidistill.cache_builder.hidden_dtype import AUTO
from unidistill.errors import ConfigError
from unidistill.models.layer_map import check_layer_range, teacher_layers_for_students
from unidistill.storage.codecs import (
    HIDDEN_CODECS, LOGIT_CODECS, LOGITS_MODES, hidden_codec, logit_codec_class, modes_with_top_k,
)
from unidistill.storage.layout import MAX_SAMPLES
from unidistill.storage.location import CacheLocation, is_url
from unidistill.storage.codecs.arrays import PACKINGS
from unidistill.text.chat import TRAIN_ON
from unidistill.text.data import check_conversation_split, check_data_split, is_conversation_source

TEACHER_DTYPES = ("float32", "bfloat16", "float16")
_GENERATION_OPTIONS = ("prompt_field", "max_new_tokens", "sample", "gen_temperature", "gen_top_p", "gen_top_k",
                       "gen_repetition_penalty", "gen_seed")
DEFAULT_TEMPERATURES = "1,2"  # the KD temperatures a top-k cache serves exactly by default


@dataclass(frozen=True)
class BuildConfig:
    teacher: str = field(metadata={"help": "model folder, hub id, .gguf file or builtin:smollm2"})
    data: str = field(metadata={"help": "data source: builtin:NAME, local file/folder or hub id"})
    out: str = field(metadata={"help": "cache folder or URL (s3://bucket/prefix) to create or resume"})
    gguf_file: str | None = None
    data_config: str | None = None
    split: str = "train"
    heldout_share: float | None = field(default=None, metadata={
        "help": "share of a local source's documents held out (None: the default, 0.05)"})
    text_field: str = "text"
    messages_field: str | None = field(default=None, metadata={
        "help": "the column holding conversations (built-in conversations: messages); set: the "
                "data are conversations, rendered with the teacher's chat template"})
    train_on: str | None = field(default=None, metadata={
        "help": "assistant | all: which tokens are targets (default: assistant for conversations, "
                "all for text)"})
    packing: str | None = field(default=None, metadata={
        "help": "stream | documents | none (default: stream for text, documents for conversations)"})
    pack_window: int = 1024  # examples per best-fit-decreasing window (--packing documents)
    seq_len: int = 512
    top_k: int = 64
    logits: str = "topk"
    samples: int = 64
    sample_seed: int = 0
    temperatures: str | None = None  # top-k modes: KD temperatures with an exact tempered tail
    layers: str = "all"
    student_layers: int | None = None
    layer_maps: tuple[str, ...] = ("uniform", "last")
    max_sequences: int | None = None
    batch_size: int = 8
    shard_size: int = 16
    dtype: str = "float32"
    hidden_dtype: str = "auto"  # see cache_builder.hidden_dtype
    device: str = "auto"
    overwrite: bool = False
    wait: bool = field(default=False, metadata={
        "help": "wait while another build holds the output's lease, instead of being refused"})
    generate: bool = field(default=False, metadata={
        "help": "the teacher answers each conversation's last assistant turn itself (greedy "
                "unless sample); one conversation per row (packing none)"})
    prompt_field: str | None = field(default=None, metadata={
        "help": "--generate on plain rows: the column holding each prompt, asked as one user "
                "message"})
    max_new_tokens: int = 256  # --generate: the longest answer
    sample: bool = False  # --generate: sample instead of greedy decoding
    gen_temperature: float = 1.0
    gen_top_p: float = 1.0
    gen_top_k: int = 0  # 0 = off
    gen_repetition_penalty: float = 1.0
    gen_seed: int = 0  # seeds each generation batch (seed * 1 000 003 + its first row)

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (one input and one next token), got {self.seq_len}")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.logits not in LOGIT_CODECS:
            listed = [f"{mode} ({codec.summary})" for mode, codec in LOGIT_CODECS.items()]
            raise ConfigError(f"logits representation {self.logits!r} is not one of {LOGITS_MODES}: "
                              f"{', '.join(listed[:-1])} or {listed[-1]}")
        self.tail_temperatures  # parsed and checked here, before anything loads
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise ConfigError(f"samples must be between 1 and {MAX_SAMPLES} draws per position, got "
                              f"{self.samples}")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ConfigError(f"max_sequences must be >= 1 (or unset for all data), got {self.max_sequences}")
        if self.dtype not in TEACHER_DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {TEACHER_DTYPES}")
        if self.hidden_dtype != AUTO:
            if self.hidden_dtype not in HIDDEN_CODECS:
                raise ConfigError(f"hidden_dtype {self.hidden_dtype!r} is not one of "
                                  f"{[AUTO, *sorted(HIDDEN_CODECS)]}")
            logit_codec_class(self.logits).check_hidden_codec(hidden_codec(self.hidden_dtype))
        if self.student_layers is not None and self.student_layers < 1:
            raise ConfigError(f"student_layers must be >= 1, got {self.student_layers}")
        self._check_packing()
        self._check_generation()
        if is_url(self.out):
            # Bad scheme, missing s3fs, missing bucket or credentials: said now, before the
            # teacher is loaded (one request to the storage service).
            CacheLocation(self.out).check_container("write to")
            return
        out = Path(self.out).expanduser()
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output path {out} is a file; expected a folder for the cache. "
                              "Choose another --out.")

    @property
    def conversations(self) -> bool:
        """True when the data are conversations: ``messages_field`` given, or a built-in source
        of conversations."""
        return self.messages_field is not None or is_conversation_source(self.data)

    @property
    def resolved_packing(self) -> str:
        if self.generate:
            return "none"
        return self.packing or ("documents" if self.conversations else "stream")

    @property
    def decoding(self) -> DecodingSettings:
        """``--generate``'s decoding settings (checked); the generation batch is ``--batch-size``."""
        return DecodingSettings(
            max_new_tokens=self.max_new_tokens, do_sample=self.sample, temperature=self.gen_temperature,
            top_p=self.gen_top_p, top_k=self.gen_top_k, repetition_penalty=self.gen_repetition_penalty,
            seed=self.gen_seed, batch_size=self.batch_size)

    def _check_generation(self) -> None:
        """``--generate`` and its options fit together (said before anything loads)."""
        if not self.generate:
            changed = [f"--{f.name.replace('_', '-')}" for f in fields(self)
                       if f.name in _GENERATION_OPTIONS and getattr(self, f.name) != f.default]
            if changed:
                raise ConfigError(f"{', '.join(changed)} without --generate: these choose how the "
                                  "teacher answers, and without --generate it answers nothing. Add "
                                  "--generate, or drop them")
            return
        if self.prompt_field is not None and (self.conversations or self.data.startswith("builtin:")):
            raise ConfigError(f"--prompt-field {self.prompt_field} with {self.data}"
                              + (f" read as conversations: the prompts are then each conversation's "
                                 "messages before its last assistant message. Drop --prompt-field, "
                                 "or --messages-field" if self.conversations else
                                 ": built-in text has no columns. Use a local file or hub data set "
                                 "whose rows hold a prompt column"))
        if not self.chat:
            raise ConfigError(f"--generate with plain text ({self.data}): the teacher answers the "
                              "prompts of conversations (everything before each conversation's last "
                              "assistant message) or of a prompt column. Pass --messages-field with "
                              "the column that holds conversations, --prompt-field with the one "
                              "that holds prompts, or use builtin:python_qa")
        if self.packing not in (None, "none"):
            raise ConfigError(f"--generate with --packing {self.packing}: a generated cache holds one "
                              "conversation per row, so its rows are known before anything is "
                              "generated and a stopped build resumes per unit. Drop --packing (it "
                              "is none with --generate)")
        self.decoding  # checked now

    @property
    def chat(self) -> bool:
        """Rendered with the teacher's chat template: conversations, or ``--generate`` prompts
        from a ``--prompt-field`` column."""
        return self.conversations or (self.generate and self.prompt_field is not None)

    @property
    def resolved_train_on(self) -> str:
        return self.train_on or ("assistant" if self.chat else "all")

    @property
    def resolved_messages_field(self) -> str | None:
        return self.messages_field or ("messages" if self.conversations else None)

    def _check_packing(self) -> None:
        """The data format, packing and targets fit together (said before anything loads)."""
        kind = "conversations" if self.conversations else "plain text"
        if self.conversations:
            check_conversation_split(self.data, self.split, self.heldout_share)
        else:
            check_data_split(self.data, self.split, self.heldout_share)
        if self.packing is not None and self.packing not in PACKINGS:
            raise ConfigError(f"--packing {self.packing!r} is not one of {PACKINGS}")
        if self.train_on is not None and self.train_on not in TRAIN_ON:
            raise ConfigError(f"--train-on {self.train_on!r} is not one of {TRAIN_ON}")
        if self.pack_window < 1:
            raise ConfigError(f"pack_window must be >= 1 example, got {self.pack_window}")
        if self.conversations and self.resolved_packing == "stream":
            raise ConfigError(f"--packing stream with {kind} ({self.data}): stream joins documents "
                              "and lets them attend to each other, which would mix conversations "
                              "and lose their targets. Use --packing documents (the default for "
                              "conversations) or none")
        if not self.chat and self.resolved_train_on == "assistant":
            raise ConfigError(f"--train-on assistant with {kind} ({self.data}): plain text has no "
                              "assistant turns. Use --train-on all, or pass --messages-field with "
                              "the column that holds conversations")
        if not self.conversations and self.train_on is not None and self.resolved_packing == "stream":
            raise ConfigError(f"--train-on {self.train_on} with --packing stream: a stream cache "
                              "trains every token and stores no targets. Drop --train-on, or use "
                              "--packing documents or none")
        if self.hidden_dtype == "int8" and self.resolved_packing == "documents":
            raise ConfigError("--hidden-dtype int8 with --packing documents: every document start "
                              "is a massive activation, and int8 keeps only 2 such tokens per row "
                              "in fp16 (docs/proposals/instruction-data.md, 1.6). Use "
                              "--hidden-dtype float16 or bfloat16, or --packing none")

    @property
    def tail_temperatures(self) -> tuple[float, ...]:
        """The temperatures != 1 whose tempered tail a top-k cache stores (T = 1 always is).

        Default ``1,2`` for topk and topk-q8. A sampled cache serves T = 1 only and an exact one
        every temperature, so ``--temperatures`` is refused for them rather than ignored.
        """
        codec = logit_codec_class(self.logits)
        if not codec.has_top_k:
            if self.temperatures is not None:
                raise ConfigError(f"--temperatures {self.temperatures} is for "
                                  f"{' and '.join(modes_with_top_k())} caches; a {self.logits} "
                                  f"cache {codec.temperatures_served}. Leave --temperatures out.")
            return ()
        spec = DEFAULT_TEMPERATURES if self.temperatures is None else self.temperatures
        try:
            temps = sorted({float(t) for t in str(spec).split(",") if t.strip()})
        except ValueError:
            raise ConfigError(f"--temperatures {spec!r} is not a comma-separated list of numbers "
                              "like 1,2") from None
        if not temps or any(not (t > 0 and math.isfinite(t)) for t in temps):
            raise ConfigError(f"--temperatures {spec!r} must list KD temperatures > 0, like 1,2")
        return tuple(t for t in temps if t != 1.0)

    def command_line(self, **changes) -> str:
        """The ``unidistill cache-build`` command of these settings with ``changes`` applied:
        every option that differs from its default (what an error tells the user to run)."""
        values = {**{f.name: getattr(self, f.name) for f in fields(self)}, **changes}
        words = ["unidistill", "cache-build"]
        for f in fields(self):
            value = values[f.name]
            if f.name not in ("teacher", "data", "out") and value == f.default:
                continue
            option = "--layer-map" if f.name == "layer_maps" else f"--{f.name.replace('_', '-')}"
            if isinstance(value, bool):
                words += [option] if value else []
            else:
                words += [option, ",".join(value) if isinstance(value, tuple) else str(value)]
        return shlex.join(words)

    @property
    def stored_k(self) -> int:
        """Ids the cache holds per position (``CacheLayout.stored_k``): K ids (``top_k``), S draws
        (``samples``), or 0 for exact logits."""
        return logit_codec_class(self.logits).stored_k_for(top_k=self.top_k, samples=self.samples)

    def resolve_layers(self, n_layers: int) -> list[int]:
        """Teacher ``hidden_states`` indices to cache, checked against the teacher's depth.

        ``all`` = 1..n, ``none`` = logits only, ``6,12,18`` explicit; with ``student_layers`` the
        union of the teacher layers that the listed maps pick for such a student. Exact logits
        always add the last layer n (the final normed state the logits are rebuilt from).
        """
        layers = self._listed_layers(n_layers)
        if logit_codec_class(self.logits).needs_final_layer and n_layers not in layers:
            layers = sorted([*layers, n_layers])
        return layers

    def _listed_layers(self, n_layers: int) -> list[int]:
        if self.student_layers is not None:
            return teacher_layers_for_students(self.student_layers, n_layers, list(self.layer_maps))
        spec = self.layers.strip().lower()
        if spec == "all":
            return list(range(1, n_layers + 1))
        if spec in ("none", ""):
            return []
        try:
            layers = sorted({int(x) for x in spec.split(",") if x.strip()})
        except ValueError:
            raise ConfigError(f"--layers {self.layers!r} is not a comma-separated list of integers, "
                              "'all' or 'none'") from None
        check_layer_range(layers, n_layers)
        return layers

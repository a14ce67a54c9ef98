"""The generation core of ``cache-build --generate``: the teacher answers prompts, one row each.

Design: ``docs/proposals/instruction-data.md`` sections 1.5, 2.3 and 2.6. This module holds the
parts that do not depend on how the build stores a unit:

* :class:`DecodingSettings`: the decoding options, checked, recorded (``settings.generation``)
  and turned into an explicit ``transformers.GenerationConfig``: transformers fills unset fields
  from the model's ``generation_config.json``, then from its defaults (``top_k=50``,
  ``max_length=20``), so ``generate(do_sample=True)`` without ``top_k`` samples from the top 50.
* :func:`usable_prompts`: prompts longer than ``seq_len - max_new_tokens`` are dropped (counted)
  before units are formed, so the rows are known before anything is generated.
* :func:`generate_batch`: one batch of prompts, left-padded, seeded with
  ``torch.manual_seed(seed * 1_000_003 + first prompt index)`` (``generate`` samples from the
  global RNG and takes no generator), each answer cut after its first stop token.
* :func:`generate_unit`: prompts ``[start, end)`` in batches from ``start``, as the rows of the
  cache (:func:`unit_rows`). The teacher forward over them (what is cached) is the build's
  ``TeacherRunner``, as for a reference cache.
* :func:`max_logp_gap`: the consistency check of design 2.6 (generate's raw logits vs the forward).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from unidistill.errors import ConfigError, DataError
from unidistill.storage.codecs.arrays import PAD_DOCUMENT  # noqa: F401  (rows' padding; tests read it here)
from unidistill.text.chat import TRAIN_ON
from unidistill.text.packing import Example, PackStats, pack_row

SEED_STRIDE = 1_000_003  # seed of a batch = seed * SEED_STRIDE + its first prompt index
MAX_SEED = 2 ** 32 - 1

# GenerationConfig fields whose neutral value is None: generate() takes them from the model's
# generation_config.json when the config passed leaves them None, so a model that sets one is
# refused (it would change the answers without being recorded).
_NONE_NEUTRAL = (
    "min_new_tokens", "min_p", "top_h", "bad_words_ids", "force_words_ids", "constraints",
    "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "sequence_bias", "exponential_decay_length_penalty", "guidance_scale", "watermarking_config",
    "stop_strings", "max_time", "penalty_alpha", "dola_layers", "prompt_lookup_num_tokens",
    "assistant_early_exit", "token_healing", "use_mtp",
)


@dataclass(frozen=True)
class DecodingSettings:
    """How the teacher answers (``--max-new-tokens``, ``--sample``, ``--gen-*``, ``--gen-seed``).

    ``top_k = 0`` is off. Under greedy decoding (``do_sample=False``) temperature, top-p and top-k
    change nothing and must stay neutral; the repetition penalty applies to both.
    ``batch_size`` prompts are generated together; it is a setting because left padding changes
    the numerics at the 1e-5 level, which can flip a greedy near-tie (design 1.5)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        _check_int("max_new_tokens", "--max-new-tokens", self.max_new_tokens, 1)
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample (--sample) is {self.do_sample!r}; expected True or False")
        _check_number("temperature", "--gen-temperature", self.temperature, "> 0", lambda v: v > 0)
        _check_number("top_p", "--gen-top-p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", "--gen-top-k", self.top_k, 0, "(0 = off)")
        _check_number("repetition_penalty", "--gen-repetition-penalty", self.repetition_penalty,
                      "> 0 (1 = off)", lambda v: v > 0)
        _check_int("seed", "--gen-seed", self.seed, 0)
        if self.seed > MAX_SEED:
            raise ConfigError(f"seed (--gen-seed) is {self.seed}; expected at most {MAX_SEED}")
        _check_int("batch_size", "--batch-size", self.batch_size, 1)
        if not self.do_sample:
            changed = [f"{name} {getattr(self, name)} ({option})" for name, option, neutral in
                       (("temperature", "--gen-temperature", 1.0), ("top_p", "--gen-top-p", 1.0),
                        ("top_k", "--gen-top-k", 0)) if getattr(self, name) != neutral]
            if changed:
                raise ConfigError(f"greedy decoding (no --sample) with {', '.join(changed)}: these "
                                  "only change which token is sampled, so greedy answers would ignore "
                                  "them; pass --sample to sample with them, or drop them")

    def batch_seed(self, first_index: int) -> int:
        """The value ``torch.manual_seed`` gets before the batch whose first prompt is
        ``first_index``: a batch's tokens depend only on its prompts, never on which batches ran
        before it in this process (a resumed or split build draws the same tokens)."""
        return self.seed * SEED_STRIDE + first_index

    def to_dict(self, tokenizer, model) -> dict:
        """The decoding part of the manifest's ``settings.generation`` (the build adds ``prompts``
        and ``device_type``): these fields plus the stop ids, the pad id and the transformers
        version, all of which change the answers."""
        import transformers

        return {**asdict(self), "eos_token_ids": list(stop_token_ids(tokenizer, model)),
                "pad_token_id": pad_token_id(tokenizer, model),
                "transformers_version": transformers.__version__}

    def generation_config(self, tokenizer, model):
        """A ``GenerationConfig`` in which every field that chooses tokens is explicit, so
        ``model.generate(generation_config=...)`` takes nothing from transformers' defaults
        (``top_k=50``, ``max_length=20``) and nothing from the model's ``generation_config.json``
        (refused where it would add a processor, see :func:`check_model_defaults`).
        Two fields are left to transformers, as neither chooses a token: ``top_k`` under greedy
        decoding, and ``max_length``: ``max_new_tokens`` decides the length (transformers sets
        ``max_length = prompt length + max_new_tokens``)."""
        from transformers import GenerationConfig

        stops = stop_token_ids(tokenizer, model)
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, min_length=0, do_sample=self.do_sample, num_beams=1,
            num_return_sequences=1, num_beam_groups=1, temperature=self.temperature, top_p=self.top_p,
            typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, length_penalty=1.0,
            repetition_penalty=self.repetition_penalty, encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, early_stopping=False,
            diversity_penalty=0.0, remove_invalid_values=False, renormalize_logits=False,
            eos_token_id=list(stops), pad_token_id=pad_token_id(tokenizer, model),
            bos_token_id=_first(model.generation_config.bos_token_id, tokenizer.bos_token_id),
            use_cache=True, return_dict_in_generate=True, output_logits=False, output_scores=False,
            output_attentions=False, output_hidden_states=False,
            # greedy: no warper runs (generate adds them only when do_sample), and transformers
            # warns about an explicit top_k other than 50 there, so top_k is left to it
            top_k=self.top_k if self.do_sample else None,
        )
        check_model_defaults(config, model)
        return config


def _check_int(name: str, option: str, value, minimum: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} ({option}) is {value!r}; expected an integer >= {minimum}"
                          f"{' ' + note if note else ''}")


def _check_number(name: str, option: str, value, expected: str, ok) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
            or not math.isfinite(value) or not ok(value)):
        raise ConfigError(f"{name} ({option}) is {value!r}; expected a finite number {expected}")


def _ids(value) -> list[int]:
    """A token id setting (None, an id or a list of ids) as a list."""
    if value is None:
        return []
    return [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]


def _first(*values):
    return next((ids[0] for ids in map(_ids, values) if ids), None)


def stop_token_ids(tokenizer, model) -> tuple[int, ...]:
    """The ids an answer ends at: the tokenizer's eos and the model's
    ``generation_config.eos_token_id`` (an id or a list), tokenizer's first, without repeats."""
    stops = dict.fromkeys(_ids(tokenizer.eos_token_id) + _ids(model.generation_config.eos_token_id))
    if not stops:
        raise ConfigError(f"neither the tokenizer ({type(tokenizer).__name__}) nor the model's "
                          "generation_config has an eos token id, so the teacher's answers could "
                          "only end at --max-new-tokens; use a tokenizer with an eos token (a chat "
                          "model's end-of-turn token)")
    return tuple(stops)


def pad_token_id(tokenizer, model) -> int:
    """The id that pads prompts (left, masked) and rows (right, never trained): the tokenizer's
    pad id, else the model's generation_config's, else the first stop id."""
    pad = _first(tokenizer.pad_token_id, model.generation_config.pad_token_id)
    return pad if pad is not None else stop_token_ids(tokenizer, model)[0]


def check_model_defaults(config, model) -> None:
    """Refuse a model whose ``generation_config.json`` sets a field that ``config`` leaves None:
    ``generate`` would take it from there (``_prepare_generation_config`` fills the None fields)
    and decode with a processor the recorded settings do not show."""
    defaults = getattr(model, "generation_config", None)
    added = {name: getattr(defaults, name, None) for name in _NONE_NEUTRAL
             if getattr(config, name, None) is None and getattr(defaults, name, None) is not None}
    if added:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(added.items()))
        raise ConfigError(f"the teacher's generation_config sets {listed}, which generate() would add to "
                          "the decoding settings of --generate without them being recorded; remove the "
                          "field(s) from the model folder's generation_config.json (or set them to null)")


@dataclass(frozen=True)
class Prompts:
    """The prompts that fit, in data order: row i of a generated cache answers ``ids[i]``, which
    was prompt ``source_index[i]`` of the input; ``dropped`` prompts were too long."""

    ids: tuple[tuple[int, ...], ...]
    source_index: tuple[int, ...]
    dropped: int


def usable_prompts(prompts: Sequence[Sequence[int]], seq_len: int, max_new_tokens: int) -> Prompts:
    """Keep the prompts of at most ``seq_len - max_new_tokens`` tokens, so every row (prompt +
    answer of up to ``max_new_tokens``) fits ``seq_len``; count the others. An empty prompt, or
    nothing left, is refused."""
    room = seq_len - max_new_tokens
    if room < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves {room} of --seq-len {seq_len} "
                          "tokens for the prompt; expected seq_len > max_new_tokens. Raise --seq-len "
                          "or lower --max-new-tokens")
    kept, index = [], []
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise DataError(f"prompt {i} has no tokens; every prompt needs at least one token to be "
                            "answered (drop empty prompts from the data)")
        if len(ids) <= room:
            kept.append(tuple(int(t) for t in ids))
            index.append(i)
    if not kept:
        raise DataError(f"none of the {len(prompts)} prompts fits: each must have at most {room} tokens "
                        f"(--seq-len {seq_len} - --max-new-tokens {max_new_tokens}), the shortest has "
                        f"{min(map(len, prompts), default=0)}; raise --seq-len or lower --max-new-tokens")
    return Prompts(tuple(kept), tuple(index), len(prompts) - len(kept))


def conversation_prompts(tokenizer, conversations) -> list[list[int]]:
    """The prompt ids of each conversation: ``text.chat.render_prompt``, i.e. the messages before
    its last assistant message (all of them when it has none) with the generation prompt."""
    from unidistill.text.chat import render_prompt

    return [render_prompt(tokenizer, messages) for messages in conversations]


@dataclass
class GeneratedBatch:
    """One batch's answers. ``answers[r]`` ends at (and holds) its first stop id, or has
    ``max_new_tokens`` ids when none came (``finished[r]`` False). ``raw_logits`` (B, S, V) fp32
    are generate's unprocessed logits per step when asked for (``check=True``), else None."""

    first_index: int
    prompt_lengths: list[int]
    answers: list[list[int]]
    finished: list[bool]
    raw_logits: torch.Tensor | None = None

    @property
    def unfinished(self) -> int:
        return sum(not f for f in self.finished)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, P) int64, prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):  # usable_prompts refuses empty prompts
        ids[r, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids, mask


def cut_answer(tokens: Sequence[int], stop_ids) -> tuple[list[int], bool]:
    """(the tokens up to and including the first stop id, whether one came)."""
    stops = set(_ids(stop_ids))
    out = []
    for t in tokens:
        out.append(int(t))
        if t in stops:
            return out, True
    return out, False


@torch.no_grad()
def generate_batch(model, prompts: Sequence[Sequence[int]], config, *, seed: int,
                   first_index: int, check: bool = False) -> GeneratedBatch:
    """Answer one batch of prompts with ``model.generate``.

    ``config`` is :meth:`DecodingSettings.generation_config`; ``seed`` is
    :meth:`DecodingSettings.batch_seed` of ``first_index``, the batch's first prompt index. The
    prompts are left-padded with ``config.pad_token_id``; answers are cut after their first id in
    ``config.eos_token_id``. ``check`` keeps generate's raw logits for :func:`max_logp_gap`."""
    import copy

    if not prompts:
        raise ValueError("generate_batch needs at least one prompt")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, config.pad_token_id)
    config = copy.deepcopy(config)
    config.output_logits = bool(check)
    config.return_dict_in_generate = True
    torch.manual_seed(seed)
    out = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=config)
    new = out.sequences[:, ids.shape[1]:].cpu().tolist()
    answers, finished = [], []
    for row in new:
        answer, done = cut_answer(row, config.eos_token_id)
        if not done and len(answer) != config.max_new_tokens:  # generate stops only when all rows did
            raise RuntimeError(f"generate returned {len(answer)} new tokens without a stop id for a "
                               f"row, expected max_new_tokens = {config.max_new_tokens}")
        answers.append(answer)
        finished.append(done)
    raw = torch.stack(out.logits, dim=1).float().cpu() if check else None
    return GeneratedBatch(first_index, [len(p) for p in prompts], answers, finished, raw)


@dataclass
class GeneratedUnit:
    """The rows of one unit (prompts ``[start, start + n)``), as the cache stores them:
    ``input_ids`` int32 (n, L), ``target`` uint8 (n, L), ``document_ids`` int32 (n, L); ``stats``
    counts rows, answer tokens, unfinished answers (cut at max_new_tokens), targets and padding.
    ``check`` is the first batch with its raw logits when the unit was asked to check."""

    start: int
    input_ids: np.ndarray
    target: np.ndarray
    document_ids: np.ndarray
    stats: dict
    batches: list[GeneratedBatch]

    @property
    def check(self) -> GeneratedBatch | None:
        first = self.batches[0]
        return first if first.raw_logits is not None else None


def unit_rows(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], start: int,
              seq_len: int, pad_id: int, train_on: str = "assistant",
              stats: PackStats | None = None) -> tuple[np.ndarray, ...]:
    """Rows ``prompt + answer`` right-padded with ``pad_id`` to ``seq_len`` (``text.packing``'s
    rows of one segment each): ids int32 (n, L), target uint8 (n, L) (the answer's tokens;
    ``train_on="all"``: every real token but the first), document_ids int32 (n, L) (``start + r``
    on row r's real tokens, PAD_DOCUMENT on padding); counted into ``stats`` when given."""
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on is {train_on!r}; expected one of {TRAIN_ON}")
    stats = PackStats() if stats is None else stats
    rows = []
    for r, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        p, total = len(prompt), len(prompt) + len(answer)
        if total > seq_len:
            raise ValueError(f"row {start + r}: prompt {p} + answer {len(answer)} tokens > seq_len {seq_len}")
        first_target = p if train_on == "assistant" else 1
        example = Example((*prompt, *answer), tuple(i >= first_target for i in range(total)))
        rows.append(pack_row([(start + r, example)], seq_len, pad_id, stats))
    if not rows:
        empty = np.zeros((0, seq_len), dtype=np.int32)
        return empty, empty.astype(np.uint8), empty.copy()
    ids, target, docs = (np.stack(a) for a in zip(*rows))
    return ids, target, docs


def generate_unit(model, prompts: Prompts | Sequence[Sequence[int]], start: int, end: int,
                  settings: DecodingSettings, config, *, seq_len: int, train_on: str = "assistant",
                  check: bool = False) -> GeneratedUnit:
    """Generate the rows of prompts ``[start, end)`` (indices into ``prompts``, already through
    :func:`usable_prompts`), in batches of ``settings.batch_size`` from ``start``, each seeded by
    its first prompt index. ``check`` keeps the first batch's raw logits (``unit.check``)."""
    all_ids = prompts.ids if isinstance(prompts, Prompts) else prompts
    if not 0 <= start < end <= len(all_ids):
        raise ValueError(f"unit [{start}, {end}) is outside the {len(all_ids)} prompts")
    unit = [list(p) for p in all_ids[start:end]]
    if max(map(len, unit)) + settings.max_new_tokens > seq_len:
        raise ValueError(f"a prompt of [{start}, {end}) leaves less than max_new_tokens of seq_len "
                         f"{seq_len}; filter the prompts with usable_prompts first")
    batches = []
    for b in range(start, end, settings.batch_size):
        chunk = unit[b - start:min(b + settings.batch_size, end) - start]
        batches.append(generate_batch(model, chunk, config, seed=settings.batch_seed(b), first_index=b,
                                      check=check and b == start))
    answers = [a for batch in batches for a in batch.answers]
    packed = PackStats()
    ids, target, docs = unit_rows(unit, answers, start, seq_len, config.pad_token_id, train_on, packed)
    stats = {"rows": len(unit), "answer_tokens": sum(len(a) for a in answers),
             "unfinished": sum(batch.unfinished for batch in batches),
             "targets": packed.targets, "padding": packed.padding}
    return GeneratedUnit(start, ids, target, docs, stats, batches)


def max_logp_gap(raw_logits: torch.Tensor, prompt_lengths: Sequence[int], answer_lengths: Sequence[int],
                 logp: torch.Tensor, ids: torch.Tensor | None = None) -> float:
    """The largest ``|log_softmax(raw) - logp|`` over the answer positions of a batch.

    ``raw_logits`` (B, S, V): generate's unprocessed logits, step j predicting answer token j.
    ``logp`` (B, L, k): the forward's log-probs over the rows ``prompt + answer`` (right-padded),
    position t predicting token t + 1, at vocabulary ids ``ids`` (B, L, k) (a top-k cache), or
    over the whole vocabulary (k = V) when ``ids`` is None. Answer token j of row r is predicted
    at row position ``prompt_lengths[r] - 1 + j``; steps after a row's stop id are not compared
    (generate keeps running finished rows on padding)."""
    worst = 0.0
    for r, (p, a) in enumerate(zip(prompt_lengths, answer_lengths, strict=True)):
        if a == 0:
            continue
        gen = torch.log_softmax(raw_logits[r, :a].float(), dim=-1)            # (a, V)
        cached = logp[r, p - 1:p - 1 + a].float()                             # (a, k)
        if ids is not None:
            gen = gen.gather(-1, ids[r, p - 1:p - 1 + a].long().to(gen.device))
        elif cached.shape[-1] != gen.shape[-1]:
            raise ValueError(f"logp has {cached.shape[-1]} entries per position and raw logits "
                             f"{gen.shape[-1]}; pass the vocabulary ids of a top-k logp")
        worst = max(worst, (gen - cached.to(gen.device)).abs().max().item())
    return worst

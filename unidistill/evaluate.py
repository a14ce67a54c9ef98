"""``unidistill evaluate``: how good is a model, and how close is it to the teacher?

- **Perplexity** of the model on held-out text (``--data``), over packed sequences, next-token
  cross-entropy on every position that has a next token, and the **next-token accuracy**: the
  share of those positions where the model's most likely token (argmax) is the actual next one.
- The **uniform-guess baseline** ln V (V = the model's output vocabulary): a model whose
  log-perplexity is above it does worse than guessing every token with probability 1/V.
- Given a **cache** of held-out text, the same (perplexity, accuracy) on the cache's sequences plus: the KL from the
  teacher to the model at T = 1 over the cached top-k ids and the tail bucket (the distance the
  KD term trains down), top-1 agreement with the teacher, and the cosine similarity of the
  model's hidden states with each cached teacher layer (a student-layer x teacher-layer matrix).
  Cosines need equal widths, or the projectors a distillation run trained (found beside the
  model); rows without either are left empty (``None``).
- On a **packed cache** (``--packing documents|none``: documents kept apart, a target mask) the
  model runs each row's documents apart, as the teacher did, and every cache metric counts the
  trained positions only (``models.batch`` loss mask: the next token is a target of the same
  document): the perplexity is on held-out target (for a chat cache, assistant) tokens, and KL,
  top-1 agreement and the layer cosines are over the same positions.

All of it streams: logits are built a chunk of positions at a time, never for a whole batch.
They are each model's own logits: its head and then its softcap or scale
(:mod:`unidistill.model_logits`), checked against ``model(ids).logits`` before scoring.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, default_collate
from tqdm.auto import tqdm

from unidistill.errors import ConfigError
from unidistill.model_logits import OutputHead, check_logit_transform
from unidistill.models.batch import TokenFields
from unidistill.models.packing import check_segment_isolation
from unidistill.models.targets import TeacherTargets
from unidistill.storage import CacheReader
from unidistill.trainer.dataset import CacheDataset, sample_document_ids, sample_input_ids
from unidistill.trainer.losses import LogitSums, LossConfig, logit_sums, next_token_labels
from unidistill.trainer.losses.divergences import teacher_head_for

DEFAULT_SEQ_LEN = 256
# Bumped whenever a metric is added or computed differently: an evaluation recorded under another
# version is stale (``unidistill ablate`` redoes it).
METRICS_VERSION = 3  # 3: packed caches score their trained positions only, documents apart
_CHUNK = 128  # positions per logits chunk
DEFAULT_WORKERS = 1  # DataLoader workers reading a cache ahead of the scoring


@dataclass
class Evaluation:
    """Results of one evaluation; ``None`` where the inputs do not allow a metric."""

    model: str
    data: str | None = None
    sequences: int = 0
    tokens: int = 0
    nll: float | None = None                 # mean next-token cross-entropy (nats)
    perplexity: float | None = None
    accuracy: float | None = None            # share of positions where argmax == the next token
    vocab_size: int | None = None            # V of the model's output layer
    uniform_nll: float | None = None         # ln V: the log-perplexity of a uniform guess
    cache: str | None = None
    cache_fingerprint: str | None = None
    cache_nll: float | None = None           # the same on the cache's sequences
    cache_perplexity: float | None = None
    cache_accuracy: float | None = None      # next-token accuracy on the cache's sequences
    kl_to_teacher: float | None = None       # KL(teacher || model), T = 1, top-k + tail buckets
    top1_agreement: float | None = None      # share of positions where argmax == teacher's top-1
    scored_positions: int | None = None      # cache positions the metrics count (packed: trained ones)
    target_share: float | None = None        # scored_positions / the cache tokens read
    student_layers: list[int] = field(default_factory=list)
    teacher_layers: list[int] = field(default_factory=list)
    layer_cosine: list[list[float | None]] = field(default_factory=list)  # [student][teacher]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class _Totals(LogitSums):
    """:class:`LogitSums` over the batches, and the cosine sums per (student, teacher) pair."""

    def __init__(self, n_student: int, n_teacher: int):
        super().__init__()
        self.cos = np.zeros((n_student, n_teacher))
        self.cos_n = 0
        self.positions = 0  # positions scored (a packed cache's trained ones; else all)


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield range(start, min(start + batch_size, n))


# CE and next-token accuracy alone; with a teacher, also the forward KL at T = 1 and the agreement
_CE_ONLY = LossConfig(alpha=1.0, beta=0.0, chunk_size=_CHUNK)
_WITH_TEACHER = LossConfig(alpha=1.0, beta=1.0, temperature=1.0, kl_direction="forward",
                           chunk_size=_CHUNK)


@torch.no_grad()
def _score_batch(model, tokens: TokenFields, totals: _Totals, targets: TeacherTargets | None,
                 pairs: dict[int, object] | None, teacher_layers: list[int]) -> None:
    """Add one batch's CE and accuracy (and teacher metrics) to ``totals``. ``tokens``: ids
    (B, L) int64, and a packed cache's target mask and document ids (the documents run apart
    and only the loss mask's positions count); ``targets`` the teacher's (an exact cache's
    carry its head: the KL is then over the whole vocabulary), through the same chunked loss
    that trains."""
    input_ids = tokens.input_ids
    mask = tokens.loss_mask()                                              # (B, L) or None: all
    out = model(input_ids=input_ids, output_hidden_states=True,
                logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
                **tokens.forward_kwargs(model))
    cfg = _CE_ONLY if targets is None or not targets.has_logits else _WITH_TEACHER
    totals.add(logit_sums(out.hidden_states[-1], OutputHead.of(model), next_token_labels(input_ids),
                          targets, cfg, mask=mask))
    keep = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask
    totals.positions += int(keep.sum())
    if pairs:
        for i, project in pairs.items():
            h_s = out.hidden_states[i]                                     # (B, L, D_s)
            h_s = (project(h_s) if project is not None else h_s).float()   # (B, L, D_t)
            for col, j in enumerate(teacher_layers):
                h_t = targets.hidden[j].float()                            # (B, L, D_t)
                cos = F.cosine_similarity(h_s, h_t, dim=-1)                # (B, L)
                totals.cos[i, col] += float(torch.where(keep, cos, 0.0).sum())
        totals.cos_n += int(keep.sum())


def _projector_rows(model_dir: str, n_student: int, d_student: int, d_teacher: int
                    ) -> dict[int, object]:
    """Student layer -> callable mapping its states to the teacher's width (None = identity)."""
    if d_student == d_teacher:
        return dict.fromkeys(range(n_student + 1))
    from unidistill.trainer.projectors import WEIGHTS_FILE, load_projectors
    from unidistill.trainer.run_record import read_run_record

    folder = Path(model_dir)
    if not (folder / WEIGHTS_FILE).is_file():
        return {}
    projectors = load_projectors(folder).eval()
    record = read_run_record(folder)
    if record is not None:  # only projectors a hidden-state loss trained
        trained = {int(i) for i in record["hidden_pairs"]}
    else:
        trained = set(projectors.layer_map)
    return {i: (lambda h, i=i: projectors(i, h)) for i in sorted(trained & set(projectors.layer_map))}


def _perplexity(total: float, count: float) -> tuple[float | None, float | None]:
    if not count:
        return None, None
    nll = total / count
    return nll, math.exp(nll)


def evaluate_on_ids(model, ids: np.ndarray, *, batch_size: int, device, progress: bool = True
                    ) -> tuple[float | None, float | None, float | None]:
    """(mean NLL, perplexity, next-token accuracy) of ``model`` on packed sequences ``ids`` (N, L)."""
    check_logit_transform(model, ids, role="evaluated model")
    totals = _Totals(0, 0)
    for rows in tqdm(list(_batches(len(ids), batch_size)), desc="perplexity", disable=not progress):
        batch = torch.from_numpy(ids[rows.start:rows.stop].astype(np.int64)).to(device)
        _score_batch(model, TokenFields(batch), totals, None, None, [])
    return (*_perplexity(totals.ce, totals.ce_n), totals.mean("correct"))


def evaluate_on_cache(model, reader: CacheReader, result: Evaluation, *, model_dir: str | None,
                      batch_size: int, device, max_sequences: int | None, progress: bool = True,
                      num_workers: int = DEFAULT_WORKERS) -> None:
    """Fill the cache metrics of ``result`` from the model's agreement with the cached teacher.

    The cache is read through a DataLoader with ``num_workers`` worker processes (0: in this
    process), so reading the next batches overlaps scoring this one."""
    cfg = model.config
    teacher_layers = list(reader.layers)
    d_teacher = reader.manifest["settings"]["teacher"]["hidden_size"]
    pairs = _projector_rows(model_dir, cfg.num_hidden_layers, cfg.hidden_size, d_teacher) \
        if model_dir and teacher_layers else {}
    n = len(reader) if max_sequences is None else min(len(reader), max_sequences)
    totals = _Totals(cfg.num_hidden_layers + 1, len(teacher_layers))
    layers = teacher_layers if pairs else []
    dataset = CacheDataset(reader, layers=layers)
    head = teacher_head_for(OutputHead(*reader.head(device)),  # padded to a padded student head
                            model.get_output_embeddings().weight.shape[0]) \
        if reader.layout.logit_codec.has_head else None
    sample = sample_input_ids(reader)
    check_logit_transform(model, sample, role="evaluated model")
    documents = sample_document_ids(reader)
    if documents is not None:  # a packed cache: the model must keep its documents apart
        check_segment_isolation(model, sample[:1], documents, role="evaluated model")
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=default_collate,
                        pin_memory=torch.device(device).type == "cuda")
    for batch in tqdm(loader, desc="teacher agreement", disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = TeacherTargets.from_fields(batch, head=head)
        _score_batch(model, TokenFields.from_fields(batch), totals, targets, pairs, layers)
    result.cache_nll, result.cache_perplexity = _perplexity(totals.ce, totals.ce_n)
    result.cache_accuracy = totals.mean("correct")
    result.kl_to_teacher = totals.mean("kl")
    result.top1_agreement = totals.mean("agree")
    result.scored_positions = totals.positions
    result.target_share = totals.positions / (n * reader.layout.seq_len) if n else None
    result.student_layers = list(range(cfg.num_hidden_layers + 1))
    result.teacher_layers = teacher_layers
    result.layer_cosine = [[float(totals.cos[i, c] / totals.cos_n) if (i in pairs and totals.cos_n) else None
                            for c in range(len(teacher_layers))] for i in result.student_layers]


def evaluate(model: str, *, data: str | None = None, cache: str | None = None,
             split: str | None = None, text_field: str = "text", seq_len: int | None = None,
             heldout_share: float | None = None,
             max_sequences: int | None = 64, batch_size: int = 4, device: str = "auto",
             gguf_file: str | None = None, progress: bool = True,
             num_workers: int = DEFAULT_WORKERS) -> Evaluation:
    """Evaluate ``model`` (folder, hub id, GGUF or builtin) on ``data`` and/or a teacher ``cache``
    (read by ``num_workers`` DataLoader workers)."""
    from unidistill.models.loading import load_tokenizer_and_model, resolve_device, resolve_model_source
    from unidistill.text.data import (
        check_data_split,
        default_eval_split,
        iter_documents,
        pack_documents,
    )
    from unidistill.trainer.dataset import check_student_matches_cache

    if data is None and cache is None:
        raise ConfigError("nothing to evaluate on: pass --data (held-out text) and/or --cache "
                          "(a teacher cache of held-out text)")
    if batch_size < 1:
        raise ConfigError(f"batch size is {batch_size}; it must be >= 1")
    if num_workers < 0:
        raise ConfigError(f"num_workers is {num_workers}; it must be >= 0 (0 reads the cache in "
                          "this process)")
    if max_sequences is not None and max_sequences < 1:
        raise ConfigError(f"max sequences is {max_sequences}; it must be >= 1 (or None for all)")
    if data is not None:
        split = default_eval_split(data) if split is None else split
        check_data_split(data, split, heldout_share)  # before the model is loaded
    dev = resolve_device(device)
    source = resolve_model_source(model, gguf_file)
    reader = CacheReader(cache) if cache is not None else None
    tokenizer, net = load_tokenizer_and_model(source, dev)
    if reader is not None:
        check_student_matches_cache(reader, tokenizer, net.config)
    vocab_size = int(net.get_output_embeddings().weight.shape[0])
    result = Evaluation(model=model, data=data, cache=None if cache is None else str(cache),
                        vocab_size=vocab_size, uniform_nll=math.log(vocab_size))
    if data is not None:
        if seq_len is None:
            seq_len = reader.layout.seq_len if reader is not None else DEFAULT_SEQ_LEN
        docs = iter_documents(data, split=split, text_field=text_field, heldout_share=heldout_share)
        ids = pack_documents(docs, tokenizer, seq_len, max_sequences)
        result.sequences, result.tokens = int(ids.shape[0]), int(ids.size)
        result.nll, result.perplexity, result.accuracy = evaluate_on_ids(
            net, ids, batch_size=batch_size, device=dev, progress=progress)
    if reader is not None:
        result.cache_fingerprint = reader.manifest["fingerprint"]
        local_dir = source.path if Path(source.path).is_dir() else None
        evaluate_on_cache(net, reader, result, model_dir=local_dir, batch_size=batch_size,
                          device=dev, max_sequences=max_sequences, progress=progress,
                          num_workers=num_workers)
    return result


def format_number(x, fmt: str) -> str:
    """A metric in a report or table: ``format(x, fmt)``, or ``-`` where there is none."""
    return "-" if x is None else format(x, fmt)


def format_evaluation(result: Evaluation) -> str:
    """A short human-readable summary (the CLI's default output)."""
    num = format_number
    lines = [f"model            {result.model}"]
    if result.uniform_nll is not None:
        lines.append(f"uniform guess    nll {result.uniform_nll:.4f} = ln V, V = {result.vocab_size} "
                     "(a model above it does worse than guessing)")
    if result.data is not None:
        lines += [f"data             {result.data} ({result.sequences} sequences, {result.tokens} tokens)",
                  f"perplexity       {num(result.perplexity, '.3f')}  (nll {num(result.nll, '.4f')})",
                  f"next-token acc   {num(result.accuracy, '.2%')}  (argmax == the actual next token)"]
    if result.cache is not None:
        lines += [f"cache            {result.cache} ({(result.cache_fingerprint or '')[:16]})",
                  f"cache perplexity {num(result.cache_perplexity, '.3f')}",
                  f"cache accuracy   {num(result.cache_accuracy, '.2%')}",
                  f"KL to teacher    {num(result.kl_to_teacher, '.4f')}  (T=1, top-k + tail)",
                  f"top-1 agreement  {num(result.top1_agreement, '.2%')}",
                  f"scored positions {num(result.scored_positions, 'd')}  "
                  f"({num(result.target_share, '.1%')} of the cache tokens read)"]
        rows = [(i, row) for i, row in zip(result.student_layers, result.layer_cosine)
                if any(v is not None for v in row)]
        if rows:
            lines.append("cosine           student layer x teacher layers " + str(result.teacher_layers))
            lines += [f"  {i:>3}  " + " ".join(num(v, '6.3f') for v in row) for i, row in rows]
    return "\n".join(lines)

"""What a teacher says about a batch: :class:`TeacherTargets`.

Two sources produce them: a cache (``trainer.dataset`` over ``storage.reader``, batched by a
DataLoader) and a live teacher (``trainer.online_teacher``). The losses and ``evaluate`` take
them the same way, whichever source they came from.

The logit targets are one of two kinds:

- **sparse** (top-k and sampled caches, a top-k online teacher): ``ids`` (B, L, K), their
  log-probs ``logp`` at T = 1 and ``log_tail`` (B, L), the tempered tail ``log Σ_tail p^(1/T)``
  at the loss temperature; for sampled caches also ``kl_offset`` (B, L), which turns the KL
  against the sample into the unbiased estimate of KL(teacher || student);
- **exact** (exact caches, a full-vocabulary online teacher): the teacher's final hidden state
  ``final_hidden`` (B, L, D_t) and its output ``head``, from which the losses rebuild the
  full-vocabulary logits a chunk of positions at a time.

``hidden`` maps a teacher layer (a ``hidden_states`` index) to its states (B, L, D_t).

A DataLoader batch is a flat dict of tensors (what ``default_collate`` and the Trainer's device
placement handle). This module owns its keys: :meth:`TeacherTargets.to_fields` writes them and
:meth:`TeacherTargets.from_fields` reads them back; nothing else spells them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from unidistill.errors import ConfigError
from unidistill.model_logits import OutputHead

_PREFIX = "teacher_"
_HIDDEN_PREFIX = "teacher_hidden_"
# the per-position tensors, by attribute; their batch key is the prefix + the name
_POSITION_FIELDS = ("ids", "logp", "log_tail", "kl_offset", "final_hidden")


def hidden_field(layer: int) -> str:
    """The batch key of teacher layer ``layer``'s hidden states."""
    return f"{_HIDDEN_PREFIX}{layer}"


@dataclass
class TeacherTargets:
    """The teacher's targets for a batch (or one sequence, without the batch axis)."""

    ids: torch.Tensor | None = None           # (B, L, K) cached or top-k ids
    logp: torch.Tensor | None = None          # (B, L, K) their log-probs at T = 1
    log_tail: torch.Tensor | None = None      # (B, L) log Σ_tail p^(1/T) at the loss temperature
    kl_offset: torch.Tensor | None = None     # (B, L) sampled caches: KL(sample||q) - offset
    final_hidden: torch.Tensor | None = None  # (B, L, D_t) exact: the final normed state
    head: OutputHead | None = None            # exact: the teacher's head and logit transform
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        sparse = [self.ids is not None, self.logp is not None, self.log_tail is not None]
        if any(sparse) and not all(sparse):
            raise ConfigError("sparse teacher targets need ids, logp and log_tail together; got "
                              + ", ".join(n for n, s in zip(("ids", "logp", "log_tail"), sparse) if s))
        if self.final_hidden is not None and any(sparse):
            raise ConfigError("teacher targets are either sparse (ids, logp, log_tail) or exact "
                              "(final_hidden + head), not both")

    @property
    def is_sparse(self) -> bool:
        return self.ids is not None

    @property
    def is_exact(self) -> bool:
        return self.final_hidden is not None

    @property
    def has_logits(self) -> bool:
        return self.is_sparse or self.is_exact

    def check_logits(self) -> None:
        """Refuse a KL term with nothing to compare against."""
        if not self.has_logits:
            raise ConfigError("the KL term needs the teacher's logit targets (ids, logp and "
                              "log_tail, or final_hidden and head) but the batch has none; set "
                              "beta to 0 or read the cache with its logits")
        if self.is_exact and self.head is None:
            raise ConfigError("exact teacher targets need the teacher's head to rebuild its "
                              "logits (CacheReader.head() of an exact cache); none was given")

    def positions(self, start: int, size: int) -> TeacherTargets:
        """Positions [start, start + size) of every per-position tensor (batch axis first)."""
        def cut(x):
            return None if x is None else x[:, start:start + size]
        return replace(self, **{n: cut(getattr(self, n)) for n in _POSITION_FIELDS},
                       hidden={j: h[:, start:start + size] for j, h in self.hidden.items()})

    def top1(self) -> torch.Tensor:
        """The most likely cached id per position (B, L) of sparse targets: top-k's first, or
        the most drawn of a sampled cache."""
        best = self.logp.argmax(-1, keepdim=True)                          # (B, L, 1)
        return self.ids.long().gather(-1, best).squeeze(-1)

    # -- the flat batch dict ---------------------------------------------------------------------
    def to_fields(self) -> dict[str, torch.Tensor]:
        """The per-position tensors as a flat dict (a dataset item or a batch); the head stays out."""
        out = {_PREFIX + n: getattr(self, n) for n in _POSITION_FIELDS if getattr(self, n) is not None}
        out.update({hidden_field(j): h for j, h in self.hidden.items()})
        return out

    @classmethod
    def from_fields(cls, batch: dict, head: OutputHead | None = None) -> TeacherTargets:
        """The targets in a flat dict written by :meth:`to_fields` (other keys are ignored)."""
        values = {n: batch.get(_PREFIX + n) for n in _POSITION_FIELDS}
        hidden = {int(k[len(_HIDDEN_PREFIX):]): v for k, v in batch.items()
                  if k.startswith(_HIDDEN_PREFIX)}
        return cls(**values, head=head if values["final_hidden"] is not None else None,
                   hidden=dict(sorted(hidden.items())))

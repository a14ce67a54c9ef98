"""The token-level fields of a batch: :class:`TokenFields`.

``input_ids`` always; for a packed cache also ``target_mask`` (which tokens are training targets)
and ``document_ids`` (which segment each token belongs to; -2 = padding). This module owns their
batch keys, the way :mod:`unidistill.models.targets` owns the teacher's: nothing else spells them.

The loss mask is position-side: the loss at position t predicts token t + 1, so
``loss_mask[t] = target[t+1] and doc[t+1] == doc[t]`` for t < L - 1, and the last position is
never trained. The one mask goes to every loss term (CE, KL, hidden) and to ``evaluate``'s sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unidistill.models.packing import segment_kwargs

INPUT_IDS = "input_ids"
TARGET_MASK = "target_mask"
DOCUMENT_IDS = "document_ids"


def loss_mask(target_mask: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """target_mask (B, L) bool, document_ids (B, L) -> the position-side loss mask (B, L) bool."""
    mask = torch.zeros_like(target_mask, dtype=torch.bool)
    mask[:, :-1] = target_mask[:, 1:].bool() & (document_ids[:, 1:] == document_ids[:, :-1])
    return mask


@dataclass
class TokenFields:
    """A batch's tokens: ``input_ids`` (B, L); ``target_mask`` (B, L) bool and ``document_ids``
    (B, L) int for a packed cache, None for a stream one."""

    input_ids: torch.Tensor
    target_mask: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.document_ids is not None

    def loss_mask(self) -> torch.Tensor | None:
        """The position-side loss mask (B, L) bool (module docstring); None for a stream batch,
        whose losses count every position as before."""
        if not self.packed:
            return None
        return loss_mask(self.target_mask, self.document_ids)

    def forward_kwargs(self, model) -> dict:
        """What ``model``'s forward needs to keep the segments apart (:func:`segment_kwargs`)."""
        return segment_kwargs(model, self.document_ids)

    def to_fields(self) -> dict[str, torch.Tensor]:
        fields = {INPUT_IDS: self.input_ids}
        if self.packed:
            fields[TARGET_MASK] = self.target_mask
            fields[DOCUMENT_IDS] = self.document_ids
        return fields

    @classmethod
    def from_fields(cls, batch: dict) -> "TokenFields":
        return cls(batch[INPUT_IDS], batch.get(TARGET_MASK), batch.get(DOCUMENT_IDS))

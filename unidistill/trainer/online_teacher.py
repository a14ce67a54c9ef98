"""The online baseline: the same losses fed by a live teacher in memory instead of a cache.

This is what offline distillation is measured against (memory, speed and quality): the teacher
shares the student's device and runs a no-grad forward on every batch. Two flavours:

- ``kd_top_k=None`` (full vocabulary): the teacher's final hidden state and output head are handed
  to the chunked loss, which rebuilds exact full-vocabulary teacher logits one chunk at a time,
  so the KL is over all V ids at any temperature;
- ``kd_top_k=k``: the teacher's top-k log-probs plus tail, exactly what a cache built with that k
  would hold (but in fp32), so the online and offline paths can be compared like for like.

Logits are the teacher's own (its head, then its softcap or scale: ``HookedTeacher.transform``),
checked against ``model(ids).logits`` on the first batch.

Hidden states of the requested teacher layers (``hidden_states`` indices, as in the cache) are
captured by forward hooks. Everything comes back as :class:`~unidistill.models.targets.TeacherTargets`,
as the cache's targets do.
"""

from __future__ import annotations

import torch

from unidistill.errors import ConfigError
from unidistill.model_logits import OutputHead
from unidistill.models.targets import TeacherTargets
from unidistill.models.teacher import HookedTeacher


class OnlineTeacher:
    """Callable ``input_ids (B, L) -> TeacherTargets`` for ``UniversalDistillationTrainer``:
    the hidden states of each requested layer, and either sparse targets (top-k ids, log-probs
    and the tempered tail) or exact ones (the final state and the teacher's head)."""

    def __init__(self, model, *, layers=(), kd_top_k: int | None = None, temperature: float = 1.0):
        vocab = model.config.vocab_size
        if kd_top_k is not None and not 1 <= kd_top_k <= vocab:
            raise ConfigError(f"online teacher top_k is {kd_top_k}, but it must be between 1 and the "
                              f"vocabulary size {vocab}; use top_k=None for the full vocabulary")
        self.model = model.eval().requires_grad_(False)
        self.kd_top_k = kd_top_k
        self.temperature = temperature
        # the top-k targets carry the exact tempered tail at the training temperature
        temps = () if temperature == 1.0 else (temperature,)
        self.runner = HookedTeacher(self.model, layers, kd_top_k, tail_temperatures=temps)
        head = self.model.get_output_embeddings()
        self.head_weight, self.head_bias = head.weight, head.bias
        self.checked = False  # check_logits runs on the first batch unless called before

    def check_logits(self, input_ids) -> None:
        """Refuse a teacher whose own logits are not its head + known transform (a few sequences)."""
        self.runner.check_logits(input_ids)
        self.checked = True

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    def __call__(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None
                 ) -> TeacherTargets:
        """The targets of a batch (B, L); with ``document_ids`` (a packed cache's) the teacher
        runs the row's segments apart, as the cache's teacher did."""
        if not self.checked:
            self.check_logits(input_ids)
        docs = None if document_ids is None else document_ids.to(self.device)
        final, captured = self.runner.forward(input_ids.to(self.device), docs)
        if self.kd_top_k is None:
            return TeacherTargets(final_hidden=final, hidden=captured,
                                  head=OutputHead(self.head_weight, self.head_bias,
                                                  self.runner.transform))
        ids, logp, tail, tempered = self.runner.top_k_tail(final)
        if self.temperature != 1.0:
            tail = tempered[..., 0]                                       # log Σ_tail p^(1/T)
        return TeacherTargets(ids=ids, logp=logp, log_tail=tail, hidden=captured)

    def close(self) -> None:
        self.runner.close()

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
captured by forward hooks and returned under the same field names as the cache dataset's.
"""

from __future__ import annotations

import torch

from unidistill.errors import ConfigError
from unidistill.models.teacher import HookedTeacher
from unidistill.trainer.dataset import hidden_field


class OnlineTeacher:
    """Callable ``input_ids (B, L) -> dict of teacher fields`` for ``UniversalDistillationTrainer``.

    Returned fields: ``teacher_hidden_<j>`` for each layer j, and either ``teacher_ids``,
    ``teacher_logp``, ``teacher_log_tail`` (top-k) or ``teacher_final_hidden`` plus the head as
    ``teacher_head_weight`` / ``teacher_head_bias`` / ``teacher_logit_transform`` (full vocabulary).
    """

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

    def __call__(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.checked:
            self.check_logits(input_ids)
        final, captured = self.runner.forward(input_ids.to(self.device))
        fields = {hidden_field(j): h for j, h in captured.items()}
        if self.kd_top_k is None:
            fields.update(teacher_final_hidden=final, teacher_head_weight=self.head_weight,
                          teacher_head_bias=self.head_bias,
                          teacher_logit_transform=self.runner.transform)
        else:
            ids, logp, tail, tempered = self.runner.top_k_tail(final)
            if self.temperature != 1.0:
                tail = tempered[..., 0]                                   # log Σ_tail p^(1/T)
            fields.update(teacher_ids=ids, teacher_logp=logp, teacher_log_tail=tail)
        return fields

    def close(self) -> None:
        self.runner.close()

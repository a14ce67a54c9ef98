"""The whole training loss of a step, ``alpha * CE + beta * T^2 * KL + gamma * hidden``: what
``UniversalDistillationTrainer.compute_loss`` returns, and what the tests check against
reference math."""

from __future__ import annotations

import torch

from unidistill.model_logits import OutputHead
from unidistill.models.targets import TeacherTargets
from unidistill.trainer.losses.config import LossConfig, LossTerms
from unidistill.trainer.losses.hidden import hidden_state_loss
from unidistill.trainer.losses.logit_loss import logit_loss


def hidden_alignment_loss(projected: dict[int, torch.Tensor], targets: TeacherTargets,
                          pairs: dict[int, int], kind: str,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the aligned (student block i -> teacher layer j) pairs of the hidden-state loss
    between the student's projected states ``projected[i]`` (B, L, D_t) and the teacher's
    ``targets.hidden[j]`` (B, L, D_t), over the masked positions (None: all)."""
    per_pair = []
    for i, j in sorted(pairs.items()):
        s = projected[i]
        t = targets.hidden[j].to(s.device)
        flat_mask = (torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if mask is None
                     else mask.to(s.device)).reshape(-1)
        per_pair.append(hidden_state_loss(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]),
                                          flat_mask, kind))
    return torch.stack(per_pair).mean()


def distillation_loss(final_hidden: torch.Tensor, head: OutputHead, labels: torch.Tensor,
                      targets: TeacherTargets | None, cfg: LossConfig, *,
                      projected: dict[int, torch.Tensor] | None = None,
                      hidden_pairs: dict[int, int] | None = None,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LossTerms]:
    """``(loss, terms)``: the compound loss of one batch with its gradient, and its three terms
    (detached CE and KL means, the hidden loss) for logging.

    final_hidden (B, L, D) is the student's final normed state and ``head`` its output head;
    ``projected`` the student block states brought to the teacher's width (the student wrapper's
    forward gives them), aligned by ``hidden_pairs`` when ``cfg.gamma > 0``. A term whose weight
    is 0 is not computed and logs as 0.
    """
    zero = final_hidden.new_zeros((), dtype=torch.float32)
    if cfg.alpha > 0 or cfg.beta > 0:
        loss, ce, kl = logit_loss(final_hidden, head, labels, targets, cfg, mask=mask)
    else:
        loss, ce, kl = zero, zero, zero
    hidden = zero
    if cfg.gamma > 0 and hidden_pairs:
        hidden = hidden_alignment_loss(projected, targets, hidden_pairs, cfg.hidden_loss, mask)
        loss = loss + cfg.gamma * hidden
    return loss, LossTerms(ce=ce, kl=kl, hidden=hidden)

"""Hidden-state losses between projected student states and the teacher's cached ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unidistill.errors import ConfigError
from unidistill.trainer.losses.divergences import choice_error, masked_sum, masked_mean

HIDDEN_KINDS = ("mse", "nmse", "cnmse", "cosine")
_EPS = 1e-12


def hidden_state_loss_per_position(student_h: torch.Tensor, teacher_h: torch.Tensor,
                                   kind: str) -> torch.Tensor:
    """Per-position hidden-state distance: student_h (N, D), teacher_h (N, D) -> (N,) fp32.

    kind "mse" = mean over channels of (s - t)^2; "cosine" = 1 - cos(s, t). "nmse" and "cnmse"
    have no per-position form (their normalisers are batch statistics): use ``hidden_state_loss``.
    """
    s, t = student_h.float(), teacher_h.float()
    if kind == "mse":
        return (s - t).square().mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    if kind in ("nmse", "cnmse"):
        raise ConfigError(f"hidden loss {kind!r} is normalised by a batch statistic and has no "
                          "per-position form; call hidden_state_loss(student_h, teacher_h, mask, "
                          f"{kind!r}) instead")
    raise choice_error("hidden-state loss kind", kind, HIDDEN_KINDS)


def hidden_state_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor,
                      kind: str) -> torch.Tensor:
    """Hidden-state loss over the unmasked positions -> fp32 scalar; 0.0 when all is masked.

    student_h (N, D), teacher_h (N, D), mask (N,). "mse" and "cosine" are masked means of the
    per-position values. "nmse" = sum ||s - t||^2 / sum ||t||^2 over the unmasked positions, i.e.
    the mean squared error divided by the teacher's mean squared norm: a relative error that is
    invariant to the scale of the hidden states, so a teacher with huge outlier channels does not
    give a loss orders of magnitude larger than CE/KL (plain mse grows with the outliers squared).
    The errors in those outlier channels still dominate the sum; nmse only fixes the scale.
    "cnmse" (channel-normalised) = the mean over channels c of sum_n (s - t)_c^2 / sum_n t_c^2:
    each channel's error relative to its own teacher energy, so a massive-activation channel
    weighs as one channel among D instead of drowning the others. A channel whose teacher energy
    is below 1e-6 of the mean channel's is measured against that floor.
    """
    if kind == "cnmse":
        s, t = student_h.float(), teacher_h.float()
        keep = mask.bool().unsqueeze(-1)
        err = torch.where(keep, (s - t).square(), 0.0).sum(0)              # (D,)
        ref = torch.where(keep, t.square(), 0.0).sum(0)
        floor = (ref.mean() * 1e-6).clamp(min=_EPS)
        return (err / torch.maximum(ref, floor)).mean()
    if kind == "nmse":
        s, t = student_h.float(), teacher_h.float()
        err, _ = masked_sum((s - t).square().sum(-1), mask)            # sum over (N, D)
        ref, _ = masked_sum(t.square().sum(-1), mask)
        return err / ref.clamp(min=_EPS)
    return masked_mean(hidden_state_loss_per_position(student_h, teacher_h, kind), mask)

"""Hand-written gradients of one chunk of the training loss, for CE and the forward KL.

Autograd through ``log_softmax``, the gather at the cached ids, the tail's ``logsumexp`` and the
KL keeps several (positions x V) fp32 tensors of each chunk alive and walks them again
backwards. The gradient has a closed form, so the fused loss takes it directly: one softmax per
temperature, a gather and two scatters over the K ids.

With p = softmax(z / T) the student's tempered distribution, q_tail = Σ_{v ∉ ids} p_v its tail
bucket and t the teacher's K + 1 bucket probabilities, the forward KL over the buckets has

    d KL / d z_v = (p_v - t_v) / T                       for v among the cached ids,
    d KL / d z_v = p_v (1 - t_tail / q_tail) / T         for every other v,

(a duplicated id, such as a sampled cache's unused slots, gets the sum of its slots' t), and over
the whole vocabulary (an exact teacher) ``(p - t) / T``. CE's is ``softmax(z) - onehot(label)``.
A logit transform (softcap, scale) is chained through its derivative. Reverse KL and JSD keep
autograd.
"""

from __future__ import annotations

import torch

from unidistill.model_logits import LogitTransform
from unidistill.models.targets import TeacherTargets
from unidistill.trainer.losses.divergences import (
    IGNORE_INDEX,
    _kl,
    masked_sum,
    minus_kl_offset,
    position_mask,
)


def _ce(z: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, weight: float):
    """(sum, count, gradient (N, V) of ``weight * sum``) of CE over the rows with a next token."""
    lse = torch.logsumexp(z, -1)                                            # (N,)
    safe = labels.clamp(min=0).unsqueeze(-1)                                # (N, 1)
    total, count = masked_sum(lse - z.gather(-1, safe).squeeze(-1), rows)
    grad = torch.exp(z - lse.unsqueeze(-1))                                 # (N, V) softmax
    grad.scatter_add_(-1, safe, torch.full_like(safe, -1.0, dtype=grad.dtype))
    return total, count, grad.mul_(torch.where(rows, weight, 0.0).unsqueeze(-1))


def _kl_sparse(zt: torch.Tensor, lse: torch.Tensor, targets: TeacherTargets, temperature: float):
    """(KL per position (N,), gradient (N, V) of the KL sum w.r.t. the tempered logits zt)."""
    k = targets.ids.shape[-1]
    ids = targets.ids.reshape(-1, k).long()                                 # (N, K)
    t_buckets = torch.cat([targets.logp.reshape(-1, k).float() / temperature,
                           targets.log_tail.reshape(-1, 1).float()], dim=-1)
    t_logp = torch.log_softmax(t_buckets, dim=-1)                           # (N, K+1)
    s_top = zt.gather(-1, ids) - lse.unsqueeze(-1)                          # (N, K)
    s_tail = (zt.scatter(-1, ids, float("-inf")).logsumexp(-1) - lse)       # (N,)
    kl = _kl(t_logp, torch.cat([s_top, s_tail.unsqueeze(-1)], dim=-1))    # (N,)
    t_tail = t_logp[:, -1]
    ratio = torch.where(t_tail == float("-inf"), 0.0, torch.exp(t_tail - s_tail))  # t_tail / q_tail
    grad = torch.exp(zt - lse.unsqueeze(-1))                                # (N, V) p
    at_ids = grad.gather(-1, ids)                                           # (N, K) p at the ids
    grad.mul_((1.0 - ratio).unsqueeze(-1))                                  # every other id
    grad.scatter_(-1, ids, at_ids)                                          # p_v at the ids ...
    grad.scatter_add_(-1, ids, -t_logp[:, :k].exp())                        # ... minus t_v
    return kl, grad


def _kl_full(zt: torch.Tensor, lse: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    t_logp = torch.log_softmax(teacher_logits.reshape(zt.shape).float() / temperature, dim=-1)
    s_logp = zt - lse.unsqueeze(-1)                                         # (N, V)
    kl = _kl(t_logp, s_logp)
    return kl, s_logp.exp_().sub_(t_logp.exp())                             # p - t


def ce_and_forward_kl(raw: torch.Tensor, transform: LogitTransform | None, labels: torch.Tensor,
                      targets: TeacherTargets | None, temperature: float,
                      mask: torch.Tensor | None, *, ce_weight: float, kl_weight: float,
                      teacher_logits: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sums, grad)`` of one chunk: the (6,) sums of :data:`~.logit_loss.SUMS` (no accuracy)
    and the gradient (N, V) fp32 of ``ce_weight * ce_sum + kl_weight * kl_sum`` with respect to
    the head's raw output ``raw`` (N, V) fp32 (None when both weights are 0).

    Equal, to float rounding, to autograd through :func:`~.logit_loss.sums_from_logits` with the
    forward KL. A weight of 0 skips its term (its sums stay 0), as there.
    """
    z = raw if transform is None or transform.is_identity else transform.apply(raw)   # (N, V)
    flat_labels = labels.reshape(-1)
    keep = position_mask(labels, mask)
    zero = z.new_zeros(())
    ce = ce_n = kl = kl_n = zero
    grad = None
    if ce_weight != 0:
        ce, ce_n, grad = _ce(z, flat_labels, keep & (flat_labels != IGNORE_INDEX), ce_weight)
    if kl_weight != 0:
        zt = z if temperature == 1.0 else z / temperature
        lse = torch.logsumexp(zt, -1)                                       # (N,)
        if teacher_logits is not None:
            per_position, g = _kl_full(zt, lse, teacher_logits, temperature)
        else:
            per_position, g = _kl_sparse(zt, lse, targets, temperature)
        kl, kl_n = masked_sum(per_position, keep)
        kl = minus_kl_offset(kl, None if targets is None else targets.kl_offset, keep)
        g.mul_(torch.where(keep, kl_weight / temperature, 0.0).unsqueeze(-1))
        grad = g if grad is None else grad.add_(g)
    if grad is not None and transform is not None and not transform.is_identity:
        grad = grad.mul_(transform.derivative(z))
    return torch.stack([ce, ce_n, kl, kl_n, zero, zero]), grad

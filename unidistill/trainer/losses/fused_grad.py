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

import math
from typing import NamedTuple

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


TAIL_FLOOR = 1e-20  # a tail mass below this is taken in log space (its fp32 terms may underflow)


def _ce_sums(z: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor):
    """(normaliser lse (N,), labels as gather indices (N, 1), CE sum, count) over ``rows``."""
    lse = torch.logsumexp(z, -1)                                            # (N,)
    safe = labels.clamp(min=0).unsqueeze(-1)                                # (N, 1)
    total, count = masked_sum(lse - z.gather(-1, safe).squeeze(-1), rows)
    return lse, safe, total, count


def _kl_sums(per_position: torch.Tensor, targets: TeacherTargets | None, keep: torch.Tensor):
    """(KL sum, count) over ``keep``; a sampled cache's offset makes the sum its unbiased estimate."""
    kl, kl_n = masked_sum(per_position, keep)
    return minus_kl_offset(kl, None if targets is None else targets.kl_offset, keep), kl_n


def _ce(z: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, weight: float):
    """(sum, count, gradient (N, V) of ``weight * sum``) of CE over the rows with a next token."""
    lse, safe, total, count = _ce_sums(z, labels, rows)
    grad = torch.exp(z - lse.unsqueeze(-1))                                 # (N, V) softmax
    grad.scatter_add_(-1, safe, torch.full_like(safe, -1.0, dtype=grad.dtype))
    return total, count, grad.mul_(torch.where(rows, weight, 0.0).unsqueeze(-1))


def _log_tail(p: torch.Tensor, ids: torch.Tensor, zt: torch.Tensor, lse: torch.Tensor):
    """(log Σ_{v ∉ ids} p_v (N,), the rows redone in log space): the tail's own terms summed (no
    1 - Σ_ids cancellation), ``p`` left zero at ``ids``. Rows whose tail mass is below
    :data:`TAIL_FLOOR` are redone in log space, where fp32 terms cannot underflow."""
    p.scatter_(-1, ids, 0.0)
    log_tail = p.sum(-1).log()
    small = (log_tail < math.log(TAIL_FLOOR)).nonzero().squeeze(-1)
    if small.numel():
        exact = zt[small].scatter(-1, ids[small], float("-inf")).logsumexp(-1) - lse[small]
        log_tail = log_tail.index_put((small,), exact)
    return log_tail, small


class _KLParts(NamedTuple):
    kl: torch.Tensor         # (N,) KL per position
    p: torch.Tensor          # (N, V) the student's tempered softmax, zero at the ids
    at_ids: torch.Tensor     # (N, K) p at the ids
    t_top: torch.Tensor      # (N, K) the teacher's bucket probabilities at the ids
    ratio: torch.Tensor      # (N,) t_tail / q_tail
    ids: torch.Tensor        # (N, K)
    small: torch.Tensor      # rows whose tail mass is below TAIL_FLOOR
    off_ids: torch.Tensor    # (len(small), V) p_v (1 - t_tail / q_tail) of those rows, computed stably


def _kl_parts(zt: torch.Tensor, lse: torch.Tensor, targets: TeacherTargets, temperature: float):
    """The sparse forward KL's pieces (:class:`_KLParts`)."""
    k = targets.ids.shape[-1]
    ids = targets.ids.reshape(-1, k).long()                                 # (N, K)
    t_buckets = torch.cat([targets.logp.reshape(-1, k).float() / temperature,
                           targets.log_tail.reshape(-1, 1).float()], dim=-1)
    t_logp = torch.log_softmax(t_buckets, dim=-1)                           # (N, K+1)
    p = torch.exp(zt - lse.unsqueeze(-1))                                   # (N, V)
    at_ids = p.gather(-1, ids)                                              # (N, K)
    s_top = zt.gather(-1, ids) - lse.unsqueeze(-1)                          # (N, K)
    s_tail, small = _log_tail(p, ids, zt, lse)                              # (N,)
    kl = _kl(t_logp, torch.cat([s_top, s_tail.unsqueeze(-1)], dim=-1))    # (N,)
    t_tail = t_logp[:, -1]
    ratio = torch.where(t_tail == float("-inf"), 0.0, torch.exp(t_tail - s_tail))  # t_tail / q_tail
    # where q_tail is tiny the ratio overflows while p_v underflows: p_v - t_tail * (p_v / q_tail),
    # the second factor the student's distribution within its tail
    zs = zt[small] - lse[small].unsqueeze(-1)
    off_ids = zs.exp() - (zs - s_tail[small].unsqueeze(-1) + t_tail[small].unsqueeze(-1)).exp()
    return _KLParts(kl, p, at_ids, t_logp[:, :k].exp(), ratio, ids, small, off_ids)


def _kl_sparse(zt: torch.Tensor, lse: torch.Tensor, targets: TeacherTargets, temperature: float):
    """(KL per position (N,), gradient (N, V) of the KL sum w.r.t. the tempered logits zt)."""
    parts = _kl_parts(zt, lse, targets, temperature)
    grad, ids = parts.p, parts.ids
    grad.mul_((1.0 - parts.ratio).unsqueeze(-1))                            # every other id
    grad[parts.small] = parts.off_ids
    grad.scatter_(-1, ids, parts.at_ids)                                    # p_v at the ids ...
    grad.scatter_add_(-1, ids, -parts.t_top)                                # ... minus t_v
    return parts.kl, grad


def _ce_and_kl_at_t1(z, labels, ce_rows, keep, targets, ce_weight: float, kl_weight: float):
    """CE and the sparse forward KL at T = 1 from one softmax: the same sums and summed gradient
    as :func:`_ce` plus :func:`_kl_sparse`, with one normaliser and one (N, V) buffer.

    Per row, with a = the CE weight and b = the KL weight (0 where the row is left out),
    d/dz_v = a (p_v - [v = label]) + b p_v (1 - t_tail / q_tail) off the ids, and
    (a + b) p_v - b Σ_slots t at the ids."""
    lse, safe, ce, ce_n = _ce_sums(z, labels, ce_rows)
    parts = _kl_parts(z, lse, targets, 1.0)
    grad, ids = parts.p, parts.ids
    a = torch.where(ce_rows, ce_weight, 0.0)
    b = torch.where(keep, kl_weight, 0.0)
    small = parts.small
    p_small = grad[small]                                                   # p itself, before scaling
    grad.mul_((a + b * (1.0 - parts.ratio)).unsqueeze(-1))
    grad[small] = a[small].unsqueeze(-1) * p_small + b[small].unsqueeze(-1) * parts.off_ids
    grad.scatter_(-1, ids, parts.at_ids * (a + b).unsqueeze(-1))
    grad.scatter_add_(-1, ids, -parts.t_top * b.unsqueeze(-1))
    grad.scatter_add_(-1, safe, -a.unsqueeze(-1))
    return ce, ce_n, parts.kl, grad


def _kl_full(zt: torch.Tensor, lse: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    t_logp = torch.log_softmax(teacher_logits.reshape(zt.shape).float() / temperature, dim=-1)
    s_logp = zt - lse.unsqueeze(-1)                                         # (N, V)
    kl = _kl(t_logp, s_logp)
    return kl, s_logp.exp_().sub_(t_logp.exp())                             # p - t


def _kl_term(z, targets, temperature: float, keep, kl_weight: float, teacher_logits):
    """(KL sum, count, its weighted gradient (N, V)) at any temperature, on its own softmax."""
    zt = z if temperature == 1.0 else z / temperature
    lse = torch.logsumexp(zt, -1)                                           # (N,)
    if teacher_logits is not None:
        per_position, g = _kl_full(zt, lse, teacher_logits, temperature)
    else:
        per_position, g = _kl_sparse(zt, lse, targets, temperature)
    kl, kl_n = _kl_sums(per_position, targets, keep)
    return kl, kl_n, g.mul_(torch.where(keep, kl_weight / temperature, 0.0).unsqueeze(-1))


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
    ce_rows = keep & (flat_labels != IGNORE_INDEX)
    if ce_weight != 0 and kl_weight != 0 and temperature == 1.0 and teacher_logits is None:
        ce, ce_n, per_position, grad = _ce_and_kl_at_t1(z, flat_labels, ce_rows, keep, targets,
                                                        ce_weight, kl_weight)
        kl, kl_n = _kl_sums(per_position, targets, keep)
    else:
        if ce_weight != 0:
            ce, ce_n, grad = _ce(z, flat_labels, ce_rows, ce_weight)
        if kl_weight != 0:
            kl, kl_n, g = _kl_term(z, targets, temperature, keep, kl_weight, teacher_logits)
            grad = g if grad is None else grad.add_(g)
    if grad is not None and transform is not None and not transform.is_identity:
        grad = grad.mul_(transform.derivative(z))
    return torch.stack([ce, ce_n, kl, kl_n, zero, zero]), grad

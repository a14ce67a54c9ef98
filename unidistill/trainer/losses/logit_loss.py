"""The one logit loss: next-token CE and the KL to the teacher, from the student's final hidden
state, a chunk of positions at a time, never holding the logits of a whole batch.

- :func:`logit_loss` trains: ``alpha * CE + beta * T^2 * KL`` (means over their positions) with
  the gradients taken chunk by chunk as soon as each chunk's logits exist (fused with the head):
  nothing of size (.., V) outlives its chunk and nothing is recomputed.
- :func:`logit_sums` evaluates: the same sums without gradients, plus next-token accuracy and
  top-1 agreement with the teacher.

Both run :func:`sums_from_logits` on each chunk, so what is tested is what trains. Targets are
:class:`~unidistill.models.targets.TeacherTargets`, sparse (K cached ids + tail bucket) or exact
(the teacher's final state and head, whose full-vocabulary logits are rebuilt per chunk without
gradients). Logits are ``head.transform(hidden @ W.T + b)``: each model's own
(:mod:`unidistill.model_logits`).

``mask`` (B, L) selects the positions that train (None: all). CE counts the masked positions that
have a next token; the KL counts every masked position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unidistill.errors import ConfigError
from unidistill.model_logits import OutputHead
from unidistill.models.targets import TeacherTargets
from unidistill.trainer.losses.config import LossConfig
from unidistill.trainer.losses.fused_grad import ce_and_forward_kl
from unidistill.trainer.losses.divergences import (
    IGNORE_INDEX,
    bucket_log_probs,
    cross_entropy_per_position,
    full_vocab_log_probs,
    kl_per_position,
    masked_sum,
    minus_kl_offset,
    position_mask,
)

# the sums of one chunk, in this order: a (6,) fp32 tensor
SUMS = ("ce", "ce_n", "kl", "kl_n", "correct", "agree")


@dataclass
class LogitSums:
    """Running sums over positions (floats): CE and its count, KL and its count, next-token hits
    (argmax == the next token, over CE's positions), top-1 agreement with the teacher (over KL's)."""

    ce: float = 0.0
    ce_n: float = 0.0
    kl: float = 0.0
    kl_n: float = 0.0
    correct: float = 0.0
    agree: float = 0.0

    def add(self, sums: torch.Tensor) -> None:
        for name, value in zip(SUMS, sums.tolist()):
            setattr(self, name, getattr(self, name) + value)

    def mean(self, name: str) -> float | None:
        count = self.ce_n if name in ("ce", "correct") else self.kl_n
        return getattr(self, name) / count if count else None


def sums_from_logits(logits: torch.Tensor, labels: torch.Tensor, targets: TeacherTargets | None,
                     temperature: float, direction: str, *, mask: torch.Tensor | None = None,
                     compute_ce: bool = True, compute_kl: bool = True,
                     teacher_logits: torch.Tensor | None = None,
                     stats: bool = False) -> torch.Tensor:
    """The (6,) sums of :data:`SUMS` over logits (B, L, V), differentiable in the logits.

    labels (B, L), -100 = no next token; ``targets`` per position (B, L, ..); ``teacher_logits``
    (B, L, V) stand for exact targets (built by the caller, without gradients). A term not asked for,
    and ``correct`` / ``agree`` unless ``stats``, are 0. For sampled targets the KL is the
    unbiased estimate: the KL to the sample minus ``targets.kl_offset`` (a constant per
    position, so the gradient is unchanged).
    """
    zero = logits.new_zeros((), dtype=torch.float32)
    flat = logits.reshape(-1, logits.shape[-1])                             # (N, V)
    flat_labels = labels.reshape(-1)                                        # (N,)
    keep = position_mask(labels, mask)
    has_next = keep & (flat_labels != IGNORE_INDEX)
    ce = ce_n = kl = kl_n = correct = agree = zero
    if compute_ce:
        ce, ce_n = masked_sum(cross_entropy_per_position(flat, flat_labels), has_next)
    if compute_kl:
        if teacher_logits is not None:
            s_logq, t_logp = full_vocab_log_probs(flat, teacher_logits.reshape(flat.shape),
                                                  temperature)              # (N, V)
        elif targets is not None and targets.is_sparse:
            k = targets.ids.shape[-1]
            s_logq, t_logp = bucket_log_probs(flat, targets.ids.reshape(-1, k),
                                              targets.logp.reshape(-1, k),
                                              targets.log_tail.reshape(-1), temperature)  # (N, K+1)
        else:
            raise ConfigError("the KL term needs sparse teacher targets (ids, logp, log_tail) or "
                              "the teacher's full logits; got neither")
        kl, kl_n = masked_sum(kl_per_position(s_logq, t_logp, direction), keep)
        kl = minus_kl_offset(kl, None if targets is None else targets.kl_offset, keep)
    if stats:
        with torch.no_grad():
            predicted = flat.argmax(-1)                                     # (N,)
            correct = (has_next & (predicted == flat_labels)).sum().float()
            if compute_kl:
                top1 = (teacher_logits.argmax(-1) if teacher_logits is not None
                        else targets.top1()).reshape(-1).to(predicted.device)
                agree = (keep & (predicted == top1)).sum().float()
    return torch.stack([ce, ce_n, kl, kl_n, correct, agree])


def _teacher_logits(targets: TeacherTargets | None, cfg: LossConfig) -> torch.Tensor | None:
    """Exact targets' full-vocabulary logits of one chunk (B, C, V), rebuilt from the teacher's
    final state and head without gradients, when the KL term is on; None otherwise."""
    if cfg.beta > 0 and targets is not None and targets.is_exact:
        with torch.no_grad():
            return targets.head.logits(targets.final_hidden)
    return None


def _chunk_sums(hidden, head: OutputHead, labels, targets, cfg: LossConfig, mask, stats: bool):
    """:func:`sums_from_logits` of one chunk of positions, from its hidden states (B, C, D)."""
    logits = head.logits(hidden)                                            # (B, C, V) fp32
    return sums_from_logits(logits, labels, targets, cfg.temperature, cfg.kl_direction, mask=mask,
                            compute_ce=cfg.alpha > 0 or stats,
                            compute_kl=cfg.beta > 0 and targets is not None,
                            teacher_logits=_teacher_logits(targets, cfg), stats=stats)


def _chunks(hidden, labels, targets, mask, size: int):
    """(start, hidden, labels, targets, mask) of each chunk of ``size`` positions."""
    for start in range(0, hidden.shape[1], size):
        yield (start, hidden[:, start:start + size], labels[:, start:start + size],
               None if targets is None else targets.positions(start, size),
               None if mask is None else mask[:, start:start + size])


def _check(hidden, labels, targets, cfg: LossConfig, mask) -> None:
    """Fail before any chunk runs."""
    if labels.shape != hidden.shape[:2]:
        raise ConfigError(f"labels have shape {tuple(labels.shape)}, hidden states "
                          f"{tuple(hidden.shape)}; they must share (batch, positions)")
    if mask is not None and mask.shape != labels.shape:
        raise ConfigError(f"the loss mask has shape {tuple(mask.shape)}; expected the labels' "
                          f"{tuple(labels.shape)}")
    if cfg.beta > 0:
        if targets is None:
            raise ConfigError("the KL term (beta > 0) needs the teacher's targets; got none. Pass "
                              "them, or set beta to 0")
        targets.check_logits()


@torch.no_grad()
def logit_sums(hidden: torch.Tensor, head: OutputHead, labels: torch.Tensor,
               targets: TeacherTargets | None, cfg: LossConfig, *,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Evaluation: the (6,) sums of :data:`SUMS` over hidden (B, L, D), chunk by chunk, no
    gradients. CE and the accuracy are always computed; the KL and the agreement when
    ``cfg.beta > 0``."""
    _check(hidden, labels, targets, cfg, mask)
    total = hidden.new_zeros(len(SUMS), dtype=torch.float32)
    for _, h, lab, tgt, m in _chunks(hidden, labels, targets, mask, cfg.chunk_size):
        total += _chunk_sums(h, head, lab, tgt, cfg, m, stats=True)
    return total


def _analytic_chunk(h, weight, bias, transform, labels, targets, cfg: LossConfig, mask, spec):
    """The chunk's sums and its gradients w.r.t. (h, weight, bias) from the closed form of
    :mod:`.fused_grad` (CE and the forward KL): no autograd graph over (positions x V)."""
    raw = F.linear(h.to(weight.dtype), weight, bias).float()               # (B, C, V)
    teacher_logits = _teacher_logits(targets, cfg)
    sums, g = ce_and_forward_kl(raw.reshape(-1, raw.shape[-1]), transform, labels, targets,
                                cfg.temperature, mask, ce_weight=spec["w_ce"],
                                kl_weight=spec["w_kl"], teacher_logits=teacher_logits)
    del raw, teacher_logits
    if g is None:
        return sums, (None, None, None)
    g = g.to(weight.dtype)                                                  # (N, V)
    flat_h = h.reshape(-1, h.shape[-1]).to(weight.dtype)                    # (N, D)
    grad_h = (g @ weight).reshape(h.shape) if h.requires_grad else None    # (B, C, D)
    grad_w = g.t() @ flat_h if weight.requires_grad else None               # (V, D)
    grad_b = g.sum(0) if bias is not None and bias.requires_grad else None
    return sums, (grad_h, grad_w, grad_b)


def _autograd_chunk(h, weight, bias, transform, labels, targets, cfg: LossConfig, mask, spec):
    """The chunk's sums and gradients by autograd over the chunk's graph (reverse KL, JSD)."""
    h = h.detach().requires_grad_(h.requires_grad)                          # (B, C, D)
    w = weight.detach().requires_grad_(weight.requires_grad)
    b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
    with torch.enable_grad():
        sums = _chunk_sums(h, OutputHead(w, b, transform), labels, targets, cfg, mask,
                           stats=False)                                     # (6,)
        objective = spec["w_ce"] * sums[0] + spec["w_kl"] * sums[2]
        leaves = [x for x in (h, w, b) if x is not None and x.requires_grad]
        grads = iter(torch.autograd.grad(objective, leaves) if objective.requires_grad else ())
    return sums.detach(), tuple(next(grads, None) if x is not None and x.requires_grad else None
                                for x in (h, w, b))


class _FusedLogitLoss(torch.autograd.Function):
    """w_ce * ce_sum + w_kl * kl_sum, whose gradients are computed chunk by chunk in forward.

    Each chunk's logits are built and turned at once into the chunk's share of the hidden-state
    and head gradients (the two matmuls a backward pass would do anyway), then dropped; for CE
    and the forward KL from the closed form (:mod:`.fused_grad`), for the other directions by
    autograd over that chunk. Nothing of size (.., V) outlives its chunk and nothing is
    recomputed. The head's gradient is accumulated in the head's own dtype (the dtype of the
    gradient the optimizer gets) and backward scales it in place, so no second copy is made.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, spec):
        params = (hidden, weight, bias)
        needs = tuple(x is not None and x.requires_grad for x in params)
        grads = [torch.zeros_like(x, dtype=torch.float32 if x is hidden else x.dtype) if need
                 else None for x, need in zip(params, needs)]
        totals = hidden.new_zeros(len(SUMS), dtype=torch.float32)
        head, cfg = spec["head"], spec["cfg"]
        step = _analytic_chunk if cfg.kl_direction == "forward" else _autograd_chunk
        for start, h, labels, targets, mask in _chunks(hidden, spec["labels"], spec["targets"],
                                                       spec["mask"], cfg.chunk_size):
            with torch.no_grad():
                sums, chunk_grads = step(h.detach().requires_grad_(needs[0]), weight.detach()
                                         .requires_grad_(needs[1]), None if bias is None else
                                         bias.detach().requires_grad_(needs[2]), head.transform,
                                         labels, targets, cfg, mask, spec)
            for i, g in enumerate(chunk_grads):
                if g is None:
                    continue
                if i == 0:
                    grads[0][:, start:start + cfg.chunk_size] = g
                else:
                    grads[i] += g
            totals += sums
        # intermediate results, kept on ctx (not save_for_backward) so backward may reuse them
        ctx.grads = [g for g in grads if g is not None]
        ctx.dtypes = [x.dtype for x, need in zip(params, needs) if need]
        ctx.needs = needs
        weighted = spec["w_ce"] * totals[0] + spec["w_kl"] * totals[2]
        ctx.mark_non_differentiable(totals)
        return weighted, totals

    @staticmethod
    def backward(ctx, grad_weighted, _grad_totals):
        # The saved gradients are scaled in place and handed over: the buffer becomes the
        # gradient (autograd takes it without a copy), so it cannot serve a second backward.
        if ctx.grads is None:
            raise RuntimeError("the fused logit loss hands its gradients over at the first "
                               "backward; a second backward through it (retain_graph=True) is "
                               "not supported. Run the forward again for another backward")
        grads, ctx.grads = ctx.grads, None
        scaled = iter(g.mul_(grad_weighted).to(dtype) if not bool(grad_weighted == 1)
                      else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return (*(next(scaled) if need else None for need in ctx.needs), None)


def logit_loss(hidden: torch.Tensor, head: OutputHead, labels: torch.Tensor,
               targets: TeacherTargets | None, cfg: LossConfig, *,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training: ``(loss, ce, kl)`` with ``loss = alpha * CE + beta * T^2 * KL`` carrying the
    gradient (w.r.t. hidden (B, L, D), the head's weight and bias) and ``ce`` / ``kl`` the
    detached means for logging (0 for a term whose weight is 0).

    Peak memory is one chunk's logits and their gradient, and the time that of a plain forward
    and backward: the loss weights are known up front, so each chunk's gradient is taken as soon
    as its logits exist.
    """
    _check(hidden, labels, targets, cfg, mask)
    keep = position_mask(labels, mask)
    ce_n = (keep & (labels.reshape(-1) != IGNORE_INDEX)).sum().clamp(min=1).item()
    kl_n = keep.sum().clamp(min=1).item()
    spec = dict(head=head, cfg=cfg, labels=labels, targets=targets, mask=mask,
                w_ce=cfg.alpha / ce_n, w_kl=cfg.kl_weight / kl_n)
    loss, totals = _FusedLogitLoss.apply(hidden, head.weight, head.bias, spec)
    return loss, totals[0] / ce_n, totals[2] / kl_n

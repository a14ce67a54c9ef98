"""Loss terms for distilling a student from a teacher cache.

Each term is a small pure function: tensors and an explicit mask in, fp32 out. Per-position
functions return ``(N,)``; reducers return scalars. The teacher side always comes from the cache:
``teacher_ids (.., K)`` top-k token ids, ``teacher_logp (.., K)`` their log-probs at T=1 and
``teacher_log_tail (..)`` the tempered tail ``log Σ_tail p^(1/T)`` at the loss temperature T
(at T=1 the log of the mass outside those ids; -inf when K == vocab size).

The KL is taken over K+1 buckets (the K cached ids plus one tail bucket for every other id), so
both distributions are proper and the KL is >= 0 and exactly 0 when the student matches the
teacher, which a KL over the top-k ids alone is not.

A teacher in memory (the online baseline) can instead give full-vocabulary logits, or its final
hidden state and output head (``teacher_exact``), from which the chunked loss rebuilds the exact
teacher logits one chunk at a time; the KL is then over the whole vocabulary.

Logits built from a final hidden state (student or teacher) are ``transform(head(h))``, with the
model's own :class:`~unidistill.model_logits.LogitTransform` (Gemma-2's softcap, Cohere's and
Granite's scales), applied inside each chunk so gradients flow through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from unidistill.errors import ConfigError
from unidistill.model_logits import LogitTransform, head_logits

IGNORE_INDEX = -100
KL_DIRECTIONS = ("forward", "reverse", "jsd")
HIDDEN_KINDS = ("mse", "nmse", "cnmse", "cosine")
_EPS = 1e-12


def _choice_error(what: str, received, choices) -> ConfigError:
    return ConfigError(f"unknown {what} {received!r}; expected one of {', '.join(choices)}")


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of values where mask, number of such positions), both fp32 scalars.

    torch.where rather than values * mask: a NaN or inf at a masked position must not leak.
    """
    mask = mask.bool()
    kept = torch.where(mask, values.float(), 0.0)
    return kept.sum(), mask.sum().float()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (same shape) as an fp32 scalar; 0.0 when all is masked.

    NaN or inf at masked positions do not reach the value; gradients stay finite only if the
    inputs at masked positions are finite (autograd multiplies their zero gradient through).
    """
    total, count = _masked_sum(values, mask)
    return total / count.clamp(min=1.0)


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """labels[:, p] = input_ids[:, p + 1]; the last position has no next token (-100)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def cross_entropy_per_position(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (N, V) against labels (N,) -> (N,) fp32; label -100 gives 0."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


def bucket_log_probs(student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                     teacher_logp: torch.Tensor, teacher_log_tail: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over the K cached ids plus one tail bucket, at temperature T.

    student_logits (N, V), teacher_ids (N, K), teacher_logp (N, K) log-probs at T = 1,
    teacher_log_tail (N,) the *tempered* tail ``log Σ_tail p_i^(1/T)`` (at T = 1: the log of the
    mass outside the K ids; the cache reader gives it for the asked temperature)
    -> s_logq (N, K+1), t_logp (N, K+1), both fp32 and normalised over the K+1 buckets.

    The student side is exact: log_softmax(logits / T) over the whole vocabulary, gathered at the
    ids, and its tail bucket is the logsumexp over every other id. The teacher side is exact too:
    softmax(z / T)_i = p_i^(1/T) / Σ_j p_j^(1/T), so its bucket log-weights are ``logp / T`` and
    the tempered tail, renormalised. (Dividing the T = 1 log-tail by T, as if the tail were one
    token, is wrong for T != 1: at T = 2 it costs a student identical to a real teacher about
    1 nat of KL.) So a student equal to the teacher gets a KL of 0 at every temperature.
    Top-k ids are unique; duplicate ids would count a student token twice.
    """
    s_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)             # (N, V)
    teacher_ids = teacher_ids.long()  # caches store narrow int types; gather needs int64
    s_top = s_logp.gather(-1, teacher_ids)                                               # (N, K)
    # exact tail: 1 - sum(top) cancels catastrophically when the top-k hold ~all the mass
    s_tail = s_logp.scatter(-1, teacher_ids, float("-inf")).logsumexp(-1, keepdim=True)  # (N, 1)
    s_logq = torch.cat([s_top, s_tail], dim=-1)                                          # (N, K+1)

    t_buckets = torch.cat([teacher_logp.float() / temperature,
                           teacher_log_tail.float().unsqueeze(-1)], dim=-1)              # (N, K+1)
    t_logp = torch.log_softmax(t_buckets, dim=-1)                                        # (N, K+1)
    return s_logq, t_logp


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q) over the last axis -> (N,).

    Buckets where p == 0 contribute exactly 0. The difference itself is masked too (not only the
    product): -inf - -inf is NaN, and a NaN there would turn the gradient to NaN even through 0 * x.
    """
    p = log_p.exp()                                                     # (N, B)
    diff = torch.where(p > 0, log_p - log_q, 0.0)                       # (N, B)
    return (p * diff).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """log((p + q) / 2), elementwise, with a finite gradient where p == q == 0.

    logaddexp's gradient is NaN where both inputs are -inf, so those buckets bypass it.
    """
    both_zero = (log_p == float("-inf")) & (log_q == float("-inf"))    # (N, B)
    mixed = torch.logaddexp(log_p.masked_fill(both_zero, 0.0), log_q.masked_fill(both_zero, 0.0))
    return mixed.masked_fill(both_zero, float("-inf")) - math.log(2.0)


def kl_per_position(s_logq: torch.Tensor, t_logp: torch.Tensor, direction: str) -> torch.Tensor:
    """Divergence between teacher and student bucket distributions -> (N,) fp32.

    s_logq (N, B), t_logp (N, B): log-probs over the same buckets (see ``bucket_log_probs``).
    direction: "forward" = KL(teacher || student) (mean-seeking), "reverse" = KL(student ||
    teacher) (mode-seeking), "jsd" = (KL(t || m) + KL(s || m)) / 2 with m = (t + s) / 2, which is
    symmetric and bounded by log 2.
    """
    s_logq, t_logp = s_logq.float(), t_logp.float()
    if direction == "forward":
        return _kl(t_logp, s_logq)
    if direction == "reverse":
        return _kl(s_logq, t_logp)
    if direction == "jsd":
        log_m = _log_mixture(t_logp, s_logq)                            # (N, B)
        return 0.5 * (_kl(t_logp, log_m) + _kl(s_logq, log_m))
    raise _choice_error("KL direction", direction, KL_DIRECTIONS)


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
    raise _choice_error("hidden-state loss kind", kind, HIDDEN_KINDS)


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
        err, _ = _masked_sum((s - t).square().sum(-1), mask)            # sum over (N, D)
        ref, _ = _masked_sum(t.square().sum(-1), mask)
        return err / ref.clamp(min=_EPS)
    return masked_mean(hidden_state_loss_per_position(student_h, teacher_h, kind), mask)


def full_vocab_log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over the whole vocabulary at temperature T.

    student_logits (N, V), teacher_logits (N, V) -> s_logq (N, V), t_logp (N, V), fp32. Exact at
    every temperature (the teacher in memory, or rebuilt from its final hidden state and head).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ConfigError(f"teacher logits have shape {tuple(teacher_logits.shape)}, the student's "
                          f"{tuple(student_logits.shape)}; full-vocabulary KD needs the same "
                          "vocabulary and positions")
    s_logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t_logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return s_logq, t_logp


def logit_losses_from_logits(logits: torch.Tensor, labels: torch.Tensor, kl_mask: torch.Tensor,
                             teacher_ids: torch.Tensor | None, teacher_logp: torch.Tensor | None,
                             teacher_log_tail: torch.Tensor | None, temperature: float,
                             direction: str, compute_ce: bool, compute_kl: bool,
                             teacher_logits: torch.Tensor | None = None):
    """CE and KL sums over logits (B, L, V) -> (ce_sum, ce_count, kl_sum, kl_count) fp32 scalars.

    labels (B, L) with -100 = ignore, kl_mask (B, L) bool, teacher_ids / teacher_logp (B, L, K),
    teacher_log_tail (B, L). Sums and counts (not means) so callers can aggregate exactly over
    chunks and micro-batches. A term not asked for is returned as zeros. ``teacher_logits``
    (B, L, V), when given, replaces the top-k teacher with the full distribution.
    """
    zero = logits.new_zeros((), dtype=torch.float32)
    ce_sum = ce_count = kl_sum = kl_count = zero
    flat = logits.reshape(-1, logits.shape[-1])                         # (N, V)
    if compute_ce:
        flat_labels = labels.reshape(-1)                                # (N,)
        ce = cross_entropy_per_position(flat, flat_labels)              # (N,)
        ce_sum, ce_count = _masked_sum(ce, flat_labels != IGNORE_INDEX)
    if compute_kl and teacher_logits is not None:
        s_logq, t_logp = full_vocab_log_probs(flat, teacher_logits.reshape(flat.shape),
                                              temperature)              # (N, V)
        kl = kl_per_position(s_logq, t_logp, direction)                # (N,)
        kl_sum, kl_count = _masked_sum(kl, kl_mask.reshape(-1))
    elif compute_kl:
        _check_teacher(teacher_ids, teacher_logp, teacher_log_tail)
        k = teacher_ids.shape[-1]
        s_logq, t_logp = bucket_log_probs(flat, teacher_ids.reshape(-1, k),
                                          teacher_logp.reshape(-1, k),
                                          teacher_log_tail.reshape(-1), temperature)  # (N, K+1)
        kl = kl_per_position(s_logq, t_logp, direction)                # (N,)
        kl_sum, kl_count = _masked_sum(kl, kl_mask.reshape(-1))
    return ce_sum, ce_count, kl_sum, kl_count


def _check_teacher(teacher_ids, teacher_logp, teacher_log_tail) -> None:
    if teacher_ids is None or teacher_logp is None or teacher_log_tail is None:
        raise ConfigError("the KL term needs teacher_ids, teacher_logp and teacher_log_tail from "
                          "the cache, but at least one is None; pass them or set compute_kl=False")


def _part(x: torch.Tensor | None, start: int, size: int) -> torch.Tensor | None:
    """Positions [start, start + size) of a (B, L, ...) tensor, or None."""
    return None if x is None else x[:, start:start + size]


def _check_logit_args(chunk_size: int, compute_kl: bool, direction: str, teacher_exact,
                      teacher_ids, teacher_logp, teacher_log_tail) -> None:
    """Fail before any chunk runs (not inside a checkpointed or fused chunk)."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    if compute_kl:
        if teacher_exact is None:
            _check_teacher(teacher_ids, teacher_logp, teacher_log_tail)
        if direction not in KL_DIRECTIONS:
            raise _choice_error("KL direction", direction, KL_DIRECTIONS)


def _chunk_losses(hidden, weight, bias, labels, kl_mask, teacher_ids, teacher_logp,
                  teacher_log_tail, temperature, direction, compute_ce, compute_kl,
                  t_hidden=None, t_weight=None, t_bias=None, transform=None, t_transform=None):
    # The matmul runs in the model's dtype (an fp32 copy of a large (V, D) head per chunk would
    # cost GBs); the transform and the softmax math that follow are fp32.
    logits = head_logits(hidden, weight, bias, transform)               # (B, C, V)
    teacher_logits = None
    if t_hidden is not None and compute_kl:
        with torch.no_grad():
            teacher_logits = head_logits(t_hidden, t_weight, t_bias, t_transform)  # (B, C, V)
    return torch.stack(logit_losses_from_logits(logits, labels, kl_mask, teacher_ids,
                                                teacher_logp, teacher_log_tail, temperature,
                                                direction, compute_ce, compute_kl,
                                                teacher_logits))        # (4,)


def chunked_logit_losses(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                         kl_mask: torch.Tensor, teacher_ids: torch.Tensor | None,
                         teacher_logp: torch.Tensor | None,
                         teacher_log_tail: torch.Tensor | None, temperature: float,
                         direction: str, chunk_size: int, compute_ce: bool, compute_kl: bool,
                         lm_head_bias: torch.Tensor | None = None,
                         teacher_exact: tuple | None = None,
                         logit_transform: LogitTransform | None = None,
                         teacher_logit_transform: LogitTransform | None = None):
    """``logit_losses_from_logits`` from the final hidden state, never holding full logits.

    hidden (B, L, D), lm_head_weight (V, D), lm_head_bias (V,) or None; other arguments as in
    ``logit_losses_from_logits``. -> (ce_sum, ce_count, kl_sum, kl_count) fp32 scalars.
    The student's logits are ``logit_transform(hidden @ W.T + b)`` (None: a plain head).
    ``teacher_exact = (teacher_final_hidden (B, L, D_t), teacher_head_weight (V, D_t),
    teacher_head_bias (V,) or None)`` gives the exact full-vocabulary teacher instead of the
    top-k fields; its logits are rebuilt chunk by chunk too, without gradients, through
    ``teacher_logit_transform``.
    The sequence axis is cut into chunks of ``chunk_size`` positions and each chunk's fp32 logits
    (B, chunk, V) are built, used and dropped. When gradients flow, each chunk runs under
    activation checkpointing so the backward pass also recomputes one chunk's logits at a time
    (a single chunk is not checkpointed: the backward pass starts at the loss, while every
    activation of the model is still alive, so recomputing it would save no peak memory)
    instead of keeping all of them alive.
    """
    _check_logit_args(chunk_size, compute_kl, direction, teacher_exact, teacher_ids, teacher_logp,
                      teacher_log_tail)
    t_hidden, t_weight, t_bias = teacher_exact if teacher_exact is not None else (None,) * 3
    needs_grad = hidden.requires_grad or lm_head_weight.requires_grad or (
        lm_head_bias is not None and lm_head_bias.requires_grad)
    recompute = torch.is_grad_enabled() and needs_grad and hidden.shape[1] > chunk_size

    totals = hidden.new_zeros(4, dtype=torch.float32)                   # ce_sum, ce_n, kl_sum, kl_n
    for start in range(0, hidden.shape[1], chunk_size):
        args = (_part(hidden, start, chunk_size), lm_head_weight, lm_head_bias,
                *(_part(x, start, chunk_size) for x in (labels, kl_mask, teacher_ids, teacher_logp,
                                                        teacher_log_tail)),
                temperature, direction, compute_ce, compute_kl, _part(t_hidden, start, chunk_size),
                t_weight, t_bias, logit_transform, teacher_logit_transform)
        if recompute:
            totals = totals + checkpoint(_chunk_losses, *args, use_reentrant=False)
        else:
            totals = totals + _chunk_losses(*args)
    return tuple(totals.unbind())


class _FusedLogitLoss(torch.autograd.Function):
    """w_ce * ce_sum + w_kl * kl_sum, whose gradients are computed chunk by chunk in forward.

    Each chunk's logits are built, differentiated locally (autograd on that chunk only) and turned
    at once into the chunk's share of the hidden-state and head gradients (the two matmuls a
    backward pass would do anyway), then dropped. Nothing of size [.., V] outlives its chunk and
    nothing is recomputed: backward only scales the stored gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, spec):
        leaves = [x for x in (hidden, weight, bias) if x is not None and x.requires_grad]
        grads = [torch.zeros_like(x, dtype=torch.float32) for x in leaves]
        totals = hidden.new_zeros(4, dtype=torch.float32)
        t_hidden, t_weight, t_bias = spec["teacher_exact"] or (None,) * 3
        chunk = spec["chunk_size"]
        for start in range(0, hidden.shape[1], chunk):
            h = _part(hidden, start, chunk).detach().requires_grad_(hidden.requires_grad)  # (B, C, D)
            w = weight.detach().requires_grad_(weight.requires_grad)
            b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
            with torch.enable_grad():
                sums = _chunk_losses(
                    h, w, b, *(_part(spec[k], start, chunk) for k in
                               ("labels", "kl_mask", "teacher_ids", "teacher_logp", "teacher_log_tail")),
                    spec["temperature"], spec["direction"], spec["compute_ce"], spec["compute_kl"],
                    _part(t_hidden, start, chunk), t_weight, t_bias, spec["transform"],
                    spec["teacher_transform"])                                 # (4,)
                objective = spec["w_ce"] * sums[0] + spec["w_kl"] * sums[2]
                chunk_leaves = [x for x in (h, w, b) if x is not None and x.requires_grad]
                if objective.requires_grad:  # the chunk's logits die with this graph
                    chunk_grads = torch.autograd.grad(objective, chunk_leaves)
                    for acc, leaf, g in zip(grads, leaves, chunk_grads):
                        if leaf is hidden:
                            acc[:, start:start + chunk] = g
                        else:
                            acc += g
            totals += sums.detach()
        ctx.save_for_backward(*grads)
        ctx.dtypes = [x.dtype for x in leaves]
        ctx.needs = tuple(x is not None and x.requires_grad for x in (hidden, weight, bias))
        weighted = spec["w_ce"] * totals[0] + spec["w_kl"] * totals[2]
        ctx.mark_non_differentiable(totals)
        return weighted, totals

    @staticmethod
    def backward(ctx, grad_weighted, _grad_totals):
        scaled = iter((g * grad_weighted).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return (*(next(scaled) if need else None for need in ctx.needs), None)


def fused_logit_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                     kl_mask: torch.Tensor, teacher_ids: torch.Tensor | None,
                     teacher_logp: torch.Tensor | None, teacher_log_tail: torch.Tensor | None,
                     temperature: float, direction: str, chunk_size: int, *, ce_weight: float,
                     kl_weight: float, lm_head_bias: torch.Tensor | None = None,
                     teacher_exact: tuple | None = None,
                     logit_transform: LogitTransform | None = None,
                     teacher_logit_transform: LogitTransform | None = None):
    """``ce_weight * CE + kl_weight * KL`` (means over their positions) for training, lean.

    Same arguments and math as :func:`chunked_logit_losses`; returns ``(loss, ce, kl)`` where
    ``loss`` carries the gradient and ``ce``/``kl`` are the detached means for logging. Unlike
    the checkpointed path it never recomputes a chunk: each chunk's gradient is taken as soon as
    its logits exist (the loss weights are known up front), so peak memory is one chunk's logits
    and their gradient, and the time is that of a plain forward and backward.
    """
    compute_ce, compute_kl = ce_weight != 0, kl_weight != 0
    _check_logit_args(chunk_size, compute_kl, direction, teacher_exact, teacher_ids, teacher_logp,
                      teacher_log_tail)
    ce_n = (labels != IGNORE_INDEX).sum().clamp(min=1).item()
    kl_n = kl_mask.sum().clamp(min=1).item()
    spec = dict(labels=labels, kl_mask=kl_mask, teacher_ids=teacher_ids, teacher_logp=teacher_logp,
                teacher_log_tail=teacher_log_tail, temperature=temperature, direction=direction,
                chunk_size=chunk_size, compute_ce=compute_ce, compute_kl=compute_kl,
                w_ce=ce_weight / ce_n, w_kl=kl_weight / kl_n, teacher_exact=teacher_exact,
                transform=logit_transform, teacher_transform=teacher_logit_transform)
    loss, totals = _FusedLogitLoss.apply(hidden, lm_head_weight, lm_head_bias, spec)
    return loss, totals[0] / ce_n, totals[2] / kl_n


@dataclass(frozen=True)
class LossTerms:
    """The three loss terms of one step, each an fp32 scalar (already reduced)."""
    ce: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor


def validate_loss_weights(alpha: float, beta: float, gamma: float, temperature: float) -> None:
    """Raise ConfigError unless the weights are >= 0, not all zero, and temperature > 0."""
    for name, value in (("alpha (CE weight)", alpha), ("beta (KL weight)", beta),
                        ("gamma (hidden-state weight)", gamma)):
        if value < 0:
            raise ConfigError(f"{name} is {value}, but loss weights must be >= 0; "
                              "set it to 0 to turn that term off")
    if alpha == 0 and beta == 0 and gamma == 0:
        raise ConfigError("alpha, beta and gamma are all 0, so there is nothing to train on; "
                          "set at least one loss weight > 0")
    if not temperature > 0:
        raise ConfigError(f"temperature is {temperature}, but it must be > 0; "
                          "use 1.0 for the teacher's own distribution")


def compound_loss(terms: LossTerms, alpha: float, beta: float, gamma: float,
                  temperature: float) -> torch.Tensor:
    """alpha * ce + beta * T^2 * kl + gamma * hidden.

    T^2 keeps the KL gradient's scale independent of T (softening by T shrinks it by ~1/T^2).
    """
    return alpha * terms.ce + beta * temperature ** 2 * terms.kl + gamma * terms.hidden

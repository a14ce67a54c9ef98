"""The per-position divergences the loss is made of: next-token CE and the KL between teacher and
student, over K+1 buckets (the cached ids and one tail bucket) or over the whole vocabulary.

Each is a small pure function: tensors in, fp32 out. Per-position functions return ``(N,)``.
The teacher side of the bucketed KL comes from the cache: ``teacher_ids (N, K)`` top-k token
ids, ``teacher_logp (N, K)`` their log-probs at T = 1 and ``teacher_log_tail (N,)`` the tempered
tail ``log Σ_tail p^(1/T)`` at the loss temperature T (at T = 1 the log of the mass outside those
ids; -inf when K == vocab size). Over K+1 buckets both distributions are proper, so the KL is
>= 0 and exactly 0 when the student matches the teacher, which a KL over the top-k ids alone is
not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unidistill.errors import ConfigError
from unidistill.model_logits import OutputHead

IGNORE_INDEX = -100
KL_DIRECTIONS = ("forward", "reverse", "jsd")


def choice_error(what: str, received, choices) -> ConfigError:
    return ConfigError(f"unknown {what} {received!r}; expected one of {', '.join(choices)}")


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of values where mask, number of such positions), both fp32 scalars.

    torch.where rather than values * mask: a NaN or inf at a masked position must not leak.
    """
    mask = mask.bool()
    kept = torch.where(mask, values.float(), 0.0)
    return kept.sum(), mask.sum().float()


def position_mask(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The loss mask (B, L) flattened to (N,) bool; every position when ``mask`` is None."""
    flat = labels.reshape(-1)
    return torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()


def minus_kl_offset(kl_sum: torch.Tensor, offset: torch.Tensor | None,
                    keep: torch.Tensor) -> torch.Tensor:
    """A sampled cache's KL sum made the unbiased estimate: minus the per-position ``offset``
    (B, L) summed over ``keep`` (N,); unchanged when there is no offset."""
    if offset is None:
        return kl_sum
    return kl_sum - masked_sum(offset.reshape(-1).to(kl_sum.device), keep)[0]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (same shape) as an fp32 scalar; 0.0 when all is masked.

    NaN or inf at masked positions do not reach the value; gradients stay finite only if the
    inputs at masked positions are finite (autograd multiplies their zero gradient through).
    """
    total, count = masked_sum(values, mask)
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
    raise choice_error("KL direction", direction, KL_DIRECTIONS)


def pad_teacher_logits(teacher_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Teacher logits (.., V_t) padded with -inf up to a student head of ``vocab_size`` >= V_t rows.

    A student whose head is padded beyond the tokenizer (vocab_size rounded up to a multiple of 64,
    as many models are) has ids the teacher does not: the teacher gives them no probability, so
    its exact distribution over the student's ids is its own over the first V_t and 0 beyond
    (log-prob -inf). The student's extra logits stay what they are, mass of its softmax like any
    other. A teacher with more ids than the student is refused.
    """
    extra = vocab_size - teacher_logits.shape[-1]
    if extra < 0:
        raise ConfigError(f"the teacher's logits cover {teacher_logits.shape[-1]} ids, the "
                          f"student's head only {vocab_size}; the student cannot be scored on the "
                          "teacher's ids beyond its own. Use a student whose head has at least the "
                          "teacher's vocabulary (e.g. one made by `unidistill prune`)")
    if extra == 0:
        return teacher_logits
    return F.pad(teacher_logits, (0, extra), value=float("-inf"))


def full_vocab_log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over the whole vocabulary at temperature T.

    student_logits (N, V), teacher_logits (N, V_t) with V_t <= V -> s_logq (N, V), t_logp (N, V),
    fp32. Exact at every temperature (the teacher in memory, or rebuilt from its final hidden state
    and head). A student head padded beyond the teacher's (V > V_t) gets the teacher's logits padded
    with -inf (:func:`pad_teacher_logits`): the teacher's exact distribution, 0 on the extra ids.
    Forward KL and JSD stay finite; the reverse KL is infinite wherever the student gives those ids
    mass, so ``check_student_matches_cache`` refuses it up front.
    """
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ConfigError(f"teacher logits have shape {tuple(teacher_logits.shape)}, the student's "
                          f"{tuple(student_logits.shape)}; full-vocabulary KD needs the same "
                          "positions")
    teacher_logits = pad_teacher_logits(teacher_logits, student_logits.shape[-1])
    s_logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t_logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return s_logq, t_logp


@dataclass(frozen=True)
class PaddedTeacherHead(OutputHead):
    """An exact teacher's head whose logits come padded with -inf up to ``vocab_size`` ids (a
    student head padded beyond the teacher's; see :func:`pad_teacher_logits`): the chunked loss
    then sees teacher and student logits of one width."""

    vocab_size: int = 0

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return pad_teacher_logits(super().logits(hidden), self.vocab_size)


def teacher_head_for(head: OutputHead, student_vocab_size: int) -> OutputHead:
    """``head`` itself for a student of the teacher's vocabulary, or the head padded to the
    student's (:class:`PaddedTeacherHead`)."""
    teacher_vocab = head.weight.shape[0]
    if student_vocab_size == teacher_vocab:
        return head
    if student_vocab_size < teacher_vocab:
        raise ConfigError(f"the teacher's head has {teacher_vocab} rows, the student's only "
                          f"{student_vocab_size}; use a student whose head covers the teacher's "
                          "vocabulary")
    return PaddedTeacherHead(head.weight, head.bias, head.transform, vocab_size=student_vocab_size)

"""Loss terms: hand-computed values, invariants and config errors, for every direction and kind."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unidistill.errors import ConfigError
from unidistill.trainer.losses import (
    HIDDEN_KINDS, KL_DIRECTIONS, LossTerms, bucket_log_probs, chunked_logit_losses, compound_loss,
    cross_entropy_per_position, hidden_state_loss, hidden_state_loss_per_position,
    kl_per_position, logit_losses_from_logits, masked_mean, validate_loss_weights,
)

INF = float("inf")
LOG2 = math.log(2.0)


def close(actual, expected, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=rtol)


def teacher_from_logits(z: torch.Tensor, k: int, temperature: float = 1.0):
    """What the cache reader gives for teacher logits z (N, V) at T: top-k ids, log-probs at
    T = 1 and the exact tempered tail log Σ_tail p^(1/T), computed here in float64."""
    logp = torch.log_softmax(z.double(), dim=-1)                                 # (N, V)
    values, ids = logp.topk(k, dim=-1)                                           # (N, K)
    tail = (logp / temperature).scatter(-1, ids, -INF).logsumexp(-1)             # (N,)
    return ids, values.float(), tail.float()


def bucket_kl(student_logits, teacher_logits, k, temperature, direction):
    ids, logp, tail = teacher_from_logits(teacher_logits, k, temperature)
    s_logq, t_logp = bucket_log_probs(student_logits, ids, logp, tail, temperature)
    return kl_per_position(s_logq, t_logp, direction)


def full_vocab_divergence(student_logits, teacher_logits, temperature, direction):
    """Independent reference over the whole vocabulary with F.kl_div."""
    log_s = torch.log_softmax(student_logits.double() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)

    def kl(log_p, log_q):  # KL(p || q); kl_div(input=log q, target=log p)
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)

    if direction == "forward":
        return kl(log_t, log_s)
    if direction == "reverse":
        return kl(log_s, log_t)
    log_m = (0.5 * (log_s.exp() + log_t.exp())).log()
    return 0.5 * (kl(log_t, log_m) + kl(log_s, log_m))


# --- hand-computed cases ------------------------------------------------------------------------

def test_masked_mean_by_hand():
    values = torch.tensor([1.0, 2.0, math.nan, INF])
    close(masked_mean(values, torch.tensor([True, True, False, False])), 1.5)  # (1 + 2) / 2
    close(masked_mean(values, torch.zeros(4, dtype=torch.bool)), 0.0)          # not NaN


def test_cross_entropy_by_hand():
    # logits [0, ln 3] -> p = [1/4, 3/4]: CE(label 1) = ln(4/3), CE(label 0) = ln 4; -100 -> 0
    logits = torch.tensor([[0.0, math.log(3.0)]] * 3, dtype=torch.float16)
    ce = cross_entropy_per_position(logits, torch.tensor([1, 0, -100]))
    assert ce.dtype == torch.float32
    close(ce, [math.log(4 / 3), math.log(4.0), 0.0], atol=1e-3, rtol=1e-3)  # fp16 input rounding


# Vocab of 3, student p = [0.5, 0.3, 0.2]; cached ids [2, 0] with teacher p = 0.6, 0.3, tail 0.1.
# Buckets (id 2, id 0, tail = id 1): student s = [0.2, 0.5, 0.3], teacher t = [0.6, 0.3, 0.1].
HAND_STUDENT = torch.tensor([[0.5, 0.3, 0.2]]).log()
HAND_IDS = torch.tensor([[2, 0]], dtype=torch.int32)
HAND_T_LOGP = torch.tensor([[0.6, 0.3]]).log()
HAND_T_TAIL = torch.tensor([0.1]).log()
HAND_BUCKETS = {
    # T=1: the buckets are the plain probabilities above.
    1.0: ([0.2, 0.5, 0.3], [0.6, 0.3, 0.1]),
    # T=2: sqrt(p) renormalised. Student over the vocab: sqrt([.5, .3, .2]) / 1.700043 ->
    # [.415934, .322181, .263060] then reordered to the buckets; teacher: sqrt([.6, .3, .1]) /
    # 1.638547. The tail holds one token here, so tempering it as one token is exact.
    2.0: ([0.26275107, 0.41544591, 0.32180302], [0.47273387, 0.33427333, 0.19299280]),
}
HAND_KL = {
    # forward T=1: .6 ln(.6/.2) + .3 ln(.3/.5) + .1 ln(.1/.3) = .659167 - .153248 - .109861
    (1.0, "forward"): 0.39605846,
    # reverse T=1: .2 ln(.2/.6) + .5 ln(.5/.3) + .3 ln(.3/.1) = -.219722 + .255413 + .329584
    (1.0, "reverse"): 0.36527404,
    # jsd T=1: m = [.4, .4, .2]; (KL(t||m) + KL(s||m)) / 2 = (.087659 + .094583) / 2
    (1.0, "jsd"): 0.09112080,
    # T=2: same formulas on the T=2 buckets (computed in float64 with math.log)
    (2.0, "forward"): 0.10630519,
    (2.0, "reverse"): 0.10052842,
    (2.0, "jsd"): 0.02554353,
}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_log_probs_by_hand(temperature):
    # the tail holds one token, so its tempered statistic log Σ p^(1/T) is log_tail / T
    s_logq, t_logp = bucket_log_probs(HAND_STUDENT, HAND_IDS, HAND_T_LOGP.half().float(),
                                      HAND_T_TAIL / temperature, temperature)
    s_expected, t_expected = HAND_BUCKETS[temperature]
    close(s_logq.exp(), [s_expected])
    close(t_logp.exp(), [t_expected], atol=5e-4)  # teacher log-probs went through fp16


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_kl_by_hand(direction, temperature):
    s_logq, t_logp = bucket_log_probs(HAND_STUDENT, HAND_IDS, HAND_T_LOGP,
                                      HAND_T_TAIL / temperature, temperature)
    close(kl_per_position(s_logq, t_logp, direction), [HAND_KL[temperature, direction]])


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_kl_zero_probability_buckets_give_zero_not_nan(direction):
    # tail bucket empty on both sides (K == V): the -inf bucket must contribute exactly 0
    log_p = torch.tensor([[math.log(0.5), math.log(0.5), -INF]], requires_grad=True)
    kl = kl_per_position(log_p, log_p.detach().clone(), direction)
    close(kl, [0.0])
    kl.sum().backward()
    assert torch.isfinite(log_p.grad).all()


def test_jsd_of_disjoint_distributions_is_log2():
    # s = [1, 0], t = [0, 1]: m = [1/2, 1/2], each KL = ln 2, so JSD = ln 2 (its maximum)
    s = torch.tensor([[0.0, -INF]])
    t = torch.tensor([[-INF, 0.0]])
    close(kl_per_position(s, t, "jsd"), [LOG2])


HAND_S = torch.tensor([[1.0, 2.0], [1.0, 0.0], [1.0, 0.0]])
HAND_T = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
HAND_HIDDEN = {
    # mse: ((1-0)^2 + (2-0)^2) / 2 = 2.5; (0 + 1) / 2 = 0.5; (4 + 0) / 2 = 2
    "mse": [2.5, 0.5, 2.0],
    # cosine: t = 0 -> cos = 0 (eps-safe) -> 1; 1 - 1/sqrt(2); opposite vectors -> 1 - (-1) = 2
    "cosine": [1.0, 1.0 - 1.0 / math.sqrt(2.0), 2.0],
}


@pytest.mark.parametrize("kind", HIDDEN_KINDS)
def test_hidden_loss_by_hand(kind):
    mask = torch.tensor([True, True, False])
    if kind == "nmse":
        # sum ||s-t||^2 = 5 + 1 (+ 4 masked); sum ||t||^2 = 0 + 2 (+ 1 masked) -> 6 / 2 = 3
        close(hidden_state_loss(HAND_S, HAND_T, mask, kind), 3.0)
        close(hidden_state_loss(HAND_S, HAND_T, torch.ones(3, dtype=torch.bool), kind), 10 / 3)
        return
    if kind == "cnmse":
        # channel 0: err 1 + 0 (+ 4 masked), ref 0 + 1 (+ 1 masked); channel 1: err 4 + 1, ref 1
        close(hidden_state_loss(HAND_S, HAND_T, mask, kind), (1 / 1 + 5 / 1) / 2)
        # all rows: channel 0 = 5 / 2, channel 1 = 5 / 1
        close(hidden_state_loss(HAND_S, HAND_T, torch.ones(3, dtype=torch.bool), kind), (2.5 + 5) / 2)
        return
    close(hidden_state_loss_per_position(HAND_S, HAND_T, kind), HAND_HIDDEN[kind])
    close(hidden_state_loss(HAND_S, HAND_T, mask, kind), sum(HAND_HIDDEN[kind][:2]) / 2)


def test_compound_loss_by_hand():
    terms = LossTerms(ce=torch.tensor(2.0), kl=torch.tensor(0.5), hidden=torch.tensor(3.0))
    # 1 * 2 + 2 * 3^2 * 0.5 + 0.5 * 3 = 2 + 9 + 1.5
    close(compound_loss(terms, alpha=1.0, beta=2.0, gamma=0.5, temperature=3.0), 12.5)


# --- invariants ---------------------------------------------------------------------------------

V = 11


def random_logits(n=6, v=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("k, temperature", [(3, 1.0), (3, 2.0), (3, 4.0), (3, 0.5), (1, 2.0),
                                            (V, 1.0), (V, 2.0), (V, 0.5)])
def test_kl_is_zero_when_student_equals_teacher(direction, k, temperature):
    z = random_logits()
    close(bucket_kl(z, z, k, temperature, direction), torch.zeros(len(z)))


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("k, temperature", [(1, 1.0), (4, 1.0), (4, 3.0), (V, 0.7)])
def test_kl_is_non_negative(direction, k, temperature):
    for seed in range(3):
        kl = bucket_kl(random_logits(seed=seed), random_logits(seed=seed + 10), k, temperature,
                       direction)
        assert (kl >= -1e-6).all(), kl
        assert (kl > 1e-3).all()  # different distributions -> clearly positive


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucketed_kl_equals_full_vocab_kl_when_k_is_v(direction, temperature):
    s, t = random_logits(seed=1), random_logits(seed=2)
    expected = full_vocab_divergence(s, t, temperature, direction)
    close(bucket_kl(s, t, V, temperature, direction), expected.float())


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("k", [1, 3, V - 2])  # V - 1 would leave one token: no loss
def test_bucketed_kl_is_at_most_full_kl(direction, k):
    # merging tokens into one tail bucket can only lose information (data-processing inequality)
    s, t = random_logits(seed=3), random_logits(seed=4)
    full = full_vocab_divergence(s, t, 1.0, direction).float()
    bucketed = bucket_kl(s, t, k, 1.0, direction)
    assert (bucketed <= full + 1e-6).all()
    assert (bucketed < full - 1e-4).any()  # and strictly less somewhere: the tail is merged


def test_reverse_is_forward_with_arguments_swapped():
    s_logq, t_logp = bucket_log_probs(random_logits(seed=5), *teacher_from_logits(
        random_logits(seed=6), 4), 1.0)
    reverse = kl_per_position(s_logq, t_logp, "reverse")
    close(reverse, kl_per_position(t_logp, s_logq, "forward"))
    assert not torch.allclose(reverse, kl_per_position(s_logq, t_logp, "forward"))


def test_jsd_is_symmetric_and_bounded_by_log2():
    s_logq, t_logp = bucket_log_probs(random_logits(seed=7, scale=20.0), *teacher_from_logits(
        random_logits(seed=8, scale=20.0), 4), 1.0)
    jsd = kl_per_position(s_logq, t_logp, "jsd")
    close(jsd, kl_per_position(t_logp, s_logq, "jsd"))
    assert (jsd <= LOG2 + 1e-6).all()
    assert (jsd > 0.1).any()  # sharp, unrelated distributions: far from 0


def test_compound_loss_multiplies_kl_by_temperature_squared():
    terms = LossTerms(ce=torch.tensor(0.7), kl=torch.tensor(0.25), hidden=torch.tensor(1.3))
    at_1 = compound_loss(terms, alpha=0.0, beta=1.0, gamma=0.0, temperature=1.0)
    at_3 = compound_loss(terms, alpha=0.0, beta=1.0, gamma=0.0, temperature=3.0)
    close(at_1, 0.25)
    close(at_3, 9 * 0.25)
    # CE and hidden are not tempered
    close(compound_loss(terms, 1.0, 0.0, 1.0, 3.0), compound_loss(terms, 1.0, 0.0, 1.0, 1.0))


def make_batch(b=2, seq=7, d=8, v=V, k=4, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, seq, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    lm_bias = torch.randn(v, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, v, (b, seq), generator=g)
    labels[0, :2] = -100
    labels[1, -1] = -100
    kl_mask = torch.ones(b, seq, dtype=torch.bool)
    kl_mask[1, 3:] = False
    teacher_logits = torch.randn(b * seq, v, generator=g) * 2
    ids, logp, tail = teacher_from_logits(teacher_logits, k)
    teacher = (ids.reshape(b, seq, k), logp.half().float().reshape(b, seq, k),
               tail.reshape(b, seq))
    return hidden, weight, lm_bias, labels, kl_mask, teacher


def mean_loss(sums):
    ce_sum, ce_count, kl_sum, kl_count = sums
    return ce_sum / ce_count.clamp(min=1) + kl_sum / kl_count.clamp(min=1)


def unchunked(hidden, weight, lm_bias, labels, kl_mask, teacher, direction, temperature=2.0,
              compute_ce=True, compute_kl=True):
    logits = F.linear(hidden, weight, lm_bias)
    return logit_losses_from_logits(logits, labels, kl_mask, *teacher, temperature, direction,
                                    compute_ce, compute_kl)


def chunked(hidden, weight, lm_bias, labels, kl_mask, teacher, direction, chunk_size,
            temperature=2.0, compute_ce=True, compute_kl=True):
    return chunked_logit_losses(hidden, weight, labels, kl_mask, *teacher, temperature, direction,
                                chunk_size, compute_ce, compute_kl, lm_head_bias=lm_bias)


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])  # 3 does not divide L=7; 64 > L
def test_chunked_equals_unchunked_values_and_gradients(direction, chunk_size):
    hidden, weight, lm_bias, labels, kl_mask, teacher = make_batch()
    params = (hidden, weight, lm_bias)

    ref = unchunked(hidden, weight, lm_bias, labels, kl_mask, teacher, direction)
    ref_grads = torch.autograd.grad(mean_loss(ref), params)
    got = chunked(hidden, weight, lm_bias, labels, kl_mask, teacher, direction, chunk_size)
    got_grads = torch.autograd.grad(mean_loss(got), params)

    close(torch.stack(got), torch.stack(ref))
    close(ref[1], 11.0)   # 14 positions, 3 labels are -100
    close(ref[3], 10.0)   # 14 positions, 4 masked out of the KL
    assert ref[2] > 0
    for g_chunk, g_ref in zip(got_grads, ref_grads):
        close(g_chunk, g_ref)
        assert g_ref.abs().sum() > 0

    with torch.no_grad():  # the no-checkpoint path gives the same numbers
        close(torch.stack(chunked(hidden, weight, lm_bias, labels, kl_mask, teacher, direction,
                                  chunk_size)), torch.stack(ref))


def test_chunks_are_checkpointed_only_when_gradients_flow(monkeypatch):
    from unidistill.trainer import losses

    calls = []
    real = losses.checkpoint
    monkeypatch.setattr(losses, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    hidden, weight, lm_bias, labels, kl_mask, teacher = make_batch()
    chunked(hidden, weight, lm_bias, labels, kl_mask, teacher, "forward", 3)
    assert len(calls) == 3  # ceil(7 / 3) chunks
    with torch.no_grad():
        chunked(hidden, weight, lm_bias, labels, kl_mask, teacher, "forward", 3)
    assert len(calls) == 3
    chunked(hidden, weight, lm_bias, labels, kl_mask, teacher, "forward", 7)  # one chunk: no gain
    assert len(calls) == 3


def test_chunked_without_bias_and_terms_not_asked_for_are_zero():
    hidden, weight, _, labels, kl_mask, teacher = make_batch(bias=False)
    ce_only = chunked(hidden, weight, None, labels, kl_mask, teacher, "forward", 2,
                      compute_kl=False)
    kl_only = chunked(hidden, weight, None, labels, kl_mask, teacher, "forward", 2,
                      compute_ce=False)
    ref = unchunked(hidden, weight, None, labels, kl_mask, teacher, "forward")
    close(torch.stack(ce_only), torch.stack([ref[0], ref[1], torch.tensor(0.0),
                                             torch.tensor(0.0)]))
    close(torch.stack(kl_only), torch.stack([torch.tensor(0.0), torch.tensor(0.0), ref[2],
                                             ref[3]]))
    # without teacher tensors the CE-only path still works
    ce_no_teacher = chunked_logit_losses(hidden, weight, labels, kl_mask, None, None, None, 1.0,
                                         "forward", 4, True, False)
    close(torch.stack(ce_no_teacher), torch.stack(ce_only))


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_all_masked_batch_gives_zero_logit_losses_and_finite_gradients(direction):
    hidden, weight, lm_bias, labels, kl_mask, teacher = make_batch(k=V)  # K == V: tail is -inf
    labels = torch.full_like(labels, -100)
    kl_mask = torch.zeros_like(kl_mask)
    sums = chunked(hidden, weight, lm_bias, labels, kl_mask, teacher, direction, 3)
    close(torch.stack(sums), torch.zeros(4))
    loss = mean_loss(sums)
    close(loss, 0.0)
    grads = torch.autograd.grad(loss, (hidden, weight, lm_bias))
    for g in grads:
        close(g, torch.zeros_like(g))  # finite and zero


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_k_equals_v_gradients_are_finite(direction):
    # the student's empty tail bucket (-inf) must not poison the gradient with NaN
    hidden, weight, lm_bias, labels, kl_mask, teacher = make_batch(k=V)
    loss = mean_loss(chunked(hidden, weight, lm_bias, labels, kl_mask, teacher, direction, 3))
    grads = torch.autograd.grad(loss, (hidden, weight, lm_bias))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", HIDDEN_KINDS)
def test_all_masked_hidden_loss_is_zero_with_finite_gradients(kind):
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4)
    none = torch.zeros(5, dtype=torch.bool)
    garbage = t.clone()
    garbage[2] = math.nan  # NaN padding at a masked position must not leak into the value
    close(hidden_state_loss(s.detach(), garbage, none, kind), 0.0)
    loss = hidden_state_loss(s, t, none, kind)
    close(loss, 0.0)
    (grad,) = torch.autograd.grad(loss, s)
    close(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("kind", HIDDEN_KINDS)
def test_hidden_loss_is_zero_for_identical_states_and_positive_otherwise(kind):
    t = torch.randn(6, 5)
    mask = torch.tensor([True, True, False, True, True, True])
    close(hidden_state_loss(t.clone(), t, mask, kind), 0.0)
    assert hidden_state_loss(t + 0.1 * torch.randn(6, 5), t, mask, kind) > 1e-4


@pytest.mark.parametrize("scale", [1e-3, 7.0, 1e3])
def test_nmse_is_invariant_to_scaling_both_and_cosine_to_scaling_student(scale):
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mask = torch.tensor([True, False, True, True, True, True])
    close(hidden_state_loss(scale * s, scale * t, mask, "nmse"),
          hidden_state_loss(s, t, mask, "nmse"))
    close(hidden_state_loss_per_position(scale * s, t, "cosine"),
          hidden_state_loss_per_position(s, t, "cosine"))
    # mse is not scale-invariant: it grows with scale^2
    close(hidden_state_loss(scale * s, scale * t, mask, "mse"),
          scale ** 2 * hidden_state_loss(s, t, mask, "mse"), rtol=1e-4, atol=0)


def test_cnmse_weighs_every_channel_alike_where_nmse_follows_the_outlier():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(16, 6, generator=g)
    mask = torch.ones(16, dtype=torch.bool)
    s = t.clone()
    s[:, 1] += 0.5 * torch.randn(16, generator=g)  # the student errs in channel 1 only
    calm = {k: hidden_state_loss(s, t, mask, k) for k in ("nmse", "cnmse")}
    scaled_t, scaled_s = t.clone(), s.clone()
    scaled_t[:, 0] *= 1000.0  # a massive-activation channel the student matches exactly
    scaled_s[:, 0] *= 1000.0
    loud = {k: hidden_state_loss(scaled_s, scaled_t, mask, k) for k in ("nmse", "cnmse")}
    close(loud["cnmse"], calm["cnmse"])  # scaling one channel of both changes nothing
    assert loud["nmse"] < calm["nmse"] * 1e-3  # nmse: the outlier's energy hides channel 1's error
    # by hand: only channel 1 errs, so cnmse = its relative error / D
    err1 = (s[:, 1] - t[:, 1]).square().sum() / t[:, 1].square().sum()
    close(calm["cnmse"], err1 / 6)


def test_cnmse_floors_a_silent_teacher_channel():
    t = torch.ones(4, 3)
    t[:, 2] = 0.0  # a channel the teacher never uses
    s = t.clone()
    s[:, 2] = 1e-3
    mask = torch.ones(4, dtype=torch.bool)
    loss = hidden_state_loss(s, t, mask, "cnmse")
    assert torch.isfinite(loss)
    # floor = 1e-6 * mean channel energy = 1e-6 * (4 + 4 + 0) / 3
    close(loss, (4 * 1e-6 / (1e-6 * 8 / 3)) / 3)


def test_outlier_channel_blows_up_mse_but_nmse_stays_relative():
    # teacher states with one huge outlier channel; the student is off by 10% everywhere
    t = torch.ones(4, 8)
    mask = torch.ones(4, dtype=torch.bool)
    losses = {}
    for outlier in (10.0, 1000.0):
        t[:, 0] = outlier
        losses[outlier] = {k: hidden_state_loss(1.1 * t, t, mask, k) for k in ("mse", "nmse")}
    # nmse = sum (0.1 t)^2 / sum t^2 = 0.01 regardless of the outlier
    close(losses[10.0]["nmse"], 0.01)
    close(losses[1000.0]["nmse"], 0.01)
    # mse = 0.01 * mean(t^2) = 0.01 * (outlier^2 + 7) / 8: grows with the outlier squared
    close(losses[10.0]["mse"], 0.01 * (100 + 7) / 8)
    close(losses[1000.0]["mse"], 0.01 * (1e6 + 7) / 8)


# --- configuration errors -----------------------------------------------------------------------

@pytest.mark.parametrize("alpha, beta, gamma, temperature, match", [
    (-0.1, 1.0, 0.0, 1.0, r"alpha.*-0\.1"),
    (1.0, -2.0, 0.0, 1.0, r"beta.*-2\.0"),
    (1.0, 1.0, -1.0, 1.0, r"gamma.*-1\.0"),
    (0.0, 0.0, 0.0, 1.0, "all 0"),
    (1.0, 1.0, 0.0, 0.0, r"temperature is 0\.0"),
    (1.0, 1.0, 0.0, -1.5, r"temperature is -1\.5"),
])
def test_validate_loss_weights_rejects(alpha, beta, gamma, temperature, match):
    with pytest.raises(ConfigError, match=match):
        validate_loss_weights(alpha, beta, gamma, temperature)


def test_validate_loss_weights_accepts_a_single_positive_weight():
    assert validate_loss_weights(0.0, 0.0, 0.5, 2.0) is None


def test_unknown_direction_is_named_in_the_error():
    s_logq, t_logp = bucket_log_probs(HAND_STUDENT, HAND_IDS, HAND_T_LOGP, HAND_T_TAIL, 1.0)
    with pytest.raises(ConfigError, match=r"'backward'.*forward, reverse, jsd"):
        kl_per_position(s_logq, t_logp, "backward")
    hidden, weight, lm_bias, labels, kl_mask, teacher = make_batch()
    with pytest.raises(ConfigError, match="'kl'"):
        chunked(hidden, weight, lm_bias, labels, kl_mask, teacher, "kl", 4)


@pytest.mark.parametrize("call", [hidden_state_loss_per_position,
                                  lambda s, t, kind: hidden_state_loss(s, t, torch.ones(3), kind)])
def test_unknown_hidden_kind_is_named_in_the_error(call):
    with pytest.raises(ConfigError, match=r"'l2'.*mse, nmse, cnmse, cosine"):
        call(HAND_S, HAND_T, "l2")


@pytest.mark.parametrize("kind", ["nmse", "cnmse"])
def test_batch_normalised_kinds_have_no_per_position_form(kind):
    with pytest.raises(ConfigError, match="hidden_state_loss"):
        hidden_state_loss_per_position(HAND_S, HAND_T, kind)


def test_chunk_size_and_missing_teacher_are_config_errors():
    hidden, weight, lm_bias, labels, kl_mask, teacher = make_batch()
    with pytest.raises(ConfigError, match="chunk_size.*0"):
        chunked(hidden, weight, lm_bias, labels, kl_mask, teacher, "forward", 0)
    with pytest.raises(ConfigError, match="teacher_ids"):
        chunked(hidden, weight, lm_bias, labels, kl_mask, (None, None, None), "forward", 4)


# -- full-vocabulary teacher (the online baseline, or exact logits rebuilt from a head) ---------

@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocab_teacher_equals_top_k_with_k_equal_to_vocab(direction, temperature):
    hidden, weight, lm_bias, labels, kl_mask, _ = make_batch()
    g = torch.Generator().manual_seed(5)
    t_hidden = torch.randn(2, 7, 5, generator=g)
    t_weight, t_bias = torch.randn(V, 5, generator=g), torch.randn(V, generator=g)
    t_logits = F.linear(t_hidden, t_weight, t_bias)                                # (B, L, V)
    ids, logp, tail = teacher_from_logits(t_logits.reshape(-1, V), V)               # K == V
    top_v = (ids.reshape(2, 7, V), logp.reshape(2, 7, V), tail.reshape(2, 7))

    ref = unchunked(hidden, weight, lm_bias, labels, kl_mask, top_v, direction, temperature)
    full = logit_losses_from_logits(F.linear(hidden, weight, lm_bias), labels, kl_mask,
                                    None, None, None, temperature, direction, True, True,
                                    teacher_logits=t_logits)
    exact = chunked_logit_losses(hidden, weight, labels, kl_mask, None, None, None, temperature,
                                 direction, 3, True, True, lm_head_bias=lm_bias,
                                 teacher_exact=(t_hidden, t_weight, t_bias))
    close(torch.stack(full), torch.stack(ref))
    close(torch.stack(exact), torch.stack(ref))
    grads = torch.autograd.grad(mean_loss(exact), (hidden, weight))
    ref_grads = torch.autograd.grad(mean_loss(ref), (hidden, weight))
    for got, want in zip(grads, ref_grads):
        close(got, want)


def test_full_vocab_kl_is_zero_for_the_teacher_itself():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 5, 6, generator=g), torch.randn(V, 6, generator=g)
    labels = torch.randint(0, V, (2, 5), generator=g)
    sums = chunked_logit_losses(hidden, weight, labels, torch.ones(2, 5, dtype=torch.bool), None,
                                None, None, 3.0, "forward", 2, False, True,
                                teacher_exact=(hidden, weight, None))
    close(sums[2], 0.0, atol=1e-6)
    close(sums[3], 10.0)


def test_full_vocab_teacher_of_another_vocabulary_is_refused():
    from unidistill.errors import ConfigError
    from unidistill.trainer.losses import full_vocab_log_probs

    with pytest.raises(ConfigError, match=r"teacher logits have shape \(3, 12\), the student's \(3, 11\)"):
        full_vocab_log_probs(torch.zeros(3, 11), torch.zeros(3, 12), 1.0)


# -- fused training path: gradients taken per chunk in forward ----------------------------------

@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_fused_loss_equals_weighted_chunked_loss_and_its_gradients(direction, chunk_size):
    from unidistill.trainer.losses import fused_logit_loss

    hidden, weight, lm_bias, labels, kl_mask, teacher = make_batch()
    params = (hidden, weight, lm_bias)
    ce_sum, ce_n, kl_sum, kl_n = unchunked(hidden, weight, lm_bias, labels, kl_mask, teacher, direction)
    ref = 0.4 * ce_sum / ce_n + 0.4 * 4.0 * kl_sum / kl_n
    ref_grads = torch.autograd.grad(ref * 0.5, params)  # 0.5: the Trainer's gradient-accumulation scale
    loss, ce, kl = fused_logit_loss(hidden, weight, labels, kl_mask, *teacher, 2.0, direction, chunk_size,
                                    ce_weight=0.4, kl_weight=0.4 * 4.0, lm_head_bias=lm_bias)
    close(loss, ref)
    close(ce, ce_sum / ce_n)
    close(kl, kl_sum / kl_n)
    assert not ce.requires_grad and not kl.requires_grad
    for got, want in zip(torch.autograd.grad(loss * 0.5, params), ref_grads):
        close(got, want)


def test_fused_loss_with_exact_teacher_and_a_term_off():
    from unidistill.trainer.losses import fused_logit_loss

    hidden, weight, _, labels, kl_mask, _ = make_batch(bias=False)
    g = torch.Generator().manual_seed(9)
    t_hidden, t_weight = torch.randn(2, 7, 5, generator=g), torch.randn(V, 5, generator=g)
    exact = (t_hidden, t_weight, None)
    _, _, kl_sum, kl_n = chunked_logit_losses(hidden, weight, labels, kl_mask, None, None, None, 1.0,
                                              "forward", 3, False, True, teacher_exact=exact)
    ref = kl_sum / kl_n
    loss, ce, kl = fused_logit_loss(hidden, weight, labels, kl_mask, None, None, None, 1.0, "forward",
                                    2, ce_weight=0.0, kl_weight=1.0, teacher_exact=exact)
    close(loss, ref)
    close(ce, 0.0)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)),
                         torch.autograd.grad(ref, (hidden, weight))):
        close(got, want)


# --- tempering the tail: exact at every temperature ---------------------------------------------

# Vocab of 4, teacher p = [0.5, 0.3, 0.15, 0.05], cached K = 2 (ids 0, 1), tail = ids 2, 3.
# At T = 2 the tempered teacher is sqrt(p) / Σ sqrt(p): sqrt = [.707107, .547723, .387298,
# .223607], Σ = 1.865735, so the buckets are [.378999, .293569, (.387298 + .223607) / Σ =
# .327432]. Tempering the tail as one token would give sqrt(.2) / (… + .447214) = .263…: wrong.
TAIL2_P = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)


def test_tempered_teacher_buckets_by_hand_with_a_two_token_tail():
    ids = torch.tensor([[0, 1]])
    logp = TAIL2_P[:, :2].log().float()
    tail_t2 = torch.tensor([math.log(math.sqrt(0.15) + math.sqrt(0.05))])   # log Σ_tail p^(1/2)
    _, t_logp = bucket_log_probs(TAIL2_P.log().float(), ids, logp, tail_t2, 2.0)
    close(t_logp.exp(), [[0.37899870, 0.29356814, 0.32743316]])


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_tempered_bucket_teacher_equals_full_vocab_softmax_summed_over_the_tail(k, temperature):
    z = random_logits(seed=5)
    ids, logp, tail = teacher_from_logits(z, k, temperature)
    _, t_logp = bucket_log_probs(z, ids, logp, tail, temperature)
    full = torch.softmax(z.double() / temperature, dim=-1)                           # (N, V)
    expected = torch.cat([full.gather(-1, ids), full.scatter(-1, ids, 0.0).sum(-1, keepdim=True)],
                         dim=-1)
    close(t_logp.exp(), expected.float())


@pytest.mark.parametrize("temperatures", [(2.0,), (0.5, 2.0, 4.0)])
def test_builder_tempered_tails_equal_the_reference(temperatures):
    from unidistill.models.teacher import top_k_with_tail

    z = random_logits(n=9, v=300, seed=3, scale=4.0)
    ids, logp, tail, tempered = top_k_with_tail(z.clone(), 16, temperatures)
    assert tempered.shape == (9, len(temperatures))
    for m, t in enumerate(temperatures):
        _, _, ref = teacher_from_logits(z, 16, t)
        close(tempered[:, m], ref, atol=1e-5, rtol=1e-5)
    _, _, ref1 = teacher_from_logits(z, 16, 1.0)
    close(tail, ref1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_truncating_the_top_k_keeps_the_tempered_tail_exact(temperature):
    from unidistill.storage.reader import truncate_top_k

    z = random_logits(n=5, v=40, seed=8)
    _, logp16, tail16 = teacher_from_logits(z, 16, temperature)
    _, logp4, tail4 = teacher_from_logits(z, 4, temperature)
    values, tail = truncate_top_k(logp16.numpy(), tail16.numpy(), 4, temperature)
    close(torch.from_numpy(values), logp4)
    close(torch.from_numpy(tail), tail4, atol=1e-5, rtol=1e-5)


def test_uniform_tail_is_exact_for_an_even_tail_and_overestimates_a_peaked_one():
    from unidistill.storage.reader import uniform_tail

    # tail of 4 ids holding 0.2 evenly: Σ (0.05)^(1/2) = 4 sqrt(.05)
    even = uniform_tail(torch.tensor([math.log(0.2)]).numpy(), 2.0, 4)
    close(torch.from_numpy(even), [math.log(4 * math.sqrt(0.05))])
    # the same mass on one id of the four: the true tempered tail is sqrt(.2), smaller
    assert even[0] > math.log(math.sqrt(0.2)) + 0.5


def test_uniform_tail_of_an_empty_tail_stays_empty():
    from unidistill.storage.reader import uniform_tail

    out = uniform_tail(torch.tensor([-INF]).numpy(), 2.0, 0)  # K == V: nothing outside the top-k
    assert out[0] == -INF

"""Loss terms: hand-computed values, invariants and config errors, for every direction and kind."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unidistill.errors import ConfigError
from unidistill.model_logits import OutputHead
from unidistill.models.targets import TeacherTargets
from unidistill.trainer.losses import (
    HIDDEN_KINDS, KL_DIRECTIONS, LossConfig, LossTerms, bucket_log_probs, compound_loss,
    cross_entropy_per_position, distillation_loss, hidden_state_loss,
    hidden_state_loss_per_position, kl_per_position, logit_loss, logit_sums, masked_mean,
    sums_from_logits, validate_loss_weights,
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
    mask = torch.ones(b, seq, dtype=torch.bool)
    mask[1, 3:] = False
    teacher_logits = torch.randn(b * seq, v, generator=g) * 2
    ids, logp, tail = teacher_from_logits(teacher_logits, k)
    teacher = TeacherTargets(ids=ids.reshape(b, seq, k), logp=logp.half().float().reshape(b, seq, k),
                             log_tail=tail.reshape(b, seq))
    return hidden, weight, lm_bias, labels, mask, teacher


def recipe(direction="forward", temperature=2.0, chunk_size=3, alpha=0.4, beta=0.4, **kw):
    return LossConfig(alpha=alpha, beta=beta, temperature=temperature, kl_direction=direction,
                      chunk_size=chunk_size, **kw)


def reference(hidden, weight, lm_bias, labels, mask, teacher, direction, temperature=2.0,
              teacher_logits=None):
    """(ce mean, kl mean, ce count, kl count, correct, agree) from full logits, term by term:
    F.cross_entropy over the masked positions with a next token, the bucketed (or full) KL over
    the masked positions, argmax hits; nothing of the chunked code."""
    logits = F.linear(hidden, weight, lm_bias)                                      # (B, L, V)
    flat, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
    keep = mask.reshape(-1)
    has_next = keep & (flat_labels != -100)
    ce = F.cross_entropy(flat[has_next], flat_labels[has_next], reduction="sum")
    if teacher_logits is None:
        k = teacher.ids.shape[-1]
        s_logq, t_logp = bucket_log_probs(flat, teacher.ids.reshape(-1, k),
                                          teacher.logp.reshape(-1, k),
                                          teacher.log_tail.reshape(-1), temperature)
        top1 = teacher.ids.reshape(-1, k)[:, 0]
    else:
        s_logq = torch.log_softmax(flat / temperature, -1)
        t_logp = torch.log_softmax(teacher_logits.reshape(-1, V) / temperature, -1)
        top1 = teacher_logits.reshape(-1, V).argmax(-1)
    kl = kl_per_position(s_logq, t_logp, direction)[keep].sum()
    predicted = flat.argmax(-1)
    return dict(ce=ce / has_next.sum(), kl=kl / keep.sum(), ce_n=float(has_next.sum()),
                kl_n=float(keep.sum()), correct=float((has_next & (predicted == flat_labels)).sum()),
                agree=float((keep & (predicted == top1)).sum()))


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])  # 3 does not divide L=7; 64 > L
def test_evaluation_sums_equal_the_reference(direction, chunk_size):
    hidden, weight, lm_bias, labels, mask, teacher = make_batch()
    ref = reference(hidden, weight, lm_bias, labels, mask, teacher, direction)
    sums = logit_sums(hidden, OutputHead(weight, lm_bias), labels, teacher,
                      recipe(direction, chunk_size=chunk_size), mask=mask)
    ce, ce_n, kl, kl_n, correct, agree = sums.tolist()
    assert (ce_n, kl_n) == (8.0, 10.0)  # 14 positions: 3 without a next token, 4 masked (1 both)
    close(ce / ce_n, ref["ce"])
    close(kl / kl_n, ref["kl"])
    assert (correct, agree) == (ref["correct"], ref["agree"])
    assert kl > 0 and not sums.requires_grad


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_the_training_loss_equals_the_reference_and_its_gradients(direction, chunk_size):
    hidden, weight, lm_bias, labels, mask, teacher = make_batch()
    params = (hidden, weight, lm_bias)
    ref = reference(hidden, weight, lm_bias, labels, mask, teacher, direction)
    ref_loss = 0.4 * ref["ce"] + 0.4 * 4.0 * ref["kl"]
    ref_grads = torch.autograd.grad(ref_loss * 0.5, params)  # 0.5: a gradient-accumulation scale
    loss, ce, kl = logit_loss(hidden, OutputHead(weight, lm_bias), labels, teacher,
                              recipe(direction, chunk_size=chunk_size), mask=mask)
    close(loss, ref_loss)
    close(ce, ref["ce"])
    close(kl, ref["kl"])
    assert not ce.requires_grad and not kl.requires_grad
    for got, want in zip(torch.autograd.grad(loss * 0.5, params), ref_grads):
        close(got, want)
        assert want.abs().sum() > 0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_the_closed_form_gradient_equals_autograd(temperature, softcap):
    """The fused step's closed-form CE + forward-KL gradient (fused_grad) against autograd over
    the same chunk, with a softcap and at T != 1, where a wrong 1/T or tail term would show."""
    from unidistill.model_logits import LogitTransform
    from unidistill.trainer.losses.logit_loss import _analytic_chunk, _autograd_chunk

    hidden, weight, lm_bias, labels, mask, teacher = make_batch()
    transform = LogitTransform(softcap=softcap)
    cfg = recipe(temperature=temperature, alpha=0.3, beta=0.9)
    spec = dict(w_ce=0.3 / 8, w_kl=cfg.kl_weight / 10)
    args = (hidden.detach().requires_grad_(), weight.detach().requires_grad_(),
            lm_bias.detach().requires_grad_(), transform, labels, teacher, cfg, mask, spec)
    closed_sums, closed = _analytic_chunk(*args)
    auto_sums, auto = _autograd_chunk(*args)
    close(closed_sums, auto_sums)
    for got, want in zip(closed, auto):
        close(got, want, atol=1e-6, rtol=1e-4)
        assert want.abs().sum() > 0


def test_sampled_targets_with_unused_slots_train_like_the_reference():
    """A sampled cache's rows: distinct ids with counts, unused slots as id 0 with weight 0 (so
    id 0 can appear twice), no tail. The closed form sums a duplicated id's slots."""
    hidden, weight, lm_bias, labels, mask, _ = make_batch()
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(V - 1, generator=g)[:4] + 1 for _ in range(14)])  # (14, 4)
    counts = torch.randint(1, 5, (14, 4), generator=g).float()
    ids[::3, 2:] = 0          # unused slots: id 0, count 0 ...
    counts[::3, 2:] = 0.0
    ids[::6, 1] = 0           # ... and in some rows id 0 was also drawn
    logp = (counts / counts.sum(-1, keepdim=True)).log()
    sampled = TeacherTargets(ids=ids.reshape(2, 7, 4), logp=logp.reshape(2, 7, 4),
                             log_tail=torch.full((2, 7), -INF))
    ref = reference(hidden, weight, lm_bias, labels, mask, sampled, "forward", 1.0)
    ref_loss = ref["ce"] + ref["kl"]
    loss, _, kl = logit_loss(hidden, OutputHead(weight, lm_bias), labels, sampled,
                             recipe(alpha=1.0, beta=1.0, temperature=1.0), mask=mask)
    close(kl, ref["kl"])
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight, lm_bias)),
                         torch.autograd.grad(ref_loss, (hidden, weight, lm_bias))):
        close(got, want)


def test_the_fused_loss_hands_its_gradients_over_once():
    """Backward scales the saved gradients in place and gives them away (no second copy of the
    head's gradient), so a second backward is refused with a clear error, not a wrong result."""
    hidden, weight, lm_bias, labels, mask, teacher = make_batch()
    loss, _, _ = logit_loss(hidden, OutputHead(weight, lm_bias), labels, teacher, recipe(), mask=mask)
    (loss * 0.5).backward(retain_graph=True)
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="second backward through it"):
        loss.backward()


def test_a_term_whose_weight_is_zero_is_not_computed():
    hidden, weight, _, labels, mask, teacher = make_batch(bias=False)
    head = OutputHead(weight)
    ref = reference(hidden, weight, None, labels, mask, teacher, "forward")
    loss, ce, kl = logit_loss(hidden, head, labels, None, recipe(beta=0.0, alpha=1.0), mask=mask)
    close(loss, ref["ce"])
    close(kl, 0.0)
    loss, ce, kl = logit_loss(hidden, head, labels, teacher, recipe(alpha=0.0, beta=1.0), mask=mask)
    close(loss, 4.0 * ref["kl"])
    close(ce, 0.0)


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_all_masked_batch_gives_zero_logit_losses_and_finite_gradients(direction):
    hidden, weight, lm_bias, labels, mask, teacher = make_batch(k=V)  # K == V: tail is -inf
    labels = torch.full_like(labels, -100)
    mask = torch.zeros_like(mask)
    head = OutputHead(weight, lm_bias)
    close(logit_sums(hidden, head, labels, teacher, recipe(direction), mask=mask), torch.zeros(6))
    loss, ce, kl = logit_loss(hidden, head, labels, teacher, recipe(direction), mask=mask)
    close(torch.stack([loss, ce, kl]), torch.zeros(3))
    for g in torch.autograd.grad(loss, (hidden, weight, lm_bias)):
        close(g, torch.zeros_like(g))  # finite and zero


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_k_equals_v_gradients_are_finite(direction):
    # the student's empty tail bucket (-inf) must not poison the gradient with NaN
    hidden, weight, lm_bias, labels, mask, teacher = make_batch(k=V)
    loss, _, _ = logit_loss(hidden, OutputHead(weight, lm_bias), labels, teacher, recipe(direction))
    grads = torch.autograd.grad(loss, (hidden, weight, lm_bias))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_a_sampled_offset_shifts_the_logged_kl_and_leaves_the_gradient():
    hidden, weight, lm_bias, labels, mask, teacher = make_batch()
    head, cfg = OutputHead(weight, lm_bias), recipe(alpha=0.0, beta=1.0, temperature=1.0)
    plain, _, kl_plain = logit_loss(hidden, head, labels, teacher, cfg, mask=mask)
    offset = torch.arange(14, dtype=torch.float32).reshape(2, 7) / 10
    shifted_targets = TeacherTargets(ids=teacher.ids, logp=teacher.logp, log_tail=teacher.log_tail,
                                     kl_offset=offset)
    shifted, _, kl_shifted = logit_loss(hidden, head, labels, shifted_targets, cfg, mask=mask)
    close(kl_plain - kl_shifted, offset[mask].sum() / 10)  # the mean offset over KL's positions
    for a, b in zip(torch.autograd.grad(plain, (hidden, weight)),
                    torch.autograd.grad(shifted, (hidden, weight))):
        close(a, b)
    sums = logit_sums(hidden, head, labels, shifted_targets, cfg, mask=mask)
    close(sums[2] / sums[3], kl_shifted)


def test_the_loss_refuses_what_it_cannot_compute():
    hidden, weight, lm_bias, labels, mask, teacher = make_batch()
    head = OutputHead(weight, lm_bias)
    with pytest.raises(ConfigError, match="chunk_size.*0"):
        recipe(chunk_size=0)
    with pytest.raises(ConfigError, match="'kl'.*forward, reverse, jsd"):
        recipe("kl")
    with pytest.raises(ConfigError, match="beta > 0.*none"):
        logit_loss(hidden, head, labels, None, recipe())
    with pytest.raises(ConfigError, match="ids, logp and log_tail together; got ids"):
        TeacherTargets(ids=teacher.ids)
    with pytest.raises(ConfigError, match="needs the teacher's logit targets"):
        logit_sums(hidden, head, labels, TeacherTargets(), recipe())
    with pytest.raises(ConfigError, match="head"):
        logit_loss(hidden, head, labels, TeacherTargets(final_hidden=hidden.detach()), recipe())
    with pytest.raises(ConfigError, match=r"loss mask has shape \(2, 6\)"):
        logit_loss(hidden, head, labels, teacher, recipe(), mask=mask[:, :6])


# -- full-vocabulary teacher (the online baseline, or exact logits rebuilt from a head) ---------

def exact_teacher(seed=5):
    g = torch.Generator().manual_seed(seed)
    t_hidden = torch.randn(2, 7, 5, generator=g)
    t_weight, t_bias = torch.randn(V, 5, generator=g), torch.randn(V, generator=g)
    return t_hidden, OutputHead(t_weight, t_bias)


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_an_exact_teacher_equals_the_full_reference_and_top_v(direction, temperature):
    hidden, weight, lm_bias, labels, mask, _ = make_batch()
    t_hidden, t_head = exact_teacher()
    t_logits = t_head.logits(t_hidden)                                              # (B, L, V)
    ids, logp, tail = teacher_from_logits(t_logits.reshape(-1, V), V, temperature)  # K == V
    top_v = TeacherTargets(ids=ids.reshape(2, 7, V), logp=logp.reshape(2, 7, V),
                           log_tail=tail.reshape(2, 7))
    ref = reference(hidden, weight, lm_bias, labels, mask, None, direction, temperature, t_logits)
    ref_top_v = reference(hidden, weight, lm_bias, labels, mask, top_v, direction, temperature)
    close(ref["kl"], ref_top_v["kl"])
    exact = TeacherTargets(final_hidden=t_hidden, head=t_head)
    cfg, head = recipe(direction, temperature, alpha=1.0, beta=1.0), OutputHead(weight, lm_bias)
    sums = logit_sums(hidden, head, labels, exact, cfg, mask=mask)
    close(sums[2] / sums[3], ref["kl"])
    assert float(sums[5]) == ref["agree"]
    loss, _, kl = logit_loss(hidden, head, labels, exact, cfg, mask=mask)
    close(kl, ref["kl"])
    ref_loss = ref["ce"] + temperature ** 2 * ref["kl"]
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)),
                         torch.autograd.grad(ref_loss, (hidden, weight))):
        close(got, want)


def test_full_vocab_kl_is_zero_for_the_teacher_itself():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 5, 6, generator=g), torch.randn(V, 6, generator=g)
    labels = torch.randint(0, V, (2, 5), generator=g)
    itself = TeacherTargets(final_hidden=hidden, head=OutputHead(weight))
    sums = logit_sums(hidden, OutputHead(weight), labels, itself, recipe(temperature=3.0, chunk_size=2))
    close(sums[2], 0.0, atol=1e-6)
    close(sums[3], 10.0)
    assert float(sums[5]) == 10.0  # top-1 agreement with itself everywhere


def test_full_vocab_teacher_of_a_larger_vocabulary_is_refused():
    # a smaller teacher (a student head padded beyond it) is padded: tests/test_user_models.py
    from unidistill.trainer.losses import full_vocab_log_probs

    with pytest.raises(ConfigError, match=r"teacher's logits cover 12 ids, the student's head only 11"):
        full_vocab_log_probs(torch.zeros(3, 11), torch.zeros(3, 12), 1.0)
    with pytest.raises(ConfigError, match=r"teacher logits have shape \(4, 11\), the student's \(3, 11\)"):
        full_vocab_log_probs(torch.zeros(3, 11), torch.zeros(4, 11), 1.0)


# -- the whole loss of a step --------------------------------------------------------------------

@pytest.mark.parametrize("kind", HIDDEN_KINDS)
def test_the_step_loss_is_alpha_ce_plus_beta_t2_kl_plus_gamma_hidden(kind):
    hidden, weight, lm_bias, labels, mask, teacher = make_batch()
    g = torch.Generator().manual_seed(4)
    projected = {2: torch.randn(2, 7, 5, generator=g, requires_grad=True),
                 4: torch.randn(2, 7, 5, generator=g, requires_grad=True)}
    teacher.hidden = {6: torch.randn(2, 7, 5, generator=g), 9: torch.randn(2, 7, 5, generator=g)}
    pairs = {2: 6, 4: 9}
    cfg = LossConfig(alpha=0.3, beta=0.5, gamma=0.7, temperature=2.0, hidden_loss=kind, chunk_size=3)
    loss, terms = distillation_loss(hidden, OutputHead(weight, lm_bias), labels, teacher, cfg,
                                    projected=projected, hidden_pairs=pairs, mask=mask)
    ref = reference(hidden, weight, lm_bias, labels, mask, teacher, "forward")
    flat_mask = mask.reshape(-1)
    ref_hidden = torch.stack([hidden_state_loss(projected[i].reshape(-1, 5),
                                                teacher.hidden[j].reshape(-1, 5), flat_mask, kind)
                              for i, j in pairs.items()]).mean()
    ref_loss = 0.3 * ref["ce"] + 0.5 * 4.0 * ref["kl"] + 0.7 * ref_hidden
    close(loss, ref_loss)
    close(torch.stack([terms.ce, terms.kl, terms.hidden]),
          torch.stack([ref["ce"], ref["kl"], ref_hidden]))
    close(loss, compound_loss(terms, 0.3, 0.5, 0.7, 2.0))
    params = (hidden, weight, lm_bias, projected[2], projected[4])
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref_loss, params)):
        close(got, want)


def test_masked_positions_do_not_reach_the_hidden_loss():
    hidden, weight, lm_bias, labels, mask, teacher = make_batch()
    projected = {1: torch.zeros(2, 7, 3)}
    teacher.hidden = {5: torch.ones(2, 7, 3)}
    teacher.hidden[5][~mask] = 1e6  # a huge error where the mask is off
    cfg = LossConfig(alpha=0.0, beta=0.0, gamma=1.0, hidden_loss="mse")
    _, terms = distillation_loss(hidden, OutputHead(weight, lm_bias), labels, teacher, cfg,
                                 projected=projected, hidden_pairs={1: 5}, mask=mask)
    close(terms.hidden, 1.0)
    close(torch.stack([terms.ce, terms.kl]), torch.zeros(2))


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

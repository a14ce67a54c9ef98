"""Sampled and exact logit representations: what the cache stores against the teacher itself, and
what the trainer and evaluate make of it."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.cli import main
from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.evaluate import evaluate
from unidistill.models.teacher import sample_with_counts
from unidistill.storage import CacheReader
from unidistill.storage.info import cache_info
from unidistill.storage.layout import HEAD_FILE
from unidistill.storage.verify import verify_cache
from unidistill.trainer.run import distill_from_cache

from .conftest import args_for, train_losses


def build(tmp_path, teacher_dir, text_file, name, **kw):
    cfg = dict(teacher=str(teacher_dir), data=str(text_file), out=str(tmp_path / name), seq_len=32,
               max_sequences=8, batch_size=4, shard_size=4, device="cpu", layers="2")
    cfg.update(kw)
    return build_cache(BuildConfig(**cfg), progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, tiny_teacher_dir, text_file):
    root = tmp_path_factory.mktemp("sampled")
    build(root, tiny_teacher_dir, text_file, "c", logits="sampled", samples=64)
    return root / "c"


@pytest.fixture(scope="module")
def exact_cache(tmp_path_factory, tiny_teacher_dir, text_file):
    root = tmp_path_factory.mktemp("exact")
    build(root, tiny_teacher_dir, text_file, "c", logits="exact")
    return root / "c"


def teacher_log_probs(teacher, input_ids: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(teacher(torch.from_numpy(input_ids.astype(np.int64))).logits, -1)


# -- sampling ----------------------------------------------------------------------------------
def test_sampled_counts_are_distinct_ids_with_unbiased_frequencies():
    p = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    logits = p.log().expand(400, -1)                                     # 400 rows, one distribution
    ids, counts, _ = sample_with_counts(logits, 50, torch.Generator().manual_seed(0))
    assert ids.shape == counts.shape == (400, 50)
    assert torch.equal(counts.sum(-1), torch.full((400,), 50))
    used = counts > 0
    assert torch.equal(ids[~used], torch.zeros_like(ids[~used]))        # unused slots: id 0
    for row_ids, row_used in zip(ids, used):
        kept = row_ids[row_used]
        assert torch.equal(kept, kept.unique())                          # distinct, ascending
    assert not (ids[used] == 5).any()                                    # never an id of p = 0
    freq = torch.zeros(6).scatter_add_(0, ids[used], counts[used].float()) / (400 * 50)
    sigma = (p * (1 - p) / (400 * 50)).sqrt()
    assert ((freq - p).abs() <= 4 * sigma + 1e-9).all(), (freq, p)


def test_sampled_kl_estimate_is_zero_for_the_teacher_and_unbiased_for_another_student():
    from unidistill.storage.reader import counts_to_buckets, sample_kl_offset
    from unidistill.trainer.losses import bucket_log_probs, kl_per_position

    g = torch.Generator().manual_seed(1)
    teacher = (torch.randn(1, 30, generator=g) * 2).expand(4000, -1)   # one distribution, 4000 rows
    student = torch.randn(1, 30, generator=g).expand(4000, -1)
    ids, counts, logp_mean = sample_with_counts(teacher.clone(), 12, g)
    logp = torch.log_softmax(teacher[0].double(), -1)
    # the stored mean is Σ (count / n) log p(id), by hand
    by_hand = (counts.double() / 12 * logp[ids]).sum(-1)
    torch.testing.assert_close(logp_mean.double(), by_hand, atol=1e-5, rtol=1e-6)
    w_logp, tail = counts_to_buckets(counts.numpy())
    offset = torch.from_numpy(sample_kl_offset(w_logp, logp_mean.numpy()))

    def estimate(z):
        s_logq, t_logp = bucket_log_probs(z, ids, torch.from_numpy(w_logp), torch.from_numpy(tail), 1.0)
        return kl_per_position(s_logq, t_logp, "forward") - offset                   # (R,)

    assert estimate(teacher).abs().max() < 1e-5                       # every row, not on average
    true_kl = float((logp.exp() * (logp - torch.log_softmax(student[0].double(), -1))).sum())
    est = estimate(student)
    assert float(est.mean()) == pytest.approx(true_kl, abs=4 * float(est.std()) / 4000 ** 0.5)


def test_a_sampled_cache_estimates_the_teacher(sampled_cache, teacher):
    reader = CacheReader(sampled_cache)
    assert reader.logits_mode == "sampled" and reader.layout.stored_k == 64
    est, true = [], []
    for i in range(len(reader)):
        seq = reader.read(i)
        counts = np.exp(seq["teacher_logp"]) * 64
        np.testing.assert_allclose(counts.sum(-1), 64, rtol=1e-5)
        assert np.all(seq["teacher_log_tail"] == -np.inf)
        logp = teacher_log_probs(teacher, seq["input_ids"][None])[0]     # (L, V)
        drawn = torch.from_numpy(seq["teacher_ids"].astype(np.int64))
        weights = torch.from_numpy(np.exp(seq["teacher_logp"]))          # count / S, 0 if unused
        est.append(float((weights * logp.gather(-1, drawn)).sum()))      # sum_i p_hat_i log p_i
        true.append(float((logp.exp() * logp).sum()))                    # sum_i p_i log p_i
    # E[sum p_hat log p] = -H(p): 8 x 32 positions x 64 draws pin it down to well under 1 %
    assert np.mean(est) == pytest.approx(np.mean(true), rel=0.01)


def test_sampling_is_seeded_so_a_rebuild_is_identical(tmp_path, tiny_teacher_dir, text_file,
                                                       sampled_cache):
    again = build(tmp_path, tiny_teacher_dir, text_file, "again", logits="sampled", samples=64)
    other = build(tmp_path, tiny_teacher_dir, text_file, "other", logits="sampled", samples=64,
                  sample_seed=1)
    assert again["fingerprint"] == CacheReader(sampled_cache).manifest["fingerprint"]
    assert other["fingerprint"] != again["fingerprint"]


def test_sampled_cache_trains_at_its_temperature_only(tmp_path, sampled_cache, student_dir):
    trainer = distill_from_cache(sampled_cache, str(student_dir), args_for(
        tmp_path / "ok", max_steps=2, save_strategy="no", kd_temperature=1.0))
    for _, loss, ce, kl, hidden in train_losses(trainer):
        assert np.isfinite([loss, ce, kl, hidden]).all() and kl >= 0
    with pytest.raises(ConfigError, match=r"sampled from the teacher at T = 1.*--temperature 2"):
        distill_from_cache(sampled_cache, str(student_dir), args_for(tmp_path / "t2", kd_temperature=2.0))
    with pytest.raises(ConfigError, match="kl_direction 'reverse'"):
        distill_from_cache(sampled_cache, str(student_dir), args_for(
            tmp_path / "rev", kd_temperature=1.0, kl_direction="reverse"))
    with pytest.raises(CacheMismatchError, match="no top-k to cut"):
        distill_from_cache(sampled_cache, str(student_dir), args_for(
            tmp_path / "k", kd_temperature=1.0, kd_top_k=8))


# -- exact ---------------------------------------------------------------------------------------
def test_an_exact_cache_holds_the_final_state_and_the_head(exact_cache, teacher):
    reader = CacheReader(exact_cache)
    assert reader.logits_mode == "exact" and reader.layout.stored_k == 0
    assert reader.layers == (2, 4)                                       # the final layer was added
    assert not any(name.startswith("logits/") for name in reader.layout.array_specs())
    weight, bias, transform = reader.head()
    assert torch.equal(weight, teacher.get_output_embeddings().weight) and bias is None
    assert transform.is_identity                                         # a Llama teacher: plain head
    seq = reader.read(0)
    rebuilt = torch.log_softmax(torch.from_numpy(seq["teacher_final_hidden"]).float() @ weight.T, -1)
    torch.testing.assert_close(rebuilt, teacher_log_probs(teacher, seq["input_ids"][None])[0],
                               atol=2e-3, rtol=0)                         # only fp16 of the state
    assert verify_cache(exact_cache).ok


def test_verify_notices_a_changed_head(tmp_path, tiny_teacher_dir, text_file):
    build(tmp_path, tiny_teacher_dir, text_file, "c", logits="exact", max_sequences=4)
    path = tmp_path / "c" / HEAD_FILE
    tensors = safetensors.torch.load_file(path)
    tensors["weight"][0, 0] += 1.0
    safetensors.torch.save_file(tensors, path)
    report = verify_cache(tmp_path / "c")
    assert not report.ok and "differs from the digest" in str(report.problems[0])


def test_exact_cache_trains_like_the_online_full_vocabulary_teacher(tmp_path, exact_cache,
                                                                   student_dir, teacher):
    kw = dict(max_steps=2, save_strategy="no", kd_temperature=2.0, layer_map="uniform")
    offline = distill_from_cache(exact_cache, str(student_dir), args_for(tmp_path / "off", **kw))
    online = distill_from_cache(exact_cache, str(student_dir), args_for(tmp_path / "on", **kw),
                                teacher_model=teacher, online_top_k=None)
    for a, b in zip(train_losses(offline), train_losses(online)):
        assert a == pytest.approx(b, rel=2e-3)                            # fp16 of the cached state


def test_teacher_against_its_own_exact_cache(exact_cache, tiny_teacher_dir):
    result = evaluate(str(tiny_teacher_dir), cache=str(exact_cache), batch_size=4, device="cpu",
                      progress=False)
    assert result.kl_to_teacher == pytest.approx(0.0, abs=1e-4)
    assert result.top1_agreement > 0.99


def test_cache_info_names_the_representation(sampled_cache, exact_cache):
    for path, text in ((sampled_cache, "64 draws per position"), (exact_cache, f"final layer + {HEAD_FILE}")):
        res = CliRunner().invoke(main, ["cache-info", str(path)])
        assert res.exit_code == 0, res.output
        assert text in res.output


def test_bad_representation_settings_are_refused(tmp_path, tiny_teacher_dir, text_file):
    with pytest.raises(ConfigError, match="'dense' is not one of"):
        BuildConfig(teacher="t", data="d", out=str(tmp_path / "x"), logits="dense")
    with pytest.raises(ConfigError, match="samples must be between 1 and 65534"):
        BuildConfig(teacher="t", data="d", out=str(tmp_path / "x"), logits="sampled", samples=0)


# -- compact top-k ---------------------------------------------------------------------------------
def test_compact_top_k_round_trip():
    from unidistill.storage.codecs.topk import decode_top_k, encode_top_k

    torch.manual_seed(0)
    logits = torch.randn(5, 7, 300) * 3
    logp_all = torch.log_softmax(logits, -1)
    logp, ids = logp_all.topk(16, dim=-1)                                 # sorted by probability
    deltas, quant, value_range = encode_top_k(ids, logp)
    assert quant.dtype == torch.uint8 and value_range.dtype == torch.float16
    got_ids, got_logp = decode_top_k(deltas.numpy().astype(np.uint16), quant.numpy(), value_range.numpy())
    step = value_range[..., 1:].float().numpy()
    # the same ids, each with its own log-prob within half a step (plus the fp16 of the maximum)
    got = torch.from_numpy(got_logp)
    true_at_got = logp_all.gather(-1, torch.from_numpy(got_ids))
    assert ((got - true_at_got).abs().numpy() <= step / 2 + 2e-3).all()
    assert torch.equal(torch.from_numpy(got_ids).sort(-1).values, ids.sort(-1).values)
    assert (np.diff(got_logp, axis=-1) <= 0).all()                       # sorted by probability


def test_a_compact_cache_trains_like_the_full_precision_one(tmp_path, tiny_teacher_dir, text_file,
                                                            student_dir):
    build(tmp_path, tiny_teacher_dir, text_file, "fp16", top_k=16)
    build(tmp_path, tiny_teacher_dir, text_file, "q8", top_k=16, logits="topk-q8")
    full, compact = CacheReader(tmp_path / "fp16"), CacheReader(tmp_path / "q8")
    for i in range(len(full)):
        a, b = full.read(i, kd_top_k=8), compact.read(i, kd_top_k=8)
        # near-ties may swap places after quantization: compare the distributions, not the order
        pa = torch.zeros(32, full.layout.vocab_size).scatter_(-1, torch.from_numpy(a["teacher_ids"].astype(np.int64)),
                                           torch.from_numpy(np.exp(a["teacher_logp"].astype(np.float32))))
        pb = torch.zeros(32, full.layout.vocab_size).scatter_(-1, torch.from_numpy(b["teacher_ids"].astype(np.int64)),
                                           torch.from_numpy(np.exp(b["teacher_logp"])))
        assert float((pa - pb).abs().sum(-1).max()) < 0.02
        np.testing.assert_allclose(b["teacher_log_tail"], a["teacher_log_tail"], atol=0.02)
    runs = [distill_from_cache(tmp_path / name, str(student_dir), args_for(
        tmp_path / f"run-{name}", max_steps=2, save_strategy="no")) for name in ("fp16", "q8")]
    for x, y in zip(*(train_losses(r) for r in runs)):
        assert y == pytest.approx(x, rel=5e-3)
    fp16, q8 = (cache_info(tmp_path / name)["bytes_per_token"] for name in ("fp16", "q8"))
    # + 2 bytes: the default --temperatures 1,2 stores the T = 2 tempered tail
    assert fp16["logits_raw"] == 16 * 2 + 16 * 2 + 2 + 2      # uint16 ids, fp16 log-probs, tails
    assert q8["logits_raw"] == 16 * 2 + 16 + 2 * 2 + 2 + 2    # uint16 deltas, uint8, (max, step), tails


def test_check_request_says_when_the_tail_is_approximated(cache):
    reader = CacheReader(cache)  # topk, --temperatures 1,2 by default
    assert reader.layout.tail_temperatures == (2.0,)
    assert reader.check_request((), None, 1.0, "uniform") is False
    assert reader.check_request((), None, 2.0, "uniform") is False  # stored: exact
    assert reader.check_request((), None, 3.0, "uniform") is True

"""Students and tokenizers as users have them: a head padded beyond the tokenizer, a pad token set
to EOS, a config that still carries a GGUF teacher's ``quantization_config``.

Each is checked against a reference computed here (the student's own full logits, the cache's
arrays as stored) or against a real run."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from unidistill.cli import main
from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.evaluate import evaluate
from unidistill.fingerprint import tokenizer_fingerprint, tokenizer_matches
from unidistill.models.loading import load_student
from unidistill.pruning.prune import prune
from unidistill.storage import CacheReader, decode_hidden
from unidistill.trainer.dataset import check_student_matches_cache
from unidistill.trainer.losses import kl_per_position
from unidistill.trainer.losses.divergences import full_vocab_log_probs
from unidistill.trainer.run import distill_from_cache

from .conftest import args_for, make_llama, train_losses
from .test_logit_modes import build

PADDED = 320  # the tiny tokenizer's 259 ids, padded to a multiple of 64 as many models are


# ---------------------------------------------------------------- a head padded beyond the tokenizer

@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory, tiny_teacher_dir):
    """The teacher with its embeddings and head padded to 320 rows the way users do it:
    ``resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)``."""
    path = tmp_path_factory.mktemp("padded")
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    assert len(tok) < PADDED == model.config.vocab_size == model.get_output_embeddings().weight.shape[0]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exact_cache(tmp_path_factory, tiny_teacher_dir, text_file):
    root = tmp_path_factory.mktemp("exact")
    build(root, tiny_teacher_dir, text_file, "c", logits="exact", layers="none")
    return root / "c"


def student_log_probs(model_dir, ids: np.ndarray) -> torch.Tensor:
    """log_softmax of the model's own logits over its whole head, float64: (N, L, V_s)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids.astype(np.int64))).logits
    return torch.log_softmax(logits.double(), -1)


def reference_ce(s_logp: torch.Tensor, ids: np.ndarray) -> float:
    nxt = torch.from_numpy(ids[:, 1:].astype(np.int64))
    return float(-s_logp[:, :-1].gather(-1, nxt[..., None]).mean())


def test_padded_student_is_scored_on_a_topk_cache_with_its_whole_softmax(cache, padded_dir):
    """KL over the cached top-k + tail buckets, by hand: the student's extra ids are mass of its
    softmax, so they land in its tail bucket; CE is over all 320 logits too."""
    result = evaluate(str(padded_dir), cache=str(cache), max_sequences=4, batch_size=2,
                      device="cpu", progress=False, num_workers=0)
    reader = CacheReader(cache)
    seqs = [reader.read(i, layers=[]) for i in range(4)]
    ids = np.stack([s["input_ids"] for s in seqs])
    s_logp = student_log_probs(padded_dir, ids)                                   # (4, L, 320)
    t_ids = torch.from_numpy(np.stack([s["teacher_ids"] for s in seqs]).astype(np.int64))
    t_buckets = torch.cat([torch.from_numpy(np.stack([s["teacher_logp"] for s in seqs])).double(),
                           torch.from_numpy(np.stack([s["teacher_log_tail"] for s in seqs])).double()[..., None]], -1)
    t = torch.log_softmax(t_buckets, -1)                                          # (4, L, K+1)

    def bucket_kl(logp):
        top = logp.gather(-1, t_ids)
        tail = logp.scatter(-1, t_ids, float("-inf")).logsumexp(-1, keepdim=True)
        s = torch.cat([top, tail], -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    want = bucket_kl(s_logp)
    assert result.vocab_size == PADDED and result.uniform_nll == pytest.approx(math.log(PADDED))
    assert result.kl_to_teacher == pytest.approx(want, rel=1e-5)
    assert result.cache_nll == pytest.approx(reference_ce(s_logp, ids), rel=1e-5)
    # the extra ids matter: leaving them out of the student's softmax gives another KL
    dropped = torch.log_softmax(s_logp[..., :reader.layout.vocab_size], -1)
    assert abs(bucket_kl(dropped) - want) > 100 * 1e-5 * want


def test_padded_student_on_an_exact_cache_gets_the_teachers_exact_distribution(exact_cache, padded_dir):
    """An exact cache's teacher has 259 ids; its logits padded with -inf are its exact distribution
    over the student's 320: KL = sum over the teacher's ids of p (log p - log q), q over all 320."""
    result = evaluate(str(padded_dir), cache=str(exact_cache), max_sequences=4, batch_size=2,
                      device="cpu", progress=False, num_workers=0)
    reader = CacheReader(exact_cache)
    weight, bias, transform = reader.head("cpu")
    assert bias is None and transform.is_identity and weight.shape[0] == reader.layout.vocab_size < PADDED
    seqs = [reader.read(i, layers=[]) for i in range(4)]
    ids = np.stack([s["input_ids"] for s in seqs])
    final = torch.stack([decode_hidden(s["teacher_final_hidden"], reader.layout.hidden_dtype)
                         for s in seqs]).double()                                 # (4, L, D)
    p = torch.log_softmax(final @ weight.double().T, -1)                          # (4, L, 259)
    q = student_log_probs(padded_dir, ids)                                        # (4, L, 320)
    want = float((p.exp() * (p - q[..., :weight.shape[0]])).sum(-1).mean())
    assert result.kl_to_teacher == pytest.approx(want, rel=1e-4)
    # the student is the teacher plus 61 ids, so most of its KL is the mass m it puts on them:
    # with equal logits on the teacher's ids, KL would be exactly E[-log(1 - m)]
    m = q[..., weight.shape[0]:].exp().sum(-1)
    assert want == pytest.approx(float((-torch.log1p(-m)).mean()), rel=0.05)
    assert result.cache_nll == pytest.approx(reference_ce(q, ids), rel=1e-5)


def test_full_vocab_log_probs_pads_a_narrower_teacher_with_minus_inf():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 10, generator=g, requires_grad=True)
    teacher = torch.randn(6, 7, generator=g)
    s_logq, t_logp = full_vocab_log_probs(student, teacher, temperature=2.0)
    assert s_logq.shape == t_logp.shape == (6, 10)
    assert torch.equal(t_logp[:, 7:], torch.full((6, 3), float("-inf")))
    torch.testing.assert_close(t_logp[:, :7], torch.log_softmax(teacher / 2, -1))
    torch.testing.assert_close(s_logq, torch.log_softmax(student / 2, -1))
    kl = kl_per_position(s_logq, t_logp, "forward")
    p = torch.softmax(teacher / 2, -1)
    torch.testing.assert_close(kl, (p * (p.log() - s_logq[:, :7])).sum(-1))
    jsd = kl_per_position(s_logq, t_logp, "jsd")
    assert torch.isfinite(jsd).all() and (jsd > 0).all() and (jsd < math.log(2)).all()
    (kl.sum() + jsd.sum()).backward()
    assert torch.isfinite(student.grad).all()
    assert torch.isinf(kl_per_position(s_logq, t_logp, "reverse")).all()  # why reverse is refused
    with pytest.raises(ConfigError, match="teacher's logits cover 10 ids, the student's head only 7"):
        full_vocab_log_probs(teacher, student.detach(), temperature=1.0)


@pytest.mark.parametrize("which, direction", [("topk", "forward"), ("exact", "forward"),
                                              ("exact", "jsd"), ("topk", "reverse")])
def test_padded_student_distills_from_the_cache(tmp_path, cache, exact_cache, padded_dir, which,
                                                direction):
    """Forward KL trains by the closed-form gradient, JSD and reverse by autograd: all finite."""
    target = cache if which == "topk" else exact_cache
    trainer = distill_from_cache(target, str(padded_dir),
                                 args_for(tmp_path / "run", max_steps=2, save_steps=10, gamma=0.0,
                                          kl_direction=direction))
    losses = train_losses(trainer)
    assert [s for s, *_ in losses] == [1, 2]
    assert all(math.isfinite(x) for _, *xs in losses for x in xs)
    assert all(kl > 0 for *_, kl, _ in losses)
    trained = load_file(tmp_path / "run" / "model.safetensors")
    assert trained["lm_head.weight"].shape[0] == PADDED
    assert all(torch.isfinite(t).all() for t in trained.values())
    before = load_file(padded_dir / "model.safetensors")
    assert not torch.equal(trained["lm_head.weight"], before["lm_head.weight"])  # it trained


def test_reverse_kl_with_a_padded_student_on_an_exact_cache_is_refused(tmp_path, exact_cache, padded_dir):
    res = CliRunner().invoke(main, ["distill-from-cache", "--cache", str(exact_cache), "--student",
                                    str(padded_dir), "--out", str(tmp_path / "run"), "--max-steps",
                                    "1", "--use-cpu", "--kl-direction", "reverse"])
    assert res.exit_code == 2, res.output
    assert "student head of 320 rows on a cache whose teacher has 259 ids" in res.output
    assert "61 extra ids no probability" in res.output and "--kl-direction forward or jsd" in res.output
    assert not (tmp_path / "run").exists()


def test_the_online_full_vocabulary_baseline_refuses_a_padded_student(tmp_path, cache, padded_dir,
                                                                      tiny_teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    with pytest.raises(ConfigError, match=r"student's head \(320 rows\) to match the teacher's \(259\)"):
        distill_from_cache(cache, str(padded_dir), args_for(tmp_path / "run", max_steps=1),
                           teacher_model=teacher, online_top_k=None)


def test_a_student_head_smaller_than_the_cache_is_refused(tmp_path, cache, tiny_teacher_dir):
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    reader = CacheReader(cache)
    small = make_llama(len(tok) - 7, hidden=24, layers=2).config
    with pytest.raises(CacheMismatchError, match=f"has {len(tok) - 7} entries, fewer than the "
                                                 f"cache's teacher {len(tok)}"):
        check_student_matches_cache(reader, tok, small)


# ---------------------------------------------------------------- the pad token

def legacy_fingerprint(tokenizer) -> str:
    """The fingerprint caches recorded before the pad id was left out: vocabulary + BOS, EOS,
    PAD, UNK ids (written out here as it was)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {name: getattr(tokenizer, name, None)
               for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    h = hashlib.sha256()
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


def test_pad_token_alone_does_not_change_the_fingerprint(tiny_teacher_dir):
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    assert tok.pad_token_id is None
    padded = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    padded.pad_token = padded.eos_token  # the common fine-tuning set-up
    assert padded.pad_token_id == tok.eos_token_id
    assert tokenizer_fingerprint(padded) == tokenizer_fingerprint(tok)
    unk_pad = AutoTokenizer.from_pretrained(tiny_teacher_dir, pad_token="<unk>")
    assert tokenizer_fingerprint(unk_pad) == tokenizer_fingerprint(tok)
    # what does change the ids still changes it
    other_eos = AutoTokenizer.from_pretrained(tiny_teacher_dir, eos_token="<bos>")
    assert tokenizer_fingerprint(other_eos) != tokenizer_fingerprint(tok)
    assert not tokenizer_matches(other_eos, tokenizer_fingerprint(tok))


def test_caches_built_with_the_old_fingerprint_still_match(tiny_teacher_dir):
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    padded = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    padded.pad_token = padded.eos_token
    unk_pad = AutoTokenizer.from_pretrained(tiny_teacher_dir, pad_token="<unk>")
    for recorded_by in (tok, padded, unk_pad):
        old = legacy_fingerprint(recorded_by)
        for student in (tok, padded, unk_pad):
            assert tokenizer_matches(student, old)
    other_eos = AutoTokenizer.from_pretrained(tiny_teacher_dir, eos_token="<bos>")
    assert not tokenizer_matches(other_eos, legacy_fingerprint(tok))
    assert not tokenizer_matches(tok, "0" * 64)


def test_student_with_pad_as_eos_reads_new_and_old_caches(tmp_path, cache, student_dir):
    """distill-from-cache and evaluate accept a student whose tokenizer sets pad = eos, on a cache
    built now and on one that recorded the old fingerprint (the teacher's, without a pad)."""
    student = tmp_path / "student"
    shutil.copytree(student_dir, student)
    tok = AutoTokenizer.from_pretrained(student)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(student)
    assert AutoTokenizer.from_pretrained(student).pad_token_id == tok.eos_token_id

    old = tmp_path / "old-cache"
    shutil.copytree(cache, old)
    meta = json.loads((old / "zarr.json").read_text())
    settings = meta["attributes"]["unidistill"]["settings"]
    teacher_tok = AutoTokenizer.from_pretrained(student_dir)
    assert settings["tokenizer"]["fingerprint"] == tokenizer_fingerprint(teacher_tok)
    settings["tokenizer"]["fingerprint"] = legacy_fingerprint(teacher_tok)
    (old / "zarr.json").write_text(json.dumps(meta))

    for target in (cache, old):
        result = evaluate(str(student), cache=str(target), max_sequences=2, batch_size=2,
                          device="cpu", progress=False, num_workers=0)
        assert result.kl_to_teacher is not None and result.kl_to_teacher > 0
    trainer = distill_from_cache(old, str(student), args_for(tmp_path / "run", max_steps=1, save_steps=10))
    assert [s for s, *_ in train_losses(trainer)] == [1]


# ---------------------------------------------------------------- a GGUF teacher's quantization_config

GGUF_LEFTOVER = {"quant_method": "gguf", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "dequantize": False}  # what a GGUF teacher's config carries after from_pretrained


def with_gguf_leftover(src, dst):
    """A copy of the model folder ``src`` whose config.json carries a GGUF quantization_config,
    as a student made from a GGUF teacher's config does; its weights stay plain safetensors."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = GGUF_LEFTOVER
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_student_with_a_gguf_quantization_config_trains_as_the_plain_model(tmp_path, cache, student_dir,
                                                                         caplog):
    student = with_gguf_leftover(student_dir, tmp_path / "student")
    model = load_student(str(student))
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    plain = AutoModelForCausalLM.from_pretrained(student_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    assert "GGUF quantization_config" in caplog.text and "loaded as the plain model" in caplog.text

    trainer = distill_from_cache(cache, str(student), args_for(tmp_path / "run", max_steps=2, save_steps=10))
    assert [s for s, *_ in train_losses(trainer)] == [1, 2]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "quantization_config" not in saved  # the trained student is a plain model
    assert json.loads((student / "config.json").read_text())["quantization_config"] == GGUF_LEFTOVER


def test_evaluate_and_prune_load_it_as_the_plain_model(tmp_path, student_dir, text_file):
    student = with_gguf_leftover(student_dir, tmp_path / "student")
    got = evaluate(str(student), data=str(text_file), seq_len=24, max_sequences=3, batch_size=3,
                   device="cpu", progress=False)
    want = evaluate(str(student_dir), data=str(text_file), seq_len=24, max_sequences=3, batch_size=3,
                    device="cpu", progress=False)
    assert got.nll == want.nll and got.accuracy == want.accuracy
    prune(str(student), str(tmp_path / "pruned"), drop_layers=1, depth_method="last", device="cpu",
          progress=False)
    assert "quantization_config" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert getattr(pruned, "hf_quantizer", None) is None and pruned.config.num_hidden_layers == 1


def test_gguf_quantization_config_without_plain_weights_says_how_to_convert(tmp_path, student_dir):
    student = with_gguf_leftover(student_dir, tmp_path / "student")
    (student / "model.safetensors").unlink()
    (student / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"no plain weights .*model\.gguf.*unidistill prune --model "
                                          r"FILE\.gguf --out DIR"):
        load_student(str(student))


def test_a_really_quantized_student_is_refused_with_the_fix(tmp_path, cache, student_dir):
    student = tmp_path / "student"
    shutil.copytree(student_dir, student)
    config = json.loads((student / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (student / "config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(main, ["distill-from-cache", "--cache", str(cache), "--student", str(student),
                                    "--out", str(tmp_path / "run"), "--max-steps", "1", "--use-cpu"])
    assert res.exit_code == 2, res.output
    assert "is quantized (config.json quantization_config, quant_method bitsandbytes)" in res.output
    assert "model.dequantize()" in res.output

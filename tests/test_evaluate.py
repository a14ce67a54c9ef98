"""``unidistill evaluate`` against reference computations on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from unidistill.cli import main
from unidistill.errors import ConfigError
from unidistill.evaluate import evaluate
from unidistill.storage import CacheReader
from unidistill.trainer.losses import bucket_log_probs
from unidistill.trainer.run import distill_from_cache

from .conftest import args_for


def reference_nll(model_dir, ids: np.ndarray) -> float:
    """Mean next-token CE from the model's own full logits (what evaluate must reproduce)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids.astype(np.int64))).logits            # (N, L, V)
    targets = torch.from_numpy(ids[:, 1:].astype(np.int64))
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1)))


def reference_accuracy(model_dir, ids: np.ndarray) -> float:
    """Share of positions whose argmax of the model's own full logits is the actual next token."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids.astype(np.int64))).logits            # (N, L, V)
    hits = logits[:, :-1].argmax(-1) == torch.from_numpy(ids[:, 1:].astype(np.int64))
    return float(hits.sum()) / hits.numel()


def test_perplexity_on_text_matches_full_logits(tiny_teacher_dir, text_file):
    from transformers import AutoTokenizer

    from unidistill.text.data import iter_documents, pack_documents

    result = evaluate(str(tiny_teacher_dir), data=str(text_file), seq_len=24, max_sequences=5,
                      batch_size=2, device="cpu", progress=False)
    # evaluation reads the held-out split of a local file unless told otherwise
    ids = pack_documents(iter_documents(str(text_file), split="heldout"),
                         AutoTokenizer.from_pretrained(tiny_teacher_dir), 24, 5)
    assert (result.sequences, result.tokens) == (5, 5 * 24)
    assert result.nll == pytest.approx(reference_nll(tiny_teacher_dir, ids), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll))
    assert result.kl_to_teacher is None and result.cache is None
    # next-token accuracy, by hand from the full logits; it is a random model, so not 0 or 1
    accuracy = reference_accuracy(tiny_teacher_dir, ids)
    assert result.accuracy == pytest.approx(accuracy, abs=1e-12) and 0 < accuracy < 1
    vocab = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).config.vocab_size
    assert result.vocab_size == vocab and result.uniform_nll == pytest.approx(math.log(vocab))


def test_teacher_against_its_own_cache(tiny_teacher_dir, cache):
    """The teacher agrees with itself: KL ~ 0 (fp16 cache rounding only), top-1 = 100 %, and the
    cosine of each of its layers with the same cached layer is 1."""
    result = evaluate(str(tiny_teacher_dir), cache=str(cache), batch_size=4, device="cpu",
                      progress=False)
    reader = CacheReader(cache)
    ids = np.stack([reader.read(i)["input_ids"] for i in range(len(reader))])
    assert result.cache_nll == pytest.approx(reference_nll(tiny_teacher_dir, ids), rel=1e-5)
    assert result.cache_accuracy == pytest.approx(reference_accuracy(tiny_teacher_dir, ids), abs=1e-12)
    assert result.kl_to_teacher == pytest.approx(0.0, abs=1e-4)
    assert result.top1_agreement == pytest.approx(1.0)
    assert result.teacher_layers == [1, 2, 3, 4] and result.student_layers == [0, 1, 2, 3, 4]
    diag = [result.layer_cosine[j][c] for c, j in enumerate(result.teacher_layers)]
    assert diag == pytest.approx([1.0] * 4, abs=1e-3)
    assert result.layer_cosine[0][3] < 0.9  # the embeddings are not the last layer


def test_narrow_student_uses_its_trained_projectors(tmp_path, cache, student_dir):
    run = tmp_path / "run"
    trainer = distill_from_cache(cache, str(student_dir), args_for(run, max_steps=2, save_strategy="no"))
    result = evaluate(str(run), cache=str(cache), device="cpu", progress=False)
    # rows with trained projectors (student blocks 1, 2 -> teacher 2, 4) have cosines, others not
    assert [i for i, row in enumerate(result.layer_cosine) if row[0] is not None] == [1, 2]
    proj = trainer.model.projectors.eval()
    reader = CacheReader(cache)
    student = AutoModelForCausalLM.from_pretrained(run).eval()
    total, kl, hits, n = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(len(reader)):
            seq = reader.read(i, layers=[4])
            out = student(torch.from_numpy(seq["input_ids"].astype(np.int64))[None],
                          output_hidden_states=True)
            h_t = torch.from_numpy(seq["hidden"][4].astype(np.float32))[None]
            total += float(F.cosine_similarity(proj(2, out.hidden_states[2]), h_t, dim=-1).sum())
            t_ids = torch.from_numpy(seq["teacher_ids"].astype(np.int64))
            s_logq, t_logp = bucket_log_probs(out.logits[0], t_ids, torch.from_numpy(seq["teacher_logp"]),
                                              torch.from_numpy(seq["teacher_log_tail"]), 1.0)
            kl += float((t_logp.exp() * (t_logp - s_logq)).sum())
            hits += float((out.logits[0].argmax(-1) == t_ids[:, 0]).sum())
            n += h_t.shape[1]
    assert result.layer_cosine[2][3] == pytest.approx(total / n, abs=1e-4)  # column of layer 4
    assert result.kl_to_teacher == pytest.approx(kl / n, rel=1e-4) and kl > 0
    assert result.top1_agreement == pytest.approx(hits / n)


def test_cli_json_and_output_file(tmp_path, tiny_teacher_dir, cache, text_file):
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_teacher_dir), "--data", str(text_file),
                                    "--cache", str(cache), "--seq-len", "16", "--max-sequences", "3",
                                    "--device", "cpu", "--json", "--output", str(out)])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)  # progress and load messages go to stderr
    assert printed == json.loads(out.read_text())
    assert printed["sequences"] == 3 and math.isfinite(printed["perplexity"])
    assert printed["top1_agreement"] == pytest.approx(1.0)


def test_cli_human_output(tiny_teacher_dir, cache):
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_teacher_dir), "--cache", str(cache),
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "top-1 agreement  100.00%" in res.output and "KL to teacher" in res.output
    assert "cache accuracy" in res.output and "uniform guess    nll" in res.output


def test_reading_the_cache_in_workers_gives_the_same_evaluation(tmp_path, cache, student_dir,
                                                                monkeypatch):
    """evaluate reads a cache through a DataLoader: with 0 or 2 worker processes and a batch size
    that does not divide the cache, every metric is the same, and the workers do the reading."""
    import torch.utils.data

    from unidistill import evaluate as evaluate_module

    made = []
    real = evaluate_module.DataLoader
    monkeypatch.setattr(evaluate_module, "DataLoader",
                        lambda *a, **kw: made.append(kw["num_workers"]) or real(*a, **kw))
    results = [evaluate(str(student_dir), cache=str(cache), batch_size=3, device="cpu",
                        progress=False, num_workers=w).to_json() for w in (0, 2)]
    assert made == [0, 2]
    assert results[0] == results[1]
    with pytest.raises(ConfigError, match="num_workers is -1; it must be >= 0"):
        evaluate(str(student_dir), cache=str(cache), device="cpu", num_workers=-1)
    assert torch.utils.data.DataLoader is real


def test_needs_data_or_cache(tiny_teacher_dir):
    with pytest.raises(ConfigError, match="pass --data .* and/or --cache"):
        evaluate(str(tiny_teacher_dir), device="cpu")


def test_model_of_a_smaller_vocabulary_is_refused(tmp_path, cache, tiny_teacher_dir):
    # a larger head (padded beyond the tokenizer) is accepted: tests/test_user_models.py
    from transformers import AutoTokenizer

    from .conftest import make_llama

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    make_llama(len(tok) - 7, hidden=24, layers=2).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path), "--cache", str(cache),
                                    "--device", "cpu"])
    assert res.exit_code == 2
    assert f"{len(tok) - 7} entries" in res.output and f"cache's teacher {len(tok)}" in res.output


def test_cli_num_workers_reaches_evaluate(tiny_teacher_dir, cache):
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_teacher_dir), "--cache", str(cache),
                                    "--device", "cpu", "--num-workers", "-1"])
    assert res.exit_code != 0 and "num_workers is -1" in res.output

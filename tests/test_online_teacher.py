"""The online baseline: a live teacher gives the same targets a cache holds, through the same
losses, so offline and online runs can be compared like for like."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from unidistill.errors import ConfigError
from unidistill.storage import CacheReader
from unidistill.storage.reader import decode_hidden
from unidistill.trainer.online_teacher import OnlineTeacher
from unidistill.trainer.run import distill_from_cache

from .conftest import args_for, train_losses


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)


def test_online_top_k_matches_what_the_cache_stored(cache, teacher):
    reader = CacheReader(cache)
    seq = reader.read(3, layers=[2, 4])
    online = OnlineTeacher(teacher, layers=[2, 4], kd_top_k=reader.layout.stored_k)
    got = online(torch.from_numpy(seq["input_ids"].astype(np.int64))[None])
    # the cache stores fp16 log-probs; the online teacher keeps fp32
    torch.testing.assert_close(got.logp[0], torch.from_numpy(seq["teacher_logp"]).float(),
                               atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(got.log_tail[0],
                               torch.from_numpy(seq["teacher_log_tail"]).float(), atol=2e-3, rtol=1e-3)
    assert torch.equal(got.ids[0, :, 0], torch.from_numpy(seq["teacher_ids"][:, 0]).long())
    assert got.is_sparse and not got.is_exact
    for j in (2, 4):
        torch.testing.assert_close(got.hidden[j][0],
                                   decode_hidden(seq["hidden"][j], reader.layout.hidden_dtype).float(),
                                   atol=2e-3, rtol=1e-3)
    online.close()


def test_online_full_vocab_gives_the_head_and_final_state(teacher):
    online = OnlineTeacher(teacher, kd_top_k=None)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 9))
    got = online(ids)
    assert got.head.weight is teacher.get_output_embeddings().weight
    logits = got.head.logits(got.final_hidden)
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)
    assert got.is_exact and got.ids is None


def test_online_top_k_above_the_vocabulary_is_refused(teacher):
    with pytest.raises(ConfigError, match=r"top_k is 100000, but it must be between 1 and the vocabulary size"):
        OnlineTeacher(teacher, kd_top_k=100_000)


def test_online_top_k_run_tracks_the_cached_run(tmp_path, cache, student_dir, teacher):
    offline = distill_from_cache(cache, str(student_dir), args_for(tmp_path / "off", max_steps=2,
                                                                   save_strategy="no"))
    online = distill_from_cache(cache, str(student_dir), args_for(tmp_path / "on", max_steps=2,
                                                                  save_strategy="no"),
                                teacher_model=teacher, online_top_k=16)
    for a, b in zip(train_losses(offline), train_losses(online)):
        assert b == pytest.approx(a, rel=2e-3)  # only the cache's fp16 rounding differs


def test_online_full_vocab_kl_and_hidden_loss_vanish_for_the_teacher_as_student(
        tmp_path, cache, tiny_teacher_dir, teacher):
    trainer = distill_from_cache(cache, str(tiny_teacher_dir), args_for(
        tmp_path / "self", max_steps=1, save_strategy="no", kd_temperature=2.0,
        layer_map="uniform", hidden_loss="mse"), teacher_model=teacher, online_top_k=None)
    (_, _, ce, kl, hidden), = train_losses(trainer)
    assert kl == pytest.approx(0.0, abs=1e-6)
    assert hidden == pytest.approx(0.0, abs=1e-9)
    assert ce > 1.0  # a random teacher is far from the data: the CE term is real

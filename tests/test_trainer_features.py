"""The usual Trainer features keep working with distillation: gradient accumulation, gradient
checkpointing, bf16, schedulers, TensorBoard, and clipping that covers the projectors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from unidistill.trainer.run import distill_from_cache

from .conftest import args_for, train_losses


def params_of(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir).state_dict()


def sgd(out, **kw):
    """Plain SGD (no momentum, no decay): the update is exactly -lr * (clipped) gradient."""
    base = dict(optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", save_strategy="no",
                max_steps=1, weight_decay=0.0)
    base.update(kw)
    return args_for(out, **base)


def test_gradient_accumulation_equals_one_large_batch(tmp_path, cache, student_dir):
    # every sequence has the same number of real tokens, so 2 x 2 accumulated == 1 x 4
    one = distill_from_cache(cache, str(student_dir), sgd(tmp_path / "one", max_grad_norm=0.0,
                                                          per_device_train_batch_size=4))
    two = distill_from_cache(cache, str(student_dir), sgd(tmp_path / "two", max_grad_norm=0.0,
                                                          per_device_train_batch_size=2,
                                                          gradient_accumulation_steps=2))
    before = params_of(student_dir)
    a, b = params_of(tmp_path / "one"), params_of(tmp_path / "two")
    for name in a:
        delta_a, delta_b = a[name] - before[name], b[name] - before[name]
        assert delta_a.abs().sum() > 0
        torch.testing.assert_close(delta_b, delta_a, rtol=1e-4, atol=1e-6)
    assert train_losses(two)[0][1] == pytest.approx(train_losses(one)[0][1], rel=1e-5)
    torch.testing.assert_close(two.model.projectors.state_dict()["proj.1.weight"],
                               one.model.projectors.state_dict()["proj.1.weight"], rtol=1e-4, atol=1e-6)


def test_projector_gradients_are_clipped_with_the_students(tmp_path, cache, student_dir):
    lr, max_norm = 0.5, 1e-3
    init = distill_from_cache(cache, str(student_dir),
                              sgd(tmp_path / "zero", learning_rate=0.0)).model.projectors.state_dict()
    trainer = distill_from_cache(cache, str(student_dir),
                                 sgd(tmp_path / "run", learning_rate=lr, max_grad_norm=max_norm))
    before, after = params_of(student_dir), params_of(tmp_path / "run")
    student_sq = sum(float((after[k] - before[k]).square().sum()) for k in after)
    proj_sq = sum(float((v - init[k]).square().sum()) for k, v in trainer.model.projectors.state_dict().items())
    assert proj_sq > 0 and student_sq > 0
    # SGD: the whole update is lr * the clipped gradient, so its norm is at most lr * max_norm
    assert math.sqrt(student_sq + proj_sq) <= lr * max_norm * 1.001
    # the logged norm is the pre-clip norm of student and projector gradients together
    assert trainer.state.log_history[0]["grad_norm"] > max_norm


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, cache, student_dir):
    plain = distill_from_cache(cache, str(student_dir), args_for(tmp_path / "a", max_steps=2,
                                                                 save_strategy="no"))
    ckpt = distill_from_cache(cache, str(student_dir), args_for(tmp_path / "b", max_steps=2,
                                                                save_strategy="no",
                                                                gradient_checkpointing=True))
    assert ckpt.model.student.is_gradient_checkpointing
    for a, b in zip(train_losses(plain), train_losses(ckpt)):
        assert b == pytest.approx(a, rel=1e-5)


def test_bf16_training_runs_and_tracks_fp32(tmp_path, cache, student_dir):
    fp32 = distill_from_cache(cache, str(student_dir), args_for(tmp_path / "a", max_steps=2,
                                                                save_strategy="no"))
    bf16 = distill_from_cache(cache, str(student_dir), args_for(tmp_path / "b", max_steps=2,
                                                                save_strategy="no", bf16=True))
    for (_, *a), (_, *b) in zip(train_losses(fp32), train_losses(bf16)):
        assert all(math.isfinite(x) for x in b)
        # bf16 keeps ~3 significant digits: the terms agree to a few per cent, not exactly
        assert b == pytest.approx(a, rel=3e-2)
    assert train_losses(bf16)[0] != train_losses(fp32)[0]  # autocast really ran in bf16


def test_scheduler_drives_the_projector_group_too(tmp_path, cache, student_dir):
    trainer = distill_from_cache(cache, str(student_dir), args_for(
        tmp_path / "run", max_steps=4, save_strategy="no", lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=1, learning_rate=1e-3,
        projector_learning_rate=1e-2))
    groups = trainer.optimizer.param_groups
    student_lr, projector_lr = groups[0]["lr"], groups[-1]["lr"]
    assert student_lr == pytest.approx(1e-4)  # decayed to min_lr_rate * peak
    assert projector_lr == pytest.approx(1e-3)  # the same schedule on the projector's own peak
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged[0] == 0 and logged[1] == pytest.approx(1e-3)  # one warmup step, then the peak
    assert logged[1] > logged[2] > logged[3]


def test_tensorboard_gets_every_loss_term(tmp_path, cache, student_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    distill_from_cache(cache, str(student_dir), args_for(
        tmp_path / "run", max_steps=2, save_strategy="no", report_to=["tensorboard"]))
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))  # <out>/runs/<date_host>/
    assert events, "no TensorBoard event file written"
    acc = event_accumulator.EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/loss_kl", "train/loss_hidden"} <= tags
    assert [e.step for e in acc.Scalars("train/loss_kl")] == [1, 2]


def test_hidden_warmup_steps_train_the_hidden_loss_alone(tmp_path, cache, student_dir):
    # reference: one SGD step on gamma * hidden with the logit terms weighted 0 (their gradient is 0)
    distill_from_cache(cache, str(student_dir), sgd(tmp_path / "ref", alpha=0.0, beta=0.0, gamma=1.0,
                                                    max_grad_norm=0.0))
    warm = distill_from_cache(cache, str(student_dir), sgd(
        tmp_path / "warm", max_steps=2, hidden_warmup_steps=1, max_grad_norm=0.0, learning_rate=0.5,
        logging_steps=1, save_strategy="steps", save_steps=1))
    before = params_of(student_dir)
    after_ref, after_warm = params_of(tmp_path / "ref"), params_of(tmp_path / "warm" / "checkpoint-1")
    for name in after_ref:
        torch.testing.assert_close(after_warm[name], after_ref[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(after_warm[k], before[k]) for k in after_warm)
    logs = [h for h in warm.state.log_history if "loss" in h]
    first, second = logs[0], logs[1]
    # step 1 logs the hidden loss only (as the loss itself); step 2 logs the full compound loss
    assert "loss_ce" not in first and "loss_kl" not in first
    assert first["loss"] == pytest.approx(first["loss_hidden"], rel=1e-5)
    a = warm.args
    full = a.alpha * second["loss_ce"] + a.beta * a.kd_temperature ** 2 * second["loss_kl"] \
        + a.gamma * second["loss_hidden"]
    assert second["loss"] == pytest.approx(full, rel=1e-4)


@pytest.mark.parametrize("kw, needle", [
    (dict(hidden_warmup_steps=2, gamma=0.0), "gamma > 0"),
    (dict(hidden_warmup_steps=4, max_steps=4), "not below max_steps"),
    (dict(hidden_warmup_steps=-1), ">= 0"),
])
def test_hidden_warmup_refuses_what_it_cannot_do(tmp_path, kw, needle):
    from unidistill.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        args_for(tmp_path / "run", **kw)

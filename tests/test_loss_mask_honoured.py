"""Masked positions contribute nothing to any loss term: a batch of a packed chat cache goes
through the trainer's compute_loss with its teacher targets, and the ids of padding, replaced by
garbage wherever the loss mask is 0; the loss and every gradient stay the same (bit for bit on
CPU), while a change at one unmasked position moves them. Also evaluate's sums."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate
from transformers import AutoModelForCausalLM

from tests.conftest import args_for
from unidistill.evaluate import _score_batch, _Totals
from unidistill.models.batch import TokenFields
from unidistill.models.targets import TeacherTargets
from unidistill.trainer.dataset import CacheDataset
from unidistill.trainer.distill_trainer import UniversalDistillationTrainer
from unidistill.trainer.projectors import HiddenProjectors
from unidistill.trainer.student import StudentWithProjectors

PAIRS = {1: 2, 2: 4}
TEACHER_FIELDS = ("teacher_logp", "teacher_log_tail", "teacher_ids", "teacher_hidden_2", "teacher_hidden_4")


def _trainer(tmp_path, student_dir, chat_cache, **kw):
    args = args_for(tmp_path / "run", max_steps=2, **kw)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    torch.manual_seed(0)
    wrapper = StudentWithProjectors(model, HiddenProjectors(PAIRS, 24, 32))
    dataset = CacheDataset(chat_cache, layers=sorted(PAIRS.values()))
    trainer = UniversalDistillationTrainer(model=wrapper, args=args, train_dataset=dataset,
                                           data_collator=default_collate, hidden_pairs=PAIRS)
    return trainer, default_collate(dataset.__getitems__([0, 1]))


def _corrupt(batch: dict, where: torch.Tensor) -> dict:
    """Garbage in every teacher field at the positions ``where`` (B, L), and in the ids of
    padding."""
    g = torch.Generator().manual_seed(1)
    out = dict(batch)
    for name in TEACHER_FIELDS:
        t = batch[name]
        w = where.reshape(*where.shape, *([1] * (t.dim() - 2))).expand_as(t)
        if t.dtype.is_floating_point:
            noise = (torch.randn(t.shape, generator=g) * 50).to(t.dtype)
        else:
            noise = torch.randint(0, 100, t.shape, generator=g).to(t.dtype)
        out[name] = torch.where(w, noise, t)
    pad = batch["document_ids"] == -2
    out["input_ids"] = torch.where(pad, torch.randint(0, 100, pad.shape, generator=g), batch["input_ids"])
    return out


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("kw", [
    dict(alpha=1.0, beta=0.0, gamma=0.0),
    dict(alpha=0.0, beta=1.0, gamma=0.0, kd_temperature=1.0),
    dict(alpha=0.0, beta=1.0, gamma=0.0, kd_temperature=2.0, kl_direction="reverse"),
    dict(alpha=0.0, beta=1.0, gamma=0.0, kd_temperature=1.0, kl_direction="jsd"),
    dict(alpha=0.0, beta=0.0, gamma=1.0, hidden_loss="mse"),
    dict(alpha=0.0, beta=0.0, gamma=1.0, hidden_loss="nmse"),
    dict(alpha=0.0, beta=0.0, gamma=1.0, hidden_loss="cnmse"),
    dict(alpha=0.0, beta=0.0, gamma=1.0, hidden_loss="cosine"),
    dict(alpha=0.4, beta=0.4, gamma=0.2, hidden_warmup_steps=1),  # the warm-up branch
    dict(alpha=0.4, beta=0.4, gamma=0.2),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_masked_positions_change_nothing_and_unmasked_ones_do(tmp_path, chat_student_dir, chat_cache, kw):
    trainer, batch = _trainer(tmp_path, chat_student_dir, chat_cache, **kw)
    mask = TokenFields.from_fields(batch).loss_mask()
    assert 0 < int(mask.sum()) < mask.numel()
    loss, grads = _loss_and_grads(trainer, batch)
    loss2, grads2 = _loss_and_grads(trainer, _corrupt(batch, ~mask))
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    one = torch.zeros_like(mask)
    one.view(-1)[int(mask.view(-1).nonzero()[0])] = True  # the first trained position
    moved = _corrupt(batch, one)
    if kw["alpha"] == 1.0:  # CE alone reads no teacher field: change the token it predicts
        row, t = divmod(int(mask.view(-1).nonzero()[0]), mask.shape[1])
        moved["input_ids"] = batch["input_ids"].clone()
        moved["input_ids"][row, t + 1] = (batch["input_ids"][row, t + 1] + 1) % 100
    loss3, _ = _loss_and_grads(trainer, moved)
    assert not torch.equal(loss, loss3)


def test_an_all_masked_batch_gives_zero_not_nan(tmp_path, chat_student_dir, chat_cache):
    trainer, batch = _trainer(tmp_path, chat_student_dir, chat_cache)
    batch = dict(batch, target_mask=torch.zeros_like(batch["target_mask"]))
    loss, grads = _loss_and_grads(trainer, batch)
    assert float(loss) == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_evaluate_sums_ignore_masked_positions(tmp_path, chat_student_dir, chat_cache):
    trainer, batch = _trainer(tmp_path, chat_student_dir, chat_cache)
    model = trainer.model.student.eval()
    mask = TokenFields.from_fields(batch).loss_mask()

    def score(b):
        totals = _Totals(3, 2)
        _score_batch(model, TokenFields.from_fields(b), totals, TeacherTargets.from_fields(b),
                     {i: (lambda h, i=i: trainer.model.projectors(i, h)) for i in PAIRS}, [2, 4])
        return totals
    a, b = score(batch), score(_corrupt(batch, ~mask))
    assert (a.ce, a.kl, a.agree, a.correct, a.ce_n, a.kl_n) == (b.ce, b.kl, b.agree, b.correct, b.ce_n, b.kl_n)
    assert (a.cos == b.cos).all() and a.cos_n == b.cos_n == int(mask.sum()) == a.positions
    assert a.kl_n == int(mask.sum())

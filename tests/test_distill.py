"""Phase two end to end: tiny teacher -> cache -> narrower, shallower student."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.errors import CacheIncompleteError, CacheMismatchError, ConfigError
from unidistill.trainer.arguments import DistillationArguments
from unidistill.trainer.run import RUN_RECORD, distill_from_cache

from .conftest import make_llama, make_tokenizer


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher_dir, text_file):
    out = tmp_path_factory.mktemp("cache") / "c"
    cfg = BuildConfig(teacher=str(tiny_teacher_dir), data=str(text_file), out=str(out), seq_len=32,
                      top_k=16, layers="all", max_sequences=16, batch_size=4, shard_size=4,
                      device="cpu")
    build_cache(cfg, progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_teacher_dir):
    """2 blocks of width 24 (teacher: 4 blocks of width 32), same tokenizer."""
    path = tmp_path_factory.mktemp("student")
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    make_llama(len(tok), hidden=24, layers=2, intermediate=48, heads=4, kv_heads=2, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def args_for(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, save_steps=2, save_strategy="steps", report_to=[], use_cpu=True,
                seed=0, data_seed=0, alpha=0.4, beta=0.4, gamma=0.2, kd_temperature=2.0,
                layer_map="uniform", hidden_loss="cosine", disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return DistillationArguments(**base)


def train_losses(trainer):
    return [(h["step"], h["loss"], h["loss_ce"], h["loss_kl"], h["loss_hidden"])
            for h in trainer.state.log_history if "loss_ce" in h]


def test_golden_run_and_resume(tmp_path, cache, student_dir):
    before = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    trainer = distill_from_cache(cache, str(student_dir), args_for(tmp_path / "run"))
    losses = train_losses(trainer)
    assert [s for s, *_ in losses] == [1, 2, 3, 4]
    # pinned reference run (step, loss, ce, kl, hidden); any change to the loss math, the data
    # order, the layer map or the projector init moves these
    golden = [(1, 3.748986, 5.545527, 0.830387, 1.010786), (2, 3.726195, 5.519360, 0.828579, 0.963622),
              (3, 3.711382, 5.499899, 0.825535, 0.952827), (4, 3.695781, 5.479560, 0.823627, 0.930767)]
    for got, want in zip(losses, golden):
        assert got == pytest.approx(want, rel=1e-4)
    # every term is active and finite, and the compound equals its weighted parts
    for _, loss, ce, kl, hid in losses:
        assert ce > 0 and kl > 0 and hid > 0
        assert loss == pytest.approx(0.4 * ce + 0.4 * 4.0 * kl + 0.2 * hid, rel=1e-3)

    # the student and the projectors learned
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    changed = [k for k, v in final.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    proj = load_file(tmp_path / "run" / "projectors.safetensors")
    assert set(proj) == {"proj.1.weight", "proj.2.weight"} and proj["proj.1.weight"].shape == (32, 24)
    ckpt2 = load_file(tmp_path / "run" / "checkpoint-2" / "projectors.safetensors")
    assert not torch.equal(ckpt2["proj.1.weight"], proj["proj.1.weight"])
    # the final folder is a plain HF model: no projector keys inside the model weights
    assert not any(k.startswith("proj") for k in final.state_dict())
    record = json.loads((tmp_path / "run" / RUN_RECORD).read_text())
    assert record["hidden_pairs"] == {"1": 2, "2": 4}
    assert len(record["cache"]["fingerprint"]) == 64

    # resume from checkpoint-2 continues the same loss trajectory
    resumed = distill_from_cache(cache, str(student_dir), args_for(tmp_path / "run"),
                                 resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    again = [row for row in train_losses(resumed) if row[0] > 2]  # history before 2 is restored
    assert [s for s, *_ in again] == [3, 4]
    for a, b in zip(again, losses[2:]):
        assert a == pytest.approx(b, rel=1e-5)

"""Faults lose nothing: builds SIGKILLed at random moments, a store that fails mid-write, a
training run killed between checkpoints, and several readers on one cache at once."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.errors import CacheError
from unidistill.storage import CacheReader
from unidistill.storage.verify import verify_cache
from unidistill.storage.manifest import UNITS_DIR, read_unit_marker

from .test_cache_resume import build_args, read_all, run_cli, slow_build_driver

REPO = Path(__file__).resolve().parents[1]
N_UNITS = 12  # build_args: 24 sequences, 2 per shard

# A build whose teacher calls are slowed, so a kill can land anywhere in it.
SLOW_BUILD = slow_build_driver(0.15)


def subprocess_env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def markers(out: Path) -> dict[int, dict]:
    return {u: m for u in range(N_UNITS) if (m := read_unit_marker(out, u)) is not None}


@pytest.fixture(scope="module")
def reference_build(tmp_path_factory, tiny_teacher_dir, text_file):
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert run_cli(build_args(tiny_teacher_dir, text_file, out)).exit_code == 0
    return out, read_all(out), CacheReader(out).manifest["fingerprint"]


def test_sigkill_at_ten_random_moments_each_resumes_to_the_same_cache(tmp_path, tiny_teacher_dir,
                                                                      text_file, reference_build):
    _, reference, fingerprint = reference_build
    rng = random.Random(20261125)
    # a moment = after a random number of committed units plus a random part of the next one,
    # so kills land before the first commit, between commits and inside unit writes
    # (one unit = one slowed teacher call of 0.15 s, so the kill stays inside the build)
    moments = [(rng.randrange(0, N_UNITS - 2), rng.uniform(0.0, 0.15)) for _ in range(10)]
    landed = []
    for i, (after_units, extra_s) in enumerate(moments):
        out = tmp_path / f"killed-{i}"
        proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, *build_args(tiny_teacher_dir, text_file, out)],
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / UNITS_DIR).is_dir() and len(list((out / UNITS_DIR).glob("*.json"))) >= after_units:
                break
            time.sleep(0.01)
        time.sleep(extra_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        before = markers(out)
        landed.append(len(before))
        assert run_cli(build_args(tiny_teacher_dir, text_file, out)).exit_code == 0
        reader = CacheReader(out)
        assert reader.manifest["build"]["units_computed_this_run"] == N_UNITS - len(before)
        after = markers(out)
        for u, m in before.items():  # committed units were kept, not recomputed
            assert after[u] == m, f"moment {i}: unit {u} was rewritten"
        got = read_all(out)
        for name in reference:
            np.testing.assert_array_equal(got[name], reference[name], err_msg=f"moment {i}: {name}")
        assert reader.manifest["fingerprint"] == fingerprint
        assert verify_cache(out).ok
    # the kills really were spread over the build
    assert min(landed) <= 2 and max(landed) >= N_UNITS // 2, landed


def test_a_failing_store_stops_with_a_clear_error_and_the_cache_resumes(tmp_path, tiny_teacher_dir,
                                                                        text_file, reference_build,
                                                                        monkeypatch):
    _, reference, fingerprint = reference_build
    out = tmp_path / "full-disk"
    real_set = zarr.storage.LocalStore.set
    writes = {"n": 0}

    async def failing_set(self, key, value):  # the disk fills up after a while
        if "/c/" in key or key.startswith("c/"):
            writes["n"] += 1
            if writes["n"] > 40:
                raise OSError(errno.ENOSPC, "No space left on device", key)
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    cfg = BuildConfig(teacher=str(tiny_teacher_dir), data=str(text_file), out=str(out), seq_len=32,
                      top_k=8, layers="1,4", max_sequences=24, batch_size=2, shard_size=2, device="cpu")
    with pytest.raises(CacheError) as err:
        build_cache(cfg, progress=False, log=lambda m: None)
    message = str(err.value)
    assert "out of disk space" in message and str(out) in message and "rerun" in message
    committed = markers(out)
    assert 0 < len(committed) < N_UNITS
    report = verify_cache(out)  # what was committed is intact; the rest is named as not committed
    assert {p.unit for p in report.problems} == set(range(N_UNITS)) - set(committed)
    assert all("not committed" in p.reason for p in report.problems)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)  # space freed: rerun
    manifest = build_cache(cfg, progress=False, log=lambda m: None)
    assert manifest["build"]["units_computed_this_run"] == N_UNITS - len(committed)
    assert all(markers(out)[u] == m for u, m in committed.items())
    got = read_all(out)
    for name in reference:
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)
    assert manifest["fingerprint"] == fingerprint


# Training slowed after its second checkpoint, so the kill lands between checkpoints.
SLOW_TRAIN = """
import sys, time
from unidistill.trainer.distill_trainer import UniversalDistillationTrainer as DistillationTrainer
_step = DistillationTrainer.training_step
def slow(self, *a, **kw):
    if self.state.global_step >= 2:
        time.sleep(30)
    return _step(self, *a, **kw)
DistillationTrainer.training_step = slow
from unidistill.cli import main
sys.exit(main())
"""


def train_args(cache, student, out, *extra):
    return ["distill-from-cache", "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--max-steps", "4", "--per-device-train-batch-size", "4", "--learning-rate", "1e-3",
            "--logging-steps", "1", "--save-steps", "1", "--seed", "0", "--alpha", "0.4",
            "--beta", "0.4", "--gamma", "0.2", "--use-cpu", *extra]


def test_training_killed_between_checkpoints_resumes_with_projectors_and_data_position(
        tmp_path, cache, student_dir):
    straight = tmp_path / "straight"
    assert run_cli(train_args(cache, student_dir, straight)).exit_code == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *train_args(cache, student_dir, out)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint-2" / "trainer_state.json").is_file():
            break
        time.sleep(0.05)
    time.sleep(0.5)  # inside step 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "checkpoint-3").exists() and not (out / "model.safetensors").exists()

    assert run_cli(train_args(cache, student_dir, out, "--resume-from-checkpoint", "last")).exit_code == 0
    # the resumed run saw the same batches (data position) with the same projectors and optimizer
    # state, so it ends where the uninterrupted one did
    def history(run):
        state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
        return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]

    assert [s for s, _ in history(out)] == [1, 2, 3, 4]
    for (s, a), (_, b) in zip(history(out), history(straight)):
        assert a == pytest.approx(b, rel=1e-5), f"step {s}"
    got, want = load_file(out / "projectors.safetensors"), load_file(straight / "projectors.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def _digest_every_read(root: str) -> str:
    reader = CacheReader(root)
    h = hashlib.sha256()
    for i in range(len(reader)):
        seq = reader.read(i)
        for key in sorted(k for k in seq if k != "hidden"):
            h.update(key.encode() + np.ascontiguousarray(seq[key]).tobytes())
        for j in sorted(seq["hidden"]):
            h.update(np.ascontiguousarray(seq["hidden"][j]).tobytes())
    return h.hexdigest()


def _verify(root: str) -> tuple[bool, str]:
    report = verify_cache(root)
    return report.ok, str(report)


def test_four_concurrent_readers_and_a_verify_agree(reference_build):
    root, _, _ = reference_build
    alone = _digest_every_read(str(root))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(5) as pool:
        readers = [pool.apply_async(_digest_every_read, (str(root),)) for _ in range(4)]
        verify = pool.apply_async(_verify, (str(root),))
        digests = [r.get(timeout=300) for r in readers]
        ok, report = verify.get(timeout=300)
    assert digests == [alone] * 4
    assert ok, report

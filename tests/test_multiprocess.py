"""Both phases as two processes on the CPU (gloo): the same cache, the same training, saved once.

Each multi-process run is a real launch in a subprocess (``torchrun --standalone`` or
``accelerate launch --multi_gpu``, which on a machine without GPUs starts the same
``torch.distributed.run`` workers). A small driver script patches in a failure or records what
each process holds, then runs the ordinary ``unidistill`` command line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from unidistill.cli import main
from unidistill.storage import CacheReader
from unidistill.storage.manifest import read_manifest, read_unit_marker
from unidistill.trainer.run_record import RUN_RECORD

from .test_cache_resume import assert_same_cache, build_args

REPO = Path(__file__).resolve().parents[1]
N_UNITS = 12  # build_args: 24 sequences, shard size 2
LAUNCH_TIMEOUT = 240  # seconds; a hung process group fails the test instead of hanging it

# cache-build with process FAIL_RANK raising on its second teacher call (the launch of its second
# unit's batch; the first unit's batch, already run, is still collected and committed), and
# process SLOW_RANK sleeping SLOW_SECONDS before each of its teacher calls (a slow share).
BUILD_DRIVER = """
import os, sys, time
from unidistill.cache_builder import capture
_call, _n = capture.TeacherRunner.launch, [0]
def patched(self, ids, **kw):
    _n[0] += 1
    if os.environ.get("RANK") == os.environ.get("SLOW_RANK"):
        time.sleep(float(os.environ["SLOW_SECONDS"]))
    if os.environ.get("RANK") == os.environ.get("FAIL_RANK") and _n[0] == 2:
        raise RuntimeError("injected failure")
    return _call(self, ids, **kw)
capture.TeacherRunner.launch = patched
from unidistill.cli import main
sys.exit(main())
"""

# distill-from-cache that dumps, per process, the projectors and student it ends with, the
# trainer's log, and every save it makes (projectors, run record, model with is_main_process).
TRAIN_DRIVER = """
import json, os, sys
import safetensors.torch
from transformers import PreTrainedModel
from unidistill.trainer import distill_trainer as dt, run, run_record
RANK, DUMP = os.environ.get("RANK", "0"), os.environ["DUMP_DIR"]
def note(what):
    with open(os.path.join(DUMP, f"saves_rank{RANK}.txt"), "a") as f:
        f.write(what + "\\n")
_save_projectors, _record = dt.save_projectors, run_record.write_run_record
def save_projectors(projectors, directory, *rest):
    note(f"projectors {os.path.basename(str(directory))}")
    return _save_projectors(projectors, directory, *rest)
def write_run_record(folder, record):
    note(f"run record {os.path.basename(str(folder))}")
    return _record(folder, record)
_save_pretrained = PreTrainedModel.save_pretrained
def save_pretrained(self, save_directory, *a, is_main_process=True, **k):
    if is_main_process:
        note(f"model {os.path.basename(str(save_directory))}")
    return _save_pretrained(self, save_directory, *a, is_main_process=is_main_process, **k)
dt.save_projectors, dt.write_run_record, run.write_run_record = (
    save_projectors, write_run_record, write_run_record)
PreTrainedModel.save_pretrained = save_pretrained
_train = dt.UniversalDistillationTrainer.train
def train(self, *a, **k):
    out = _train(self, *a, **k)
    wrapper = self.accelerator.unwrap_model(self.model)
    tensors = {f"projectors.{n}": t for n, t in wrapper.projectors.state_dict().items()}
    tensors.update({f"model.{n}": t for n, t in wrapper.student.state_dict().items()})
    safetensors.torch.save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()},
                                os.path.join(DUMP, f"rank{RANK}.safetensors"))
    with open(os.path.join(DUMP, f"rank{RANK}.json"), "w") as f:
        json.dump({"processes": self.accelerator.num_processes,
                   "distributed_type": str(self.accelerator.distributed_type)}, f)
    return out
dt.UniversalDistillationTrainer.train = train
from unidistill.cli import main
sys.exit(main())
"""


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, driver: str, args, **env):
    script = tmp_path / "driver.py"
    script.write_text(driver)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), *map(str, args)],
                          env=_env(**env), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def accelerate_launch(args):
    accelerate = Path(sys.executable).parent / "accelerate"
    return subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", str(_free_port()), "-m", "unidistill.cli",
                           *map(str, args)],
                          env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, tiny_teacher_dir, text_file):
    out = tmp_path_factory.mktemp("mp") / "one-process"
    result = CliRunner().invoke(main, build_args(tiny_teacher_dir, text_file, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_two_process_build_equals_one_process_build(tmp_path, tiny_teacher_dir, text_file,
                                                   reference_cache):
    out = tmp_path / "two-processes"
    result = accelerate_launch(build_args(tiny_teacher_dir, text_file, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_cache(out, reference_cache)
    manifest = CacheReader(out).manifest
    assert manifest["build"]["processes"] == 2 and manifest["build"]["units_computed_this_run"] == N_UNITS
    # two writers, round-robin over the units: each process committed every other unit
    runs = [read_unit_marker(out, u)["run_id"] for u in range(N_UNITS)]
    assert len(set(runs)) == 2 and set(runs[0::2]).isdisjoint(runs[1::2])
    assert result.stderr.count("cache complete") == 1  # logged by the main process only


def test_failure_in_one_process_stops_both_and_resume_resplits(tmp_path, tiny_teacher_dir, text_file,
                                                               reference_cache):
    out = tmp_path / "c"
    failed = torchrun(tmp_path, BUILD_DRIVER, build_args(tiny_teacher_dir, text_file, out), FAIL_RANK="1")
    assert failed.returncode != 0
    assert "RuntimeError: injected failure" in failed.stderr
    assert "process 1 of 2 failed (RuntimeError: injected failure); process 0 stops too" in failed.stderr
    # process 1 committed its first unit (1) only; process 0 stopped at the failure flag after
    # some of its own units (0, 2, ...: a prefix of its share, however far it had got)
    committed = {u for u in range(N_UNITS) if read_unit_marker(out, u) is not None}
    assert 1 in committed and 3 not in committed
    mine = sorted(u for u in committed if u % 2 == 0)
    assert mine == list(range(0, 2 * len(mine), 2))
    assert read_manifest(out)["status"] == "building"

    resumed = torchrun(tmp_path, BUILD_DRIVER, build_args(tiny_teacher_dir, text_file, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(committed)}/12 units already committed" in resumed.stderr
    assert CacheReader(out).manifest["build"]["units_computed_this_run"] == N_UNITS - len(committed)
    # the remaining units were split again, round-robin over the processes
    remaining = [u for u in range(N_UNITS) if u not in committed]
    runs = {u: read_unit_marker(out, u)["run_id"] for u in remaining}
    assert len({runs[u] for u in remaining[0::2]}) == 1 and len({runs[u] for u in remaining[1::2]}) == 1
    assert runs[remaining[0]] != runs[remaining[1]]
    assert_same_cache(out, reference_cache)


def test_a_failing_process_stops_a_slow_share_at_once(tmp_path, tiny_teacher_dir, text_file):
    """Process 1 fails on its second unit while process 0 takes 3 s a unit over a share of 6
    (18 s). The failure flag stops process 0 before its next unit: it commits at most 2 units, and
    the message naming process 1 comes well within the collective timeout (40 s), which process
    1 would otherwise reach first while process 0 finished its share."""
    out = tmp_path / "c"
    failed = torchrun(tmp_path, BUILD_DRIVER, build_args(tiny_teacher_dir, text_file, out),
                      FAIL_RANK="1", SLOW_RANK="0", SLOW_SECONDS="3", UNIDISTILL_DIST_TIMEOUT="40")
    assert failed.returncode != 0
    assert "process 1 of 2 failed (RuntimeError: injected failure); process 0 stops too" in failed.stderr
    committed = {u for u in range(N_UNITS) if read_unit_marker(out, u) is not None}
    assert 1 in committed
    assert len([u for u in committed if u % 2 == 0]) <= 2, committed  # of process 0's 6 units
    assert not (out / "_control" / "lease.json").exists()  # released by process 0


def test_two_process_training_matches_double_batch_and_saves_once(tmp_path, cache, student_dir):
    common = ["distill-from-cache", "--cache", cache, "--student", student_dir, "--max-steps", "3",
              "--logging-steps", "1", "--save-steps", "2", "--learning-rate", "1e-3", "--seed", "0",
              "--alpha", "0.4", "--beta", "0.4", "--gamma", "0.2", "--report-to", "none"]
    one = tmp_path / "one"
    result = CliRunner().invoke(main, [*map(str, common), "--use-cpu", "--per-device-train-batch-size",
                                       "4", "--out", str(one)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    two, dump = tmp_path / "two", tmp_path / "dump"
    dump.mkdir()
    # --use-cpu: a distributed launch without GPUs trains on the CPU only when asked to
    # (tests/test_no_silent_fallbacks.py); accelerate then builds the gloo group
    run = torchrun(tmp_path, TRAIN_DRIVER, [*common, "--use-cpu", "--per-device-train-batch-size", "2",
                                            "--out", two], DUMP_DIR=str(dump))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("student saved to") == 1

    for rank in (0, 1):
        info = json.loads((dump / f"rank{rank}.json").read_text())
        assert info == {"processes": 2, "distributed_type": "DistributedType.MULTI_CPU"}
    # the projectors are in the DDP model with the student, and end identical on both processes
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and any(k.startswith("projectors.") for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # saved once, by the main process: final model, projectors, checkpoints, run record
    assert not (dump / "saves_rank1.txt").exists()
    saves = (dump / "saves_rank0.txt").read_text().splitlines()
    assert sorted(saves) == sorted([f"{what} {folder}" for what in ("model", "projectors", "run record")
                                    for folder in ("checkpoint-2", "checkpoint-3", "two")]
                                   + ["run record two"])  # at the start, and with the final model
    final = load_file(two / "projectors.safetensors")
    assert all(torch.equal(t, rank0[f"projectors.{n}"]) for n, t in final.items())
    model = AutoModelForCausalLM.from_pretrained(two)
    assert all(torch.equal(t, rank0[f"model.{n}"]) for n, t in model.state_dict().items())
    record = json.loads((two / RUN_RECORD).read_text())
    assert record["processes"] == 2
    assert record["caches"][0]["fingerprint"] == CacheReader(cache).manifest["fingerprint"]

    # 2 processes x batch 2 = 1 process x batch 4: same samples per step, same averaged gradient
    def losses(run_dir):
        state = json.loads((run_dir / "trainer_state.json").read_text())
        return [(h["step"], h["loss"], h["loss_ce"], h["loss_kl"], h["loss_hidden"])
                for h in state["log_history"] if "loss_ce" in h]

    got, want = losses(two), losses(one)
    assert [s for s, *_ in got] == [1, 2, 3]
    assert got[0] == pytest.approx(want[0], rel=1e-5)  # first step: same batch, same weights
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4)


def test_single_process_group_only_reraises(monkeypatch):
    from unidistill.distributed import ProcessGroup, world_size_from_env

    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert world_size_from_env() == 1
    group = ProcessGroup.from_env()
    assert group.is_main and not group.distributed
    assert group.agree(None, {"a": 1}) == [{"a": 1}]
    with pytest.raises(KeyError, match="mine"):
        group.agree(KeyError("mine"), None)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")  # mpirun's variables count as well
    assert world_size_from_env() == 3

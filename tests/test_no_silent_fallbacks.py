"""Input that used to be quietly replaced by a default is refused with what was received and how
to fix it: a non-numeric WORLD_SIZE, a multi-process launch without GPUs, a malformed run record
on resume; and ``make test-slow`` succeeds (saying so) when no test is marked slow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from unidistill.cli import main
from unidistill.distributed import ProcessGroup, world_size_from_env
from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.storage import CacheReader
from unidistill.trainer import arguments
from unidistill.trainer.arguments import DistillationArguments
from unidistill.trainer.run_record import RUN_RECORD, check_checkpoint_caches

REPO = Path(__file__).resolve().parents[1]
SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def no_launcher(monkeypatch):
    for name in SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---------------------------------------------------------------- WORLD_SIZE

@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "two"), ("WORLD_SIZE", ""),
                                         ("WORLD_SIZE", "0"), ("WORLD_SIZE", "2.0"),
                                         ("OMPI_COMM_WORLD_SIZE", "-3")])
def test_a_world_size_that_is_not_a_process_count_is_refused(no_launcher, name, value):
    no_launcher.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"environment variable {name}={value!r} is not a whole "
                                          r"number >= 1.*Unset it for a single-process run"):
        world_size_from_env()
    with pytest.raises(ConfigError, match=name):
        ProcessGroup.from_env()


def test_world_sizes_that_are_numbers_still_count(no_launcher):
    assert world_size_from_env() == 1
    no_launcher.setenv("WORLD_SIZE", "1")
    assert world_size_from_env() == 1 and not ProcessGroup.from_env().distributed
    no_launcher.setenv("WORLD_SIZE", " 3 ")  # int() accepts surrounding spaces, as torch does
    assert world_size_from_env() == 3


def test_cache_build_with_a_non_numeric_world_size_is_refused_before_writing(tmp_path, no_launcher,
                                                                           tiny_teacher_dir, text_file):
    no_launcher.setenv("WORLD_SIZE", "two")
    out = tmp_path / "c"
    res = CliRunner().invoke(main, ["cache-build", "--teacher", str(tiny_teacher_dir), "--data",
                                    str(text_file), "--out", str(out), "--seq-len", "16",
                                    "--max-sequences", "2", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "WORLD_SIZE='two' is not a whole number" in res.output
    assert not out.exists()


def test_a_bad_group_timeout_is_refused(no_launcher):
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setenv("UNIDISTILL_DIST_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="UNIDISTILL_DIST_TIMEOUT='soon' is not a number of seconds"):
        ProcessGroup.from_env()


# ---------------------------------------------------------------- several processes, no GPU

def test_multi_process_training_without_gpus_needs_use_cpu(tmp_path, no_launcher, cache, student_dir):
    """torchrun on a machine where torch sees no GPU used to switch to the CPU by itself."""
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setattr(arguments, "_has_accelerator", lambda: False)
    with pytest.raises(ConfigError, match=r"2 processes were launched \(WORLD_SIZE\), but torch sees "
                                          r"no GPU.*Pass --use-cpu"):
        DistillationArguments(output_dir=str(tmp_path), report_to=[])
    res = CliRunner().invoke(main, ["distill-from-cache", "--cache", str(cache), "--student",
                                    str(student_dir), "--out", str(tmp_path / "run"), "--max-steps", "1"])
    assert res.exit_code == 2, res.output
    assert "torch sees no GPU or other accelerator" in res.output and "--use-cpu" in res.output
    assert not (tmp_path / "run").exists()
    # the two-process CPU run with --use-cpu: tests/test_multiprocess.py


def test_one_process_without_gpus_is_not_affected(tmp_path, no_launcher):
    no_launcher.setattr(arguments, "_has_accelerator", lambda: False)
    assert not DistillationArguments(output_dir=str(tmp_path), report_to=[]).use_cpu


# ---------------------------------------------------------------- the run record on resume

def write_record(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_RECORD).write_text(text)
    return folder / RUN_RECORD


@pytest.mark.parametrize("text, what", [
    ('{"cache": {"path": "c", "fingerp', "it is not valid JSON"),
    ("", "it is not valid JSON"),
    ('["cache"]', "it holds a JSON list, not an object"),
    ('{"arguments": {}}', "its 'cache' entry is None; expected an object"),
    ('{"cache": "/data/c"}', "its 'cache' entry is '/data/c'"),
    ('{"cache": {"path": "c"}}', "its cache fingerprint is None; expected the cache's content"),
    ('{"cache": {"path": "c", "fingerprint": 7}}', "its cache fingerprint is 7"),
])
def test_a_malformed_run_record_is_refused_naming_the_file(tmp_path, text, what):
    path = write_record(tmp_path / "run" / "checkpoint-2", text)
    write_record(tmp_path / "run", json.dumps({"cache": {"path": "c", "fingerprint": "f" * 64}}))
    with pytest.raises(ConfigError, match="run record") as e:
        check_checkpoint_caches(str(path.parent), [("c", "f" * 64)])
    assert f"run record {path} is malformed: {what}" in str(e.value)
    assert "copy the run folder's unidistill_run.json over it" in str(e.value)


def test_a_malformed_run_folder_record_is_refused_too(tmp_path):
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)  # no record of its own
    path = write_record(tmp_path / "run", "{}")
    with pytest.raises(ConfigError, match=f"run record {path} is malformed"):
        check_checkpoint_caches(str(tmp_path / "run" / "checkpoint-2"), [("c", "f" * 64)])


def test_well_formed_records_are_still_checked(tmp_path, caplog):
    folder = write_record(tmp_path / "run" / "checkpoint-2",
                          json.dumps({"cache": {"path": "/c", "fingerprint": "a" * 64}})).parent
    check_checkpoint_caches(str(folder), [("/c", "a" * 64)])
    with pytest.raises(CacheMismatchError, match=f"fingerprint {'a' * 16}"):
        check_checkpoint_caches(str(folder), [("/c", "b" * 64)])
    foreign = tmp_path / "elsewhere" / "checkpoint-1"
    foreign.mkdir(parents=True)
    check_checkpoint_caches(str(foreign), [("/c", "b" * 64)])  # no record at all: nothing to compare ...
    assert "has no unidistill_run.json" in caplog.text  # ... and it says so


def test_resume_from_a_checkpoint_with_a_torn_record_is_refused(tmp_path, cache, student_dir):
    def run(*extra):
        return CliRunner().invoke(main, ["distill-from-cache", "--cache", str(cache), "--student",
                                         str(student_dir), "--out", str(tmp_path / "run"),
                                         "--max-steps", "2", "--save-steps", "1",
                                         "--per-device-train-batch-size", "2", "--use-cpu", *extra])

    assert run().exit_code == 0
    record = tmp_path / "run" / "checkpoint-1" / RUN_RECORD
    good = json.loads(record.read_text())
    assert good["caches"][0]["fingerprint"] == CacheReader(cache).manifest["fingerprint"]
    record.write_text(record.read_text()[:40])  # torn, as a full disk leaves it
    res = run("--resume-from-checkpoint", str(tmp_path / "run" / "checkpoint-1"))
    assert res.exit_code == 2, res.output
    assert f"run record {record} is malformed: it is not valid JSON" in res.output
    shutil.copy(tmp_path / "run" / RUN_RECORD, record)  # the fix the message names
    assert run("--resume-from-checkpoint", str(tmp_path / "run" / "checkpoint-1")).exit_code == 0


# ---------------------------------------------------------------- make test-slow

def make_test_slow(**env):
    """``make test-slow`` on this checkout with the running interpreter's environment as the
    venv (``-o`` keeps make from reinstalling it), collecting only: the marker selection is what
    is tested, not the tests it selects."""
    venv = Path(sys.executable).parent.parent
    return subprocess.run(["make", "--no-print-directory", "test-slow", f"VENV={venv}",
                           "-o", f"{venv}/.installed"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_slow_succeeds_and_says_so_when_no_test_is_marked_slow():
    res = make_test_slow(PYTEST_ADDOPTS="--collect-only -p no:cacheprovider")
    assert res.returncode == 0, res.stdout + res.stderr
    collected = res.stdout
    if "no tests collected" in collected:  # nothing is marked slow today
        assert "test-slow: no test is marked slow; make test runs every test" in collected
    # a real failure still fails the target (pytest's usage error, exit 4)
    bad = make_test_slow(PYTEST_ADDOPTS="--no-such-pytest-option")
    assert bad.returncode != 0
    assert "no test is marked slow" not in bad.stdout

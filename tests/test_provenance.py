"""Every run names the cache it read: the run folder and each checkpoint record its fingerprint,
cache-info shows it, and a checkpoint is not resumed on another cache."""

from __future__ import annotations

import json

from click.testing import CliRunner

from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.cli import main
from unidistill.storage import CacheReader
from unidistill.trainer.run_record import RUN_RECORD


def train(cache, student, out, *extra):
    args = ["distill-from-cache", "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--max-steps", "2", "--save-steps", "1", "--per-device-train-batch-size", "2",
            "--use-cpu", "--report-to", "none", *extra]
    return CliRunner().invoke(main, args)


def test_run_and_checkpoints_record_the_cache_and_resume_checks_it(tmp_path, cache, student_dir,
                                                                  tiny_teacher_dir, text_file):
    fingerprint = CacheReader(cache).manifest["fingerprint"]
    info = CliRunner().invoke(main, ["cache-info", str(cache)])
    assert f"fingerprint  {fingerprint}" in info.output

    out = tmp_path / "run"
    result = train(cache, student_dir, out)
    assert result.exit_code == 0, result.output
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        record = json.loads((folder / RUN_RECORD).read_text())
        assert record["caches"] == [{"path": str(cache), "fingerprint": fingerprint}], folder
        assert record["cache_fingerprints"] == [fingerprint]
        assert record["resumed_from"] is None and record["processes"] == 1

    result = train(cache, student_dir, out, "--resume-from-checkpoint", str(out / "checkpoint-1"))
    assert result.exit_code == 0, result.output
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["resumed_from"] == str(out / "checkpoint-1")
    assert record["caches"][0]["fingerprint"] == fingerprint

    other = tmp_path / "other-cache"
    build_cache(BuildConfig(teacher=str(tiny_teacher_dir), data=str(text_file), out=str(other),
                            seq_len=32, top_k=16, layers="all", max_sequences=8, batch_size=4,
                            shard_size=4, device="cpu"), progress=False, log=lambda m: None)
    refused = train(other, student_dir, out, "--resume-from-checkpoint", "last")
    assert refused.exit_code == 2, refused.output
    assert f"fingerprint {fingerprint[:16]}" in refused.output
    assert "Resume with the recorded --cache" in refused.output
    assert json.loads((out / RUN_RECORD).read_text())["caches"][0]["fingerprint"] == fingerprint  # untouched

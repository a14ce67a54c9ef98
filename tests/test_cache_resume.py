"""Crash safety: a SIGKILLed build resumes to the same cache; damage is named by cache-verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from unidistill.cli import main
from unidistill.errors import CacheError, CacheIncompleteError, CacheMismatchError
from unidistill.storage import CacheReader
from unidistill.storage.layout import hidden_key
from unidistill.storage.manifest import UNITS_DIR, read_unit_marker

def slow_build_driver(seconds: float) -> str:
    """A `python -c` script running the CLI with every teacher call (the launch of a batch's
    forward) slowed by ``seconds``, so a test can kill the build mid-way."""
    return f"""
import sys, time
from unidistill.cache_builder import capture
_call = capture.TeacherRunner.launch
def slow(self, ids, **kw):
    time.sleep({seconds})
    return _call(self, ids, **kw)
capture.TeacherRunner.launch = slow
from unidistill.cli import main
sys.exit(main())
"""


SLOW_DRIVER = slow_build_driver(0.4)


def build_args(teacher, data, out, *extra):
    return ["cache-build", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--seq-len", "32", "--top-k", "8", "--layers", "1,4", "--max-sequences", "24",
            "--batch-size", "2", "--shard-size", "2", "--device", "cpu", "--quiet", *extra]


def run_cli(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def read_all(root):
    reader = CacheReader(root)
    return {name: reader.group[name][:] for name in reader.layout.array_specs()}


def assert_same_cache(got, reference):
    """Every array equal, and so the content fingerprint."""
    ref, mine = read_all(reference), read_all(got)
    assert ref.keys() == mine.keys()
    for name in ref:
        np.testing.assert_array_equal(mine[name], ref[name], err_msg=name)
    assert CacheReader(got).manifest["fingerprint"] == CacheReader(reference).manifest["fingerprint"]


def test_sigkill_then_resume_gives_identical_cache(tmp_path, tiny_teacher_dir, text_file):
    reference = tmp_path / "reference"
    assert run_cli(build_args(tiny_teacher_dir, text_file, reference)).exit_code == 0

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DRIVER,
                             *build_args(tiny_teacher_dir, text_file, out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        markers = list((out / UNITS_DIR).glob("*.json")) if (out / UNITS_DIR).is_dir() else []
        if len(markers) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]

    n_units = 12
    before = {u: read_unit_marker(out, u) for u in range(n_units)}
    committed = {u for u, m in before.items() if m is not None}
    assert 3 <= len(committed) < n_units, f"kill came too late or too early: {sorted(committed)}"
    with pytest.raises(CacheIncompleteError):
        CacheReader(out)

    assert run_cli(build_args(tiny_teacher_dir, text_file, out)).exit_code == 0
    reader = CacheReader(out)
    # committed units were kept as they were, not recomputed
    assert reader.manifest["build"]["units_computed_this_run"] == n_units - len(committed)
    for u in committed:
        assert read_unit_marker(out, u) == before[u]
    resumed_run = {read_unit_marker(out, u)["run_id"] for u in range(n_units) if u not in committed}
    assert len(resumed_run) == 1 and resumed_run.isdisjoint({before[u]["run_id"] for u in committed})
    # and the finished cache is byte-identical to the uninterrupted one
    ref, got = read_all(reference), read_all(out)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert reader.manifest["fingerprint"] == CacheReader(reference).manifest["fingerprint"]


def test_rerunning_the_same_command_on_a_complete_cache_succeeds(tmp_path, tiny_teacher_dir, text_file):
    """A scheduler retrying a build that had finished gets exit code 0, and the cache is untouched."""
    out = tmp_path / "c"
    assert run_cli(build_args(tiny_teacher_dir, text_file, out)).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, build_args(tiny_teacher_dir, text_file, out))
    assert result.exit_code == 0, result.output
    assert "already complete with these settings" in result.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_complete_cache_refused_without_overwrite(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "c"
    assert run_cli(build_args(tiny_teacher_dir, text_file, out)).exit_code == 0
    fp = CacheReader(out).manifest["fingerprint"]
    result = CliRunner().invoke(main, build_args(tiny_teacher_dir, text_file, out, "--top-k", "4"))
    assert result.exit_code == 2 and "already holds a complete cache" in result.output
    assert "layout.top_k: 8 in the cache, 4 now" in result.output and "--overwrite" in result.output
    assert CacheReader(out).manifest["fingerprint"] == fp  # untouched
    assert run_cli(build_args(tiny_teacher_dir, text_file, out, "--top-k", "4", "--overwrite")).exit_code == 0
    assert CacheReader(out).manifest["layout"]["top_k"] == 4


def test_layout_keeps_its_manifest_key_top_k():
    """CacheLayout.stored_k is written and read as the manifest's layout.top_k (format v1), so
    caches built before the rename load, and new manifests are what older versions read."""
    from unidistill.storage.layout import CacheLayout

    written_before = {"n_sequences": 4, "seq_len": 8, "top_k": 4, "vocab_size": 100, "hidden_size": 8,
                      "layers": [1], "hidden_dtype": "float16", "shard_size": 2, "logits_mode": "topk"}
    layout = CacheLayout.from_dict(written_before)
    assert layout.stored_k == 4
    d = layout.to_dict()
    assert d["top_k"] == 4 and "stored_k" not in d
    assert {k: d[k] for k in written_before} == written_before


def test_resume_with_other_settings_names_them(tmp_path, tiny_teacher_dir, text_file):
    from unidistill.storage.layout import CacheLayout
    from unidistill.storage.writer import CacheWriter

    out = tmp_path / "c"
    layout = CacheLayout(n_sequences=4, seq_len=8, stored_k=4, vocab_size=100, hidden_size=8,
                         layers=(1,), shard_size=2)
    writer = CacheWriter.open(out, layout, {"teacher": {"source": "a"}})
    writer.write_unit(0, {name: np.zeros((2,) + tuple(spec["shape"][1:]), spec["dtype"])
                          for name, spec in layout.array_specs().items()})
    other = CacheLayout.from_dict({**layout.to_dict(), "top_k": 8})
    with pytest.raises(CacheMismatchError) as e:
        CacheWriter.open(out, other, {"teacher": {"source": "b"}})
    msg = str(e.value)
    assert "layout.top_k: 4 in the cache, 8 now" in msg
    assert "settings.teacher.source: 'a' in the cache, 'b' now" in msg
    assert read_unit_marker(out, 0) is not None  # nothing lost
    with pytest.raises(CacheError, match="not committed"):
        CacheWriter.open(out, layout, {"teacher": {"source": "a"}}).finalize()


def test_cache_verify_names_a_corrupted_chunk(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "c"
    assert run_cli(build_args(tiny_teacher_dir, text_file, out)).exit_code == 0
    ok = CliRunner().invoke(main, ["cache-verify", str(out), "--quiet"])
    assert ok.exit_code == 0 and "OK   12 units verified" in ok.output

    shard = out / hidden_key(4) / "c" / "5" / "0" / "0"  # unit 5 = sequences 10..11
    data = bytearray(shard.read_bytes())
    for i in range(100, 140):  # inside the first chunk's compressed bytes
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))

    bad = CliRunner().invoke(main, ["cache-verify", str(out), "--quiet"])
    assert bad.exit_code == 1
    bad_lines = [line for line in bad.output.splitlines() if line.startswith("BAD")]
    assert len(bad_lines) == 1, bad.output
    assert "unit 5, array hidden/4" in bad_lines[0] and "sequence 10" in bad_lines[0]
    assert "DAMAGED" in bad.output


def test_cache_verify_reports_uncommitted_unit(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "c"
    assert run_cli(build_args(tiny_teacher_dir, text_file, out)).exit_code == 0
    (out / UNITS_DIR / "000007.json").unlink()
    bad = CliRunner().invoke(main, ["cache-verify", str(out), "--quiet"])
    assert bad.exit_code == 1 and "unit 7: not committed" in bad.output


def test_cache_info_json_reports_sizes(tmp_path, tiny_teacher_dir, text_file):
    out = tmp_path / "c"
    assert run_cli(build_args(tiny_teacher_dir, text_file, out)).exit_code == 0
    result = CliRunner().invoke(main, ["cache-info", str(out), "--json"])
    info = json.loads(result.output)
    assert info["status"] == "complete" and info["units_committed"] == info["units_total"] == 12
    assert info["n_tokens"] == 24 * 32 and info["layers"] == [1, 4]
    bpt = info["bytes_per_token"]
    # raw hidden: 2 layers x 32 channels x 2 bytes; raw logits: 8 x (2 + 2) + 2 bytes
    assert bpt["hidden_raw"] == 2 * 32 * 2 and bpt["logits_raw"] == 8 * 4 + 2 + 2  # + the T = 2 tail
    assert 0 < bpt["logits_disk"] and 0 < bpt["hidden_disk"]
    text = CliRunner().invoke(main, ["cache-info", str(out)]).output
    assert "complete (12/12 units)" in text and "hidden/4" in text

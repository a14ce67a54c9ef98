"""benchmarks/recovery.py continues a stopped experiment: a stage is skipped only when its output
is complete (as the real commands leave it) AND was made with the same options.

The stage logic runs with the heavy commands replaced by a recorder that leaves outputs shaped
like the real ones (and refuses, like them, to write over an output without --overwrite); the
completeness checks are also run on a real cache and a real pruned student."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from unidistill.storage.manifest import STATUS_BUILDING, STATUS_COMPLETE
from unidistill.storage.writer import MANIFEST_KEY, read_manifest

RECOVERY = Path(__file__).resolve().parents[1] / "benchmarks" / "recovery.py"


@pytest.fixture(scope="module")
def recovery():
    spec = importlib.util.spec_from_file_location("recovery_benchmark", RECOVERY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_manifest(folder: Path, status: str, options: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    attributes = {MANIFEST_KEY: {"status": status, "settings": options}}
    (folder / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                  "attributes": attributes}))


class FakeCommands:
    """Records each command; leaves outputs like the real ones; refuses like them."""

    def __init__(self, recovery):
        self.recovery = recovery
        self.calls: list[tuple] = []

    def __call__(self, argv: list[str]) -> None:
        options = self.recovery.command_options(argv)
        command, overwrite = options["command"], bool(options.get("--overwrite"))
        out = Path(options.get("--out", argv[-1]))
        self.calls.append((command, out.name, overwrite))
        if command == "prune":
            if out.exists() and any(out.iterdir()) and not overwrite:
                raise RuntimeError(f"prune: output folder {out} is not empty")
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            (out / "config.json").write_text(json.dumps({"unidistill_provenance": {"teacher": "t"}}))
            (out / "model.safetensors").write_bytes(b"weights")
        elif command == "cache-build":
            manifest = read_manifest(out)
            if manifest is not None and not overwrite:
                if manifest["status"] == STATUS_COMPLETE:
                    raise RuntimeError(f"cache-build: {out} already holds a complete cache")
                if manifest["settings"] != options:
                    raise RuntimeError(f"cache-build: {out} holds a build with other settings")
            if overwrite:
                shutil.rmtree(out, ignore_errors=True)
            _write_manifest(out, STATUS_COMPLETE, options)
        elif command == "ablate":
            out.mkdir(parents=True, exist_ok=True)
            (out / "ablation.json").write_text(json.dumps({"rows": [], "common": {}}))

    def take(self) -> list[tuple]:
        calls, self.calls = self.calls, []
        return calls


def test_a_second_invocation_skips_what_is_complete_and_redoes_what_changed(recovery, tmp_path,
                                                                            monkeypatch):
    commands = FakeCommands(recovery)
    monkeypatch.setattr(recovery, "_execute", commands)
    messages: list[str] = []

    def experiment(*extra: str) -> dict:
        opts = recovery.parse_options(["--out", str(tmp_path / "exp"), "--results",
                                       str(tmp_path / "results"), *extra])
        return recovery.run(opts, log=messages.append)

    every_time = [("ablate", "runs", False), ("report", "runs", False)]
    experiment()
    assert commands.take() == [("prune", "student", False), ("cache-build", "cache", False),
                               ("cache-build", "heldout-cache", False), *every_time]

    result = experiment()  # everything complete, same options: only ablate (it keeps its runs) + report
    assert commands.take() == every_time
    assert result["times_s"]["prune"] is None and result["times_s"]["cache_train"] is None
    assert sum("skipped" in m for m in messages) == 3

    messages.clear()
    experiment("--train-sequences", "50")  # the training cache's options changed: rebuilt, alone
    assert commands.take() == [("cache-build", "cache", True), *every_time]
    assert any("--max-sequences: '96' before, '50' now" in m for m in messages)

    # a held-out build stopped mid-way (manifest 'building'), same options: continued, not wiped
    held = tmp_path / "exp" / "heldout-cache"
    _write_manifest(held, STATUS_BUILDING, read_manifest(held)["settings"])
    experiment("--train-sequences", "50")
    assert commands.take() == [("cache-build", "heldout-cache", False), *every_time]

    # the held-out split reaches the held-out cache and the ablate evaluations
    experiment("--train-sequences", "50", "--heldout-split", "all")
    assert commands.take() == [("cache-build", "heldout-cache", True), *every_time]

    experiment("--train-sequences", "50", "--heldout-split", "all", "--data", "other.jsonl")
    assert commands.take() == [("prune", "student", True), ("cache-build", "cache", True),
                               ("cache-build", "heldout-cache", True), *every_time]

    # a pruned student whose weights are gone is made again, whatever its record says
    (tmp_path / "exp" / "student" / "model.safetensors").unlink()
    experiment("--train-sequences", "50", "--heldout-split", "all", "--data", "other.jsonl")
    assert commands.take() == [("prune", "student", True), *every_time]


def test_the_ablate_stage_passes_the_heldout_split(recovery, tmp_path, monkeypatch):
    argvs = []
    monkeypatch.setattr(recovery, "_execute", lambda argv: argvs.append(argv) or FakeCommands(recovery)(argv))
    opts = recovery.parse_options(["--out", str(tmp_path), "--heldout-split", "all"])
    recovery.run(opts, log=lambda m: None)
    ablate = recovery.command_options(next(a for a in argvs if a[1] == "ablate"))
    assert ablate["--heldout-split"] == "all" and ablate["--eval-sequences"] == "28"


def test_completeness_is_read_from_what_the_real_commands_leave(recovery, tmp_path, cache,
                                                                 tiny_teacher_dir):
    from unidistill.pruning.prune import prune

    assert recovery.cache_complete(cache)  # a cache the real builder finished
    unfinished = tmp_path / "unfinished"
    shutil.copytree(cache, unfinished)
    manifest = json.loads((unfinished / "zarr.json").read_text())
    manifest["attributes"][MANIFEST_KEY]["status"] = STATUS_BUILDING
    (unfinished / "zarr.json").write_text(json.dumps(manifest))
    assert not recovery.cache_complete(unfinished)
    assert not recovery.cache_complete(tmp_path / "absent")

    student = tmp_path / "student"
    prune(str(tiny_teacher_dir), str(student), drop_layers=1, device="cpu", progress=False)
    assert recovery.pruned_student_complete(student)
    assert not recovery.pruned_student_complete(tmp_path)  # a folder without a model

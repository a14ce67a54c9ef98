"""benchmarks/recovery.py continues a stopped experiment: a stage is skipped only when its output
is complete (as the real commands leave it) AND was made with the same options.

The stage logic runs with the heavy commands replaced by a recorder that leaves outputs shaped
like the real ones (and refuses, like them, to write over an output without --overwrite); the
completeness checks are also run on a real cache and a real pruned student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from unidistill.storage.manifest import STATUS_BUILDING, STATUS_COMPLETE
from unidistill.storage.manifest import MANIFEST_KEY, read_manifest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def recovery():
    return load_benchmark("recovery")


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
            blocks = 30 - int(options.get("--drop-layers", 0))  # keeps the first ones
            (out / "config.json").write_text(json.dumps({"num_hidden_layers": blocks, "unidistill_provenance": {
                "teacher": "t", "teacher_blocks": list(range(blocks))}}))
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

    every_time = [("ablate", "runs-depth", False), ("report", "runs-depth", False),
                  ("ablate", "runs-width", False), ("report", "runs-width", False)]
    experiment()
    assert commands.take() == [("prune", "student-depth", False), ("prune", "student-width", False),
                               ("cache-build", "cache", False), ("cache-build", "heldout-stdlib_docs", False),
                               ("cache-build", "heldout-kjv_bible", False), *every_time]

    result = experiment()  # everything complete, same options: only ablate (it keeps its runs) + report
    assert commands.take() == every_time
    assert result["times_s"]["prune_depth"] is None and result["times_s"]["cache_train"] is None
    assert sum("skipped" in m for m in messages) == 5

    messages.clear()
    experiment("--train-sequences", "50")  # the training cache's options changed: rebuilt, alone
    assert commands.take() == [("cache-build", "cache", True), *every_time]
    assert any("--max-sequences: '200' before, '50' now" in m for m in messages)

    # a held-out build stopped mid-way (manifest 'building'), same options: continued, not wiped
    held = tmp_path / "exp" / "heldout-stdlib_docs"
    _write_manifest(held, STATUS_BUILDING, read_manifest(held)["settings"])
    experiment("--train-sequences", "50")
    assert commands.take() == [("cache-build", "heldout-stdlib_docs", False), *every_time]

    # the held-out split reaches the training text's held-out cache (and the ablate evaluations)
    experiment("--train-sequences", "50", "--heldout-split", "all")
    assert commands.take() == [("cache-build", "heldout-stdlib_docs", True), *every_time]

    # other training text: both students, the cache and its held-out cache made again; the other
    # kind of text's held-out cache is kept
    experiment("--train-sequences", "50", "--heldout-split", "all", "--data", "other.jsonl")
    assert commands.take() == [("prune", "student-depth", True), ("prune", "student-width", True),
                               ("cache-build", "cache", True), ("cache-build", "heldout-other", False),
                               *every_time]

    # a pruned student whose weights are gone is made again, whatever its record says
    (tmp_path / "exp" / "student-width" / "model.safetensors").unlink()
    experiment("--train-sequences", "50", "--heldout-split", "all", "--data", "other.jsonl")
    assert commands.take() == [("prune", "student-width", True), *every_time]

    # a student pruned to other blocks needs other teacher layers: the training cache is rebuilt
    config_path = tmp_path / "exp" / "student-depth" / "config.json"
    config = json.loads(config_path.read_text())
    config["unidistill_provenance"]["teacher_blocks"] = list(range(10, 30))
    config_path.write_text(json.dumps(config))
    messages.clear()
    experiment("--train-sequences", "50", "--heldout-split", "all", "--data", "other.jsonl")
    assert commands.take() == [("cache-build", "cache", True), *every_time]
    assert any("--layers" in m and "before" in m for m in messages)


def test_the_ablate_stages_evaluate_on_both_heldout_texts(recovery, tmp_path, monkeypatch):
    argvs = []
    monkeypatch.setattr(recovery, "_execute", lambda argv: argvs.append(argv) or FakeCommands(recovery)(argv))
    opts = recovery.parse_options(["--out", str(tmp_path), "--heldout-split", "all"])
    recovery.run(opts, log=lambda m: None)
    ablates = [recovery.command_options(a) for a in argvs if a[1] == "ablate"]
    assert [Path(a["--student"]).name for a in ablates] == ["student-depth", "student-width"]
    for ablate in ablates:
        assert ablate["--heldout"] == ["builtin:stdlib_docs", "builtin:kjv_bible"]
        assert ablate["--heldout-split"] == ["all", "heldout"] and ablate["--eval-sequences"] == "16"
        assert [Path(c).name for c in ablate["--heldout-cache"]] == ["heldout-stdlib_docs", "heldout-kjv_bible"]
    builds = {Path(recovery.command_options(a)["--out"]).name: recovery.command_options(a)
              for a in argvs if a[1] == "cache-build"}
    assert builds["heldout-kjv_bible"]["--layers"] == "none"
    assert builds["heldout-kjv_bible"]["--max-sequences"] == "16"
    # the union of the uniform, last and original maps' layers of both students' aligned blocks
    # (fake students keep their first blocks: original = i)
    depth = {8, 15, 23, 30} | {15, 20, 25, 30} | {5, 10, 15, 20}
    width = {8, 15, 23, 30} | {9, 16, 23, 30} | {7, 14, 21, 28}
    assert builds["cache"]["--layers"] == ",".join(map(str, sorted(depth | width)))
    spec = recovery.load_variants(opts.variants)
    runs = {v["name"]: v for v in recovery.student_variants(spec, "width")}
    assert {"ce.seed1", "kd.seed1", "ce+kd.seed1"} <= set(runs)
    assert runs["kd.seed1"]["seed"] == 1 and runs["kd.seed1"]["data_seed"] == 1
    assert runs["ce+kd+hidden.original"]["align_layers"] == "7,14,21,28"
    assert "align_layers" not in runs["ce"]
    text = (tmp_path / "variants-depth.yaml").read_text()
    assert "ce+kd.seed1" in text and "ce+kd+hidden.nmse" not in text


def test_the_long_preset_runs_only_the_students_its_runs_file_names(recovery, tmp_path, monkeypatch):
    argvs = []
    monkeypatch.setattr(recovery, "_execute", lambda argv: argvs.append(argv) or FakeCommands(recovery)(argv))
    opts = recovery.parse_options(["--preset", "cpu-long", "--out", str(tmp_path)])
    assert Path(opts.variants).name == "recovery_long_variants.yaml"
    assert (opts.steps, opts.train_sequences, opts.eval_sequences) == (160, 640, 64)
    recovery.run(opts, log=lambda m: None)
    pruned = [Path(recovery.command_options(a)["--out"]).name for a in argvs if a[1] == "prune"]
    ablates = [recovery.command_options(a) for a in argvs if a[1] == "ablate"]
    assert pruned == ["student-width"]
    assert [Path(a["--student"]).name for a in ablates] == ["student-width"]
    assert ablates[0]["--max-steps"] == "160" and ablates[0]["--eval-sequences"] == "64"
    builds = {Path(recovery.command_options(a)["--out"]).name: recovery.command_options(a)
              for a in argvs if a[1] == "cache-build"}
    assert builds["cache"]["--max-sequences"] == "640"
    assert builds["cache"]["--layers"] == ",".join(map(str, sorted(
        {8, 15, 23, 30} | {9, 16, 23, 30} | {7, 14, 21, 28})))  # the width student's maps only


def test_a_runs_file_naming_an_unknown_student_is_refused(recovery, tmp_path):
    path = tmp_path / "runs.yaml"
    path.write_text("common: {}\nstudents:\n  tiny: {align_layers: '1', variants: []}\n")
    with pytest.raises(SystemExit, match=r"names \['tiny'\].*some of \['depth', 'width'\]"):
        recovery.load_variants(path)


def _row(name, docs, kjv):
    return {"name": name, "heldout_sets": {"docs": {"perplexity": docs}, "kjv": {"perplexity": kjv}}}


def test_seed_spread_and_the_verdict(recovery):
    rows = {r["name"]: r for r in [
        _row("teacher", 17, 9), _row("student (before)", 90, 60), _row("ce", 30.0, 40.0),
        _row("ce.seed1", 30.5, 41.0), _row("kd", 31.0, 30.0), _row("kd.seed1", 31.2, 30.4),
        _row("hidden", 29.5, 45.0)]}
    spread = recovery.seed_spread(rows, ["docs", "kjv"], ["ce", "kd", "ce+kd"])
    assert spread["per_recipe"]["ce"] == pytest.approx({"docs": 0.5, "kjv": 1.0})
    assert spread["max"] == pytest.approx({"docs": 0.5, "kjv": 1.0})
    v = recovery.verdict(rows, ["docs", "kjv"], spread["max"])
    assert v["docs"]["best"] == "hidden" and v["kjv"]["best"] == "kd"
    # hidden beats CE on docs by 0.5, not more than 2 x 0.5; kd beats it on kjv by 10 > 2, but not on docs
    assert v["docs"]["beats_ce_by_more_than_2x_spread"] == {"docs": False, "kjv": False}
    assert v["kjv"]["beats_ce_by_more_than_2x_spread"] == {"docs": False, "kjv": True}
    assert not v["kjv"]["beats_ce_on_both_texts"]
    assert recovery.versus_ce(rows["hidden"], rows["ce"], "docs", 0.5) == "-0.50"
    assert recovery.versus_ce(rows["kd.seed1"], rows["ce"], "docs", 1.5) == "no measurable difference"


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

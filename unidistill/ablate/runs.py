"""``ablate()``: evaluate the teacher and the untrained student, then train and evaluate each
run, keeping what an earlier call made under the same settings."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

from unidistill.ablate.heldout import HeldOut, eval_file, heldout_apart, heldout_sets
from unidistill.ablate.records import (
    RUN_SETTINGS_FILE,
    TRAIN_SPEED_FILE,
    data_identity,
    evaluate_to,
    evaluation_settings,
    model_identity,
    prepare_run,
    training_settings,
)
from unidistill.ablate.table import ABLATION_JSON, ABLATION_MD, format_table, new_table, row
from unidistill.ablate.variants import (
    CACHE,
    ONLINE,
    SHOWN,
    argument_defaults,
    cache_paths,
    check_variants,
    online_top_k,
    run_arguments,
)
from unidistill.storage.files import atomic_write_bytes, atomic_write_json
from unidistill.storage.manifest import read_manifest


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fingerprint(cache) -> str | None:
    return None if cache is None else (read_manifest(cache) or {}).get("fingerprint")


@dataclasses.dataclass
class _Evaluations:
    """Evaluates a model on every held-out set, keeping each evaluation an earlier call made under
    the same settings. Building it refuses a set that shares documents with the training cache."""

    cache: object
    sets: list[HeldOut]
    eval_sequences: int | None
    eval_batch_size: int
    device: str
    progress: bool
    log: Callable[[str], None]

    def __post_init__(self):
        # each set's evaluation settings: its held-out share; its cache's fingerprint; its text
        self.apart = {h.name: heldout_apart(self.cache, h.data, h.cache, h.split) for h in self.sets}
        self.fingerprints = {h.name: _fingerprint(h.cache) for h in self.sets}
        self.data_ids = {h.name: data_identity(h.data) for h in self.sets}

    def check_apart(self, caches: list) -> None:
        """Refuse a held-out set that shares documents with any of a run's training caches."""
        for cache in caches:
            for h in self.sets:
                heldout_apart(cache, h.data, h.cache, h.split)

    def __call__(self, folder: Path, label: str, model: str, model_id: dict) -> dict[str, dict]:
        """The model's evaluation on every held-out set, by set name."""
        result = {}
        for index, h in enumerate(self.sets):
            settings = {**evaluation_settings(model_id, self.data_ids[h.name], h.split,
                                              self.fingerprints[h.name], self.eval_sequences),
                        **self.apart[h.name]}
            where = f" on {h.name}" if len(self.sets) > 1 else ""
            result[h.name] = evaluate_to(
                folder, label + where, model, settings, self.log, eval_file(index, h), data=h.data,
                split=h.split, cache=h.cache, max_sequences=self.eval_sequences, **self.apart[h.name],
                batch_size=self.eval_batch_size, device=self.device, progress=self.progress)
        return result


@dataclasses.dataclass
class _Ablation:
    """What every run of one ablation shares; ``caches``: those a run trains on unless it names
    its own (``cache``: one path or a list)."""

    caches: list
    student: str
    teacher: str
    out: Path
    common: dict
    evaluations: _Evaluations
    log: Callable[[str], None]

    def __post_init__(self):
        self.fingerprints = [_fingerprint(c) for c in self.caches]  # each run records them too
        self.student_id, self.teacher_id = model_identity(self.student), model_identity(self.teacher)

    def references(self) -> tuple[dict, dict]:
        """The teacher's and the untrained student's evaluations, and their two rows."""
        teacher = self.evaluations(self.out / "_teacher", "teacher", self.teacher, self.teacher_id)
        student = self.evaluations(self.out / "_student", "student (before)", self.student, self.student_id)
        refs = {h.name: {"teacher": teacher[h.name], "student": student[h.name]}
                for h in self.evaluations.sets}
        return refs, [row("teacher", {}, teacher, refs, None),
                      row("student (before)", {}, student, refs, None)]

    def run(self, variant: dict, refs: dict) -> dict:
        """Train the variant (unless a run under the same settings finished), evaluate it; its row."""
        name = variant["name"]
        run_dir = self.out / name
        settings = {k: v for k, v in variant.items() if k != "name"}
        caches = cache_paths(settings[CACHE], f"run {name!r}") if CACHE in settings else self.caches
        fingerprints = [_fingerprint(c) for c in caches] if CACHE in settings else self.fingerprints
        record = training_settings(settings, self.common, fingerprints, self.student_id,
                                   self.teacher_id if ONLINE in settings else None)
        if not prepare_run(run_dir, name, record, self.out, self.log):
            train_run(caches, self.student, self.teacher, run_dir, name, settings, record, self.common)
        evs = self.evaluations(run_dir, f"run {name!r}", str(run_dir), model_identity(str(run_dir)))
        speed_file = run_dir / TRAIN_SPEED_FILE
        speed = json.loads(speed_file.read_text())["tokens_per_s"] if speed_file.is_file() else None
        defaults = argument_defaults()
        shown = {k: settings.get(k, self.common.get(k, defaults[k])) for k in SHOWN}
        shown.update({k: settings[k] for k in (ONLINE, CACHE) if k in settings})
        return row(name, shown, evs, refs, speed)


def ablate(cache, student: str, teacher: str, heldout, out, *, variants: list[dict],
           common: dict | None = None, heldout_cache=None, heldout_split=None,
           heldout_names=None, eval_sequences: int | None = 32, eval_batch_size: int = 4,
           device: str = "auto", progress: bool = True, log: Callable[[str], None] = _stderr) -> dict:
    """Run every variant, evaluate it on every held-out set, and write the table; returns it.

    ``cache``: the cache every run trains on, or a list of them (concatenated, in that order); a
    variant's own ``cache`` (one path or a list) replaces it for that run.

    ``heldout``, ``heldout_split``, ``heldout_cache``: one held-out set (str) or several (lists in
    the same order, see :func:`heldout_sets`). Pieces made with the same settings are kept, the
    others redone (see the package docstring); ``log`` gets one line for each piece redone and why.
    A split None: evaluate's default (``heldout`` for built-in text and local files)."""
    common = dict(common or {})
    check_variants(common, variants)
    caches = [str(c) for c in cache] if isinstance(cache, (list, tuple)) else [cache]
    sets = heldout_sets(heldout, heldout_split, heldout_cache, heldout_names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluations = _Evaluations(caches[0], sets, eval_sequences, eval_batch_size, device, progress, log)
    for train_caches in [caches[1:]] + [cache_paths(v[CACHE], f"run {v['name']!r}")
                                        for v in variants if CACHE in v]:
        evaluations.check_apart(train_caches)  # before any run trains
    ablation = _Ablation(caches, student, teacher, out, common, evaluations, log)
    refs, rows = ablation.references()
    one = len(caches) == 1
    table = new_table(caches[0] if one else caches, ablation.fingerprints[0] if one else ablation.fingerprints,
                      teacher, student, sets, evaluations.fingerprints, eval_sequences, common, refs)
    table["rows"] = rows
    for variant in variants:
        table["rows"].append(ablation.run(variant, refs))
        atomic_write_json(out / ABLATION_JSON, table)
        atomic_write_bytes(out / ABLATION_MD, format_table(table).encode())
    return table


def train_run(caches: list, student: str, teacher: str, run_dir: Path, name: str, settings: dict,
              record: dict, common: dict) -> None:
    """Train one run on ``caches`` (concatenated) (on the live teacher with ``online``), resuming a checkpoint left under
    the same settings; record its speed and that it finished."""
    from unidistill.trainer.run import distill_from_cache

    args = run_arguments(run_dir, settings, common)
    resume = any(run_dir.glob("checkpoint-*"))  # stopped mid-way under these settings
    online = {}
    if ONLINE in settings:
        online = dict(teacher_model=_load_teacher(teacher),
                      online_top_k=online_top_k(settings[ONLINE], name))
    trainer = distill_from_cache(caches, student, args, resume_from_checkpoint=resume or None,
                                 **online)
    atomic_write_json(run_dir / TRAIN_SPEED_FILE, {"tokens_per_s": _tokens_per_second(trainer),
                                                   "train_seconds": _train_seconds(trainer)})
    atomic_write_json(run_dir / RUN_SETTINGS_FILE, {"settings": record, "trained": True})


def _load_teacher(teacher: str):
    from unidistill.models.loading import load_model, resolve_model_source

    return load_model(resolve_model_source(teacher))


def _train_seconds(trainer) -> float | None:
    final = [h for h in trainer.state.log_history if "train_runtime" in h]
    return final[-1]["train_runtime"] if final else None


def _tokens_per_second(trainer) -> float | None:
    """Training tokens per second of the run's last session (data loading included), from the
    Trainer's own ``train_samples_per_second``: it counts only the steps that session ran, so a
    resumed run is not credited with the steps of the sessions before it."""
    final = [h for h in trainer.state.log_history if "train_samples_per_second" in h]
    if not final:
        return None
    return final[-1]["train_samples_per_second"] * trainer.train_dataset.seq_len

"""The phase-one build loop: pack the data, run the teacher unit by unit, write, finish.

Resume is by rerunning the same command: the packed data, teacher and settings are fingerprinted
and compared with the unfinished cache; committed units are skipped, the rest is computed again.
Units are always computed in the same batches, so a resumed cache is byte-identical to an
uninterrupted one on deterministic hardware; the machine kind and batch size are among the
settings, so a resume elsewhere is refused. The same command on a complete cache with the same
settings reports it complete. Process 0 holds the output's lease for the whole build, and a
failing process stops the others between units (:mod:`unidistill.cache_builder.guard`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from unidistill import __version__
from unidistill.cache_builder.capture import LaunchedBatch, TeacherRunner
from unidistill.cache_builder.config import BuildConfig
from unidistill.cache_builder.generated_rows import TeacherGeneration
from unidistill.cache_builder.guard import BuildGuard, discard_if_nothing_committed, with_rerun_command
from unidistill.cache_builder.hidden_dtype import AUTO, resolve_hidden_dtype
from unidistill.cache_builder.inputs import PreparedBuild, prepare  # noqa: F401  (re-exported)
from unidistill.cache_builder.writers import UnitWriters, writer_threads
from unidistill.distributed import ProcessGroup
from unidistill.errors import ConfigError
from unidistill.fingerprint import tokenizer_fingerprint, weights_fingerprint
from unidistill.model_logits import CHECK_SEQUENCES
from unidistill.models.loading import device_kind, load_model
from unidistill.models.packing import check_segment_isolation
from unidistill.storage.codecs.registry import logit_codec_class
from unidistill.storage.head import head_digest, write_head
from unidistill.storage.layout import HEAD_FILE, CacheLayout, index_dtype_for
from unidistill.storage.manifest import MACHINE_SETTINGS
from unidistill.storage.writer import CacheWriter
from unidistill.text.packing import PackedTokens


def build_cache(cfg: BuildConfig, *, progress: bool = True, log=print) -> dict:
    """Build (or resume) the cache described by ``cfg``; returns the final manifest.

    Launched as several processes (``torchrun --nproc_per_node N`` or ``accelerate launch
    --multi_gpu --num_processes N``; see :mod:`unidistill.distributed`), the processes split the
    pending work units round-robin by rank: each runs its own copy of the teacher and writes its
    own units, so no two writers ever share a shard. Process 0 alone creates (or resumes) the
    cache, writes the head file and finalizes the manifest; the others open the cache only after
    it exists. The result is the same cache, byte for byte and fingerprint, as one process builds.
    """
    group = ProcessGroup.from_env()
    try:
        return _build(cfg, group, progress=progress and group.is_main,
                      log=log if group.is_main else (lambda m: None))
    finally:
        group.close()


@dataclass
class _Build:
    """One process's share of a build once set up: the loaded teacher and the cache it fills.

    ``unit_rows(start, stop)`` gives the rows ``[start, stop)`` of a unit: the packed data's
    (``tokens.rows``), or rows a unit makes itself (the seam for teacher-generated caches)."""

    tokens: PackedTokens  # the packed rows (their sample runs the start-up checks)
    unit_rows: Callable[[int, int], PackedTokens]
    device: torch.device
    head: torch.nn.Module  # the teacher's output head (stored once in an exact cache)
    layout: CacheLayout
    runner: TeacherRunner
    settings: dict  # what identifies the build (compared on resume)
    hidden_choice: str  # why the layout's hidden dtype (cache_builder.hidden_dtype)
    writer_threads: int  # this process's (see cache_builder.writers)
    writer: CacheWriter | None = None  # open once the cache exists (see _share_pending)
    generation_check: dict | None = None  # --generate: generate's logits vs the forward's


def _build(cfg: BuildConfig, group: ProcessGroup, *, progress: bool, log) -> dict:
    error, build, pending, guard = None, None, [], None
    try:
        # process 0 takes the output's lease before loading anything (cache_builder.guard)
        guard = BuildGuard.take(cfg.out, group, wait=cfg.wait, log=log)
        build = _set_up(cfg, group, log)
        if group.is_main:  # the only process that creates, overwrites or resumes the cache
            pending = _open_cache(cfg, build, guard, log)
    except BaseException as e:  # told to the other processes at the sync point, then re-raised
        error = e
    try:
        pending = _share_pending(cfg, group, build, error, pending)
        mine = pending[group.rank::group.world_size]
        t_start = time.perf_counter()
        seconds, error = _compute_units(cfg, group, build, mine, progress, guard)
        try:
            stats = group.agree(error, seconds)
        except BaseException:
            if guard.holds_lease():  # never another build's cache
                discard_if_nothing_committed(build.writer, log)
            raise
        wall = time.perf_counter() - t_start
        return _finish(cfg, group, build, stats, pending, wall, log)
    finally:
        if guard is not None:
            guard.release()


def _set_up(cfg: BuildConfig, group: ProcessGroup, log) -> _Build:
    """Check the input, load the teacher, fix the layout and the settings; nothing written."""
    threads = writer_threads(int(os.environ.get("LOCAL_WORLD_SIZE", group.world_size)))
    prepared = prepare(cfg, log)
    tokens, device, model_config = prepared.tokens, prepared.device, prepared.model_config
    ids = tokens.input_ids
    if group.distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", group.local_rank % torch.cuda.device_count())
    log(f"{ids.shape[0]} sequences x {cfg.seq_len} tokens; loading teacher {prepared.source.path} on {device} ..."
        + (f" (x{group.world_size} processes)" if group.distributed else ""))
    model = load_model(prepared.source, cfg.dtype, str(device))
    head = model.get_output_embeddings()
    hidden_dtype, hidden_choice = resolve_hidden_dtype(cfg.hidden_dtype, cfg.logits, model,
                                                       prepared.layers, ids[:cfg.batch_size],
                                                       None if tokens.document_ids is None
                                                       else tokens.document_ids[:cfg.batch_size])
    if cfg.hidden_dtype == AUTO:
        log(f"hidden states stored as {hidden_dtype}: {hidden_choice}")
    layout = CacheLayout(
        n_sequences=int(ids.shape[0]), seq_len=cfg.seq_len, stored_k=cfg.stored_k,
        vocab_size=int(head.weight.shape[0]), hidden_size=int(model_config.hidden_size),
        layers=tuple(prepared.layers), hidden_dtype=hidden_dtype, shard_size=cfg.shard_size,
        logits_mode=cfg.logits, tail_temperatures=cfg.tail_temperatures,
        sample_logp=logit_codec_class(cfg.logits).draws, packing=cfg.resolved_packing)
    runner = TeacherRunner(model, prepared.layers, cfg.stored_k, index_dtype=index_dtype_for(layout.vocab_size),
                           hidden_dtype=hidden_dtype, mode=cfg.logits,
                           tail_temperatures=layout.tail_temperatures, packing=layout.packing)
    # before anything is written: a teacher we cannot reproduce is refused
    runner.check_logits(np.array(ids[:CHECK_SEQUENCES]))
    if layout.token_codec.packed:  # ... and one that lets packed documents see each other
        check_segment_isolation(model, np.array(ids[:1]), np.array(tokens.document_ids[:1]),
                                role="teacher")
    settings = _settings(cfg, prepared, model, runner, layout)
    settings[MACHINE_SETTINGS] = {"device": device_kind(device), "batch_size": cfg.batch_size,
                                  "forward_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    build = _Build(tokens=tokens, unit_rows=tokens.rows, device=device, head=head, layout=layout,
                   runner=runner, settings=settings, hidden_choice=hidden_choice,
                   writer_threads=threads)
    if prepared.prompts is not None:
        teacher = TeacherGeneration(cfg, prepared, model, device)
        settings["generation"] = teacher.settings
        build.unit_rows, build.generation_check = teacher.unit_rows, teacher.check(log)
    return build


def _settings(cfg: BuildConfig, prepared: PreparedBuild, model, runner: TeacherRunner,
              layout: CacheLayout) -> dict:
    """The manifest's ``settings``: teacher, tokenizer and data that identify the build."""
    model_config, tokenizer = prepared.model_config, prepared.tokenizer
    settings = {
        "teacher": {**prepared.source.describe(), "architecture": type(model).__name__,
                    "n_layers": model_config.num_hidden_layers,
                    "hidden_size": model_config.hidden_size,
                    "vocab_size": layout.vocab_size,
                    # what follows the head (softcap, scale): an exact cache's logits need it
                    "logit_transform": runner.transform.to_dict(),
                    "weights_fingerprint": weights_fingerprint(model),
                    "dtype": cfg.dtype},
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer),
                      "eos_token_id": tokenizer.eos_token_id},
        "data": prepared.data_settings,
    }
    if logit_codec_class(cfg.logits).draws:
        settings["sampling"] = {"temperature": 1.0, "seed": cfg.sample_seed}
    return settings


def _open_cache(cfg: BuildConfig, build: _Build, guard: BuildGuard, log) -> list[int]:
    """Process 0, holding the lease: create or resume the cache (and write an exact cache's
    head); its pending units (none for a cache already complete with these settings)."""
    build.writer = CacheWriter.open(cfg.out, build.layout, build.settings, overwrite=cfg.overwrite)
    if build.writer.already_complete:
        return []
    guard.clear_failure()
    pending = build.writer.pending_units()
    done_units = build.layout.n_units - len(pending)
    if done_units:
        log(f"resuming {cfg.out}: {done_units}/{build.layout.n_units} units already committed")
    if build.layout.logit_codec.has_head:
        write_head(cfg.out, build.head.weight, build.head.bias)
    return pending


def _share_pending(cfg: BuildConfig, group: ProcessGroup, build: _Build | None,
                   error: BaseException | None, pending: list[int]) -> list[int]:
    """The sync point after set-up: a failure anywhere is raised everywhere; process 0's pending
    list (read before anyone writes a unit) is the one every process splits; the other processes
    open the cache process 0 made."""
    pending = group.agree(error, pending)[0]
    if group.distributed:
        if not group.is_main:
            try:  # the cache exists now, with this build's settings; never overwrite it from here
                build.writer = CacheWriter.open(cfg.out, build.layout, build.settings, overwrite=False)
            except BaseException as e:
                error = e
        group.agree(error)  # every process has the cache open
    return pending


def _unit_tokens(cfg: BuildConfig, layout: CacheLayout, units) -> int:
    return sum(np.subtract(*layout.unit_range(u)[::-1]) for u in units) * cfg.seq_len


def _compute_units(cfg: BuildConfig, group: ProcessGroup, build: _Build, units: list[int],
                   progress: bool, guard: BuildGuard) -> tuple[dict, BaseException | None]:
    """Run the teacher over ``units`` batch by batch, the writer threads writing behind it.

    Returns the seconds spent in the teacher, in the writers and waiting for them, and the error
    that stopped it (None when every unit was written): the caller tells the other processes
    before raising.
    """
    writers = None
    loop = None
    error = None
    try:
        bar = tqdm(total=int(_unit_tokens(cfg, build.layout, units)), unit="tok", unit_scale=True,
                   desc="cache-build" + (f" (process 0 of {group.world_size})" if group.distributed else ""),
                   disable=not progress, smoothing=0.1)
        writers = UnitWriters(build.writer, threads=build.writer_threads)
        loop = _BatchLoop(cfg, build, writers, bar, guard)
        try:
            loop.run(units)
        finally:
            build.runner.close()
            bar.close()
            writers.close()  # writes what was queued: finished units are never thrown away
    except BaseException as e:
        error = with_rerun_command(e, cfg, build.writer)
        guard.flag_failure(error)
    return {"teacher_seconds": loop.teacher_seconds if loop else 0.0,
            **(loop.generated if loop else {}),
            "writer_seconds": writers.write_seconds if writers else 0.0,
            "writer_wait_seconds": writers.wait_seconds if writers else 0.0}, error


class _BatchLoop:
    """The teacher over a list of units, one batch ahead: batch i+1 is launched before batch i is
    collected (see :mod:`unidistill.cache_builder.capture`); a unit goes to the writers once its
    last batch is collected. Batches are those of a sequential build (each unit cut from its
    start by ``batch_size``; sampled seeds from the batch start), so the cache is the same."""

    def __init__(self, cfg: BuildConfig, build: _Build, writers: UnitWriters, bar, guard: BuildGuard):
        self.cfg, self.build, self.writers, self.bar, self.guard = cfg, build, writers, bar, guard
        self.teacher_seconds = 0.0
        self.generated = {"answer_tokens": 0, "unfinished": 0}  # --generate: this run's units
        self._parts: list[dict] = []

    def batches(self, units):
        """(unit, batch start, batch stop, first batch of its unit, last batch of its unit) in
        build order."""
        size = self.cfg.batch_size
        for unit in units:
            start, stop = self.build.layout.unit_range(unit)
            for s in range(start, stop, size):
                yield unit, s, min(s + size, stop), s == start, s + size >= stop

    def run(self, units):
        pending = None  # (unit, last, launched batch)
        rows, start = None, 0  # the current unit's rows and its first row
        for unit, s, e, first, last in self.batches(units):
            try:
                if first:
                    self.guard.check()  # another process failed, or the lease is lost: stop now
                    start = self.build.layout.unit_range(unit)[0]
                    rows = self._timed(self.build.unit_rows, *self.build.layout.unit_range(unit))
                    for key in self.generated.keys() & rows.stats.keys():
                        self.generated[key] += rows.stats[key]
                batch = rows.rows(s - start, e - start)
                launched = self._timed(self.build.runner.launch, batch.input_ids,
                                       seed=self.cfg.sample_seed * 1_000_003 + s,
                                       target_mask=batch.target_mask, document_ids=batch.document_ids)
            except BaseException:
                if pending is not None:  # its forward is done: keep its work (and its unit's)
                    with contextlib.suppress(Exception):
                        self._finish(*pending)
                raise
            if pending is not None:
                self._finish(*pending)
            pending = (unit, last, launched)
        if pending is not None:
            self._finish(*pending)

    def _finish(self, unit: int, last: bool, launched: LaunchedBatch):
        part = self._timed(self.build.runner.collect, launched)
        self._parts.append(part)
        self.bar.update(part["input_ids"].size)
        if last:
            parts, self._parts = self._parts, []
            self.writers.submit(unit, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})

    def _timed(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.teacher_seconds += time.perf_counter() - t0


def _finish(cfg: BuildConfig, group: ProcessGroup, build: _Build, stats: list[dict],
            pending: list[int], wall: float, log) -> dict:
    """Process 0 records the build statistics and finalizes the manifest (or reports a cache
    that was already complete); every process gets the manifest."""
    manifest = None
    error = None
    if group.is_main:
        try:
            if build.writer.already_complete:
                manifest = build.writer.manifest
                log(f"{cfg.out} is already complete with these settings (fingerprint "
                    f"{manifest.get('fingerprint', '?')[:16]}); nothing to do")
            else:
                manifest = _finalize(cfg, group, build, stats, pending, wall, log)
        except BaseException as e:
            error = e
    return group.agree(error, manifest)[0]


def _finalize(cfg: BuildConfig, group: ProcessGroup, build: _Build, stats: list[dict],
              pending: list[int], wall: float, log) -> dict:
    todo_tokens = _unit_tokens(cfg, build.layout, pending)
    record = {"units_computed_this_run": len(pending), "wall_seconds": round(wall, 3),
              "teacher_seconds": round(sum(s["teacher_seconds"] for s in stats), 3),
              "writer_seconds": round(sum(s["writer_seconds"] for s in stats), 3),
              "writer_wait_seconds": round(sum(s["writer_wait_seconds"] for s in stats), 3),
              "writer_threads": build.writer_threads,
              "tokens_per_second": round(todo_tokens / wall, 1) if wall > 0 else None,
              "device": str(build.device), "processes": group.world_size,
              "hidden_dtype_choice": build.hidden_choice,
              "unidistill_version": __version__,
              "config": {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "wait")}}
    if build.generation_check is not None:
        record["generation"] = {**build.generation_check, **{
            f"{key}_this_run": sum(s.get(key, 0) for s in stats)
            for key in ("answer_tokens", "unfinished")}}
    extra = {"build": record}
    if build.layout.logit_codec.has_head:
        extra["head"] = {"file": HEAD_FILE, "sha256": head_digest(cfg.out)}
    manifest = build.writer.finalize(extra)
    log(f"cache complete: {cfg.out} ({build.layout.n_sequences * cfg.seq_len} tokens, "
        f"fingerprint {manifest['fingerprint'][:16]})")
    return manifest

"""The build that never waits: the teacher one batch ahead of its copy-out, several writer threads.

The cache a pipelined, multi-writer build makes is compared byte for byte with what the teacher
gives batch by batch (launch, then collect at once: the build before the pipeline); the writer
threads keep the commit protocol (a unit's shards durable before its marker) and a bounded queue.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from unidistill.cache_builder import capture, writers
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.cache_builder.writers import UnitWriters, writer_threads
from unidistill.errors import CacheError, ConfigError
from unidistill.models.loading import load_model, load_tokenizer, resolve_model_source
from unidistill.storage import CacheReader
from unidistill.storage.layout import index_dtype_for
from unidistill.storage.manifest import read_unit_marker, unit_marker_key
from unidistill.storage.writer import CacheWriter
from unidistill.text.data import iter_documents, pack_documents

from .test_storage_backends import SyncLog, folders_up_to, small_layout, unit_data

SEQ_LEN = 32
N_SEQ = 14  # shard 4: units of 4, 4, 4 and a short last one of 2
BATCH = 3  # not a divisor of the shard: units cut into batches of 3 and 1


def build(teacher, data, out, **kw):
    cfg = BuildConfig(teacher=str(teacher), data=str(data), out=str(out), seq_len=SEQ_LEN,
                      device="cpu", **{"top_k": 8, "layers": "0,2,4", "max_sequences": N_SEQ,
                                       "batch_size": BATCH, "shard_size": 4, **kw})
    return cfg, build_cache(cfg, progress=False, log=lambda m: None)


def batch_by_batch(cfg: BuildConfig, layout) -> dict[str, np.ndarray]:
    """Every array as the teacher gives it one batch at a time, in the build's batches and seeds
    (each unit cut from its start by batch_size; the seed from the batch start)."""
    source = resolve_model_source(cfg.teacher)
    ids = pack_documents(iter_documents(cfg.data, split=cfg.split), load_tokenizer(source),
                         cfg.seq_len, cfg.max_sequences)
    model = load_model(source, cfg.dtype, "cpu")
    runner = capture.TeacherRunner(model, list(layout.layers), layout.stored_k,
                                   index_dtype=index_dtype_for(layout.vocab_size),
                                   hidden_dtype=layout.hidden_dtype, mode=layout.logits_mode,
                                   tail_temperatures=layout.tail_temperatures)
    parts = []
    for unit in range(layout.n_units):
        start, stop = layout.unit_range(unit)
        for s in range(start, stop, cfg.batch_size):
            parts.append(runner(ids[s:min(s + cfg.batch_size, stop)],
                                seed=cfg.sample_seed * 1_000_003 + s))
    runner.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("kw", [
    {"temperatures": "1,2"},                          # topk with a tempered tail
    {"logits": "sampled", "top_k": 1, "samples": 6},  # seeded draws
    {"logits": "exact", "layers": "2"},               # the final layer is added
    {"logits": "topk-q8", "hidden_dtype": "int8"},
    {"hidden_dtype": "bfloat16"},
], ids=["topk-tempered", "sampled", "exact", "q8-int8", "bf16"])
def test_pipelined_build_with_three_writers_is_byte_identical(tmp_path, tiny_teacher_dir, text_file,
                                                              monkeypatch, kw):
    monkeypatch.setenv(writers.THREADS_ENV, "3")
    cfg, manifest = build(tiny_teacher_dir, text_file, tmp_path / "c", **kw)
    assert manifest["build"]["writer_threads"] == 3
    reader = CacheReader(tmp_path / "c")
    expected = batch_by_batch(cfg, reader.layout)
    assert set(expected) == set(reader.layout.array_specs())
    for name, want in expected.items():
        got = reader.group[name][:]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name


def test_the_next_batch_is_launched_before_the_last_one_is_collected(tmp_path, tiny_teacher_dir,
                                                                      text_file, monkeypatch):
    events = []
    launch, collect = capture.TeacherRunner.launch, capture.TeacherRunner.collect

    def launched(self, ids, **kw):
        out = launch(self, ids, **kw)
        events.append(("launch", id(out)))
        return out

    def collected(self, batch):
        events.append(("collect", id(batch)))
        return collect(self, batch)

    monkeypatch.setattr(capture.TeacherRunner, "launch", launched)
    monkeypatch.setattr(capture.TeacherRunner, "collect", collected)
    build(tiny_teacher_dir, text_file, tmp_path / "c")
    kinds = [k for k, _ in events]
    n = kinds.count("launch")
    assert n == kinds.count("collect") == 7  # 3 units of batches 3 + 1, then one batch of 2
    # launch 0, launch 1, collect 0, launch 2, collect 1, ..., collect n-1
    assert kinds == ["launch", "launch"] + ["collect", "launch"] * (n - 2) + ["collect", "collect"]
    assert [b for k, b in events if k == "collect"] == [b for k, b in events if k == "launch"]


def test_a_failing_forward_keeps_the_batch_before_it(tmp_path, tiny_teacher_dir, text_file,
                                                     monkeypatch):
    """The third forward fails: the second batch, already run, is still collected, so unit 0
    (batches 1-2) is committed; resuming computes the rest and equals a clean build."""
    calls = {"n": 0}
    launch = capture.TeacherRunner.launch

    def failing(self, ids, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return launch(self, ids, **kw)

    monkeypatch.setattr(capture.TeacherRunner, "launch", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        build(tiny_teacher_dir, text_file, tmp_path / "c")
    assert read_unit_marker(tmp_path / "c", 0) is not None
    assert read_unit_marker(tmp_path / "c", 1) is None
    monkeypatch.setattr(capture.TeacherRunner, "launch", launch)
    _, resumed = build(tiny_teacher_dir, text_file, tmp_path / "c")
    _, clean = build(tiny_teacher_dir, text_file, tmp_path / "clean")
    assert resumed["build"]["units_computed_this_run"] == 3
    assert resumed["fingerprint"] == clean["fingerprint"]


# -- the writer threads -------------------------------------------------------------------------

def test_writer_threads_commit_every_unit_once_with_its_digests(tmp_path):
    layout = small_layout(n_sequences=16)  # 8 units of 2
    writer = CacheWriter.open(tmp_path / "c", layout, {"data": "x"})
    done = []
    pool = UnitWriters(writer, threads=3, on_commit=done.append)
    data = {u: unit_data(layout, u) for u in range(layout.n_units)}
    for u, arrays in data.items():
        pool.submit(u, arrays)
    pool.close()
    assert sorted(done) == list(range(8))
    assert writer.pending_units() == []
    assert len({read_unit_marker(tmp_path / "c", u)["run_id"] for u in range(8)}) == 1
    writer.finalize()
    reader = CacheReader(tmp_path / "c")
    for u, arrays in data.items():
        start, stop = layout.unit_range(u)
        for name, want in arrays.items():
            np.testing.assert_array_equal(reader.group[name][start:stop], want, err_msg=f"{u} {name}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced files")
def test_with_concurrent_writers_each_unit_is_durable_before_its_marker(tmp_path, monkeypatch):
    root = (tmp_path / "cache").resolve()
    layout = small_layout(n_sequences=12, hidden_dtype="int8")
    writer = CacheWriter.open(str(root), layout, {"data": "x"})
    log = SyncLog(monkeypatch)
    pool = UnitWriters(writer, threads=3)
    for u in range(layout.n_units):
        pool.submit(u, unit_data(layout, u))
    pool.close()
    for unit in range(layout.n_units):
        committed = log.index("rename", root / unit_marker_key(unit))
        shards = [p for name in layout.array_specs()
                  for p in sorted((root / name / "c" / str(unit)).rglob("*")) if p.is_file()]
        assert len(shards) == len(layout.array_specs())
        for shard in shards:
            renamed = log.index("rename", shard, last=True)
            assert renamed < committed
            for path in [shard, *folders_up_to(root, shard)]:
                assert log.synced_between(path, renamed, committed), (unit, shard, path)


def test_the_queue_bounds_what_waits_for_the_writers(tmp_path, monkeypatch):
    """With writes held up, submit returns for the units the threads hold plus the queue's depth,
    then blocks until a unit is written."""
    layout = small_layout(n_sequences=20)  # 10 units
    writer = CacheWriter.open(tmp_path / "c", layout, {"data": "x"})
    release = threading.Event()
    real = CacheWriter.write_unit

    def held(self, unit, arrays):
        release.wait(30)
        return real(self, unit, arrays)

    monkeypatch.setattr(CacheWriter, "write_unit", held)
    pool = UnitWriters(writer, threads=2, depth=3)
    submitted = []

    def producer():
        for u in range(layout.n_units):
            pool.submit(u, unit_data(layout, u))
            submitted.append(u)

    t = threading.Thread(target=producer)
    t.start()
    deadline = time.time() + 10
    while len(submitted) < 5 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert len(submitted) == 5 and t.is_alive()  # 2 taken by the threads + 3 queued; the sixth waits
    release.set()
    t.join(30)
    pool.close()
    assert submitted == list(range(10)) and writer.pending_units() == []
    assert pool.wait_seconds > 0.2


def test_a_failed_unit_stops_the_writers_and_keeps_the_committed_ones(tmp_path, monkeypatch):
    layout = small_layout(n_sequences=12)  # 6 units
    writer = CacheWriter.open(tmp_path / "c", layout, {"data": "x"})
    real = CacheWriter.write_unit

    def failing(self, unit, arrays):
        if unit == 2:
            raise OSError(28, "No space left on device")
        return real(self, unit, arrays)

    monkeypatch.setattr(CacheWriter, "write_unit", failing)
    pool = UnitWriters(writer, threads=2)
    with pytest.raises(CacheError, match="out of disk space.*Committed units are kept"):
        for u in range(layout.n_units):
            pool.submit(u, unit_data(layout, u))
            time.sleep(0.05)  # let the writers run, so the failure is seen at a later submit
        pool.close()
    with pytest.raises(CacheError, match="out of disk space"):
        pool.close()  # close after a failure still reports it, once every thread has stopped
    committed = set(range(layout.n_units)) - set(writer.pending_units())
    assert 2 not in committed and {0, 1} <= committed


def test_writer_threads_from_the_environment(monkeypatch):
    monkeypatch.setattr(writers, "usable_cores", lambda: 16)
    monkeypatch.delenv(writers.THREADS_ENV, raising=False)
    assert writer_threads() == 8
    assert writer_threads(local_processes=4) == 2
    assert writer_threads(local_processes=16) == 1
    monkeypatch.setattr(writers, "usable_cores", lambda: 2)
    assert writer_threads() == 1
    monkeypatch.setenv(writers.THREADS_ENV, "5")
    assert writer_threads() == 5
    for bad in ("0", "-1", "two", ""):
        monkeypatch.setenv(writers.THREADS_ENV, bad)
        with pytest.raises(ConfigError, match="UNIDISTILL_WRITER_THREADS.*whole number"):
            writer_threads()


def test_a_bad_writer_thread_count_is_refused_before_the_cache_is_made(tmp_path, tiny_teacher_dir,
                                                                       text_file, monkeypatch):
    monkeypatch.setenv(writers.THREADS_ENV, "many")
    with pytest.raises(ConfigError, match="UNIDISTILL_WRITER_THREADS"):
        build(tiny_teacher_dir, text_file, tmp_path / "c")
    assert not (tmp_path / "c").exists()

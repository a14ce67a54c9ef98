"""Writer threads behind the teacher: whole units through a bounded queue, several at a time.

Units are independent (each is one shard of every array, see :mod:`unidistill.storage.writer`),
so several threads can write different units at once; each thread runs the whole commit of its
unit (``CacheWriter.write_unit``: arrays, fsync of the unit's shards and folders, then its
marker), so the commit protocol is the same as with one thread. What they spend their time on
(Blosc, crc32c, sha256 digests, fsync, Zarr's Python) mostly releases the GIL, so threads add
throughput where cores are free (a GPU build); on a CPU build the teacher uses the cores and one
thread is the default.

Memory stays bounded: ``submit`` blocks while ``depth`` units wait, so at most ``depth`` queued
units plus one per thread are held, besides the unit the teacher is filling.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time

from unidistill.errors import CacheError, ConfigError
from unidistill.storage.writer import CacheWriter

THREADS_ENV = "UNIDISTILL_WRITER_THREADS"
MAX_DEFAULT_THREADS = 8


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def writer_threads(local_processes: int = 1) -> int:
    """Writer threads per build process: ``$UNIDISTILL_WRITER_THREADS`` when set, else half the
    cores this process may use (its share when ``local_processes`` share the machine), between 1
    and 8. The other half is left to the teacher's thread (kernel launches on a GPU, the forward's
    own threads on a CPU)."""
    given = os.environ.get(THREADS_ENV)
    if given is not None:
        try:
            n = int(given)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"{THREADS_ENV}={given!r}: expected a whole number of writer threads "
                              ">= 1; unset it for the default (half the cores, at most "
                              f"{MAX_DEFAULT_THREADS})")
        return n
    share = usable_cores() // max(1, local_processes)
    return max(1, min(MAX_DEFAULT_THREADS, share // 2))


class UnitWriters:
    """``threads`` threads writing and committing whole units from one queue of ``depth``.

    ``submit`` hands a unit over (blocking while the queue is full) and raises a failure of an
    earlier unit; ``close`` waits for every submitted unit, then raises the first failure.
    After a failure the threads finish the units they hold and drop the queued ones: every unit
    committed stays committed, and a rerun of the same command resumes from there.
    """

    def __init__(self, writer: CacheWriter, threads: int = 1, depth: int | None = None,
                 on_commit=None):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.writer = writer
        self.on_commit = on_commit
        self.threads = threads
        self._queue: queue.Queue = queue.Queue(maxsize=depth or max(2, threads))
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.write_seconds = 0.0  # summed over threads
        self.wait_seconds = 0.0  # the teacher's side, blocked on a full queue
        self._threads = [threading.Thread(target=self._run, name=f"unidistill-writer-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure; the main thread reports it
            unit, arrays = item
            try:
                t0 = time.perf_counter()
                self.writer.write_unit(unit, arrays)
                with self._lock:
                    self.write_seconds += time.perf_counter() - t0
                if self.on_commit:
                    self.on_commit(unit)
            except BaseException as e:  # reported to the main thread at the next submit/close
                with self._lock:
                    if self._error is None:
                        self._error = e

    def _raise_if_failed(self):
        if self._error is None:
            return
        e = self._error
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"out of disk space while writing the cache at {self.writer.root}: {e}. "
                             "Committed units are kept; free space and rerun the same command "
                             "to resume.") from e
        raise CacheError(f"writing the cache at {self.writer.root} failed: {type(e).__name__}: {e}. "
                         "Committed units are kept; rerun the same command to resume.") from e

    def submit(self, unit: int, arrays: dict):
        self._raise_if_failed()
        t0 = time.perf_counter()
        self._queue.put((unit, arrays))
        self.wait_seconds += time.perf_counter() - t0

    def close(self):
        """Wait until every submitted unit is written, then re-raise a writer failure."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._raise_if_failed()

"""Reading ahead of a :class:`~unidistill.storage.reader.CacheReader`: the next shards, in the
background, on Zarr's event loop (no thread of its own; the caller never waits for it).

A cache's shard u of every array is *work unit* u: ``shard_size`` consecutive sequences. "Next"
is the storage order, the only order a reader sees. The sampler's order is known to the
DataLoader, not to the dataset: a shuffled sampler (the Trainer's default) asks for sequences no
reader can guess, and the DataLoader's own workers already read its batches ahead
(``dataloader_num_workers``, ``dataloader_prefetch_factor``). So the prefetcher does what only
the storage side can:

- **With a read-through folder** (``CacheReader(local_dir=...)``): after each read it keeps up to
  ``depth`` copies in flight of the next units not copied yet, walking forward from the last unit
  read (wrapping round). In storage order that is the next shard; under a shuffled sampler it is a
  copy of the whole cache running ahead of the reads, so that more and more of them find their
  shard local. Each copy is the unit's shard file of every array read, whole (one request each).
- **Without one**: only when the reads are sequential (a batch of consecutive ascending indices,
  or one index right after the previous read: a ``SequentialSampler``, ``evaluate``, a scan), it
  reads the next ``depth`` units whole (one request per array per unit instead of two per
  sequence) into memory and serves their sequences from there. Memory: ``depth`` + 1 units of the
  arrays read, per process. A read that is not sequential schedules nothing.

A background read that fails is not lost: the read that needs its unit raises its error (memory)
or fetches the shard again (folder) and raises there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np

from unidistill.errors import ConfigError


def zarr_loop() -> asyncio.AbstractEventLoop:
    """Zarr's event loop (a background thread), where its stores' clients live."""
    from zarr.core import sync

    return sync._get_loop()


def is_sequential(indices: list[int], previous: int | None) -> bool:
    """A run of consecutive ascending indices (two or more), or one index after ``previous``."""
    if len(indices) == 1:
        return previous is not None and indices[0] == previous + 1
    return indices == list(range(indices[0], indices[0] + len(indices)))


def check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ConfigError(f"prefetch must be a whole number of shards >= 0 (0 = off), got {depth!r}")
    return depth


class UnitPrefetcher:
    """One process's read-ahead for ``reader`` (made again in each DataLoader worker)."""

    def __init__(self, reader, depth: int):
        self.reader = reader
        self.depth = check_depth(depth)
        self.shard_size = reader.layout.shard_size
        self.n_units = reader.layout.n_units
        self._held: dict[int, tuple[frozenset, concurrent.futures.Future]] = {}  # memory mode
        self._copies: dict[int, concurrent.futures.Future] = {}  # folder mode, in flight
        self._copied: set[int] = set()  # folder mode: units whose files of _copy_names are local
        self._copy_names: frozenset = frozenset()
        self._previous: int | None = None

    def fetch_many(self, names: list[str], indices: list[int]) -> list[dict[str, np.ndarray]]:
        store = self.reader.read_through
        if store is not None:
            got = self.reader.fetch_now(names, indices)
            self._copy_ahead(store, names, max(indices) // self.shard_size)
            return got
        sequential = is_sequential(indices, self._previous)
        self._previous = indices[-1]
        got = self._from_held(names, indices)
        if sequential:
            first, last = indices[0] // self.shard_size, indices[-1] // self.shard_size
            self._hold(names, first, last)
        return got

    # -- memory mode -------------------------------------------------------------------------
    def _from_held(self, names, indices) -> list[dict[str, np.ndarray]]:
        wanted = frozenset(names)
        out: list[dict | None] = [None] * len(indices)
        for k, index in enumerate(indices):
            unit = index // self.shard_size
            held = self._held.get(unit)
            if held is not None and wanted <= held[0]:
                arrays = held[1].result()  # waits for a unit in flight; raises its error
                row = index - unit * self.shard_size
                out[k] = {n: np.array(arrays[n][row]) for n in names}
        missing = [k for k, got in enumerate(out) if got is None]
        if missing:
            for k, got in zip(missing, self.reader.fetch_now(names, [indices[k] for k in missing])):
                out[k] = got
        return out

    def _hold(self, names, first: int, last: int) -> None:
        """Keep units last+1 .. last+depth held or in flight; drop those behind ``first``."""
        wanted = frozenset(names)
        for unit in [u for u in self._held if u < first or u > last + self.depth]:
            del self._held[unit]
        for unit in range(last + 1, min(last + 1 + self.depth, self.n_units)):
            held = self._held.get(unit)
            if held is None or not wanted <= held[0]:
                coro = self.reader.read_unit(list(names), unit)
                self._held[unit] = (wanted, asyncio.run_coroutine_threadsafe(coro, zarr_loop()))

    # -- folder mode -------------------------------------------------------------------------
    def _copy_ahead(self, store, names, last: int) -> None:
        wanted = frozenset(names)
        if wanted != self._copy_names:  # other arrays: what was copied may not cover them
            self._copy_names, self._copied = wanted, set()
        for unit, future in list(self._copies.items()):
            if future.done():
                del self._copies[unit]
                if future.exception() is None:
                    self._copied.add(unit)
        budget = self.depth - len(self._copies)
        unit = last
        for _ in range(self.n_units):
            if budget <= 0 or len(self._copied) == self.n_units:
                return
            unit = (unit + 1) % self.n_units
            if unit in self._copied or unit in self._copies:
                continue
            keys = self.reader.unit_keys(names, unit)
            if all(store.is_copied(k) for k in keys):
                self._copied.add(unit)
                continue
            self._copies[unit] = asyncio.run_coroutine_threadsafe(store.copy_all(keys), zarr_loop())
            budget -= 1

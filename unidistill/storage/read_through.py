"""A local read-through copy of a remote cache: each file is copied whole on its first read.

:class:`ReadThroughStore` wraps the Zarr store of a remote cache (``FsspecStore`` or
``ObjectStore``). The first read of any key (a shard file, a ``zarr.json``) fetches the whole
object in one request, writes it under the local folder (temporary name, then a rename: a reader
in another process sees no file or the whole one) and answers the read from it; every later read
of that key is served from the local file by Zarr's ``LocalStore``, byte ranges included, without
a request. Concurrent reads of one key in a process share one download (a batch often reads
several sequences of one shard); two processes may both copy a file, and the second rename
replaces identical bytes.

Why not fsspec's ``simplecache::`` / ``filecache::`` or Zarr's ``CacheStore``: fsspec 2026.7's
whole-file caches answer a negative ``start`` (the suffix read Zarr makes for every shard index)
with ``OSError: [Errno 22] Invalid argument`` (fsspec/filesystem_spec#2101, open), and they
download into the final file name, so a concurrent reader can open half a file; Zarr 3.1's
experimental ``CacheStore`` keeps byte-range reads (all a sharded read makes) in memory only, so
no shard file ever reaches the folder.

The folder must be named per cache content: :class:`~unidistill.storage.reader.CacheReader`
puts a cache's copy under ``<local_dir>/<content fingerprint>``, so a cache rebuilt at the same
URL is never served from the old copy. Nothing here is written back: the store is read-only.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore, WrapperStore


def byte_slice(data: bytes, byte_range: ByteRequest | None) -> bytes:
    """The bytes of ``data`` that ``byte_range`` names, as Zarr's stores read them."""
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start:byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset:]
    if isinstance(byte_range, SuffixByteRequest):
        return data[max(0, len(data) - byte_range.suffix):]
    raise TypeError(f"unexpected byte range {byte_range!r}; expected a Range, Offset or "
                    "Suffix ByteRequest")


def _write_whole(path: Path, data: bytes) -> None:
    """``data`` at ``path`` under a temporary name, then renamed: never half a file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ReadThroughStore(WrapperStore[Store]):
    """Read-only Zarr store: ``store``'s files, each copied whole to ``folder`` on first read."""

    def __init__(self, store: Store, folder):
        super().__init__(store)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._local = LocalStore(self.folder, read_only=True)
        self._copying: dict[str, asyncio.Future] = {}  # key -> its download, on Zarr's loop
        self.copied = 0  # files this store copied (a count, for benchmarks and tests)

    def _with_store(self, store: Store) -> "ReadThroughStore":
        return type(self)(store, self.folder)

    def __repr__(self) -> str:
        return f"ReadThroughStore({self._store!r}, {str(self.folder)!r})"

    def is_copied(self, key: str) -> bool:
        return (self.folder / key).is_file()

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        if self.is_copied(key):
            return await self._local.get(key, prototype, byte_range)
        data = await self.copy(key)
        return None if data is None else prototype.buffer.from_bytes(byte_slice(data, byte_range))

    async def copy(self, key: str) -> bytes | None:
        """Copy ``key``'s object to the folder (once, however many ask at the same time); its
        bytes, or None when the remote store holds no such key (nothing is written then)."""
        pending = self._copying.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._download(key))
            self._copying[key] = pending
            pending.add_done_callback(lambda _: self._copying.pop(key, None))
        return await asyncio.shield(pending)

    async def _download(self, key: str) -> bytes | None:
        buffer = await self._store.get(key, default_buffer_prototype())
        if buffer is None:
            return None
        data = buffer.to_bytes()
        await asyncio.to_thread(_write_whole, self.folder / key, data)
        self.copied += 1
        return data

    async def copy_all(self, keys: Iterable[str]) -> None:
        """Copy every key not copied yet, concurrently (the prefetcher's copy-ahead)."""
        await asyncio.gather(*(self.copy(k) for k in keys if not self.is_copied(k)))

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]
                                 ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def _get_many(self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
                        ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    @property
    def read_only(self) -> bool:
        return True

    @property
    def supports_writes(self) -> bool:
        return False

    @property
    def supports_deletes(self) -> bool:
        return False

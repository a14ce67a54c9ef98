"""Small durable-file helpers: atomic JSON writes, content digests and the UTC timestamps records carry."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one, never half.

    The bytes go to a temporary file in the same directory, are fsynced, then renamed over
    ``path``; the directory is fsynced so the rename itself survives a power cut, and so is the
    parent of every folder this call had to create.
    """
    path = Path(path)
    created, folder = [], path.parent
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for folder in created:  # the new folders' own entries
        _fsync_path(folder.parent)
    _fsync_path(path.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(root: Path, keys) -> list[str]:
    """fsync the files ``root/<key>`` and every folder from each one's parent up to ``root``.

    For files another writer already put in place (Zarr's ``LocalStore`` writes a temporary file
    and renames it, without fsync): after this returns, the bytes and the folder entries naming
    them survive a power cut. Files first, then folders, deepest first. A key with no file is
    skipped (its folders are still synced, so a deletion is durable too) and returned, for the
    caller to judge.
    """
    root = Path(root)
    missing, folders = [], {}
    for key in keys:
        path = root / key
        if path.is_file():
            _fsync_path(path)
        else:
            missing.append(key)
        folder = path.parent
        while True:
            if folder.is_dir():
                folders[folder] = len(folder.relative_to(root).parts)
            if folder == root:
                break
            folder = folder.parent
    for folder in sorted(folders, key=folders.get, reverse=True):
        _fsync_path(folder)
    return missing


def json_bytes(obj) -> bytes:
    """How every JSON record of unidistill is written: indented, keys sorted, UTF-8."""
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def utc_timestamp() -> str:
    """Now in UTC, to the second, as every record stores it: ``2026-01-31T12:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def array_digest(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes (C order)."""
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def create_exclusive_file(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if no file is there (``O_CREAT | O_EXCL``, atomic
    on a local file system: of two processes exactly one creates it); False when one is there.
    The bytes are fsynced, then the folder. A reader can see the file empty for the moment
    between its creation and the write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_path(path.parent)
    return True

"""Where a cache lives: a local folder, or an fsspec URL (``s3://bucket/prefix``, ``memory://``...).

Everything the storage package does outside Zarr arrays goes through a :class:`CacheLocation`:
the Zarr store to open, existence and listing, small files (unit markers, the head file),
durability of what Zarr wrote, removal for ``--overwrite`` and bytes stored for ``cache-info``.

Every location is one fsspec file system and a root path in it: a plain path (or a ``file://``
URL) is fsspec's ``LocalFileSystem``, any other URL what ``fsspec.core.url_to_fs`` makes of it.
Listing, reading, deleting and removal are the same calls for all, so they mean the same
everywhere:

- **A file** is a file on disk or an object in a bucket. Folders are not things: a location is
  *empty* when no file is stored under its root, whatever folders (a local folder holding only
  empty folders, ``memory://`` pseudo-folders, zero-byte ``prefix/`` folder-marker objects) sit
  there; it *exists* when its root is a file or it is not empty. Listings name files only,
  recursively, strictly under the root (a root that is itself a file lists nothing).
- **Removal** deletes every file under the root, then the folders left (local folders,
  pseudo-folders, folder markers), but never a bucket: a cache at a bucket's root keeps it.

Three differences are kept, each for a reason:

- **Atomic small files.** Locally a file is written to a temporary name, fsynced and renamed
  (then its folder fsynced); on an object store one PUT, which the store applies atomically (a
  reader sees the old object or the new one, never half) and which is durable once acknowledged.
- **Zarr store.** Locally Zarr's own ``LocalStore`` (Zarr's fastest path on disk); otherwise a
  ``zarr.storage.FsspecStore``.
- **Durability** (:meth:`CacheLocation.make_durable`): locally files and their folders are
  fsynced; an object store has no fsync and needs none (see above).

Buckets are never created: a URL whose bucket does not exist is refused with a message saying so.

Credentials and endpoint come from the environment as for any AWS client
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``); extra fsspec options
for URLs can be given as JSON in ``UNIDISTILL_STORAGE_OPTIONS``. The fsspec file system is
created lazily and again in each process (a forked DataLoader worker gets its own; fsspec's async
file systems refuse to be used across a fork), and is never pickled.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from unidistill.errors import CacheNotFoundError, ConfigError
from unidistill.storage.files import (
    atomic_write_bytes, create_exclusive_file, fsync_files, json_bytes,
)

STORAGE_OPTIONS_ENV = "UNIDISTILL_STORAGE_OPTIONS"
S3_PROTOCOLS = ("s3", "s3a")
# Schemes whose first path component is a bucket / container that must exist beforehand.
BUCKET_PROTOCOLS = S3_PROTOCOLS + ("gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2")
LOCAL_PROTOCOLS = tuple(LocalFileSystem.protocol)  # ("file", "local"): URLs that name a folder
# What reading a key that is not a file raises on some file system: no file there.
_NOT_A_FILE = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def is_url(path) -> bool:
    """True for ``scheme://...`` strings (``file://`` included), False for plain paths."""
    return isinstance(path, str) and "://" in path and not path.startswith("/")


def _env_storage_options(protocol: str) -> dict:
    # Listings are not cached: markers and shards are written by another file system instance
    # (Zarr's) or another process, and a stale listing would hide them.
    opts = {"use_listings_cache": False}
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if raw:
        try:
            opts.update(json.loads(raw))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{STORAGE_OPTIONS_ENV} must hold a JSON object of fsspec options, "
                              f"got {raw!r} ({e}); e.g. '{{\"anon\": false}}'") from None
        except (TypeError, ValueError):
            raise ConfigError(f"{STORAGE_OPTIONS_ENV} must hold a JSON object of fsspec options, "
                              f"got {raw!r}") from None
    if protocol in S3_PROTOCOLS:
        # botocore >= 1.31 reads these itself; passing them keeps older versions right too.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get("client_kwargs", {}):
            opts["endpoint_url"] = endpoint
    return opts


def as_location(root) -> "CacheLocation":
    """``root`` itself when it already is a :class:`CacheLocation` (keeps its connection)."""
    return root if isinstance(root, CacheLocation) else CacheLocation(root)


class CacheLocation:
    """A cache root: local folder or fsspec URL. Keys are '/'-separated, relative to the root."""

    def __init__(self, root, storage_options: dict | None = None):
        if isinstance(root, CacheLocation):
            root, storage_options = root.root, storage_options or root._extra_options
        self._extra_options = dict(storage_options or {})
        if is_url(root):
            scheme, rest = root.split("://", 1)
            if scheme.lower() in LOCAL_PROTOCOLS:
                root = rest  # file:///abs/path -> /abs/path: a plain local folder
        if is_url(root):
            scheme, rest = root.split("://", 1)
            self.url = f"{scheme}://{rest.rstrip('/')}"
            self.protocol = scheme.lower()
            self.root = self.url
            self.is_local = False
        else:
            self.root = Path(root)
            self.url = str(self.root)
            self.protocol = "file"
            self.is_local = True
        self._fs = None
        self._fs_path = None
        self._fs_pid = None

    # -- identity --------------------------------------------------------------------------------
    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"CacheLocation({str(self.root)!r})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_fs=None, _fs_path=None, _fs_pid=None)  # rebuilt in the receiving process
        return state

    # -- the fsspec file system --------------------------------------------------------------------
    def storage_options(self) -> dict:
        """The fsspec options of this location: for a URL the environment's (see the module
        docstring) and those given; for a local folder only those given."""
        if self.is_local:
            return dict(self._extra_options)
        return {**_env_storage_options(self.protocol), **self._extra_options}

    def _connect(self):
        if self._fs is not None and self._fs_pid == os.getpid():
            return self._fs, self._fs_path
        if self.is_local:
            # Not through url_to_fs: a path is a path, even one holding '::' (fsspec's URL
            # chaining) or glob characters.
            fs, path = LocalFileSystem(**self.storage_options()), os.path.abspath(self.root)
        else:
            try:
                from fsspec.core import url_to_fs

                fs, path = url_to_fs(self.url, **self.storage_options())
            except ImportError as e:
                hint = ("pip install 'unidistill[s3]' (s3fs)" if self.protocol in S3_PROTOCOLS
                        else f"install the fsspec implementation of {self.protocol}://")
                raise ConfigError(f"cannot open {self.url}: {e}. To use {self.protocol}:// caches, "
                                  f"{hint}.") from None
            except ValueError as e:
                raise ConfigError(f"cannot open cache location {self.url!r}: {e}. Expected a local "
                                  "folder or an fsspec URL such as s3://bucket/prefix, memory://name "
                                  "or file:///abs/path.") from None
            if isinstance(fs, LocalFileSystem):
                raise ConfigError(f"cache location {self.url!r} names a local folder through a "
                                  f"{self.protocol}:// URL; expected a plain path or file:///abs/path "
                                  "for a local cache (writes to a folder must go through fsync + "
                                  "rename).")
        self._fs, self._fs_path, self._fs_pid = fs, path.rstrip("/") or "/", os.getpid()
        return self._fs, self._fs_path

    @property
    def fs(self):
        return self._connect()[0]

    def _path(self, key: str = "") -> str:
        base = self._connect()[1]
        return f"{base.rstrip('/')}/{key}" if key else base

    @property
    def bucket(self) -> str | None:
        if self.protocol not in BUCKET_PROTOCOLS:
            return None
        return self.url.split("://", 1)[1].split("/", 1)[0]

    def _is_bucket_root(self) -> bool:
        return self.bucket is not None and self._path().strip("/") == self.bucket

    def _describe_endpoint(self) -> str:
        opts = self.storage_options()
        endpoint = opts.get("endpoint_url") or opts.get("client_kwargs", {}).get("endpoint_url")
        return f" at endpoint {endpoint}" if endpoint else ""

    @contextmanager
    def _errors(self, action: str):
        """Turn client errors into messages that say what failed and how to fix it."""
        try:
            yield
        except (ConfigError, CacheNotFoundError):
            raise
        except Exception as e:
            name = type(e).__name__
            if name in ("NoCredentialsError", "PartialCredentialsError"):
                raise ConfigError(
                    f"cannot {action} {self.url}: no usable credentials ({e}). Set AWS_ACCESS_KEY_ID "
                    "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for a "
                    "non-AWS S3 service, then rerun.") from None
            if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"):
                raise ConfigError(
                    f"cannot {action} {self.url}: the storage service cannot be reached ({e}). "
                    "Check AWS_ENDPOINT_URL / the network, then rerun.") from None
            if isinstance(e, PermissionError):
                fix = ("Check the permissions of this folder and its files" if self.is_local
                       else "Check the credentials' permissions on this bucket and prefix")
                raise ConfigError(f"cannot {action} {self.url}: access denied ({e}). {fix}.") from None
            if isinstance(e, FileNotFoundError) and self.bucket and not self._bucket_exists():
                raise self._no_bucket_error(action) from None
            raise

    def _bucket_exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.bucket))
        except Exception:
            return True  # unknown: let the original error speak

    def _no_bucket_error(self, action: str) -> ConfigError:
        example = f" (e.g. `aws s3 mb s3://{self.bucket}`)" if self.protocol in S3_PROTOCOLS else ""
        return ConfigError(
            f"cannot {action} {self.url}: bucket {self.bucket!r} does not exist"
            f"{self._describe_endpoint()}. Expected a URL {self.protocol}://<existing bucket>/<prefix>; "
            f"create the bucket first{example} or fix the bucket name.")

    def check_container(self, action: str = "use") -> None:
        """Raise a clear error for an unknown URL scheme, a missing fsspec implementation, or a
        bucket that does not exist / cannot be reached with the credentials at hand. Buckets are
        never created."""
        self._connect()
        if not self.bucket:
            return
        with self._errors(action):
            if not self.fs.exists(self.bucket):
                raise self._no_bucket_error(action)

    # -- the Zarr store ----------------------------------------------------------------------------
    def zarr_store(self, mode: str = "r"):
        """What ``zarr.open_group`` takes: Zarr's ``LocalStore`` for a local folder, an
        ``FsspecStore`` for a URL; read-only for mode ``r``, where an ``s3://`` cache is read by
        obstore's ``ObjectStore`` instead with ``UNIDISTILL_S3_READER=obstore``
        (:mod:`~unidistill.storage.obstore_reader`)."""
        read_only = mode == "r"
        if self.is_local:
            from zarr.storage import LocalStore

            return LocalStore(self._path(), read_only=read_only)
        from zarr.storage import FsspecStore

        from unidistill.storage.obstore_reader import obstore_zarr_store, s3_reader

        if read_only and self.protocol in S3_PROTOCOLS and s3_reader() == "obstore":
            return obstore_zarr_store(self.url, self.storage_options())
        with self._errors("open"):
            return FsspecStore.from_url(self.url, storage_options=self.storage_options(),
                                        read_only=read_only)

    def open_group(self, mode: str = "r", attributes: dict | None = None, store=None):
        """The cache's root Zarr group, on :meth:`zarr_store` or on ``store`` (a wrapper of it)."""
        import zarr

        with self._errors("open"):
            store = self.zarr_store(mode) if store is None else store
            return zarr.open_group(store, mode=mode, attributes=attributes)

    # -- existence and listing ---------------------------------------------------------------------
    def _files(self, prefix: str = "") -> dict[str, dict]:
        """{key: fsspec info} of every file strictly under ``prefix`` (recursive)."""
        base = self._path(prefix.strip("/"))
        with self._errors("list"):
            found = self.fs.find(base, detail=True)
        under, root = base.rstrip("/") + "/", self._path().rstrip("/") + "/"
        # A name ending in '/' is a folder-marker object (what S3 consoles make for a folder),
        # listed by some clients as a zero-byte file: a folder, not a file.
        return {name[len(root):]: info for name, info in found.items()
                if name.startswith(under) and not name.endswith("/")
                and info.get("type", "file") == "file"}

    def exists(self) -> bool:
        """True when the root is a file or holds at least one file (folders alone do not count)."""
        return self.is_file() or not self.is_empty()

    def is_file(self, key: str = "") -> bool:
        with self._errors("read"):
            return bool(self.fs.isfile(self._path(key)))

    def is_empty(self, ignore: str | None = None) -> bool:
        """True when no file is stored under the root (empty folders do not count); files under
        the prefix ``ignore`` (a build's control files) do not count either."""
        return not [key for key in self._files() if not (ignore and key.startswith(ignore))]

    def list_files(self, prefix: str = "") -> list[str]:
        """Keys of every file under ``prefix`` (recursive), relative to the root, sorted."""
        return sorted(self._files(prefix))

    def file_sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: bytes} of every file under ``prefix`` (recursive; keys relative to the root): file
        sizes on disk, object sizes in a bucket. One listing."""
        return {key: int(info.get("size") or 0) for key, info in self._files(prefix).items()}

    def disk_bytes(self, prefix: str = "") -> int:
        """Bytes stored under ``prefix`` (the whole cache for "")."""
        return sum(self.file_sizes(prefix).values())

    # -- small files -------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes | None:
        """The file's bytes, or None when no file is stored at ``key``."""
        with self._errors("read"):
            try:
                return self.fs.cat_file(self._path(key))
            except _NOT_A_FILE:
                if self.bucket and not self._bucket_exists():
                    raise
                return None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace the file whole: temporary file, fsync and rename locally; one PUT on an object
        store."""
        with self._errors("write to"):
            if self.is_local:
                atomic_write_bytes(Path(self._path(key)), data)
            else:
                self.fs.pipe_file(self._path(key), data)

    def write_json(self, key: str, obj) -> None:
        self.write_bytes(key, json_bytes(obj))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write a new file at ``key`` only if none is there; False (nothing written) if one is.

        Locally ``open(O_CREAT | O_EXCL)``, then the bytes, fsync, and the folder fsynced; on S3
        a conditional PUT (``If-None-Match: *``, s3fs's ``mode="create"``), which the service
        applies atomically: of two writers exactly one succeeds. Other fsspec stores get fsspec's
        ``mode="create"`` (``memory://``: a check then a write, atomic within one process only).
        """
        with self._errors("write to"):
            if self.is_local:
                return create_exclusive_file(Path(self._path(key)), data)
            try:
                self.fs.pipe_file(self._path(key), data, mode="create")
            except FileExistsError:
                return False
            return True

    def modified_seconds_ago(self, key: str) -> float | None:
        """Seconds since the file at ``key`` was last written (by this machine's clock), or None
        when there is no file."""
        with self._errors("read"):
            try:
                return time.time() - self.fs.modified(self._path(key)).timestamp()
            except _NOT_A_FILE:
                return None

    def delete(self, key: str) -> None:
        """Delete the file at ``key``; nothing to do when there is none."""
        with self._errors("delete from"):
            try:
                self.fs.rm_file(self._path(key))
            except FileNotFoundError:
                pass

    def make_durable(self, keys: Iterable[str]) -> list[str]:
        """Make the files at ``keys`` survive a power cut, with the folder entries that name them.

        Locally: fsync each file, then each folder from its parent up to the root (a rename or a
        new folder is durable only once its folder is). On an object store nothing is to be done:
        a PUT is durable once acknowledged, and there is no fsync. Returns the keys that hold no
        file (locally; [] otherwise), for the caller to judge.
        """
        if not self.is_local:
            return []
        keys = list(keys)
        with self._errors("sync"):
            return fsync_files(Path(self._path()), keys)

    # -- whole-cache operations --------------------------------------------------------------------
    def remove(self, keep: str | None = None) -> None:
        """Delete the cache and everything under it (``--overwrite``): every file under the root,
        then the folders left; a bucket itself is never deleted. Files under the prefix ``keep``
        (the lease of the build that removes it) stay, with their folders."""
        with self._errors("delete"):
            files = [self._path(key) for key in self._files() if not (keep and key.startswith(keep))]
            if files:
                self.fs.rm(files)  # one by one (batched by the client): not the bucket
            if not keep and not self._is_bucket_root() and self.fs.isdir(self._path()):
                self.fs.rm(self._path(), recursive=True)  # folders, pseudo-folders, folder markers
            self.fs.invalidate_cache()

"""Where a cache lives: a local folder, or an fsspec URL (``s3://bucket/prefix``, ``memory://``...).

Everything the storage package does outside Zarr arrays goes through a :class:`CacheLocation`:
the Zarr store to open, existence and listing, small files (unit markers, the head file),
removal for ``--overwrite`` and bytes on disk for ``cache-info``.

- A plain path (or a ``file://`` URL) stays exactly what it was before remote caches existed:
  Zarr opens it as a ``LocalStore`` and small files are written with fsync + rename.
- Any other URL goes through fsspec: the Zarr store is a ``zarr.storage.FsspecStore`` and small
  files are written with one PUT, which object stores apply atomically (a reader sees the old
  object or the new one, never half).

Credentials and endpoint come from the environment as for any AWS client
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``); extra fsspec options
can be given as JSON in ``UNIDISTILL_STORAGE_OPTIONS``. The fsspec file system is created
lazily and again in each process (a forked DataLoader worker gets its own; fsspec's async file
systems refuse to be used across a fork), and is never pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from unidistill.errors import CacheNotFoundError, ConfigError
from unidistill.storage.files import atomic_write_bytes, json_bytes

STORAGE_OPTIONS_ENV = "UNIDISTILL_STORAGE_OPTIONS"
S3_PROTOCOLS = ("s3", "s3a")
# Schemes whose first path component is a bucket / container that must exist beforehand.
BUCKET_PROTOCOLS = S3_PROTOCOLS + ("gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2")


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
        if isinstance(root, str) and root.startswith("file://"):
            root = root[len("file://"):]  # file:///abs/path -> /abs/path: a plain local folder
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

    # -- the fsspec file system (remote only) ------------------------------------------------------
    def storage_options(self) -> dict:
        return {**_env_storage_options(self.protocol), **self._extra_options}

    def _connect(self):
        if self._fs is not None and self._fs_pid == os.getpid():
            return self._fs, self._fs_path
        try:
            from fsspec.core import url_to_fs

            fs, path = url_to_fs(self.url, **self.storage_options())
        except ImportError as e:
            hint = ("pip install 'unidistill[s3]' (s3fs)" if self.protocol in S3_PROTOCOLS
                    else f"install the fsspec implementation of {self.protocol}://")
            raise ConfigError(f"cannot open {self.url}: {e}. To use {self.protocol}:// caches, "
                              f"{hint}.") from None
        except ValueError as e:
            raise ConfigError(f"cannot open cache location {self.url!r}: {e}. Expected a local folder "
                              "or an fsspec URL such as s3://bucket/prefix, memory://name or "
                              "file:///abs/path.") from None
        self._fs, self._fs_path, self._fs_pid = fs, path.rstrip("/"), os.getpid()
        return self._fs, self._fs_path

    @property
    def fs(self):
        return self._connect()[0]

    def _path(self, key: str = "") -> str:
        base = self._connect()[1]
        return f"{base}/{key}" if key else base

    @property
    def bucket(self) -> str | None:
        if self.protocol not in BUCKET_PROTOCOLS:
            return None
        return self.url.split("://", 1)[1].split("/", 1)[0]

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
                raise ConfigError(
                    f"cannot {action} {self.url}: access denied ({e}). Check the credentials' "
                    "permissions on this bucket and prefix.") from None
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
        bucket that does not exist / cannot be reached with the credentials at hand (no-op for
        local paths)."""
        if self.is_local:
            return
        self._connect()
        if not self.bucket:
            return
        with self._errors(action):
            if not self.fs.exists(self.bucket):
                raise self._no_bucket_error(action)

    # -- the Zarr store ----------------------------------------------------------------------------
    def zarr_store(self, mode: str = "r"):
        """What ``zarr.open_group`` takes: the local path as a string (``LocalStore``, as always),
        or an ``FsspecStore`` for a URL (read-only for mode ``r``)."""
        if self.is_local:
            return str(self.root)
        from zarr.storage import FsspecStore

        with self._errors("open"):
            return FsspecStore.from_url(self.url, storage_options=self.storage_options(),
                                        read_only=(mode == "r"))

    def open_group(self, mode: str = "r", attributes: dict | None = None):
        import zarr

        with self._errors("open"):
            return zarr.open_group(self.zarr_store(mode), mode=mode, attributes=attributes)

    # -- existence and listing ---------------------------------------------------------------------
    def exists(self) -> bool:
        if self.is_local:
            return self.root.exists()
        with self._errors("read"):
            return self.fs.exists(self._path())

    def is_file(self, key: str = "") -> bool:
        if self.is_local:
            return (self.root / key).is_file() if key else self.root.is_file()
        with self._errors("read"):
            return self.fs.isfile(self._path(key))

    def is_dir(self) -> bool:
        if self.is_local:
            return self.root.is_dir()
        with self._errors("read"):
            return self.fs.isdir(self._path())

    def list_files(self, prefix: str = "") -> list[str]:
        """Keys of every file under ``prefix`` (recursive), relative to the root, sorted."""
        if self.is_local:
            base = self.root / prefix if prefix else self.root
            if not base.is_dir():
                return []
            return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        with self._errors("list"):
            return sorted(self._relative(p) for p in self.fs.find(self._path(prefix)))

    def _relative(self, full: str) -> str:
        return full[len(self._path()):].lstrip("/")

    def is_empty(self) -> bool:
        if self.is_local:
            return not self.root.is_dir() or not any(self.root.iterdir())
        return not self.list_files()

    # -- small files -------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        if self.is_local:
            path = self.root / key
            return path.read_bytes() if path.is_file() else None
        with self._errors("read"):
            try:
                return self.fs.cat_file(self._path(key))
            except FileNotFoundError:
                if self.bucket and not self._bucket_exists():
                    raise
                return None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace the file whole: fsync + rename locally, one PUT on an object store."""
        if self.is_local:
            atomic_write_bytes(self.root / key, data)
            return
        with self._errors("write to"):
            self.fs.pipe_file(self._path(key), data)

    def write_json(self, key: str, obj) -> None:
        self.write_bytes(key, json_bytes(obj))

    def delete(self, key: str) -> None:
        if self.is_local:
            (self.root / key).unlink(missing_ok=True)
            return
        with self._errors("delete from"):
            try:
                self.fs.rm_file(self._path(key))
            except FileNotFoundError:
                pass

    def file_size(self, key: str) -> int:
        """Size in bytes of one file, 0 if it does not exist."""
        if self.is_local:
            path = self.root / key
            return path.stat().st_size if path.is_file() else 0
        with self._errors("read"):
            try:
                return int(self.fs.size(self._path(key)) or 0)
            except FileNotFoundError:
                return 0

    def make_dir(self, key: str) -> None:
        """Create a folder locally; object stores have no folders (nothing to do)."""
        if self.is_local:
            (self.root / key).mkdir(parents=True, exist_ok=True)

    # -- whole-cache operations --------------------------------------------------------------------
    def remove(self) -> None:
        """Delete the cache and everything under it (``--overwrite``)."""
        if self.is_local:
            if self.root.is_dir():
                shutil.rmtree(self.root)
            return
        with self._errors("delete"):
            # The files one by one (batched by the client): a cache at a bucket's root must not
            # take the bucket with it.
            files = self.fs.find(self._path())
            if files:
                self.fs.rm(files)
            if not self.bucket and self.fs.exists(self._path()):
                self.fs.rm(self._path(), recursive=True)  # pseudo-folders (memory://)
            self.fs.invalidate_cache()

    def file_sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: bytes} of every file under ``prefix`` (recursive; keys relative to the root): file
        sizes on disk, object sizes in a bucket. One listing remotely."""
        if self.is_local:
            base = self.root / prefix if prefix else self.root
            if not base.is_dir():
                return {}
            return {p.relative_to(self.root).as_posix(): p.stat().st_size
                    for p in base.rglob("*") if p.is_file()}
        with self._errors("list"):
            found = self.fs.find(self._path(prefix), detail=True)
        return {self._relative(name): int(info.get("size") or 0) for name, info in found.items()
                if info.get("type", "file") == "file"}

    def disk_bytes(self, prefix: str = "") -> int:
        """Bytes stored under ``prefix`` (the whole cache for "")."""
        return sum(self.file_sizes(prefix).values())

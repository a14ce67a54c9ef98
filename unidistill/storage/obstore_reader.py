"""Reading an ``s3://`` cache's arrays with obstore (Zarr's ``ObjectStore``) instead of s3fs.

Chosen by ``UNIDISTILL_S3_READER=obstore`` (:func:`s3_reader`); s3fs stays the default and the
client of everything else (listings, the manifest, markers, every write). obstore's client is
Rust (``object_store``), so its requests do not queue behind Python on the event loop:
``benchmarks/results/read_cpu.md`` has the figures that made it an option. Needs the ``obstore``
extra (``pip install 'unidistill[obstore]'``).

obstore reads the usual AWS variables itself (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``/``AWS_REGION``, ``AWS_ENDPOINT_URL_S3``/
``AWS_ENDPOINT_URL``), but not ``AWS_PROFILE``: a profile without keys in the environment is
refused rather than left to fail at the first request. Of ``UNIDISTILL_STORAGE_OPTIONS`` (fsspec
options) it takes the ones it has a name for (:data:`FSSPEC_TO_OBSTORE`) and refuses the rest.

obstore is not fork-safe: its Rust runtime's threads do not survive a fork, and a process forked
from one that used obstore hangs at its first request (developmentseed/obstore#441; reproduced
here with obstore 0.12.1). A DataLoader's workers are forked on Linux, after the main process has
read the cache, so a worker that would hang is refused instead (:func:`check_not_forked`): read
with 0 workers, start the workers with ``spawn`` (``torch.multiprocessing.set_start_method(
"spawn")`` or the DataLoader's ``multiprocessing_context``), or read with s3fs.
"""

from __future__ import annotations

import os

from unidistill.errors import ConfigError

S3_READER_ENV = "UNIDISTILL_S3_READER"
S3_READERS = ("s3fs", "obstore")
# s3fs option -> obstore S3Store option (client_kwargs' endpoint_url / region_name too)
FSSPEC_TO_OBSTORE = {"endpoint_url": "endpoint", "key": "access_key_id", "secret": "secret_access_key",
                     "token": "session_token", "anon": "skip_signature", "region_name": "region"}
_IGNORED = ("use_listings_cache",)  # unidistill's own fsspec setting: listings are not obstore's
_USED_IN: int | None = None  # the pid of the process whose obstore runtime this module set up


def check_not_forked() -> None:
    """Refuse to use obstore in a process forked from one that used it (it would hang)."""
    global _USED_IN
    if _USED_IN is not None and _USED_IN != os.getpid():
        raise ConfigError(
            f"{S3_READER_ENV}=obstore in process {os.getpid()}, forked from process {_USED_IN} "
            "that already read with obstore: obstore is not fork-safe and would hang here. Use 0 "
            "DataLoader workers (--dataloader-num-workers 0), start workers with spawn "
            "(torch.multiprocessing.set_start_method('spawn')), or unset "
            f"{S3_READER_ENV} to read with s3fs")
    _USED_IN = os.getpid()


def s3_reader() -> str:
    """The client that reads an s3:// cache's arrays: ``s3fs`` (default) or ``obstore``."""
    value = os.environ.get(S3_READER_ENV, "s3fs").strip().lower() or "s3fs"
    if value not in S3_READERS:
        raise ConfigError(f"{S3_READER_ENV}={os.environ[S3_READER_ENV]!r} is not one of {S3_READERS}; "
                          f"set it to obstore to read s3:// caches with obstore, or unset it (s3fs)")
    return value


def _obstore_options(storage_options: dict) -> dict:
    opts = {k: v for k, v in storage_options.items() if k not in _IGNORED}
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    for key in ("endpoint_url", "region_name"):
        if key in client_kwargs:
            opts.setdefault(key, client_kwargs.pop(key))
    unknown = sorted(k for k in opts if k not in FSSPEC_TO_OBSTORE) + sorted(f"client_kwargs.{k}"
                                                                             for k in client_kwargs)
    if unknown:
        raise ConfigError(f"{S3_READER_ENV}=obstore cannot honour the fsspec options {unknown} "
                          f"(from UNIDISTILL_STORAGE_OPTIONS); it takes {sorted(FSSPEC_TO_OBSTORE)}. "
                          f"Drop those options, or unset {S3_READER_ENV} to read with s3fs")
    return {FSSPEC_TO_OBSTORE[k]: v for k, v in opts.items()}


def obstore_zarr_store(url: str, storage_options: dict):
    """A read-only ``zarr.storage.ObjectStore`` over obstore's ``S3Store`` at ``url``
    (``s3://bucket/prefix``), configured as the s3fs client of the same location would be."""
    try:
        from obstore.store import S3Store
        from zarr.storage import ObjectStore
    except ImportError as e:
        raise ConfigError(f"{S3_READER_ENV}=obstore needs obstore ({e}): pip install "
                          f"'unidistill[obstore]', or unset {S3_READER_ENV} to read with s3fs") from None
    kwargs = _obstore_options(storage_options)
    check_not_forked()
    if (os.environ.get("AWS_PROFILE") and "access_key_id" not in kwargs
            and not os.environ.get("AWS_ACCESS_KEY_ID")):
        raise ConfigError(f"{S3_READER_ENV}=obstore does not read AWS profiles (AWS_PROFILE="
                          f"{os.environ['AWS_PROFILE']!r}) and no AWS_ACCESS_KEY_ID is set; export "
                          f"the profile's keys (e.g. `eval $(aws configure export-credentials "
                          f"--format env)`), or unset {S3_READER_ENV} to read with s3fs")
    endpoint = (kwargs.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or "")
    client_options = {"allow_http": True} if endpoint.startswith("http://") else {}
    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    store = S3Store(bucket, prefix=prefix.strip("/") or None, client_options=client_options, **kwargs)
    return ObjectStore(store, read_only=True)

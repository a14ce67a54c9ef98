"""The run record, ``unidistill_run.json``: written into a run folder and beside every checkpoint.

It holds the command, the settings and the fingerprint of the cache a student was trained on
(built by :func:`unidistill.trainer.run.make_run_record`). It is read back to refuse resuming a
checkpoint on another cache, and by ``evaluate`` to find which projectors a hidden-state loss
trained. This module stands below both the run wiring (:mod:`.run`) and the Trainer subclass
(:mod:`.distill_trainer`), which both write it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.storage.files import atomic_write_json

RUN_RECORD = "unidistill_run.json"

logger = logging.getLogger(__name__)


def write_run_record(folder, record: dict) -> None:
    """``unidistill_run.json`` into a run folder or checkpoint."""
    atomic_write_json(Path(folder) / RUN_RECORD, record)


def read_run_record(folder) -> dict | None:
    """The ``unidistill_run.json`` of a run folder or checkpoint, or None when it has none.

    A file that is not a JSON object (torn, emptied, edited by hand, another tool's) is refused
    with :class:`~unidistill.errors.ConfigError` naming the file and what is wrong."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _malformed(path, f"it is not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise _malformed(path, f"it holds a JSON {type(record).__name__}, not an object")
    return record


def _malformed(path: Path, what: str) -> ConfigError:
    return ConfigError(f"run record {path} is malformed: {what}. distill-from-cache writes it "
                       "into the run folder and every checkpoint; it names the cache the run "
                       "trained on, which a resume must match. If it was damaged, copy the run "
                       f"folder's {RUN_RECORD} over it (the same run), or start a new run in "
                       "another --out")


def recorded_cache_fingerprint(folder) -> tuple[str, str] | None:
    """(path of the record, the cache fingerprint it names) of a run folder or checkpoint, None
    when it has no record; a record without a cache fingerprint string is refused."""
    record = read_run_record(folder)
    if record is None:
        return None
    path = Path(folder) / RUN_RECORD
    cache = record.get("cache")
    if not isinstance(cache, dict):
        raise _malformed(path, f"its 'cache' entry is {cache!r}; expected an object with the "
                               "cache's 'path' and 'fingerprint'")
    fingerprint = cache.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise _malformed(path, f"its cache fingerprint is {fingerprint!r}; expected the cache's "
                               "content fingerprint (a sha256 hex string, as cache-info prints)")
    return str(cache.get("path")), fingerprint


def resolve_checkpoint(resume_from_checkpoint, output_dir) -> str | None:
    """The checkpoint folder a resume will load (``True``: the newest in ``output_dir``)."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    return str(resume_from_checkpoint)


def check_checkpoint_cache(checkpoint: str | None, fingerprint: str) -> None:
    """Refuse to resume a checkpoint trained on another cache.

    The checkpoint's own run record (written beside every checkpoint) is read; a checkpoint
    without one falls back to its run folder's record. A malformed record is refused (it cannot
    say which cache the run trained on). No record at all (a checkpoint not written by
    unidistill): nothing to compare, and a warning says so.
    """
    if checkpoint is None:
        return
    for folder in (Path(checkpoint), Path(checkpoint).parent):
        recorded = recorded_cache_fingerprint(folder)
        if recorded is None:
            continue
        cache_path, recorded_fingerprint = recorded
        if recorded_fingerprint != fingerprint:
            raise CacheMismatchError(
                f"checkpoint {checkpoint} was trained on the cache at {cache_path} "
                f"(fingerprint {recorded_fingerprint[:16]}), not on this one "
                f"(fingerprint {fingerprint[:16]}); resuming would continue its data order on "
                "other data. Resume with the recorded --cache, or start a new run in another "
                "--out.")
        return
    logger.warning("checkpoint %s has no %s, nor has its folder: it cannot be checked against "
                   "this cache (fingerprint %s); resuming assumes it was trained on it",
                   checkpoint, RUN_RECORD, fingerprint[:16])

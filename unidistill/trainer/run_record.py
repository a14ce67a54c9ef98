"""The run record, ``unidistill_run.json``: written into a run folder and beside every checkpoint.

It holds the command, the settings and the paths and fingerprints of the caches a student was
trained on (built by :func:`unidistill.trainer.run.make_run_record`; ``caches`` in training
order, ``cache_fingerprints`` sorted; a record of an earlier version names its one ``cache``).
It is read back to refuse resuming a checkpoint on other caches, or on the same in another
order, and by ``evaluate`` to find which projectors a hidden-state loss trained. This module stands below both the run wiring (:mod:`.run`) and the Trainer subclass
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
                       "into the run folder and every checkpoint; it names the caches the run "
                       "trained on, which a resume must match. If it was damaged, copy the run "
                       f"folder's {RUN_RECORD} over it (the same run), or start a new run in "
                       "another --out")


def cache_entries(caches) -> dict:
    """The record's caches: ``caches`` is ``[(path, fingerprint)]`` in training order (the order
    decides which sequence each index of the shuffled order is), and ``cache_fingerprints`` the
    same fingerprints sorted (which caches, whatever their order)."""
    return {"caches": [{"path": str(path), "fingerprint": fingerprint} for path, fingerprint in caches],
            "cache_fingerprints": sorted(fingerprint for _, fingerprint in caches)}


def recorded_caches(folder) -> tuple[Path, list[tuple[str, str]]] | None:
    """(path of the record, its ``[(cache path, fingerprint)]`` in training order) of a run folder
    or checkpoint; None when it has none. Records of single-cache runs made before ``caches``
    existed (one ``cache`` object) are read as a list of one. A record naming no cache, or a
    cache without a fingerprint string, is refused."""
    record = read_run_record(folder)
    if record is None:
        return None
    path = Path(folder) / RUN_RECORD
    if "caches" in record:
        entries = record["caches"]
        if not isinstance(entries, list) or not entries:
            raise _malformed(path, f"its 'caches' entry is {entries!r}; expected a list of objects "
                                   "with each cache's 'path' and 'fingerprint'")
    else:  # the single-cache record of earlier versions
        if not isinstance(record.get("cache"), dict):
            raise _malformed(path, f"its 'cache' entry is {record.get('cache')!r}; expected an "
                                   "object with the cache's 'path' and 'fingerprint' (or a "
                                   "'caches' list of them)")
        entries = [record["cache"]]
    return path, [_entry(path, entry) for entry in entries]


def _entry(path: Path, entry) -> tuple[str, str]:
    if not isinstance(entry, dict):
        raise _malformed(path, f"a cache entry is {entry!r}; expected an object with the "
                               "cache's 'path' and 'fingerprint'")
    fingerprint = entry.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise _malformed(path, f"its cache fingerprint is {fingerprint!r}; expected the cache's "
                               "content fingerprint (a sha256 hex string, as cache-info prints)")
    return str(entry.get("path")), fingerprint


def resolve_checkpoint(resume_from_checkpoint, output_dir) -> str | None:
    """The checkpoint folder a resume will load (``True``: the newest in ``output_dir``)."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    return str(resume_from_checkpoint)


def _listed(caches) -> str:
    return ", ".join(f"{path} (fingerprint {fingerprint[:16]})" for path, fingerprint in caches)


def check_checkpoint_caches(checkpoint: str | None, caches) -> None:
    """Refuse to resume a checkpoint trained on other caches, or on the same in another order.

    ``caches``: ``[(path, fingerprint)]`` of this run, in training order. The checkpoint's own
    run record (written beside every checkpoint) is read; a checkpoint without one falls back to
    its run folder's record. A malformed record is refused (it cannot say which caches the run
    trained on). No record at all (a checkpoint not written by unidistill): nothing to compare,
    and a warning says so.
    """
    if checkpoint is None:
        return
    given = [fingerprint for _, fingerprint in caches]
    for folder in (Path(checkpoint), Path(checkpoint).parent):
        recorded = recorded_caches(folder)
        if recorded is None:
            continue
        _, entries = recorded
        was = [fingerprint for _, fingerprint in entries]
        if was == given:
            return
        if sorted(was) == sorted(given):
            raise CacheMismatchError(
                f"checkpoint {checkpoint} was trained on the same caches in another order: "
                f"{_listed(entries)}, not {_listed(caches)}. The order decides which sequence "
                "each index of the shuffled data order is, so resuming would repeat some "
                "sequences and skip others. Give --cache in the recorded order, or start a new "
                "run in another --out.")
        raise CacheMismatchError(
            f"checkpoint {checkpoint} was trained on the cache{'s' * (len(entries) > 1)} "
            f"{_listed(entries)}, not on {_listed(caches)}; resuming would continue its data "
            "order on other data. Resume with the recorded --cache, or start a new run in "
            "another --out.")
    logger.warning("checkpoint %s has no %s, nor has its folder: it cannot be checked against "
                   "these caches (%s); resuming assumes it was trained on them",
                   checkpoint, RUN_RECORD, _listed(caches))

"""The run record, ``unidistill_run.json``: written into a run folder and beside every checkpoint.

It holds the command, the settings and the fingerprint of the cache a student was trained on
(built by :func:`unidistill.trainer.run.make_run_record`). It is read back to refuse resuming a
checkpoint on another cache, and by ``evaluate`` to find which projectors a hidden-state loss
trained. This module stands below both the run wiring (:mod:`.run`) and the Trainer subclass
(:mod:`.distill_trainer`), which both write it.
"""

from __future__ import annotations

import json
from pathlib import Path

from unidistill.errors import CacheMismatchError
from unidistill.storage.files import atomic_write_json

RUN_RECORD = "unidistill_run.json"


def write_run_record(folder, record: dict) -> None:
    """``unidistill_run.json`` into a run folder or checkpoint."""
    atomic_write_json(Path(folder) / RUN_RECORD, record)


def read_run_record(folder) -> dict | None:
    """The ``unidistill_run.json`` of a run folder or checkpoint, or None when it has none
    (a torn or foreign file raises :class:`json.JSONDecodeError`)."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    return json.loads(path.read_text())


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
    without one falls back to its run folder's record. No record: nothing to compare.
    """
    if checkpoint is None:
        return
    for folder in (Path(checkpoint), Path(checkpoint).parent):
        try:
            record = read_run_record(folder)
            if record is None:
                continue
            recorded = record["cache"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return
        if recorded.get("fingerprint") != fingerprint:
            raise CacheMismatchError(
                f"checkpoint {checkpoint} was trained on the cache at {recorded.get('path')} "
                f"(fingerprint {str(recorded.get('fingerprint'))[:16]}), not on this one "
                f"(fingerprint {fingerprint[:16]}); resuming would continue its data order on "
                "other data. Resume with the recorded --cache, or start a new run in another "
                "--out.")
        return

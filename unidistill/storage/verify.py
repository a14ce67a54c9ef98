"""Re-read a cache and check every unit against its commit marker and chunk checksums."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from unidistill.storage.files import array_digest
from unidistill.storage.reader import CacheReader
from unidistill.storage.manifest import read_unit_markers


@dataclass
class Problem:
    unit: int
    array: str | None
    reason: str

    def __str__(self) -> str:
        where = f"unit {self.unit}" + (f", array {self.array}" if self.array else "")
        return f"{where}: {self.reason}"


@dataclass
class VerifyReport:
    root: str
    n_units: int
    status: str
    problems: list[Problem] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.status == "complete"


def _locate_bad_chunks(source, name: str, start: int, stop: int) -> list[str]:
    """Read sequence by sequence to name the chunks that fail to decode."""
    bad = []
    arr = source.group[name]
    for i in range(start, stop):
        try:
            arr[i]
        except Exception as e:  # zarr raises codec-specific errors on checksum failure
            bad.append(f"sequence {i} ({type(e).__name__}: {e})")
    return bad


def unit_problems(source, unit: int, marker: dict) -> list[Problem]:
    """A committed unit read back against its marker: every array that fails to decode or whose
    data differ from the committed digest. ``source``: a :class:`CacheReader`, or a
    :class:`~unidistill.storage.writer.CacheWriter` checking its units before it finishes (both
    have ``layout``, ``group`` and ``read_array_unit``)."""
    start, stop = source.layout.unit_range(unit)
    problems = []
    for name in source.layout.array_specs():
        try:
            data = source.read_array_unit(name, unit)
        except Exception as e:
            chunks = _locate_bad_chunks(source, name, start, stop)
            detail = "; ".join(chunks) if chunks else f"{type(e).__name__}: {e}"
            problems.append(Problem(unit, name, f"unreadable: {detail}"))
            continue
        if array_digest(data) != marker["digests"].get(name):
            problems.append(Problem(
                unit, name, f"content differs from its committed digest (sequences {start}..{stop - 1})"))
    return problems


def verify_cache(root, progress=None) -> VerifyReport:
    """Check markers, digests and crc32c of every unit. ``progress`` wraps an iterable (tqdm).

    ``root``: a local folder or a URL (``s3://bucket/prefix``)."""
    reader = CacheReader(root, require_complete=False)
    loc = reader.location
    layout = reader.layout
    report = VerifyReport(str(reader.root), layout.n_units, reader.manifest.get("status", "?"))
    units = range(layout.n_units)
    markers = read_unit_markers(loc, layout.n_units)
    for unit in progress(units) if progress else units:
        marker = markers.get(unit)
        if marker is None:
            report.problems.append(Problem(unit, None, "not committed (no marker): rerun "
                                                       "`unidistill cache-build` to redo it"))
            continue
        report.problems += unit_problems(reader, unit, marker)
    expected_head = reader.manifest.get("head")
    if reader.layout.logit_codec.has_head and expected_head is not None:
        data = loc.read_bytes(expected_head["file"])
        if data is None:
            report.problems.append(Problem(-1, expected_head["file"], "missing: rebuild the cache"))
        elif hashlib.sha256(data).hexdigest() != expected_head["sha256"]:
            report.problems.append(Problem(-1, expected_head["file"],
                                           "content differs from the digest in the manifest"))
    # Zarr's LocalStore writes <key>.<uuid>.partial then renames: leftovers of a killed writer.
    report.stray_files = [key for key in loc.list_files() if key.endswith(".partial")]
    return report

"""The cache manifest (the root group's attributes) and the unit markers: their keys and readers.

The manifest is written three times: with the root group as ``status: creating`` (the arrays
may not all exist yet: a build that finds this status starts over, nothing was committed), then
``status: building`` once every array exists, with the settings that identify the build, and
last of all ``status: complete`` with the content fingerprint. A reader trusts a cache only
when the status is ``complete``.
"""

from __future__ import annotations

import hashlib
import json

from unidistill.storage.location import as_location

STATUS_CREATING = "creating"
STATUS_BUILDING = "building"
STATUS_COMPLETE = "complete"

MANIFEST_KEY = "unidistill"
UNITS_DIR = "_units"
# A build's control files, not cache content: the builder's lease and a multi-process build's
# failure flag. They do not make a folder non-empty, and --overwrite keeps the lease.
CONTROL_DIR = "_control/"
LEASE_KEY = f"{CONTROL_DIR}lease.json"
FAILURE_KEY = f"{CONTROL_DIR}failed.json"
# The settings section that names the machine of a build (device kind, forward dtype, batch
# size): compared on resume, not when a complete cache is asked for again.
MACHINE_SETTINGS = "compute"


def unit_marker_key(unit: int) -> str:
    return f"{UNITS_DIR}/{unit:06d}.json"


def read_manifest(root) -> dict | None:
    """The manifest dict of the cache at ``root`` (folder, URL or :class:`CacheLocation`), or None
    when there is no unidistill cache."""
    raw = as_location(root).read_bytes("zarr.json")
    if raw is None:
        return None
    attrs = json.loads(raw).get("attributes", {})
    return attrs.get(MANIFEST_KEY)


def read_unit_marker(root, unit: int) -> dict | None:
    raw = as_location(root).read_bytes(unit_marker_key(unit))
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return None  # torn marker: atomic writes make this unlikely; treat as uncommitted


def read_unit_markers(root, n_units: int) -> dict[int, dict]:
    """``{unit: marker}`` of every committed unit: one listing of ``_units/``, then only the
    markers that are there are read (one request each on an object store)."""
    loc = as_location(root)
    present = set(loc.list_files(UNITS_DIR))
    markers = {u: read_unit_marker(loc, u) for u in range(n_units) if unit_marker_key(u) in present}
    return {u: m for u, m in markers.items() if m is not None}


def diff_settings(stored: dict, requested: dict, stored_as: str = "in the cache",
                  requested_as: str = "now") -> list[str]:
    """Human-readable lines for every setting whose value differs (nested keys dotted)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    a, b = flat(stored), flat(requested)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            lines.append(f"{key}: {a.get(key, '<unset>')!r} {stored_as}, {b.get(key, '<unset>')!r} {requested_as}")
    return lines


def content_settings(settings: dict) -> dict:
    """The settings that decide a cache's content: all but the machine's section
    (``MACHINE_SETTINGS``), which a resume compares and a finished cache does not."""
    return {k: v for k, v in settings.items() if k != MACHINE_SETTINGS}


def content_fingerprint(settings: dict, layout: dict, unit_digests: list[dict]) -> str:
    """sha256 over the identifying settings, the layout and every unit's array digests.

    Two caches with the same fingerprint hold the same bytes for the same build settings. The
    machine's section (``MACHINE_SETTINGS``: device kind, batch size) is left out: two machines
    that compute the same bytes make the same cache, and the unit digests tell when they do not.
    """
    settings = content_settings(settings)
    h = hashlib.sha256()
    h.update(json.dumps({"settings": settings, "layout": layout}, sort_keys=True).encode())
    for d in unit_digests:
        h.update(json.dumps(d, sort_keys=True).encode())
    return h.hexdigest()

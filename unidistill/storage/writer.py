"""Create, resume and finish a teacher cache.

Crash safety: each work unit (one shard index of every array) is written whole and then
committed by a marker file ``_units/<unit>.json`` holding the digests of what was written. A unit
without a marker is redone on resume; the manifest says ``complete`` only after every marker is
there. A killed writer can leave a half-written shard, but never a committed one.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import zarr

from unidistill import __version__
from unidistill.errors import CacheError, CacheMismatchError, ConfigError
from unidistill.storage.files import array_digest, atomic_write_json
from unidistill.storage.layout import FORMAT_VERSION, CacheLayout
from unidistill.storage.manifest import (
    STATUS_BUILDING,
    STATUS_COMPLETE,
    STATUS_CREATING,
    content_fingerprint,
    diff_settings,
)

MANIFEST_KEY = "unidistill"
UNITS_DIR = "_units"


def unit_marker_path(root: Path, unit: int) -> Path:
    return Path(root) / UNITS_DIR / f"{unit:06d}.json"


def read_manifest(root: Path) -> dict | None:
    """The manifest dict of the cache at ``root``, or None when there is no unidistill cache."""
    meta = Path(root) / "zarr.json"
    if not meta.is_file():
        return None
    attrs = json.loads(meta.read_text()).get("attributes", {})
    return attrs.get(MANIFEST_KEY)


def read_unit_marker(root: Path, unit: int) -> dict | None:
    path = unit_marker_path(root, unit)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # torn marker: atomic writes make this unlikely; treat as uncommitted


class CacheWriter:
    """Writes whole work units into a cache and finishes it. Use :meth:`open`."""

    def __init__(self, root: Path, group: zarr.Group, layout: CacheLayout, manifest: dict):
        self.root = Path(root)
        self.group = group
        self.layout = layout
        self.manifest = manifest
        self.run_id = uuid.uuid4().hex
        self._arrays = {name: group[name] for name in layout.array_specs()}

    @classmethod
    def open(cls, root, layout: CacheLayout, settings: dict, *, overwrite: bool = False) -> "CacheWriter":
        """Create a new cache at ``root``, or resume the unfinished build with the same settings.

        Refuses (and writes nothing) when ``root`` is a file, a folder that is not a unidistill
        cache, a complete cache (unless ``overwrite``), or a build with other settings.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"output path {root} is a file; expected a folder for the cache. "
                              "Choose another --out.")
        existing = read_manifest(root) if root.is_dir() else None
        if root.is_dir() and existing is None and any(root.iterdir()):
            raise ConfigError(f"output folder {root} is not empty and holds no unidistill cache; "
                              "refusing to write into it. Choose an empty or new --out.")
        if existing is not None and (overwrite or existing.get("status") == STATUS_CREATING):
            shutil.rmtree(root)  # a creation cut short holds no committed work: start it again
            existing = None
        if existing is None:
            return cls._create(root, layout, settings)
        if existing.get("status") == STATUS_COMPLETE:
            raise CacheError(f"{root} already holds a complete cache "
                             f"(fingerprint {existing.get('fingerprint', '?')[:16]}). "
                             "Pass --overwrite to rebuild it, or choose another --out.")
        differences = diff_settings(
            {"settings": existing.get("settings", {}), "layout": existing.get("layout", {})},
            {"settings": settings, "layout": layout.to_dict()},
        )
        if differences:
            raise CacheMismatchError(
                f"{root} holds an unfinished build with other settings:\n  "
                + "\n  ".join(differences)
                + "\nRerun with the cache's settings to resume it, pass --overwrite to start over, "
                "or choose another --out."
            )
        group = zarr.open_group(str(root), mode="r+")
        return cls(root, group, layout, existing)

    @classmethod
    def _create(cls, root: Path, layout: CacheLayout, settings: dict) -> "CacheWriter":
        manifest = {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "status": STATUS_CREATING,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": settings,
            "layout": layout.to_dict(),
        }
        # The group is born with the manifest saying "creating", so a build killed before every
        # array exists is recognised as ours and started over, not mistaken for foreign files.
        group = zarr.open_group(str(root), mode="w", attributes={MANIFEST_KEY: manifest})
        for name, spec in layout.array_specs().items():
            group.create_array(name, **spec)
        (root / UNITS_DIR).mkdir(exist_ok=True)
        manifest = {**manifest, "status": STATUS_BUILDING}
        group.attrs[MANIFEST_KEY] = manifest
        return cls(root, group, layout, manifest)

    def committed_units(self) -> set[int]:
        return {u for u in range(self.layout.n_units) if read_unit_marker(self.root, u) is not None}

    def pending_units(self) -> list[int]:
        done = self.committed_units()
        return [u for u in range(self.layout.n_units) if u not in done]

    def write_unit(self, unit: int, arrays: dict[str, np.ndarray]) -> dict:
        """Write every array's slice of ``unit`` (whole shards), then commit its marker."""
        start, stop = self.layout.unit_range(unit)
        if set(arrays) != set(self._arrays):
            raise ValueError(f"unit {unit}: got arrays {sorted(arrays)}, expected {sorted(self._arrays)}")
        digests = {}
        for name, data in arrays.items():
            target = self._arrays[name]
            expected = (stop - start,) + tuple(target.shape[1:])
            if data.shape != expected or data.dtype != target.dtype:
                raise ValueError(f"unit {unit}, array {name}: got {data.dtype}{data.shape}, "
                                 f"expected {target.dtype}{expected}")
            target[start:stop] = data
            digests[name] = array_digest(data)
        marker = {"unit": unit, "start": start, "stop": stop, "digests": digests,
                  "run_id": self.run_id,
                  "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(unit_marker_path(self.root, unit), marker)
        return marker

    def finalize(self, extra: dict | None = None) -> dict:
        """Check every unit is committed, then write the manifest with ``status: complete``."""
        missing = self.pending_units()
        if missing:
            raise CacheError(f"cannot finish {self.root}: units {missing[:10]} are not committed")
        markers = [read_unit_marker(self.root, u) for u in range(self.layout.n_units)]
        manifest = dict(self.manifest)
        manifest.update(extra or {})
        manifest["status"] = STATUS_COMPLETE
        manifest["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest["fingerprint"] = content_fingerprint(
            manifest["settings"], manifest["layout"], [m["digests"] for m in markers])
        self.group.attrs[MANIFEST_KEY] = manifest
        self.manifest = manifest
        return manifest

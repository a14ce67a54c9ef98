"""Create, resume and finish a teacher cache.

Crash safety: each work unit (one shard index of every array) is written whole and then
committed by a marker file ``_units/<unit>.json`` holding the digests of what was written. A unit
without a marker is redone on resume; the manifest says ``complete`` only after every marker is
there. A killed writer can leave a half-written shard, but never a committed one.
"""

from __future__ import annotations

import uuid

import numpy as np
import zarr

from unidistill import __version__
from unidistill.errors import CacheError, CacheMismatchError, ConfigError
from unidistill.storage.files import array_digest, utc_timestamp
from unidistill.storage.layout import FORMAT_VERSION, CacheLayout
from unidistill.storage.location import CacheLocation, as_location
from unidistill.storage.manifest import (
    MANIFEST_KEY,
    STATUS_BUILDING,
    STATUS_COMPLETE,
    STATUS_CREATING,
    content_fingerprint,
    diff_settings,
    read_manifest,
    read_unit_markers,
    unit_marker_key,
)


class CacheWriter:
    """Writes whole work units into a cache and finishes it. Use :meth:`open`."""

    def __init__(self, root, group: zarr.Group, layout: CacheLayout, manifest: dict):
        self.location = as_location(root)
        self.root = self.location.root  # a Path for a local cache, the URL for a remote one
        self.group = group
        self.layout = layout
        self.manifest = manifest
        self.run_id = uuid.uuid4().hex
        self._arrays = {name: group[name] for name in layout.array_specs()}

    @classmethod
    def open(cls, root, layout: CacheLayout, settings: dict, *, overwrite: bool = False) -> "CacheWriter":
        """Create a new cache at ``root``, or resume the unfinished build with the same settings.

        ``root`` is a local folder or an fsspec URL (``s3://bucket/prefix``). Refuses (and writes
        nothing) when ``root`` is a file, a folder / prefix that is not a unidistill cache, a
        complete cache (unless ``overwrite``), or a build with other settings.
        """
        loc = CacheLocation(root)
        loc.check_container("write to")
        if loc.is_file():
            what = "a file" if loc.is_local else "an object, not a prefix"
            raise ConfigError(f"output path {loc} is {what}; expected a folder for the cache. "
                              "Choose another --out.")
        existing = read_manifest(loc)
        if existing is None and not loc.is_empty():
            raise ConfigError(f"output {'folder' if loc.is_local else 'prefix'} {loc} is not empty "
                              "and holds no unidistill cache; refusing to write into it. Choose an "
                              "empty or new --out.")
        if existing is not None and (overwrite or existing.get("status") == STATUS_CREATING):
            loc.remove()  # a creation cut short holds no committed work: start it again
            existing = None
        if existing is None:
            return cls._create(loc, layout, settings)
        if existing.get("status") == STATUS_COMPLETE:
            raise CacheError(f"{loc} already holds a complete cache "
                             f"(fingerprint {existing.get('fingerprint', '?')[:16]}). "
                             "Pass --overwrite to rebuild it, or choose another --out.")
        differences = diff_settings(
            {"settings": existing.get("settings", {}), "layout": existing.get("layout", {})},
            {"settings": settings, "layout": layout.to_dict()},
        )
        if differences:
            raise CacheMismatchError(
                f"{loc} holds an unfinished build with other settings:\n  "
                + "\n  ".join(differences)
                + "\nRerun with the cache's settings to resume it, pass --overwrite to start over, "
                "or choose another --out."
            )
        group = loc.open_group(mode="r+")
        return cls(loc, group, layout, existing)

    @classmethod
    def _create(cls, loc: CacheLocation, layout: CacheLayout, settings: dict) -> "CacheWriter":
        manifest = {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "status": STATUS_CREATING,
            "created_at": utc_timestamp(),
            "settings": settings,
            "layout": layout.to_dict(),
        }
        # The group is born with the manifest saying "creating", so a build killed before every
        # array exists is recognised as ours and started over, not mistaken for foreign files.
        group = loc.open_group(mode="w", attributes={MANIFEST_KEY: manifest})
        for name, spec in layout.array_specs().items():
            group.create_array(name, **spec)
        manifest = {**manifest, "status": STATUS_BUILDING}
        group.attrs[MANIFEST_KEY] = manifest
        return cls(loc, group, layout, manifest)

    def committed_units(self) -> set[int]:
        return set(read_unit_markers(self.location, self.layout.n_units))

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
                  "committed_at": utc_timestamp()}
        self.location.write_json(unit_marker_key(unit), marker)
        return marker

    def finalize(self, extra: dict | None = None) -> dict:
        """Check every unit is committed, then write the manifest with ``status: complete``."""
        committed = read_unit_markers(self.location, self.layout.n_units)
        missing = [u for u in range(self.layout.n_units) if u not in committed]
        if missing:
            raise CacheError(f"cannot finish {self.root}: units {missing[:10]} are not committed")
        markers = [committed[u] for u in range(self.layout.n_units)]
        manifest = dict(self.manifest)
        manifest.update(extra or {})
        manifest["status"] = STATUS_COMPLETE
        manifest["completed_at"] = utc_timestamp()
        manifest["fingerprint"] = content_fingerprint(
            manifest["settings"], manifest["layout"], [m["digests"] for m in markers])
        self.group.attrs[MANIFEST_KEY] = manifest
        self.manifest = manifest
        return manifest

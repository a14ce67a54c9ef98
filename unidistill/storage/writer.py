"""Create, resume and finish a teacher cache.

Crash safety: each work unit (one shard index of every array) is written whole and then
committed by a marker file ``_units/<unit>.json`` holding the digests of what was written. A unit
without a marker is redone on resume; the manifest says ``complete`` only after every marker is
there. A killed writer can leave a half-written shard, but never a committed one.

Power cuts: Zarr's ``LocalStore`` renames each shard into place without fsync, so before a marker
is written the unit's shard files and their folders are fsynced (:meth:`CacheWriter.write_unit`);
the metadata Zarr writes at creation and the final manifest are fsynced too. A durable marker
therefore never names a shard that a power cut could still tear. On an object store each shard
is one PUT, durable once acknowledged, and there is nothing to sync.
"""

from __future__ import annotations

import uuid

import numpy as np
import zarr

from unidistill import __version__
from unidistill.errors import CacheError, CacheMismatchError, ConfigError
from unidistill.storage.files import array_digest, utc_timestamp
from unidistill.storage.layout import CacheLayout
from unidistill.storage.location import CacheLocation, as_location
from unidistill.storage.manifest import (
    CONTROL_DIR,
    LEASE_KEY,
    MACHINE_SETTINGS,
    MANIFEST_KEY,
    STATUS_BUILDING,
    STATUS_COMPLETE,
    STATUS_CREATING,
    content_fingerprint,
    content_settings,
    diff_settings,
    read_manifest,
    read_unit_markers,
    unit_marker_key,
)
from unidistill.storage.verify import unit_problems

ZARR_METADATA = "zarr.json"  # every Zarr v3 node's metadata; the root group's holds the manifest


def check_output(loc: CacheLocation) -> dict | None:
    """The manifest at ``loc`` (None when there is no cache yet); refuses a file, and a folder or
    prefix holding files that are no unidistill cache (control files aside)."""
    loc.check_container("write to")
    if loc.is_file():
        what = "a file" if loc.is_local else "an object, not a prefix"
        raise ConfigError(f"output path {loc} is {what}; expected a folder for the cache. "
                          "Choose another --out.")
    existing = read_manifest(loc)
    if existing is None and not loc.is_empty(ignore=CONTROL_DIR):
        raise ConfigError(f"output {'folder' if loc.is_local else 'prefix'} {loc} is not empty "
                          "and holds no unidistill cache; refusing to write into it. Choose an "
                          "empty or new --out.")
    return existing


def _content(manifest_part: dict) -> dict:
    """Settings and layout without the machine's section: what a finished cache holds."""
    return {"settings": content_settings(manifest_part["settings"]), "layout": manifest_part["layout"]}


def _machine_consequence(differences: list[str]) -> str:
    prefix = f"settings.{MACHINE_SETTINGS}."
    if not any(line.startswith(prefix) for line in differences):
        return ""
    return (f"\nThe build was started on another kind of machine ({prefix}*: device, forward "
            "dtype, batch size): the resumed units would not be identical to an uninterrupted "
            "build (kernels and batch shapes change the teacher's last bits). Resume it on the "
            "machine kind and with the batch size it started with, or start over with --overwrite.")

class CacheWriter:
    """Writes whole work units into a cache and finishes it. Use :meth:`open`."""

    def __init__(self, root, group: zarr.Group, layout: CacheLayout, manifest: dict):
        self.location = as_location(root)
        self.root = self.location.root  # a Path for a local cache, the URL for a remote one
        self.group = group
        self.layout = layout
        self.manifest = manifest
        self.run_id = uuid.uuid4().hex
        self._specs = layout.array_specs()
        self._arrays = {name: group[name] for name in self._specs}
        self.already_complete = False  # set by open for a finished cache asked for again

    @classmethod
    def open(cls, root, layout: CacheLayout, settings: dict, *, overwrite: bool = False) -> "CacheWriter":
        """Create a new cache at ``root``, or resume the unfinished build with the same settings.

        ``root`` is a local folder or an fsspec URL (``s3://bucket/prefix``). Refuses (and writes
        nothing) when ``root`` is a file, a folder / prefix that is not a unidistill cache, a
        build with other settings, or a complete cache with other settings (unless
        ``overwrite``). A complete cache with the same settings (its machine aside) is opened as
        it is, :attr:`already_complete`: asking again for a finished cache is not an error. The
        caller holds the cache's lease (:mod:`unidistill.storage.lease`), whose file stays.
        """
        loc = CacheLocation(root)
        existing = check_output(loc)
        if existing is not None and (overwrite or existing.get("status") == STATUS_CREATING):
            loc.remove(keep=LEASE_KEY)  # a creation cut short holds no committed work: start again
            existing = None
        if existing is None:
            return cls._create(loc, layout, settings)
        stored = {"settings": existing.get("settings", {}), "layout": existing.get("layout", {})}
        requested = {"settings": settings, "layout": layout.to_dict()}
        if existing.get("status") == STATUS_COMPLETE:
            content_differences = diff_settings(_content(stored), _content(requested))
            if content_differences:
                raise CacheError(
                    f"{loc} already holds a complete cache (fingerprint "
                    f"{existing.get('fingerprint', '?')[:16]}) built with other settings:\n  "
                    + "\n  ".join(content_differences)
                    + "\nPass --overwrite to rebuild it, or choose another --out.")
            writer = cls(loc, loc.open_group(mode="r"), layout, existing)
            writer.already_complete = True
            return writer
        differences = diff_settings(stored, requested)
        if differences:
            raise CacheMismatchError(
                f"{loc} holds an unfinished build with other settings:\n  "
                + "\n  ".join(differences) + _machine_consequence(differences)
                + "\nRerun with the cache's settings to resume it, pass --overwrite to start over, "
                "or choose another --out.")
        group = loc.open_group(mode="r+")
        return cls(loc, group, layout, existing)

    @classmethod
    def _create(cls, loc: CacheLocation, layout: CacheLayout, settings: dict) -> "CacheWriter":
        manifest = {
            "format_version": layout.format_version,
            "package_version": __version__,
            "status": STATUS_CREATING,
            "created_at": utc_timestamp(),
            "settings": settings,
            "layout": layout.to_dict(),
        }
        # The group is born with the manifest saying "creating", so a build killed before every
        # array exists is recognised as ours and started over, not mistaken for foreign files.
        # mode "a", not "w": "w" would delete the lease beside it (open checked nothing else is)
        group = loc.open_group(mode="a", attributes={MANIFEST_KEY: manifest})
        for name, spec in layout.array_specs().items():
            group.create_array(name, **spec)
        manifest = {**manifest, "status": STATUS_BUILDING}
        group.attrs[MANIFEST_KEY] = manifest
        # Every node's metadata (the root group, each array and the groups above it, e.g.
        # hidden/zarr.json) must outlive a power cut before any marker can claim data in it.
        metadata = {ZARR_METADATA} | {f"{'/'.join(name.split('/')[:i])}/{ZARR_METADATA}"
                                      for name in layout.array_specs()
                                      for i in range(1, name.count("/") + 2)}
        missing = loc.make_durable(sorted(metadata))
        if missing:
            raise CacheError(f"cannot create the cache at {loc}: Zarr wrote no metadata at "
                             f"{missing} (expected a zarr.json for the root group, each array and "
                             "each group above one). The installed zarr may write another layout; "
                             "use zarr>=3.1,<4 as setup.cfg declares.")
        return cls(loc, group, layout, manifest)

    def committed_units(self) -> set[int]:
        return set(read_unit_markers(self.location, self.layout.n_units))

    def pending_units(self) -> list[int]:
        done = self.committed_units()
        return [u for u in range(self.layout.n_units) if u not in done]

    def unit_shard_keys(self, unit: int) -> dict[str, str]:
        """{array name: store key of its shard of ``unit``}. The layout shards every array along
        the sequence axis by ``shard_size`` and keeps the other axes whole, so the unit's shard
        sits at shard-grid position (unit, 0, ...); the array's own chunk key encoding names it
        (Zarr v3 default: ``<array>/c/<unit>/0/...``)."""
        start, _ = self.layout.unit_range(unit)
        keys = {}
        for name, array in self._arrays.items():
            shards = self._specs[name]["shards"]
            origin = (start,) + (0,) * (len(shards) - 1)
            coords = tuple(o // s for o, s in zip(origin, shards))
            keys[name] = f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
        return keys

    def _make_unit_durable(self, unit: int, arrays: dict[str, np.ndarray]) -> None:
        """fsync the unit's shard files and their folders (locally; a no-op on object stores)."""
        keys = self.unit_shard_keys(unit)
        missing = set(self.location.make_durable(keys.values()))
        for name, key in keys.items():
            # Zarr stores no shard whose every value is the fill value (and deletes one that was
            # there); any other missing shard means it wrote somewhere else.
            if key in missing and not _all_fill(arrays[name], self._arrays[name].fill_value):
                raise CacheError(
                    f"unit {unit}, array {name}: no shard file at {key} in {self.root} after "
                    "writing it, and the data is not all fill values, so Zarr stored it under "
                    "another key. Nothing was committed for this unit; this zarr version names "
                    "shards differently from what the writer expects (use zarr>=3.1,<4).")

    def write_unit(self, unit: int, arrays: dict[str, np.ndarray]) -> dict:
        """Write every array's slice of ``unit`` (whole shards), make them durable, then commit
        its marker."""
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
        self._make_unit_durable(unit, arrays)
        marker = {"unit": unit, "start": start, "stop": stop, "digests": digests,
                  "run_id": self.run_id,
                  "committed_at": utc_timestamp()}
        counts = self.layout.token_codec.unit_counts(arrays)
        if counts is not None:  # packed caches: targets, padding and segments of the unit
            marker["tokens"] = counts
        self.location.write_json(unit_marker_key(unit), marker)
        return marker

    def read_array_unit(self, name: str, unit: int) -> np.ndarray:
        start, stop = self.layout.unit_range(unit)
        return self._arrays[name][start:stop]

    def _check_digests(self, markers: list[dict]) -> None:
        """Read every committed unit back and compare it with its marker's digests
        (:func:`~unidistill.storage.verify.unit_problems`, as ``cache-verify`` does) before the
        cache is called complete. A unit that differs (written over by another writer, a torn
        shard) loses its marker, so that rerunning the command redoes it."""
        bad = []
        for marker in markers:
            problems = unit_problems(self, marker["unit"], marker)
            if problems:
                bad.append(f"unit {marker['unit']} ({problems[0].array})")
                self.location.delete(unit_marker_key(marker["unit"]))
        if bad:
            raise CacheError(f"cannot finish {self.root}: the data of {', '.join(bad[:10])} differ "
                             "from the digests committed for them (another writer, or damage). "
                             "Their markers were removed and the cache left unfinished: rerun the "
                             "same cache-build command to redo those units.")

    def finalize(self, extra: dict | None = None) -> dict:
        """Check every unit is committed, then write the manifest with ``status: complete``."""
        committed = read_unit_markers(self.location, self.layout.n_units)
        missing = [u for u in range(self.layout.n_units) if u not in committed]
        if missing:
            raise CacheError(f"cannot finish {self.root}: units {missing[:10]} are not committed")
        markers = [committed[u] for u in range(self.layout.n_units)]
        self._check_digests(markers)
        manifest = dict(self.manifest)
        manifest.update(extra or {})
        if self.layout.token_codec.packed:  # the units' counts summed: what cache-info shows
            tokens = {k: sum(m["tokens"][k] for m in markers) for k in markers[0]["tokens"]}
            manifest["build"] = {**manifest.get("build", {}), "tokens": tokens}
        manifest["status"] = STATUS_COMPLETE
        manifest["completed_at"] = utc_timestamp()
        manifest["fingerprint"] = content_fingerprint(
            manifest["settings"], manifest["layout"], [m["digests"] for m in markers])
        self.group.attrs[MANIFEST_KEY] = manifest
        self.location.make_durable([ZARR_METADATA])
        self.manifest = manifest
        return manifest


def _all_fill(data: np.ndarray, fill) -> bool:
    """True when every value of ``data`` equals ``fill`` (NaN equal to NaN), as Zarr judges an
    empty chunk."""
    fill = np.asarray(fill, dtype=data.dtype)
    if data.dtype.kind in "fc" and np.isnan(fill):
        return bool(np.isnan(data).all())
    return bool((data == fill).all())

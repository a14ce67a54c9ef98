"""The storage layer behaves the same on every backend: a local folder, ``memory://`` and S3.

Every test of the first part runs on all three with the same expectations, so a backend that
disagrees fails. S3 is moto's server on loopback reached through the real s3fs client (no client
is mocked); its tests skip when moto or s3fs is missing. What a test sets up or checks outside
:class:`CacheLocation` (a foreign file, an empty folder, what is stored) goes through each
backend's own client, not through the code under test.

The second part checks durable commits on a local folder: a unit's shard files and their folders
are fsynced before its marker is written.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from unidistill.errors import CacheError, ConfigError
from unidistill.storage import CacheReader
from unidistill.storage.files import json_bytes
from unidistill.storage.layout import CacheLayout
from unidistill.storage.location import CacheLocation
from unidistill.storage.manifest import read_unit_markers, unit_marker_key
from unidistill.storage.writer import CacheWriter

BUCKET = "unidistill-test"
BACKENDS = ("local", "memory", "s3")


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free loopback port, the AWS env pointing at it, and one bucket."""
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'unidistill[s3]')")
    moto_server = pytest.importorskip("moto.server",
                                      reason="moto[server] is not installed (pip install 'moto[server]')")

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets in process-wide state, shared by every server of this process:
    # start from none and leave none for the next module's server.
    reset = urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset).close()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE",
                                            "AWS_ENDPOINT_URL_S3"]}
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(k, None)
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        urllib.request.urlopen(reset).close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


class Backend:
    """A fresh location on one backend, and that backend's own client to set up and inspect it."""

    def __init__(self, kind: str, tmp_path: Path, s3=None):
        self.kind = kind
        name = uuid.uuid4().hex[:12]
        if kind == "local":
            self.folder = tmp_path / "cache"
            self.location = CacheLocation(str(self.folder))
        elif kind == "memory":
            import fsspec

            self.fs, self.path = fsspec.filesystem("memory"), f"/unidistill-backends/{name}"
            self.location = CacheLocation(f"memory:/{self.path}")
        else:
            self.fs, self.path = s3, f"{BUCKET}/backends/{name}"
            self.location = CacheLocation(f"s3://{self.path}")

    def put(self, key: str, data: bytes) -> None:
        """Store a file at ``key`` ("" = the root itself) without going through the location."""
        if self.kind == "local":
            path = self.folder / key if key else self.folder
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self.fs.pipe_file(f"{self.path}/{key}" if key else self.path, data)

    def make_folder(self, key: str) -> None:
        """An empty folder: a directory, a memory:// pseudo-folder, an S3 folder-marker object."""
        if self.kind == "local":
            (self.folder / key).mkdir(parents=True)
        elif self.kind == "memory":
            self.fs.makedirs(f"{self.path}/{key}")
        else:
            prefix = self.path.split("/", 1)[1]
            self.fs.call_s3("put_object", Bucket=BUCKET, Key=f"{prefix}/{key}/", Body=b"")

    def stored(self) -> dict[str, bytes]:
        """{key: bytes} of every file (object) under the root, read with the backend's client;
        a folder marker counts too, so nothing can hide."""
        if self.kind == "local":
            if not self.folder.is_dir():
                return {}
            return {p.relative_to(self.folder).as_posix(): p.read_bytes()
                    for p in self.folder.rglob("*") if p.is_file()}
        if self.kind == "memory":
            return {k[len(self.path) + 1:]: v.getvalue() for k, v in self.fs.store.items()
                    if k.startswith(self.path + "/")}
        prefix = self.path.split("/", 1)[1] + "/"
        return {key[len(prefix):]: self.fs.cat_file(f"{BUCKET}/{key}") for key in self._s3_keys(prefix)}

    def anything_at_root(self) -> bool:
        """Whether a file, a folder or a pseudo-folder is left at the root."""
        if self.kind == "local":
            return self.folder.exists()
        if self.kind == "memory":
            return any(p == self.path or p.startswith(self.path + "/")
                       for p in [*self.fs.store, *self.fs.pseudo_dirs])
        return bool(self._s3_keys(self.path.split("/", 1)[1]))

    def _s3_keys(self, prefix: str) -> list[str]:
        listing = self.fs.call_s3("list_objects_v2", Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for o in listing.get("Contents", [])]

    def clear(self) -> None:
        """Delete whatever a test left (tmp_path takes care of local folders)."""
        if self.kind == "memory":
            for k in [k for k in self.fs.store if k == self.path or k.startswith(self.path + "/")]:
                del self.fs.store[k]
            self.fs.pseudo_dirs[:] = [d for d in self.fs.pseudo_dirs
                                      if d != self.path and not d.startswith(self.path + "/")]
        elif self.kind == "s3":
            for key in self._s3_keys(self.path.split("/", 1)[1]):
                self.fs.call_s3("delete_object", Bucket=BUCKET, Key=key)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    s3 = request.getfixturevalue("s3_server") if request.param == "s3" else None
    b = Backend(request.param, tmp_path, s3)
    yield b
    b.clear()


# -- CacheLocation: the same behaviour everywhere ------------------------------------------------

def test_a_new_location_is_empty_and_holds_nothing(backend):
    loc = backend.location
    loc.check_container("write to")  # the bucket exists; nothing is created
    assert loc.is_empty() and not loc.exists() and not loc.is_file()
    assert loc.list_files() == [] and loc.file_sizes() == {} and loc.disk_bytes() == 0
    assert loc.read_bytes("zarr.json") is None and not loc.is_file("zarr.json")
    assert not backend.anything_at_root()


def test_small_files_round_trip_and_listing(backend):
    loc = backend.location
    marker = {"unit": 1, "digests": {"input_ids": "ab"}, "loss": 1.5}
    loc.write_json("_units/000001.json", marker)
    loc.write_bytes("a/b/c", b"123")
    loc.write_bytes("top", b"")
    assert loc.read_bytes("_units/000001.json") == json_bytes(marker)
    assert json.loads(loc.read_bytes("_units/000001.json")) == marker
    assert loc.read_bytes("a/b/c") == b"123" and loc.read_bytes("top") == b""
    assert backend.stored() == {"_units/000001.json": json_bytes(marker), "a/b/c": b"123", "top": b""}
    assert loc.list_files() == ["_units/000001.json", "a/b/c", "top"]
    assert loc.list_files("a") == loc.list_files("a/b") == ["a/b/c"]
    assert loc.list_files("_units") == ["_units/000001.json"] and loc.list_files("nothing") == []
    assert loc.file_sizes("a") == {"a/b/c": 3}
    assert loc.disk_bytes() == 3 + len(json_bytes(marker))
    assert loc.exists() and not loc.is_empty()
    assert loc.is_file("a/b/c") and loc.is_file("top")
    assert not loc.is_file("a") and loc.read_bytes("a") is None  # a folder is not a file
    assert loc.read_bytes("a/b/c/d") is None  # nor is anything under a file


def test_a_prefix_lists_only_what_is_under_it(backend):
    loc = backend.location
    for key in ("_units/000001.json", "_units2/x", "_units-old", "_unitsx"):
        backend.put(key, b"1")
    assert loc.list_files("_units") == ["_units/000001.json"]
    assert loc.file_sizes("_units") == {"_units/000001.json": 1}


def test_empty_folders_do_not_count(backend):
    """The one meaning of "empty": no file under the root. An empty folder, a memory://
    pseudo-folder and an S3 folder-marker object are folders, not files."""
    loc = backend.location
    backend.make_folder("sub/inner")
    assert backend.anything_at_root()
    assert loc.is_empty() and not loc.exists()
    assert loc.list_files() == [] and loc.file_sizes() == {}
    backend.put("sub/inner/file", b"x")
    assert not loc.is_empty() and loc.exists() and loc.list_files() == ["sub/inner/file"]


def test_a_whole_replace_leaves_only_the_new_bytes(backend):
    loc = backend.location
    loc.write_bytes("_units/000003.json", b"x" * 10_000)
    loc.write_json("_units/000003.json", {"unit": 3})
    assert loc.read_bytes("_units/000003.json") == json_bytes({"unit": 3})  # no tail of the old bytes
    assert backend.stored() == {"_units/000003.json": json_bytes({"unit": 3})}  # no temporary left
    assert loc.file_sizes() == {"_units/000003.json": len(json_bytes({"unit": 3}))}


def test_delete_one_file(backend):
    loc = backend.location
    loc.write_bytes("_units/000001.json", b"1")
    loc.write_bytes("_units/000002.json", b"2")
    loc.delete("_units/000001.json")
    loc.delete("_units/000009.json")  # none there: nothing to do
    assert loc.read_bytes("_units/000001.json") is None
    assert backend.stored() == {"_units/000002.json": b"2"}


def test_remove_leaves_nothing_at_the_location(backend):
    loc = backend.location
    loc.write_json("zarr.json", {"attributes": {}})
    loc.write_bytes("hidden/4/c/0/0/0", b"shard")
    backend.make_folder("empty/inner")
    loc.remove()
    assert loc.is_empty() and not loc.exists() and loc.list_files() == []
    assert backend.stored() == {} and not backend.anything_at_root()
    loc.remove()  # nothing there: nothing to do


def test_a_root_that_is_a_file(backend):
    """A file (object) at the root itself: it is a file, nothing is under it, and neither
    removal nor the writer touches it."""
    loc = backend.location
    backend.put("", b"precious")
    assert loc.is_file() and loc.exists()
    assert loc.is_empty() and loc.list_files() == [] and loc.read_bytes("zarr.json") is None
    loc.remove()
    assert loc.is_file()
    layout = small_layout()
    with pytest.raises(ConfigError, match="expected a folder for the cache"):
        CacheWriter.open(loc, layout, {"data": "x"})
    assert loc.is_file()


def test_open_group_writes_the_same_keys(backend):
    import zarr

    loc = backend.location
    store = loc.zarr_store("w")
    want_store = zarr.storage.LocalStore if backend.kind == "local" else zarr.storage.FsspecStore
    assert isinstance(store, want_store)
    group = loc.open_group(mode="w", attributes={"unidistill": {"status": "building"}})
    array = group.create_array("hidden/4", shape=(4, 3), chunks=(1, 3), shards=(2, 3),
                               dtype="int32", fill_value=-1)
    array[:] = np.arange(12, dtype="int32").reshape(4, 3)
    assert loc.list_files() == ["hidden/4/c/0/0", "hidden/4/c/1/0", "hidden/4/zarr.json",
                                "hidden/zarr.json", "zarr.json"]
    again = loc.open_group(mode="r")
    assert again.attrs["unidistill"] == {"status": "building"}
    np.testing.assert_array_equal(again["hidden/4"][:], np.arange(12).reshape(4, 3))
    with pytest.raises(ValueError, match="read-only"):
        again["hidden/4"][0] = 0
    assert json.loads(loc.read_bytes("zarr.json"))["attributes"] == {"unidistill": {"status": "building"}}


def test_a_pickled_location_reconnects(backend):
    loc = backend.location
    loc.write_bytes("a", b"1")
    clone = pickle.loads(pickle.dumps(loc))
    assert clone._fs is None and clone.read_bytes("a") == b"1" and clone.list_files() == ["a"]


def test_make_durable_has_work_only_on_a_local_folder(backend):
    loc = backend.location
    loc.write_bytes("a/b", b"1")
    missing = loc.make_durable(["a/b", "a/none"])
    assert missing == (["a/none"] if backend.kind == "local" else [])


# -- the writer over every backend ---------------------------------------------------------------

def small_layout(**kw) -> CacheLayout:
    return CacheLayout(**{"n_sequences": 5, "seq_len": 4, "stored_k": 2, "vocab_size": 50,
                          "hidden_size": 3, "layers": (1, 2), "shard_size": 2, **kw})


def unit_data(layout: CacheLayout, unit: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + unit)
    start, stop = layout.unit_range(unit)
    out = {}
    for name, spec in layout.array_specs().items():
        shape = (stop - start,) + tuple(spec["shape"][1:])
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            out[name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[name] = rng.integers(0, 40, size=shape).astype(dtype)
    return out


def test_the_writer_builds_the_same_cache_on_every_backend(backend):
    loc, layout = backend.location, small_layout()
    writer = CacheWriter.open(loc, layout, {"data": "x"})
    data = {u: unit_data(layout, u) for u in range(layout.n_units)}
    for u in range(layout.n_units):
        writer.write_unit(u, data[u])
    writer.finalize()

    # The files a unit wrote are the ones the writer names from the layout, and nothing else.
    shard_files = {k for k in loc.list_files() if "/c/" in k}
    named = {u: set(writer.unit_shard_keys(u).values()) for u in range(layout.n_units)}
    assert set().union(*named.values()) == shard_files
    for u in range(layout.n_units):
        assert named[u] == {k for k in shard_files if k.split("/c/")[1].split("/")[0] == str(u)}
    assert len(shard_files) == layout.n_units * len(layout.array_specs())
    assert sorted(read_unit_markers(loc, layout.n_units)) == list(range(layout.n_units))

    reader = CacheReader(loc)
    for name in layout.array_specs():
        np.testing.assert_array_equal(reader.group[name][:],
                                      np.concatenate([data[u][name] for u in range(layout.n_units)]))


def test_the_writer_refuses_foreign_files_but_not_empty_folders(backend):
    loc = backend.location
    backend.make_folder("leftover")
    writer = CacheWriter.open(loc, small_layout(), {"data": "x"})  # empty: accepted
    assert writer.pending_units() == [0, 1, 2]
    loc.remove()
    backend.put("notes.txt", b"keep me")
    with pytest.raises(ConfigError, match="is not empty and holds no unidistill cache"):
        CacheWriter.open(loc, small_layout(), {"data": "x"})
    assert backend.stored() == {"notes.txt": b"keep me"}


# -- durable commits (a local folder) ------------------------------------------------------------

class SyncLog:
    """Records, in order, every fsync (by the path of its descriptor) and every rename."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def replace(src, dst, *a, **kw):
            result = real_replace(src, dst, *a, **kw)
            self.events.append(("rename", os.path.abspath(dst)))
            return result

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, kind: str, path, last: bool = False) -> int:
        hits = [i for i, e in enumerate(self.events) if e == (kind, str(path))]
        assert hits, f"no {kind} of {path}; recorded: {self.events}"
        return hits[-1] if last else hits[0]

    def synced_between(self, path, after: int, before: int) -> bool:
        return any(e == ("fsync", str(path)) for e in self.events[after + 1:before])


def folders_up_to(root: Path, path: Path) -> list[Path]:
    out, folder = [], path.parent
    while True:
        out.append(folder)
        if folder == root:
            return out
        folder = folder.parent


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced files")
def test_unit_shards_and_folders_are_fsynced_before_the_marker(tmp_path, monkeypatch):
    root = (tmp_path / "cache").resolve()
    layout = small_layout(hidden_dtype="int8")  # nested arrays: hidden/<j>, hidden/<j>_scale, ...
    writer = CacheWriter.open(str(root), layout, {"data": "x"})
    log = SyncLog(monkeypatch)
    for unit in (0, 2):  # unit 0 creates every c/ folder; unit 2 is the short last one
        writer.write_unit(unit, unit_data(layout, unit))
        marker = root / unit_marker_key(unit)
        committed = log.index("rename", marker)
        # What the unit wrote, found on disk (zarr v3: <array>/c/<unit>/...), not from the writer.
        shards = [p for name in layout.array_specs()
                  for p in sorted((root / name / "c" / str(unit)).rglob("*")) if p.is_file()]
        assert len(shards) == len(layout.array_specs())
        for shard in shards:
            # zarr renamed the shard into place; then the shard and every folder from its own up
            # to the root were fsynced, all before the marker existed
            renamed = log.index("rename", shard, last=True)
            for path in [shard, *folders_up_to(root, shard)]:
                assert log.synced_between(path, renamed, committed), (unit, shard, path)
        assert log.synced_between(marker.parent, committed, len(log.events))  # the marker's rename


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced files")
def test_metadata_and_the_final_manifest_are_fsynced(tmp_path, monkeypatch):
    root = (tmp_path / "cache").resolve()
    layout = small_layout()
    log = SyncLog(monkeypatch)
    writer = CacheWriter.open(str(root), layout, {"data": "x"})
    metadata = sorted(root.rglob("zarr.json"))
    nodes = {"/".join(name.split("/")[:i]) for name in layout.array_specs()
             for i in range(1, name.count("/") + 2)}  # arrays and the groups above them
    assert [p.relative_to(root).as_posix() for p in metadata] == sorted(
        ["zarr.json", *(f"{node}/zarr.json" for node in nodes)])
    for path in metadata:
        renames = [i for i, e in enumerate(log.events) if e == ("rename", str(path))]
        assert log.synced_between(path, renames[-1] if renames else -1, len(log.events)), path
        assert log.synced_between(path.parent, renames[-1] if renames else -1, len(log.events)), path
    for u in range(layout.n_units):
        writer.write_unit(u, unit_data(layout, u))
    log.events.clear()
    writer.finalize()
    written = log.index("rename", root / "zarr.json", last=True)
    assert log.synced_between(root / "zarr.json", written, len(log.events))
    assert log.synced_between(root, written, len(log.events))


def test_a_unit_whose_array_is_all_fill_values_commits_without_its_shard(tmp_path):
    """zarr stores no shard whose every value is the fill value; the unit still commits."""
    root, layout = tmp_path / "cache", small_layout()
    writer = CacheWriter.open(str(root), layout, {"data": "x"})
    data = unit_data(layout, 1)
    data["hidden/2"][:] = np.nan  # the array's fill value
    writer.write_unit(1, data)
    assert not (root / writer.unit_shard_keys(1)["hidden/2"]).exists()
    assert (root / writer.unit_shard_keys(1)["hidden/1"]).is_file()
    assert (root / unit_marker_key(1)).is_file()


def test_a_shard_missing_after_its_write_stops_the_commit(tmp_path, monkeypatch):
    root, layout = tmp_path / "cache", small_layout()
    writer = CacheWriter.open(str(root), layout, {"data": "x"})
    real = CacheWriter.unit_shard_keys
    monkeypatch.setattr(CacheWriter, "unit_shard_keys",
                        lambda self, unit: {**real(self, unit), "hidden/1": "hidden/1/c/9/9/9"})
    with pytest.raises(CacheError, match=r"unit 1, array hidden/1: no shard file at hidden/1/c/9/9/9"):
        writer.write_unit(1, unit_data(layout, 1))
    assert not (root / unit_marker_key(1)).exists()


def test_a_failed_local_write_keeps_the_old_file_whole(tmp_path, monkeypatch):
    loc = CacheLocation(str(tmp_path / "cache"))
    loc.write_bytes("_units/000001.json", b"old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        loc.write_bytes("_units/000001.json", b"new")
    monkeypatch.undo()
    assert loc.read_bytes("_units/000001.json") == b"old"
    assert loc.list_files() == ["_units/000001.json"]  # the temporary file is gone


def test_a_local_folder_name_is_taken_literally(tmp_path):
    """fsspec reads '::' in a URL as a chain of file systems; a local path is just a path."""
    folder = tmp_path / "runs::v2" / "cache[1]"
    loc = CacheLocation(str(folder))
    loc.write_bytes("a/b", b"1")
    assert (folder / "a" / "b").read_bytes() == b"1"
    assert loc.list_files() == ["a/b"] and loc.read_bytes("a/b") == b"1"
    loc.remove()
    assert not folder.exists() and (tmp_path / "runs::v2").is_dir()

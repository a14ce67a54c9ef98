"""Remote caches: both phases against a real S3 API (moto's server on loopback), no client mocks.

The server is a real HTTP endpoint; s3fs / aiobotocore talk to it through AWS_ENDPOINT_URL with
fake credentials, exactly as they would talk to MinIO or AWS.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate
from click.testing import CliRunner

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'unidistill[s3]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")

from unidistill.cli import main  # noqa: E402
from unidistill.errors import CacheIncompleteError, ConfigError  # noqa: E402
from unidistill.storage import CacheReader  # noqa: E402
from unidistill.storage.layout import hidden_key  # noqa: E402
from unidistill.storage.location import CacheLocation  # noqa: E402
from unidistill.storage.manifest import MANIFEST_KEY, read_unit_marker, unit_marker_key  # noqa: E402
from unidistill.trainer.dataset import CacheDataset  # noqa: E402
from unidistill.trainer.run import distill_from_cache  # noqa: E402
from unidistill.trainer.run_record import RUN_RECORD  # noqa: E402

from .conftest import args_for, train_losses  # noqa: E402
from .test_storage_backends import BUCKET, s3_server  # noqa: E402,F401  (the moto server fixture)

N_UNITS = 4  # 16 sequences in shards of 4


def build_args(teacher, data, out, *extra):
    return ["cache-build", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--seq-len", "32", "--top-k", "8", "--layers", "1,4", "--max-sequences", "16",
            "--batch-size", "4", "--shard-size", "4", "--device", "cpu", "--quiet", *extra]


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_all(root):
    reader = CacheReader(root)
    return {name: reader.group[name][:] for name in reader.layout.array_specs()}


@pytest.fixture(scope="module")
def built(s3_server, tiny_teacher_dir, text_file, tmp_path_factory):
    """The same build written to S3 and to a local folder."""
    local = tmp_path_factory.mktemp("remote-ref") / "cache"
    url = f"s3://{BUCKET}/cache"
    for out in (local, url):
        result = run_cli(build_args(tiny_teacher_dir, text_file, out))
        assert result.exit_code == 0, result.output
    return {"url": url, "local": local}


def copy_cache(fs, url, name):
    """A private copy of the shared S3 cache for a test that damages it."""
    dst = f"s3://{BUCKET}/{name}"
    fs.copy(url.removeprefix("s3://"), dst.removeprefix("s3://"), recursive=True)
    return dst


def test_s3_build_equals_local_build(s3_server, built):
    url, local = built["url"], built["local"]
    keys = s3_server.find(f"{BUCKET}/cache")
    assert f"{BUCKET}/cache/zarr.json" in keys
    assert f"{BUCKET}/cache/{unit_marker_key(N_UNITS - 1)}" in keys
    remote_reader, local_reader = CacheReader(url), CacheReader(local)
    assert remote_reader.root == url and remote_reader.location.is_local is False
    assert remote_reader.manifest["fingerprint"] == local_reader.manifest["fingerprint"]
    assert remote_reader.manifest["layout"] == local_reader.manifest["layout"]
    remote_arrays, local_arrays = read_all(url), read_all(local)
    assert set(remote_arrays) == set(local_arrays) and hidden_key(4) in remote_arrays
    for name, a in local_arrays.items():
        np.testing.assert_array_equal(remote_arrays[name], a, err_msg=name)
    for u in range(N_UNITS):
        assert read_unit_marker(url, u)["digests"] == read_unit_marker(local, u)["digests"]


def test_cache_info_and_verify_on_s3_url(s3_server, built):
    url = built["url"]
    info = run_cli(["cache-info", url, "--json"])
    assert info.exit_code == 0, info.output
    data = json.loads(info.output)
    assert data["path"] == url and data["status"] == "complete"
    assert data["units_committed"] == data["units_total"] == N_UNITS
    object_bytes = sum(s3_server.du(f"{BUCKET}/cache", total=False).values())
    assert data["bytes_per_token"]["total_disk"] * data["n_tokens"] == pytest.approx(object_bytes)
    assert all(a["disk_bytes"] > 0 for a in data["arrays"].values())
    local = json.loads(run_cli(["cache-info", built["local"], "--json"]).output)
    for name, a in data["arrays"].items():  # same codecs, same bytes: object sizes = file sizes
        assert a["disk_bytes"] == local["arrays"][name]["disk_bytes"], name
    text = run_cli(["cache-info", url])
    assert text.exit_code == 0 and f"cache        {url}" in text.output

    verify = run_cli(["cache-verify", url, "--quiet"])
    assert verify.exit_code == 0, verify.output
    assert f"OK   {N_UNITS} units verified" in verify.output


def test_verify_names_a_corrupted_object(s3_server, built):
    url = copy_cache(s3_server, built["url"], "corrupt")
    name = hidden_key(4)
    shard = sorted(k for k in s3_server.find(f"{BUCKET}/corrupt/{name}/c/2"))[0]
    blob = bytearray(s3_server.cat_file(shard))
    blob[len(blob) // 3] ^= 0xFF
    s3_server.pipe_file(shard, bytes(blob))

    result = run_cli(["cache-verify", url, "--quiet"])
    assert result.exit_code == 1, result.output
    assert f"BAD  unit 2, array {name}" in result.output
    assert sum(line.startswith("BAD") for line in result.output.splitlines()) == 1
    assert f"DAMAGED: 1 problem(s) in {url}" in result.output


def test_training_from_s3_matches_local(tmp_path, built, student_dir):
    runs = {}
    for kind in ("url", "local"):
        trainer = distill_from_cache(built[kind], str(student_dir),
                                     args_for(tmp_path / kind, max_steps=2, save_strategy="no"))
        runs[kind] = train_losses(trainer)
    assert [s for s, *_ in runs["url"]] == [1, 2]
    assert runs["url"] == runs["local"]
    record = json.loads((tmp_path / "url" / RUN_RECORD).read_text())
    assert record["caches"][0]["path"] == built["url"]


def test_evaluate_on_s3_cache_matches_local(built, tiny_teacher_dir):
    from unidistill.evaluate import evaluate

    got, want = (evaluate(str(tiny_teacher_dir), cache=built[kind], batch_size=4, device="cpu",
                          max_sequences=8, progress=False) for kind in ("url", "local"))
    assert got.cache == built["url"] and got.cache_fingerprint == want.cache_fingerprint
    assert got.kl_to_teacher == want.kl_to_teacher and got.cache_nll == want.cache_nll
    assert got.layer_cosine == want.layer_cosine


def test_dataloader_workers_read_the_remote_cache(built):
    remote = CacheDataset(built["url"], layers=(1, 4))
    local = CacheDataset(built["local"], layers=(1, 4))
    first = remote[0]  # the parent opens its store and client before the workers fork
    assert torch.equal(first["teacher_hidden_4"], local[0]["teacher_hidden_4"])
    clone = pickle.loads(pickle.dumps(remote))  # spawn-style hand-over: no client is pickled
    assert torch.equal(clone[3]["teacher_logp"], local[3]["teacher_logp"])

    loader = torch.utils.data.DataLoader(remote, batch_size=4, num_workers=2,
                                         collate_fn=default_collate)
    batches = list(loader)
    want = default_collate([local[i] for i in range(len(local))])
    for key, value in want.items():
        assert torch.equal(torch.cat([b[key] for b in batches]), value), key


def test_unfinished_remote_build_resumes_only_missing_unit(s3_server, built, tiny_teacher_dir,
                                                           text_file):
    import zarr

    url = copy_cache(s3_server, built["url"], "resume")
    # What a build killed before its end leaves: status building, unit 2 without marker and
    # without its shards.
    loc = CacheLocation(url)
    group = zarr.open_group(loc.zarr_store("r+"), mode="r+")
    manifest = dict(group.attrs[MANIFEST_KEY])
    for key in ("fingerprint", "completed_at", "build"):
        manifest.pop(key)
    group.attrs[MANIFEST_KEY] = {**manifest, "status": "building"}
    s3_server.rm_file(f"{BUCKET}/resume/{unit_marker_key(2)}")
    for name in CacheReader(url, require_complete=False).layout.array_specs():
        for key in s3_server.find(f"{BUCKET}/resume/{name}/c/2"):
            s3_server.rm_file(key)
    before = {u: read_unit_marker(url, u) for u in range(N_UNITS)}
    assert before[2] is None
    with pytest.raises(CacheIncompleteError):
        CacheReader(url)
    verify = run_cli(["cache-verify", url, "--quiet"])
    assert verify.exit_code == 1 and "unit 2: not committed" in verify.output

    result = run_cli(build_args(tiny_teacher_dir, text_file, url))
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and f"{N_UNITS - 1}/{N_UNITS} units already committed" in result.output
    after = {u: read_unit_marker(url, u) for u in range(N_UNITS)}
    for u in (0, 1, 3):
        assert after[u] == before[u]  # untouched
    assert after[2]["run_id"] != before[0]["run_id"]
    reader = CacheReader(url)
    assert reader.manifest["build"]["units_computed_this_run"] == 1
    assert reader.manifest["fingerprint"] == CacheReader(built["local"]).manifest["fingerprint"]
    resumed = read_all(url)
    for name, a in read_all(built["local"]).items():
        np.testing.assert_array_equal(resumed[name], a, err_msg=name)


def test_complete_remote_cache_is_immutable_without_overwrite(s3_server, built, tiny_teacher_dir,
                                                              text_file):
    url = copy_cache(s3_server, built["url"], "immutable")
    before = s3_server.cat_file(f"{BUCKET}/immutable/zarr.json")
    result = run_cli(build_args(tiny_teacher_dir, text_file, url))  # the same command: done
    assert result.exit_code == 0 and "already complete" in result.output
    result = run_cli(build_args(tiny_teacher_dir, text_file, url, "--top-k", "4"))
    assert result.exit_code == 2
    assert "already holds a complete cache" in result.output and "--overwrite" in result.output
    assert s3_server.cat_file(f"{BUCKET}/immutable/zarr.json") == before
    assert not s3_server.exists(f"{BUCKET}/immutable/_control/lease.json")

    s3_server.pipe_file(f"{BUCKET}/immutable/stray-object", b"x")  # --overwrite clears the prefix
    result = run_cli(build_args(tiny_teacher_dir, text_file, url, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not s3_server.exists(f"{BUCKET}/immutable/stray-object")
    assert CacheReader(url).manifest["fingerprint"] == CacheReader(built["local"]).manifest["fingerprint"]


def test_prefix_with_foreign_objects_is_refused(s3_server, tiny_teacher_dir, text_file):
    s3_server.pipe_file(f"{BUCKET}/foreign/notes.txt", b"not a cache")
    result = run_cli(build_args(tiny_teacher_dir, text_file, f"s3://{BUCKET}/foreign"))
    assert result.exit_code == 2
    assert "is not empty and holds no unidistill cache" in result.output
    assert s3_server.find(f"{BUCKET}/foreign") == [f"{BUCKET}/foreign/notes.txt"]


def test_missing_bucket_is_a_clear_error(s3_server, tiny_teacher_dir, text_file):
    url = "s3://no-such-bucket/cache"
    for args in (build_args(tiny_teacher_dir, text_file, url), ["cache-info", url],
                 ["cache-verify", url, "--quiet"]):
        result = run_cli(args)
        assert result.exit_code == 2, result.output
        assert "bucket 'no-such-bucket' does not exist" in result.output, result.output
        assert "create the bucket" in result.output and "Traceback" not in result.output
    assert not s3_server.exists("no-such-bucket")
    # an existing bucket without a cache under the prefix is "no cache", not "no bucket"
    result = run_cli(["cache-info", f"s3://{BUCKET}/nothing-here"])
    assert result.exit_code == 2 and "no unidistill cache at" in result.output


def test_missing_credentials_are_a_clear_error(s3_server, built, monkeypatch, tmp_path):
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would still hold the old keys
    try:
        result = run_cli(["cache-info", built["url"]])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert result.exit_code == 2, result.output
    assert "no usable credentials" in result.output and "AWS_ACCESS_KEY_ID" in result.output


def test_unknown_url_scheme_is_a_clear_error(tiny_teacher_dir, text_file):
    result = run_cli(build_args(tiny_teacher_dir, text_file, "nosuchscheme://bucket/cache"))
    assert result.exit_code == 2
    assert "nosuchscheme://bucket/cache" in result.output and "s3://bucket/prefix" in result.output
    with pytest.raises(ConfigError, match="Expected a local folder or an fsspec URL"):
        CacheReader("nosuchscheme://bucket/cache")


def test_memory_url_exact_logits_cache_and_file_url(tiny_teacher_dir, text_file, tmp_path):
    """memory:// goes through FsspecStore too (head file included); file:// is a local folder."""
    url = "memory://unidistill-test/exact"
    local = tmp_path / "exact"
    for out in (url, f"file://{local}"):
        result = run_cli(build_args(tiny_teacher_dir, text_file, out, "--logits", "exact"))
        assert result.exit_code == 0, result.output
    assert CacheLocation(f"file://{local}").is_local and (local / "lm_head.safetensors").is_file()
    remote, ref = CacheReader(url), CacheReader(local)
    assert remote.manifest["fingerprint"] == ref.manifest["fingerprint"]
    assert remote.manifest["head"] == ref.manifest["head"]
    (*got_head, got_transform), (*want_head, want_transform) = remote.head(), ref.head()
    for got, want in zip(got_head, want_head):
        assert (got is None and want is None) or torch.equal(got, want)
    assert got_transform == want_transform
    assert run_cli(["cache-verify", url, "--quiet"]).exit_code == 0

    loc = CacheLocation(url)
    loc.write_bytes("lm_head.safetensors", b"garbage")
    result = run_cli(["cache-verify", url, "--quiet"])
    assert result.exit_code == 1 and "lm_head.safetensors: content differs" in result.output
    loc.remove()
    assert not loc.exists()


def test_location_at_a_bucket_root_keeps_the_bucket(s3_server, tmp_path):
    """The CacheLocation primitives on a bucket's root (a prefix, memory:// and a folder:
    tests/test_storage_backends.py); removing a cache there keeps the bucket."""
    s3_server.mkdir("root-bucket")
    loc = CacheLocation("s3://root-bucket")
    assert loc.is_empty() and loc.read_bytes("missing") is None
    loc.write_json("_units/000001.json", {"unit": 1})
    loc.write_bytes("a/b/c", b"123")
    assert loc.list_files() == ["_units/000001.json", "a/b/c"]
    assert loc.file_sizes("a") == {"a/b/c": 3} and loc.disk_bytes() == 3 + len(
        loc.read_bytes("_units/000001.json"))
    assert json.loads(loc.read_bytes("_units/000001.json")) == {"unit": 1}
    clone = pickle.loads(pickle.dumps(loc))
    assert clone._fs is None and clone.read_bytes("a/b/c") == b"123"
    loc.remove()
    assert loc.list_files() == [] and loc.is_empty() and s3_server.find("root-bucket") == []
    assert s3_server.exists("root-bucket")
    assert CacheLocation(f"file://{tmp_path}").root == tmp_path
    assert CacheLocation(f"local://{tmp_path}").is_local

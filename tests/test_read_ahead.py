"""The read path ahead of the trainer: shard prefetching and the read-through folder.

Both must give exactly what the plain reader gives, in every order, on a local cache and on S3
(moto's server on loopback through the real s3fs client, as in ``test_storage_backends``); the
read-through folder must serve a second read with the S3 server stopped; bad settings are refused.
"""

from __future__ import annotations

import logging
import random
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, default_collate

from unidistill.errors import ConfigError
from unidistill.storage import CacheReader
from unidistill.storage.location import CacheLocation
from unidistill.storage.writer import CacheWriter
from unidistill.trainer.dataset import CacheDataset

from .conftest import args_for, train_losses
from .test_storage_backends import BUCKET, s3_server, small_layout  # noqa: F401  (the moto fixture)

ORDERS = {  # the conftest cache: 16 sequences, shards (units) of 4
    "sequential": [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14], [15]],
    "singles": [[i] for i in range(16)],
    "shuffled": [[11, 2, 7], [0, 15, 5], [9, 3], [12, 8, 1], [6, 14, 10], [4, 13]],
    "mixed": [[5, 6, 7], [0, 1], [8, 9, 10, 11], [15], [2, 3, 4], [12, 13, 14], [3, 4]],
}


@pytest.fixture(scope="module")
def remote(s3_server, cache):
    """The conftest cache copied object by object to S3."""
    url = f"s3://{BUCKET}/read-ahead/cache"
    s3_server.put(str(cache) + "/", url.removeprefix("s3://") + "/", recursive=True)
    return url


@pytest.fixture(params=["local", "s3"])
def where(request, cache):
    return cache if request.param == "local" else request.getfixturevalue("remote")


def assert_same(got, want):
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert sorted(got) == sorted(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same(a, b)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)
    else:
        assert got == want


def read_in_order(reader, order, **kw):
    return [reader.read_many(batch, **kw) for batch in order]


# -- prefetching -----------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 3])
def test_prefetching_gives_the_plain_readers_items(where, cache, depth):
    plain = CacheReader(cache)
    for name, order in ORDERS.items():
        want = read_in_order(plain, order, layers=[2, 4])
        got = read_in_order(CacheReader(where, prefetch=depth), order, layers=[2, 4])
        assert_same(got, want)
    # other requests of the same reader (fewer arrays, a temperature) are not served stale
    reader = CacheReader(where, prefetch=2)
    assert_same(read_in_order(reader, ORDERS["sequential"], layers=[], logits=False),
                read_in_order(plain, ORDERS["sequential"], layers=[], logits=False))
    assert_same(read_in_order(reader, ORDERS["sequential"], layers=[1], temperature=2.0),
                read_in_order(plain, ORDERS["sequential"], layers=[1], temperature=2.0))


def _record_direct_reads(reader, monkeypatch):
    direct, units = [], []
    real_fetch, real_unit = reader.fetch_now, reader.read_unit
    monkeypatch.setattr(reader, "fetch_now", lambda names, idx: direct.extend(idx) or real_fetch(names, idx))
    monkeypatch.setattr(reader, "read_unit", lambda names, u: units.append(u) or real_unit(names, u))
    return direct, units


def test_sequential_reads_come_from_the_units_read_ahead(cache, monkeypatch):
    reader = CacheReader(cache, prefetch=2)
    direct, units = _record_direct_reads(reader, monkeypatch)
    for start in range(0, 16, 2):
        reader.read_many([start, start + 1])
    assert direct == [0, 1, 2, 3]  # only the first unit is read sequence by sequence
    assert units == [1, 2, 3]  # each later unit read once, whole, ahead of its first sequence
    assert sorted(reader._prefetcher._held) == [3]  # the units behind the reads are dropped


def test_shuffled_reads_read_nothing_ahead_without_a_folder(cache, monkeypatch):
    reader = CacheReader(cache, prefetch=2)
    direct, units = _record_direct_reads(reader, monkeypatch)
    read_in_order(reader, ORDERS["shuffled"])
    assert sorted(direct) == list(range(16)) and units == []


# -- the read-through folder -------------------------------------------------------------------

def test_read_through_gives_the_same_items_and_copies_whole_files(remote, s3_server, cache, tmp_path):
    reader = CacheReader(remote, local_dir=tmp_path / "rt", prefetch=0)
    plain = CacheReader(cache)
    for name, order in ORDERS.items():
        assert_same(read_in_order(reader, order), read_in_order(plain, order))
    folder = tmp_path / "rt" / reader.manifest["fingerprint"]
    assert reader.read_through.folder == folder
    copied = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    read = ["input_ids", *reader.layout.logit_codec.read_names(1.0),
            *(n for j in reader.layers for n in reader.layout.hidden_codec.names(j))]
    assert sorted(k for k in copied if "/c/" in k) == sorted(
        k for u in range(reader.layout.n_units) for k in reader.unit_keys(read, u))
    prefix = remote.removeprefix("s3://")
    for key, data in copied.items():
        assert data == s3_server.cat_file(f"{prefix}/{key}"), key  # whole, byte for byte
    assert not list(folder.rglob("*.partial"))


@pytest.fixture
def private_s3(tmp_path, cache, monkeypatch):
    """A moto server of this test alone (it gets stopped), holding a copy of the cache."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"private-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(bucket)
    fs.put(str(cache) + "/", f"{bucket}/cache/", recursive=True)
    try:
        yield server, endpoint, f"s3://{bucket}/cache"
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_second_read_is_served_without_s3(private_s3, tmp_path):
    server, endpoint, url = private_s3
    reader = CacheReader(url, local_dir=tmp_path / "rt", prefetch=0)
    first = read_in_order(reader, ORDERS["shuffled"], layers=[1, 3])
    copied = reader.read_through.copied
    assert copied > 0
    server.stop()
    with pytest.raises(OSError):  # the endpoint is gone: any request would fail
        urllib.request.urlopen(endpoint, timeout=5)
    again = read_in_order(reader, ORDERS["mixed"] + ORDERS["shuffled"], layers=[1, 3])
    assert_same(again[len(ORDERS["mixed"]):], first)
    assert reader.read_through.copied == copied  # nothing fetched again


def test_copy_ahead_copies_the_next_units_in_the_background(remote, tmp_path):
    reader = CacheReader(remote, local_dir=tmp_path / "rt")  # prefetch: 2 units by default
    assert reader.prefetch == 2
    reader.read_many([0, 1], layers=[2])
    prefetcher = reader._prefetcher
    for future in list(prefetcher._copies.values()):
        future.result(timeout=60)
    names = sorted(prefetcher._copy_names)
    store = reader.read_through
    copied = {u: all(store.is_copied(k) for k in reader.unit_keys(names, u)) for u in range(4)}
    assert copied == {0: True, 1: True, 2: True, 3: False}
    reader.read_many([4], layers=[2])  # unit 1: 2 is copied, 3 is next, then 0 (wraps round)
    for future in list(prefetcher._copies.values()):
        future.result(timeout=60)
    assert all(store.is_copied(k) for k in reader.unit_keys(names, 3))


def test_dataloader_workers_with_read_through_and_prefetch(remote, cache, tmp_path):
    order = list(range(16))
    random.Random(0).shuffle(order)
    local = CacheDataset(cache, layers=(1, 4))
    want = [default_collate([local[i] for i in order[s:s + 3]]) for s in range(0, 16, 3)]
    for prefetch in (None, 1):
        remote_set = CacheDataset(remote, layers=(1, 4), local_dir=tmp_path / f"rt{prefetch}",
                                  prefetch=prefetch)
        remote_set[0]  # the parent opens its store first, the workers make their own
        loader = DataLoader(remote_set, batch_size=3, sampler=order, num_workers=2,
                            collate_fn=default_collate)
        for got, batch in zip(loader, want, strict=True):
            for key, value in batch.items():
                assert torch.equal(got[key], value), key


def test_training_through_a_read_through_folder_matches_local(remote, cache, student_dir, tmp_path):
    local = train_losses(distill_run(cache, student_dir, tmp_path / "local"))
    folder = tmp_path / "rt"
    through = train_losses(distill_run(remote, student_dir, tmp_path / "rt-run", cache_local_dir=str(folder)))
    assert [s for s, *_ in through] == [1, 2] and through == local
    assert any(p.is_file() and "/c/" in p.as_posix() for p in folder.rglob("*"))  # shards copied


def distill_run(cache, student_dir, out, **kw):
    from unidistill.trainer.run import distill_from_cache

    return distill_from_cache(cache, str(student_dir), args_for(out, max_steps=2, save_strategy="no", **kw))


# -- refusals ----------------------------------------------------------------------------------

def test_a_read_through_folder_for_a_local_cache_is_refused(cache, tmp_path, student_dir):
    with pytest.raises(ConfigError, match=r"is a local folder already: there is nothing to copy"):
        CacheReader(cache, local_dir=tmp_path / "rt")
    with pytest.raises(ConfigError, match=r"nothing to copy.*--cache-local-dir"):
        distill_run(cache, student_dir, tmp_path / "run", cache_local_dir=str(tmp_path / "rt"))
    assert not (tmp_path / "rt").exists() and not (tmp_path / "run").exists()


def test_bad_read_ahead_settings_are_refused(remote, cache, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=rf"read-through folder {afile} is a file; expected a folder"):
        CacheReader(remote, local_dir=afile)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=rf"prefetch must be a whole number of shards >= 0 .*got {bad!r}"):
            CacheReader(cache, prefetch=bad)
    with pytest.raises(ConfigError, match=r"got an open CacheReader and local_dir=.*give those to the CacheReader"):
        CacheDataset(CacheReader(remote), local_dir=tmp_path / "rt")


def test_an_unfinished_cache_cannot_be_read_through_a_folder(tmp_path):
    url = f"memory://read-ahead-{uuid.uuid4().hex[:8]}/cache"
    CacheWriter.open(CacheLocation(url), small_layout(), {"data": "x"})  # building, no fingerprint
    with pytest.raises(ConfigError, match=r"no content fingerprint \(status 'building'\).*only a complete cache"):
        CacheReader(url, require_complete=False, local_dir=tmp_path / "rt")


def test_distill_from_cache_has_the_option():
    from unidistill.cli import main

    result = CliRunner().invoke(main, ["distill-from-cache", "--help"])
    assert result.exit_code == 0 and "--cache-local-dir" in result.output

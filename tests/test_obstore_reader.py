"""``UNIDISTILL_S3_READER=obstore``: an s3:// cache's arrays read by obstore (Zarr's
``ObjectStore``) give exactly what s3fs gives, against moto's S3 server on loopback; settings
obstore cannot honour are refused. The tests that need obstore skip when it is not installed."""

from __future__ import annotations

import random
import sys

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from unidistill.errors import ConfigError
from unidistill.storage import CacheReader
from unidistill.storage.location import CacheLocation
from unidistill.storage.obstore_reader import S3_READER_ENV
from unidistill.trainer.dataset import CacheDataset

from .test_read_ahead import ORDERS, assert_same, read_in_order, remote  # noqa: F401  (fixture)
from .test_storage_backends import s3_server  # noqa: F401  (the moto server fixture)


def needs_obstore():
    pytest.importorskip("obstore", reason="obstore is not installed (pip install 'unidistill[obstore]')")


def test_obstore_reads_what_s3fs_reads(remote, monkeypatch):
    needs_obstore()
    from zarr.storage import FsspecStore, ObjectStore

    want = {name: read_in_order(CacheReader(remote), order, layers=[1, 4]) for name, order in ORDERS.items()}
    monkeypatch.setenv(S3_READER_ENV, "obstore")
    reader = CacheReader(remote)
    assert isinstance(reader.group.store, ObjectStore)
    assert isinstance(CacheLocation(remote).zarr_store("w"), FsspecStore)  # writes stay on s3fs
    for name, order in ORDERS.items():
        assert_same(read_in_order(reader, order, layers=[1, 4]), want[name])
    assert_same(read_in_order(CacheReader(remote, prefetch=2), ORDERS["sequential"], layers=[1, 4]),
                want["sequential"])


def test_obstore_in_spawned_workers_and_through_a_folder(remote, cache, monkeypatch, tmp_path):
    needs_obstore()
    order = list(range(16))
    random.Random(1).shuffle(order)
    local = CacheDataset(cache, layers=(2,))
    want = [default_collate([local[i] for i in order[s:s + 4]]) for s in range(0, 16, 4)]
    monkeypatch.setenv(S3_READER_ENV, "obstore")
    for local_dir in (None, tmp_path / "rt"):
        dataset = CacheDataset(remote, layers=(2,), local_dir=local_dir)
        dataset[0]  # the parent reads with obstore first, as distill-from-cache does
        loader = DataLoader(dataset, batch_size=4, sampler=order, num_workers=2,
                            collate_fn=default_collate, multiprocessing_context="spawn")
        for got, batch in zip(loader, want, strict=True):
            for key, value in batch.items():
                assert torch.equal(got[key], value), key
    assert any((tmp_path / "rt").rglob("input_ids/c/*/*"))


def test_forked_workers_after_obstore_are_refused_not_hung(remote, monkeypatch):
    needs_obstore()
    monkeypatch.setenv(S3_READER_ENV, "obstore")
    dataset = CacheDataset(remote, layers=(2,))
    dataset[0]
    loader = DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=default_collate,
                        multiprocessing_context="fork", timeout=120)
    with pytest.raises(ConfigError, match=r"forked from process \d+ that already read with obstore: "
                                          r"obstore is not fork-safe.*--dataloader-num-workers 0"):
        next(iter(loader))


def test_settings_obstore_cannot_honour_are_refused(remote, monkeypatch):
    needs_obstore()
    monkeypatch.setenv(S3_READER_ENV, "boto")
    with pytest.raises(ConfigError, match=rf"{S3_READER_ENV}='boto' is not one of \('s3fs', 'obstore'\)"):
        CacheReader(remote).group
    monkeypatch.setenv(S3_READER_ENV, "obstore")
    monkeypatch.setenv("UNIDISTILL_STORAGE_OPTIONS", '{"client_kwargs": {"verify": false}, "max_concurrency": 4}')
    with pytest.raises(ConfigError, match=r"cannot honour the fsspec options \['max_concurrency', "
                                          r"'client_kwargs.verify'\].*unset UNIDISTILL_S3_READER"):
        CacheLocation(remote).zarr_store("r")
    monkeypatch.delenv("UNIDISTILL_STORAGE_OPTIONS")
    monkeypatch.setenv("AWS_PROFILE", "work")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(ConfigError, match=r"does not read AWS profiles \(AWS_PROFILE='work'\)"):
        CacheLocation(remote).zarr_store("r")


def test_without_obstore_the_setting_says_what_to_install(remote, monkeypatch):
    monkeypatch.setenv(S3_READER_ENV, "obstore")
    monkeypatch.setitem(sys.modules, "obstore.store", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"needs obstore .*pip install 'unidistill\[obstore\]'"):
        CacheLocation(remote).zarr_store("r")

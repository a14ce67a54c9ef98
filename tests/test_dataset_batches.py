"""A DataLoader batch is one concurrent read of the cache (``CacheDataset.__getitems__``)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, default_collate

from unidistill.storage import CacheReader
from unidistill.storage import reader as reader_module
from unidistill.trainer.dataset import CacheDataset


def test_a_batch_is_one_gather_and_equals_the_items_one_by_one(cache, monkeypatch):
    dataset = CacheDataset(cache, layers=[2, 4])
    one_by_one = [dataset[i] for i in (5, 0, 3)]
    gathers = []
    real = reader_module.zarr_sync
    monkeypatch.setattr(reader_module, "zarr_sync", lambda coro: gathers.append(1) or real(coro))
    batch = dataset.__getitems__([5, 0, 3])
    assert len(gathers) == 1  # every array of the three sequences in one round
    assert [sorted(b) for b in batch] == [sorted(o) for o in one_by_one]
    for got, want in zip(batch, one_by_one):
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_the_dataloader_reads_whole_batches(cache, monkeypatch):
    dataset = CacheDataset(cache, layers=[2])
    asked = []
    real = CacheReader.read_many
    monkeypatch.setattr(CacheReader, "read_many",
                        lambda self, indices, **kw: asked.append(list(indices)) or real(self, indices, **kw))
    batches = list(DataLoader(dataset, batch_size=3, collate_fn=default_collate))
    assert asked == [list(range(s, min(s + 3, len(dataset)))) for s in range(0, len(dataset), 3)]
    assert batches[0]["input_ids"].shape == (3, dataset.reader.layout.seq_len)
    assert torch.equal(batches[1]["teacher_hidden_2"][0], dataset[3]["teacher_hidden_2"])


def test_an_index_out_of_range_names_the_range(cache):
    import pytest

    dataset = CacheDataset(cache)
    with pytest.raises(IndexError, match=rf"sequence {len(dataset)} out of range 0..{len(dataset) - 1}"):
        dataset.__getitems__([0, len(dataset)])

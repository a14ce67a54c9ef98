"""Packing that keeps documents apart (text.packing), position ids and the loss mask, by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unidistill.errors import DataError
from unidistill.models.batch import TokenFields, loss_mask
from unidistill.models.packing import position_ids
from unidistill.text.packing import Example, PackStats, iter_packed_rows, pack_examples


def example(n: int, first: int = 10, target=None) -> Example:
    return Example(tuple(range(first, first + n)), tuple(target) if target else (False,) + (True,) * (n - 1))


def test_best_fit_decreasing_by_hand():
    # lengths 5 3 7 2 9 into rows of 10: 9 -> row 0; 7 -> row 1; 5 -> row 2; 3 fits row 1 exactly
    # (least room that holds it); 2 -> row 2 (room 5; row 0 has 1)
    got = pack_examples([example(n) for n in (5, 3, 7, 2, 9)], 10, "documents", pad_id=0,
                        long_examples="split")
    assert got.document_ids.tolist() == [[4] * 9 + [-2],
                                         [2] * 7 + [1] * 3,
                                         [0] * 5 + [3] * 2 + [-2] * 3]
    assert got.input_ids[0].tolist() == list(range(10, 19)) + [0]
    assert got.target_mask[2].tolist() == [0, 1, 1, 1, 1, 0, 1, 0, 0, 0]
    assert got.stats == {"examples": 5, "segments": 5, "targets": 21, "padding": 4, "rows": 3,
                         "truncated": 0, "dropped": 0}


def test_none_packs_one_example_per_row_and_windows_keep_data_order():
    got = pack_examples([example(n) for n in (3, 5)], 6, "none", pad_id=7)
    assert got.input_ids.tolist() == [[10, 11, 12, 7, 7, 7], [10, 11, 12, 13, 14, 7]]
    assert got.document_ids.tolist() == [[0, 0, 0, -2, -2, -2], [1] * 5 + [-2]]
    # window 1: no example ever shares a row with a later one
    one = pack_examples([example(n) for n in (3, 2, 4)], 10, "documents", pad_id=0, window=1)
    assert len(one) == 3


def test_long_examples_split_into_segments_or_truncate_and_drop():
    split = pack_examples([example(7)], 3, "documents", pad_id=0, long_examples="split")
    assert sorted(split.document_ids[:, 0].tolist()) == [0, 1, 2]  # three pieces, three segments
    assert split.stats["segments"] == 3 and split.stats["truncated"] == 0
    no_target_left = example(6, target=(False, False, False, False, True, True))
    stats = PackStats()
    rows = list(iter_packed_rows([no_target_left, example(5)], 4, "none", pad_id=0, stats=stats,
                                 long_examples="truncate"))
    assert len(rows) == 1 and stats.truncated == 2 and stats.dropped == 1
    with pytest.raises(DataError, match="not one of"):
        list(iter_packed_rows([], 4, "stream", pad_id=0, stats=PackStats()))


def test_max_sequences_stops_after_that_many_rows():
    got = pack_examples([example(5) for _ in range(8)], 5, "documents", pad_id=0, max_sequences=3)
    assert len(got) == 3 and got.stats["rows"] == 3


def test_position_ids_restart_per_segment_and_padding():
    docs = torch.tensor([[0, 0, 0, 3, 3, -2, -2], [5, 5, 5, 5, 5, 5, 5]])
    assert position_ids(docs).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


def test_the_loss_mask_is_the_next_tokens_target_within_its_document():
    target = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, -2, -2]])
    # t=0 predicts 1 (target, same doc); t=2 predicts the next document's first token: 0; t=3
    # predicts 4 (target); t=4 predicts 5 of another document: 0; last position never trained
    assert loss_mask(target, docs).int().tolist() == [[1, 1, 0, 1, 0, 0, 0, 0]]
    tokens = TokenFields(torch.zeros(1, 8, dtype=torch.long), target, docs)
    assert torch.equal(tokens.loss_mask(), loss_mask(target, docs))
    assert TokenFields(torch.zeros(1, 8, dtype=torch.long)).loss_mask() is None
    assert set(TokenFields.from_fields(tokens.to_fields()).to_fields()) == {
        "input_ids", "target_mask", "document_ids"}


def test_packed_rows_spool_with_the_fingerprint_of_the_rows():
    from unidistill.cache_builder.packed import packed_fingerprint, spool_packed_rows

    rows = pack_examples([example(n) for n in (5, 3, 7)], 8, "documents", pad_id=0,
                         long_examples="split")
    spooled, fp = spool_packed_rows(zip(rows.input_ids, rows.target_mask, rows.document_ids), 8)
    assert np.array_equal(spooled.input_ids, rows.input_ids)
    assert np.array_equal(spooled.target_mask, rows.target_mask)
    assert np.array_equal(spooled.document_ids, rows.document_ids)
    assert fp == packed_fingerprint(rows)
    changed = rows.target_mask.copy()
    changed[0, 1] ^= 1
    _, other = spool_packed_rows(zip(rows.input_ids, changed, rows.document_ids), 8)
    assert other != fp  # the targets are part of the fingerprint

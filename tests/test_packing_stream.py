"""Packing as a stream: the same sequences as the whole-list packer, read only as far as needed;
the build's spool of them and its ids fingerprint."""

from __future__ import annotations

import errno
import itertools
import tempfile
from itertools import islice

import numpy as np
import pytest
from transformers import AutoTokenizer

from unidistill.cache_builder import packed
from unidistill.cache_builder.build import build_cache
from unidistill.cache_builder.config import BuildConfig
from unidistill.errors import DataError
from unidistill.fingerprint import ids_fingerprint
from unidistill.storage import CacheReader
from unidistill.text.data import iter_documents, iter_packed, pack_documents

from .conftest import make_documents


def pack_whole_list(documents, tokenizer, seq_len, max_sequences=None, batch_docs=64):
    """The packer as it was before streaming (every token in one Python list), kept as the
    reference the stream must equal."""
    eos = tokenizer.eos_token_id
    need = None if max_sequences is None else max_sequences * seq_len
    buffer, docs = [], iter(documents)
    while need is None or len(buffer) < need:
        batch = list(islice(docs, batch_docs))
        if not batch:
            break
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
    n = len(buffer) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    return np.asarray(buffer[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


class Recording:
    """A document iterator that counts how many documents were taken from it."""

    def __init__(self, docs):
        self._docs = iter(docs)
        self.taken = 0

    def __iter__(self):
        return self

    def __next__(self):
        doc = next(self._docs)
        self.taken += 1
        return doc


@pytest.fixture(scope="module")
def tok(tiny_teacher_dir):
    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


@pytest.mark.parametrize("data,split", [("builtin:pydoc_topics", "all"), ("builtin:pydoc_topics", "heldout"),
                                        ("builtin:stdlib_docs", "heldout"), ("file", "all")])
@pytest.mark.parametrize("seq_len,max_sequences,batch_docs", [(64, None, 64), (37, 25, 3), (256, 7, 1)])
def test_the_stream_is_the_whole_list_packing(tok, text_file, data, split, seq_len, max_sequences,
                                              batch_docs):
    data = str(text_file) if data == "file" else data
    want = pack_whole_list(iter_documents(data, split=split), tok, seq_len, max_sequences, batch_docs)
    got = list(iter_packed(iter_documents(data, split=split), tok, seq_len, max_sequences, batch_docs))
    assert len(got) == len(want) > 0
    assert all(s.dtype == np.int32 and s.shape == (seq_len,) for s in got)
    np.testing.assert_array_equal(np.stack(got), want)
    np.testing.assert_array_equal(
        pack_documents(iter_documents(data, split=split), tok, seq_len, max_sequences, batch_docs), want)


def test_documents_are_read_only_as_far_as_the_sequences_taken(tok):
    docs = make_documents(400, seed=7, min_words=60, max_words=80)  # each doc fills a 16-token sequence
    source = Recording(docs)
    stream = iter_packed(source, tok, 16, batch_docs=8)
    first = next(stream)
    assert source.taken == 8  # one tokenizer batch, not the 400 documents
    np.testing.assert_array_equal(first, pack_whole_list(docs, tok, 16, 1)[0])
    taken = [first, *islice(stream, 299)]
    # exactly the batches of 8 documents whose tokens (each + EOS) fill 300 sequences
    sizes = np.cumsum([len(ids) + 1 for ids in tok(docs, add_special_tokens=False)["input_ids"]])
    needed = int(np.searchsorted(sizes, 300 * 16)) + 1
    assert source.taken == -(-needed // 8) * 8 < 400
    np.testing.assert_array_equal(np.stack(taken), pack_whole_list(docs, tok, 16, 300))


def test_max_sequences_stops_reading_an_endless_source(tok):
    endless = Recording(itertools.cycle(make_documents(5, seed=1)))
    got = list(iter_packed(endless, tok, 32, max_sequences=50, batch_docs=4))
    assert len(got) == 50 and endless.taken < 400


def test_too_little_text_is_refused_after_the_last_document(tok):
    with pytest.raises(DataError, match=r"holds \d+ tokens in 2 documents, fewer than one sequence of seq_len=4096"):
        list(iter_packed(["a short one.", "another."], tok, 4096))
    with pytest.raises(DataError, match="no EOS"):
        list(iter_packed(["x"], type("NoEos", (), {"eos_token_id": None})(), 8))
    with pytest.raises(DataError, match="seq_len must be at least 1"):
        list(iter_packed(["x"], tok, 0))


def test_the_spool_holds_the_packed_ids_and_their_fingerprint(tok, text_file):
    want = pack_documents(iter_documents(str(text_file)), tok, 24)
    ids, fingerprint = packed.spool_sequences(iter_packed(iter_documents(str(text_file)), tok, 24), 24)
    np.testing.assert_array_equal(ids, want)
    assert fingerprint == ids_fingerprint(want)  # the build's settings.data.ids_fingerprint
    assert not ids.flags.writeable
    with pytest.raises(ValueError, match=r"packed sequence 1 has shape \(5,\), expected \(4,\)"):
        packed.spool_sequences([np.zeros(4, np.int32), np.zeros(5, np.int32)], 4)
    with pytest.raises(DataError, match="no packed sequences"):
        packed.spool_sequences([], 4)


def test_a_full_temporary_folder_is_named(tok, text_file, monkeypatch):
    class Full:
        def __init__(self, *a, **kw):
            self._f = real(*a, **kw)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    real = tempfile.TemporaryFile
    monkeypatch.setattr(packed.tempfile, "TemporaryFile", Full)
    with pytest.raises(DataError, match="could not spool the packed token ids.*TMPDIR"):
        packed.spool_sequences(iter_packed(iter_documents(str(text_file)), tok, 24), 24)


def test_the_build_fingerprints_the_streamed_ids(tmp_path, tiny_teacher_dir, text_file, tok):
    cfg = BuildConfig(teacher=str(tiny_teacher_dir), data=str(text_file), out=str(tmp_path / "c"),
                      seq_len=32, top_k=4, layers="none", max_sequences=9, batch_size=4, shard_size=4,
                      device="cpu")
    manifest = build_cache(cfg, progress=False, log=lambda m: None)
    want = pack_documents(iter_documents(str(text_file)), tok, 32, 9)
    assert manifest["settings"]["data"]["ids_fingerprint"] == ids_fingerprint(want)
    np.testing.assert_array_equal(CacheReader(tmp_path / "c").group["input_ids"][:], want)

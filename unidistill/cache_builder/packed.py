"""The packed token ids of a build, read once from the text and spooled to a temporary file.

Before a build can create or resume its cache it needs two things about the whole packed text:
the number of sequences (the layout and the unit plan) and the sha256 of every id
(``settings.data.ids_fingerprint``, compared on resume). So the documents are streamed once
(:func:`unidistill.text.data.iter_packed`), and each packed sequence is hashed, counted and
appended to an unlinked temporary file; the build then reads its units' sequences from a
read-only memory map of that file. The process holds one batch of documents' tokens at a time
instead of the whole token list; the ids live on disk (4 bytes a token, where the cache stores
hundreds to thousands) and in the page cache, which the kernel may drop. The text is read
and tokenized once, as before, so a streamed hub data set is not downloaded twice and a source
that changes during the build cannot put other text in the cache than the fingerprint names.

Packed caches (``--packing documents`` or ``none``) spool three arrays per row the same way
(:func:`spool_packed_rows`).

The file is made with :func:`tempfile.TemporaryFile` (``$TMPDIR``, else ``/tmp``) and unlinked at
once: it goes away with the map, or with the process if it is killed.
"""

from __future__ import annotations

import hashlib
import tempfile
from typing import Iterable

import numpy as np

from unidistill.errors import DataError
from unidistill.text.packing import PackedTokens


def spool_sequences(sequences: Iterable[np.ndarray], seq_len: int) -> tuple[np.ndarray, str]:
    """Write ``sequences`` (each ``(seq_len,)`` int32) to an unlinked temporary file.

    Returns a read-only ``(N, seq_len)`` int32 memory map of them and their fingerprint, the
    sha256 of their bytes in order: :func:`unidistill.fingerprint.ids_fingerprint` of the same
    ids as one array (tests/test_packing_stream.py holds the two equal).
    """
    digest = hashlib.sha256()
    n = 0
    with tempfile.TemporaryFile(prefix="unidistill-ids-") as f:
        try:
            for seq in sequences:
                seq = np.ascontiguousarray(seq, dtype=np.int32)
                if seq.shape != (seq_len,):
                    raise ValueError(f"packed sequence {n} has shape {seq.shape}, expected ({seq_len},)")
                digest.update(seq.data)
                f.write(seq.data)
                n += 1
            f.flush()
        except OSError as e:
            raise DataError(f"could not spool the packed token ids ({n} sequences of {seq_len} so "
                            f"far, 4 bytes a token) to a temporary file in "
                            f"{tempfile.gettempdir()}: {e}. Point TMPDIR at a folder with space.") from e
        if n == 0:
            raise DataError(f"no packed sequences of seq_len={seq_len}; add text or lower --seq-len")
        ids = np.memmap(f, dtype=np.int32, mode="r", shape=(n, seq_len))  # the map keeps the file
    return ids, digest.hexdigest()


def spool_packed_rows(rows: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], seq_len: int
                      ) -> tuple[PackedTokens, str]:
    """:func:`spool_sequences` for rows that keep documents apart: each row is ``(input_ids,
    target_mask, document_ids)``, ``(seq_len,)`` each, spooled together as one (3, seq_len)
    int32 record. Returns read-only views of the three arrays and their fingerprint: the sha256,
    row by row, of ``input_ids`` (int32) ‖ ``target_mask`` (uint8) ‖ ``document_ids`` (int32)
    bytes (:func:`packed_fingerprint`)."""
    digest = hashlib.sha256()

    def records():
        for ids, target, docs in rows:
            _hash_row(digest, ids, target, docs)
            yield np.stack([np.asarray(ids, np.int32), np.asarray(target, np.int32),
                            np.asarray(docs, np.int32)]).reshape(-1)

    spooled, _ = spool_sequences(records(), 3 * seq_len)
    spooled = spooled.reshape(-1, 3, seq_len)
    return PackedTokens(spooled[:, 0], spooled[:, 1], spooled[:, 2]), digest.hexdigest()


def _hash_row(digest, ids, target, docs) -> None:
    digest.update(np.ascontiguousarray(ids, dtype=np.int32).data)
    digest.update(np.ascontiguousarray(target, dtype=np.uint8).data)
    digest.update(np.ascontiguousarray(docs, dtype=np.int32).data)


def packed_fingerprint(tokens: PackedTokens) -> str:
    """The fingerprint :func:`spool_packed_rows` gives, of rows held in memory."""
    digest = hashlib.sha256()
    for row in zip(tokens.input_ids, tokens.target_mask, tokens.document_ids):
        _hash_row(digest, *row)
    return digest.hexdigest()

"""Examples into rows that keep documents apart: ``--packing documents`` and ``none``.

An *example* is one plain-text document or one conversation, rendered to token ``ids`` plus a
per-token ``target`` (True: the student learns to produce this token; :mod:`.chat`). Rows are
``seq_len`` tokens with three arrays: ``input_ids``, ``target_mask`` (uint8 0/1) and
``document_ids``: a unique id per *segment* (an example, or one piece of a split one), increasing
in data order, and -2 (:data:`PAD_DOCUMENT`) on padding. Padding is ``pad_id`` with target 0.

* ``documents``: best-fit decreasing over windows of ``window`` examples in data order. Within a
  window the pieces are sorted by (-length, data index), so the rows do not depend on anything
  but the data; each piece goes to the row with the least room that still holds it, else a new
  row. A window's last, under-filled rows are kept.
* ``none``: one piece per row, right-padded.

Long examples (more than ``seq_len`` tokens): ``truncate`` (conversations) keeps the start, and
drops the example (counted) when no trainable target survives; ``split`` (plain text) cuts it
into ``seq_len`` pieces, each its own segment. ``stream`` is not here: it is
:func:`unidistill.text.data.iter_packed`, documents joined with EOS and attending to each other.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable, Iterator

import numpy as np

from unidistill.errors import DataError
from unidistill.text.chat import render_conversation

PAD_DOCUMENT = -2  # = storage.codecs.arrays.PAD_DOCUMENT (the text layer does not import storage)
PACKERS = ("documents", "none")
LONG_EXAMPLES = ("truncate", "split")


@dataclass(frozen=True)
class Example:
    """One rendered example: ``ids`` and ``target`` (bool) have one entry per token."""

    ids: tuple[int, ...]
    target: tuple[bool, ...]


@dataclass
class PackStats:
    """Counted while packing: examples read, segments placed, target and padding tokens, rows,
    examples truncated (conversations) and dropped (no target left after truncation)."""

    examples: int = 0
    segments: int = 0
    targets: int = 0
    padding: int = 0
    rows: int = 0
    truncated: int = 0
    dropped: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PackedTokens:
    """Rows of a cache: ``input_ids`` (N, L) int32; ``target_mask`` (N, L) (0/1) and
    ``document_ids`` (N, L) int32, both None for ``stream``."""

    input_ids: np.ndarray
    target_mask: np.ndarray | None = None
    document_ids: np.ndarray | None = None
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, start: int, stop: int) -> "PackedTokens":
        """Rows ``[start, stop)`` (views)."""
        cut = slice(start, stop)
        return PackedTokens(self.input_ids[cut],
                            None if self.target_mask is None else self.target_mask[cut],
                            None if self.document_ids is None else self.document_ids[cut])


def text_examples(documents: Iterable[str], tokenizer, batch_docs: int = 64) -> Iterator[Example]:
    """Plain-text documents as examples: ``tokens + [EOS]``, every token but the first a target
    (the first has no token before it in its segment)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which ends every document; set tokenizer.eos_token")
    docs = iter(documents)
    while batch := list(islice(docs, batch_docs)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids = (*ids, eos)
            yield Example(ids, (False,) + (True,) * (len(ids) - 1))


def conversation_examples(conversations: Iterable[list[dict]], tokenizer, train_on: str
                          ) -> Iterator[Example]:
    """Conversations rendered with the tokenizer's chat template (:func:`.chat.render_conversation`)."""
    for messages in conversations:
        got = render_conversation(tokenizer, messages, train_on)
        yield Example(got.ids, got.target)


def _pieces(example: Example, seq_len: int, long_examples: str, stats: PackStats) -> list[Example]:
    n = len(example.ids)
    if n <= seq_len:
        return [example] if n else []
    if long_examples == "split":
        return [Example(example.ids[s:s + seq_len], example.target[s:s + seq_len])
                for s in range(0, n, seq_len)]
    stats.truncated += 1
    cut = Example(example.ids[:seq_len], example.target[:seq_len])
    if not any(cut.target[1:]):  # the first token is never predicted within its segment
        stats.dropped += 1
        return []
    return [cut]


def _best_fit_decreasing(pieces: list[tuple[int, Example]], seq_len: int) -> list[list]:
    """Rows of (segment id, piece): pieces sorted by (-length, id), each into the open row with
    the least room that holds it (a new row when none does)."""
    rows: list[list] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for doc, piece in sorted(pieces, key=lambda p: (-len(p[1].ids), p[0])):
        at = bisect.bisect_left(room, (len(piece.ids), -1))
        if at == len(room):
            rows.append([(doc, piece)])
            free, row = seq_len - len(piece.ids), len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append((doc, piece))
            free -= len(piece.ids)
        bisect.insort(room, (free, row))
    return rows


def pack_row(segments: list, seq_len: int, pad_id: int, stats: PackStats):
    """One row ``(input_ids, target_mask, document_ids)`` of ``seq_len`` tokens from its
    ``(segment id, Example)`` pieces in order, right-padded; counted into ``stats``."""
    ids = np.full(seq_len, pad_id, dtype=np.int32)
    target = np.zeros(seq_len, dtype=np.uint8)
    docs = np.full(seq_len, PAD_DOCUMENT, dtype=np.int32)
    at = 0
    for doc, piece in segments:
        n = len(piece.ids)
        ids[at:at + n], target[at:at + n], docs[at:at + n] = piece.ids, piece.target, doc
        at += n
    stats.rows += 1
    stats.segments += len(segments)
    stats.targets += int(target.sum())
    stats.padding += seq_len - at
    return ids, target, docs


def iter_packed_rows(examples: Iterable[Example], seq_len: int, packing: str, *, pad_id: int,
                     stats: PackStats, window: int = 1024, long_examples: str = "truncate",
                     max_sequences: int | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(input_ids, target_mask, document_ids)`` rows, each ``(seq_len,)``, as the
    examples come (module docstring); ``stats`` is filled on the way."""
    if packing not in PACKERS:
        raise DataError(f"packing {packing!r} is not one of {PACKERS} (stream is text.data.iter_packed)")
    if long_examples not in LONG_EXAMPLES:
        raise DataError(f"long_examples {long_examples!r} is not one of {LONG_EXAMPLES}")
    if window < 1:
        raise DataError(f"pack window must be >= 1 example, got {window}")
    it = iter(examples)
    next_doc = 0
    while max_sequences is None or stats.rows < max_sequences:
        batch = list(islice(it, window if packing == "documents" else 1))
        if not batch:
            break
        stats.examples += len(batch)
        pieces = []
        for example in batch:
            for piece in _pieces(example, seq_len, long_examples, stats):
                pieces.append((next_doc, piece))
                next_doc += 1
        rows = (_best_fit_decreasing(pieces, seq_len) if packing == "documents"
                else [[p] for p in pieces])
        for segments in rows:
            if max_sequences is not None and stats.rows >= max_sequences:
                return
            yield pack_row(segments, seq_len, pad_id, stats)


def pack_examples(examples: Iterable[Example], seq_len: int, packing: str, *, pad_id: int,
                  window: int = 1024, long_examples: str = "truncate",
                  max_sequences: int | None = None) -> PackedTokens:
    """Every row of :func:`iter_packed_rows` at once, with the stats."""
    stats = PackStats()
    rows = list(iter_packed_rows(examples, seq_len, packing, pad_id=pad_id, stats=stats,
                                 window=window, long_examples=long_examples,
                                 max_sequences=max_sequences))
    if not rows:
        raise DataError(f"no rows: {stats.examples} examples, {stats.dropped} dropped; add data")
    ids, target, docs = (np.stack(a) for a in zip(*rows))
    return PackedTokens(ids, target, docs, stats.to_dict())

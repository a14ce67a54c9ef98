"""The token-level arrays of a cache: ``input_ids`` always, and for packed caches (``packing``
``documents`` or ``none``, format v2) ``target_mask`` and ``document_ids``.

| array          | shape  | dtype | fill | values |
|----------------|--------|-------|------|--------|
| input_ids      | [N, L] | int32 | -1   | token ids |
| target_mask    | [N, L] | uint8 | 255  | 1 = the student learns to produce this token, 0 = context or padding |
| document_ids   | [N, L] | int32 | -1   | one id per segment, increasing in data order; -2 = padding |

The fills are sentinels real data never holds, so a shard of padding is still written (Zarr
stores no shard whose every value is the fill). A ``stream`` cache (documents joined with EOS,
attending to each other) has ``input_ids`` alone, exactly as format v1 always had.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unidistill.errors import ConfigError
from unidistill.storage.codecs.arrays import (
    DOCUMENT_IDS, INPUT_IDS, PACKINGS, PAD_DOCUMENT, TARGET_MASK, Grid, zstd,
)

STREAM = "stream"
TARGET_FILL = 255
DOCUMENT_FILL = -1


@dataclass(frozen=True)
class TokenCodec:
    """The token arrays of a layout with ``packing`` (one of :data:`PACKINGS`)."""

    packing: str = STREAM

    def check_layout(self) -> None:
        if self.packing not in PACKINGS:
            raise ConfigError(f"packing {self.packing!r} is not one of {PACKINGS}")

    @property
    def packed(self) -> bool:
        """True when documents are kept apart (the arrays of format v2 are stored)."""
        return self.packing != STREAM

    def array_specs(self, grid: Grid) -> dict[str, dict]:
        specs = {INPUT_IDS: grid.spec((grid.seq_len,), "int32", -1, zstd())}
        if self.packed:
            specs[TARGET_MASK] = grid.spec((grid.seq_len,), "uint8", TARGET_FILL, zstd())
            specs[DOCUMENT_IDS] = grid.spec((grid.seq_len,), "int32", DOCUMENT_FILL, zstd())
        return specs

    def encode(self, input_ids: np.ndarray, target_mask: np.ndarray | None = None,
               document_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """(B, L) token arrays -> {name: (B, L)} in storage dtypes; refuses values outside
        {0, 1} in the mask and below -2 in the document ids, and arrays a layout does not hold."""
        out = {INPUT_IDS: np.array(input_ids, dtype=np.int32)}  # a copy: the rows may be a map
        if not self.packed:
            if target_mask is not None or document_ids is not None:
                raise ValueError("a stream cache stores input_ids alone; got a target mask or "
                                 "document ids")
            return out
        if target_mask is None or document_ids is None:
            raise ValueError(f"a {self.packing}-packed cache stores target_mask and document_ids; "
                             "both are needed")
        target, docs = np.asarray(target_mask), np.asarray(document_ids)
        if target.shape != out[INPUT_IDS].shape or docs.shape != out[INPUT_IDS].shape:
            raise ValueError(f"token arrays of shapes {out[INPUT_IDS].shape}, {target.shape}, "
                             f"{docs.shape}; expected one shape")
        if not np.isin(target, (0, 1)).all():
            raise ValueError("target_mask holds values other than 0 and 1")
        if docs.size and docs.min() < PAD_DOCUMENT:
            raise ValueError(f"document_ids holds {docs.min()}, below the padding id {PAD_DOCUMENT}")
        out[TARGET_MASK] = target.astype(np.uint8)
        out[DOCUMENT_IDS] = docs.astype(np.int32)
        return out

    def read_names(self) -> list[str]:
        return list(self.array_specs(Grid(1, 1, 1)))

    def decode(self, got: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One sequence's fetched arrays -> ``input_ids`` and, when packed, ``target_mask``
        (bool) and ``document_ids`` (int32)."""
        out = {INPUT_IDS: got[INPUT_IDS]}
        if self.packed:
            out[TARGET_MASK] = got[TARGET_MASK].astype(bool)
            out[DOCUMENT_IDS] = got[DOCUMENT_IDS].astype(np.int32)
        return out

    def unit_counts(self, arrays: dict[str, np.ndarray]) -> dict[str, int] | None:
        """A unit's ``tokens`` marker entry: targets, padding tokens and segments (None for
        stream caches, whose markers stay as in format v1)."""
        if not self.packed:
            return None
        docs = arrays[DOCUMENT_IDS]
        real = docs != PAD_DOCUMENT
        starts = np.ones_like(docs, dtype=bool)
        starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
        return {"targets": int((arrays[TARGET_MASK] == 1).sum()),
                "padding": int((~real).sum()),
                "segments": int((starts & real).sum())}

    def describe(self, counts: dict | None, n_tokens: int, train_on: str | None = None) -> str:
        """One line for ``cache-info``: the packing and, for packed caches, the share of trained
        tokens from the build's counts."""
        if not self.packed:
            return "stream (documents joined with EOS, attending to each other)"
        if not counts:
            return f"{self.packing} (token counts not recorded yet)"
        share = counts["targets"] / n_tokens if n_tokens else 0.0
        pad = counts["padding"] / n_tokens if n_tokens else 0.0
        on = f" ({train_on})" if train_on else ""
        return (f"{self.packing}: {counts['segments']} segments, {pad:.1%} padding; "
                f"share of trained tokens {share:.1%}{on}")

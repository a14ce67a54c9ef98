"""The hidden-state representations of a cache, one codec per ``--hidden-dtype``: ``float16``
(default), ``bfloat16`` (raw bits stored as uint16) and ``int8`` (blocks with fp16 outliers), and
the int8 math.

Real residual streams carry two kinds of outliers, and both break a plain int8 code:

* *massive tokens*: the first token of a sequence (the attention sink) and a few others reach
  norms 10-200x the median token's, in a handful of channels. A scale taken over the sequence
  is then set by that one token, and every ordinary token of those channels rounds to zero
  (on SmolLM2-135M, layer 15: 42 % mean per-token error);
* *outlier channels*: a few channels are far larger than the rest on every token, so one scale
  per token spends the 8 bits on them and loses the others (3-5 % per token).

So each sequence keeps its ``OUTLIERS`` highest-norm tokens apart in fp16 (``hidden/<j>_outliers``
[N, n, D] and their positions ``hidden/<j>_outlier_pos`` [N, n]), and every other token is int8
with one fp16 scale per channel and block of ``BLOCK`` tokens (``hidden/<j>_scale``
[N, ceil(L / BLOCK), D], the block's absmax / 127 over its ordinary tokens). Bytes per token:
D + 2·D / BLOCK + (2·D + 4)·n / L, about 0.52x of fp16 raw (0.49x of fp16 on disk, as int8
compresses and fp16 barely does), at under 1 % mean per-token relative error on SmolLM2-135M
(benchmarks/results/storage_cpu.md).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from unidistill.errors import HiddenRangeError
from unidistill.storage.codecs.arrays import (
    Grid, hidden_key, hidden_outlier_pos_key, hidden_outliers_key, hidden_scale_key, lz4, zstd,
)

LEVELS = 127  # symmetric: -127..127; -128 is the array's fill sentinel and never written
BLOCK = 64  # tokens per scale
OUTLIERS = 2  # highest-norm tokens per sequence kept in fp16


def n_blocks(seq_len: int, block: int = BLOCK) -> int:
    return math.ceil(seq_len / block)


def quantize(h: torch.Tensor, block: int = BLOCK, outliers: int = OUTLIERS):
    """h (B, L, D) -> q (B, L, D) int8, scale (B, ceil(L / block), D) float16,
    kept (B, n, D) float16, pos (B, n) int32 with n = min(outliers, L); positions ascending."""
    h = h.float()
    b, length, d = h.shape
    n = min(outliers, length)
    pos = h.norm(dim=-1).topk(n, dim=-1).indices.sort(dim=-1).values                 # (B, n)
    rows = pos.unsqueeze(-1).expand(b, n, d)
    kept = torch.gather(h, 1, rows).half()
    rest = h.scatter(1, rows, 0.0)                                                   # (B, L, D)
    nb = n_blocks(length, block)
    padded = torch.nn.functional.pad(rest, (0, 0, 0, nb * block - length)).reshape(b, nb, block, d)
    scale = (padded.abs().amax(dim=2) / LEVELS).half()                               # (B, nb, D) as stored
    safe = scale.float().clamp(min=torch.finfo(torch.float16).tiny).unsqueeze(2)
    q = (padded / safe).round().clamp(-LEVELS, LEVELS).to(torch.int8).reshape(b, nb * block, d)
    return q[:, :length], scale, kept, pos.to(torch.int32)


def dequantize(q: np.ndarray, scale: np.ndarray, kept: np.ndarray, pos: np.ndarray,
               block: int = BLOCK) -> np.ndarray:
    """Inverse of :func:`quantize` on stored arrays, with any leading dims:
    q (.., L, D), scale (.., nb, D), kept (.., n, D), pos (.., n) -> float32 (.., L, D)."""
    length = q.shape[-2]
    out = q.astype(np.float32) * np.repeat(scale.astype(np.float32), block, axis=-2)[..., :length, :]
    np.put_along_axis(out, pos.astype(np.int64)[..., None], kept.astype(np.float32), axis=-2)
    return out


def check_float16_range(layer: int, h: torch.Tensor, *stored: torch.Tensor) -> None:
    """Refuse hidden states that float16 storage would turn into inf (|x| > 65504)."""
    if all(bool(torch.isfinite(t).all()) for t in stored):
        return
    peak = h.float().abs().max().item()
    raise HiddenRangeError(f"teacher hidden states of layer {layer} reach |x| = {peak:.4g}, beyond "
                           "float16's range (65504), which float16 and int8 storage (its outlier "
                           "tokens and scales are float16) cannot hold; store them as bfloat16 "
                           "(--hidden-dtype bfloat16)")


class HiddenCodec:
    """One hidden-state representation: the arrays of a cached layer, encode (the captured torch
    states on the teacher's device -> storage dtypes), the arrays a read fetches, decode (-> the
    reader's ``hidden`` values) and :meth:`to_torch` (-> what the trainer feeds its losses)."""

    dtype: ClassVar[str]  # the --hidden-dtype name, the layout's hidden_dtype
    store_dtype: ClassVar[np.dtype]  # of hidden/<j>
    fill: ClassVar[float | int]  # a sentinel real data never holds
    keeps_exact_logits: ClassVar[bool] = False  # the final state serves an exact-logits cache
    what: ClassVar[str] = ""  # a few words for cache-info

    def compressors(self) -> list:
        return lz4()

    def array_specs(self, layer: int, grid: Grid, width: int) -> dict[str, dict]:
        return {hidden_key(layer): grid.spec((grid.seq_len, width), self.store_dtype, self.fill,
                                             self.compressors())}

    def names(self, layer: int) -> list[str]:
        """The arrays a read of ``layer`` fetches."""
        return [hidden_key(layer)]

    def encode(self, layer: int, h: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, layer: int, got: dict[str, np.ndarray]) -> np.ndarray:
        """One sequence of ``layer`` as :meth:`CacheReader.read` returns it."""
        return got[hidden_key(layer)]

    def to_torch(self, a: np.ndarray) -> torch.Tensor:
        """What :meth:`decode` gave, as a torch tensor of the logical dtype."""
        return torch.from_numpy(np.ascontiguousarray(a))

    def describe(self) -> str:
        return f"{self.dtype} ({self.what})" if self.what else self.dtype


class Float16(HiddenCodec):
    """``float16``: the states as fp16 (refused where they exceed float16's range)."""

    dtype = "float16"
    store_dtype = np.dtype("float16")
    fill = float("nan")
    keeps_exact_logits = True

    def encode(self, layer: int, h: torch.Tensor) -> dict[str, np.ndarray]:
        h16 = h.to(torch.float16)
        check_float16_range(layer, h, h16)
        return {hidden_key(layer): h16.cpu().numpy()}


class BFloat16(HiddenCodec):
    """``bfloat16``: the raw bits in uint16 (zarr has no bf16); 0xFFFF, a bf16 NaN, is the fill."""

    dtype = "bfloat16"
    store_dtype = np.dtype("uint16")
    fill = 0xFFFF
    what = "raw bits in uint16"

    def encode(self, layer: int, h: torch.Tensor) -> dict[str, np.ndarray]:
        bits = h.to(torch.bfloat16).view(torch.int16)  # raw bits, stored as uint16
        return {hidden_key(layer): bits.cpu().numpy().view(np.uint16)}

    def to_torch(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


class Int8(HiddenCodec):
    """``int8``: int8 codes with one fp16 scale per channel and block of ``BLOCK`` tokens, and each
    sequence's ``OUTLIERS`` highest-norm tokens in fp16 (see the module docstring); read back
    dequantized to fp32."""

    dtype = "int8"
    store_dtype = np.dtype("int8")
    fill = -128
    what = f"per channel and {BLOCK}-token block, {OUTLIERS} fp16 outlier tokens"

    def compressors(self) -> list:
        return zstd(shuffle=False)  # int8 codes do compress (about 1.1x), which pays for their scales

    def array_specs(self, layer: int, grid: Grid, width: int) -> dict[str, dict]:
        kept = min(OUTLIERS, grid.seq_len)
        nan = float("nan")
        return {**super().array_specs(layer, grid, width),
                hidden_scale_key(layer): grid.spec((n_blocks(grid.seq_len), width), "float16", nan, zstd()),
                hidden_outliers_key(layer): grid.spec((kept, width), "float16", nan, zstd()),
                hidden_outlier_pos_key(layer): grid.spec((kept,), "int32", -1, zstd())}

    def names(self, layer: int) -> list[str]:
        return [hidden_key(layer), hidden_scale_key(layer), hidden_outliers_key(layer),
                hidden_outlier_pos_key(layer)]

    def encode(self, layer: int, h: torch.Tensor) -> dict[str, np.ndarray]:
        q, scale, kept, pos = quantize(h)
        check_float16_range(layer, h, kept, scale)  # fp16 outlier tokens and scales
        return dict(zip(self.names(layer), (t.cpu().numpy() for t in (q, scale, kept, pos))))

    def decode(self, layer: int, got: dict[str, np.ndarray]) -> np.ndarray:
        return dequantize(*(got[n] for n in self.names(layer)))

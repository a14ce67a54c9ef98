"""8-bit hidden states that survive the outliers of real decoders.

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

import numpy as np
import torch

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

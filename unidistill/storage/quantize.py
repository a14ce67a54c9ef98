"""The compact top-k of ``topk-q8`` caches: ids delta-coded in ascending order, log-probs as
uint8 steps below the position's maximum.

Quantizing log-probs (not probabilities) keeps the relative error of every stored probability
below exp(step / 2) - 1, for the rare ids as much as the likely ones; with K = 64 the spread
max - min is a few nats, so a step is a few hundredths of a nat.
"""

from __future__ import annotations

import numpy as np
import torch

LEVELS = 255
_MIN_STEP = 1e-4  # keeps a flat row (all K log-probs equal) decodable


def encode_top_k(ids: torch.Tensor, logp: torch.Tensor):
    """ids (.., K) and logp (.., K) sorted by probability -> (deltas (.., K) int64, quant (.., K)
    uint8, range (.., 2) float16 = (max, step)), all in ascending id order."""
    order = ids.argsort(dim=-1)
    ids_sorted = ids.gather(-1, order)
    logp_sorted = logp.float().gather(-1, order)
    top = logp.float().amax(-1, keepdim=True).half().float()                 # (.., 1) as stored
    low = logp.float().amin(-1, keepdim=True)
    step = ((top - low) / LEVELS).clamp(min=_MIN_STEP).half().float()       # (.., 1) as stored
    quant = ((top - logp_sorted) / step).round().clamp(0, LEVELS).to(torch.uint8)
    deltas = torch.cat([ids_sorted[..., :1], ids_sorted.diff(dim=-1)], dim=-1)
    return deltas, quant, torch.cat([top, step], dim=-1).half()


def decode_top_k(deltas: np.ndarray, quant: np.ndarray, value_range: np.ndarray):
    """Inverse of :func:`encode_top_k` -> ids (.., K) int64 and logp (.., K) float32, sorted by
    probability (descending), as a ``topk`` cache stores them."""
    ids = np.cumsum(deltas.astype(np.int64), axis=-1)
    top = value_range[..., :1].astype(np.float32)
    step = value_range[..., 1:].astype(np.float32)
    logp = top - quant.astype(np.float32) * step
    order = np.argsort(-logp, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(logp, order, -1)

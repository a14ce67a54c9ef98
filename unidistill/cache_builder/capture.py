"""One teacher forward that returns exactly what the cache stores.

The forward itself, its hooks, top-k with tail and sampling are the hooked teacher of
:mod:`unidistill.models.teacher`; this module adds what is about storage: the logit
representation of the cache (``mode``), dtype casts (float16, bfloat16 bits, int8 blocks with
float16 outliers, refusing values float16 cannot hold) and the arrays under the layout's names.
Casts happen on the teacher's device so only the compact results are copied to the host.
"""

from __future__ import annotations

import numpy as np
import torch

from unidistill.errors import ConfigError
from unidistill.models.teacher import HookedTeacher
from unidistill.storage import hidden_q8
from unidistill.storage.layout import (
    INPUT_IDS,
    LOGIT_COUNTS,
    LOGIT_INDICES,
    LOGIT_QUANT,
    LOGIT_RANGE,
    LOGIT_SAMPLE_LOGP,
    LOGIT_TAIL,
    LOGIT_TAIL_TEMPERED,
    LOGIT_VALUES,
    LOGITS_MODES,
    TOPK_MODES,
    hidden_key,
    hidden_outlier_pos_key,
    hidden_outliers_key,
    hidden_scale_key,
)
from unidistill.storage.quantize import encode_top_k


def _check_float16_range(layer: int, h: torch.Tensor, *stored: torch.Tensor) -> None:
    """Refuse hidden states that float16 storage would turn into inf (|x| > 65504)."""
    if all(bool(torch.isfinite(t).all()) for t in stored):
        return
    peak = h.float().abs().max().item()
    raise ConfigError(f"teacher hidden states of layer {layer} reach |x| = {peak:.4g}, beyond "
                      "float16's range (65504), which float16 and int8 storage (its outlier tokens "
                      "and scales are float16) cannot hold; rebuild with --hidden-dtype bfloat16")


class TeacherRunner(HookedTeacher):
    """Runs the teacher on batches of ids and returns numpy arrays in storage dtypes.

    ``mode`` is the cache's logit representation (see :mod:`unidistill.storage.layout`):
    ``topk`` (``stored_k`` ids + tail), ``topk-q8`` (the same, compact), ``sampled`` (``stored_k`` draws per position, seeded per call)
    or ``exact`` (no logit arrays; the final layer is among ``layers``).
    """

    def __init__(self, model, layers, stored_k: int | None, *, index_dtype: np.dtype = np.int32,
                 hidden_dtype: str = "float16", rows_per_chunk: int = 1024, mode: str = "topk",
                 tail_temperatures: tuple[float, ...] = ()):
        if mode not in LOGITS_MODES:
            raise ConfigError(f"logits mode {mode!r} is not one of {LOGITS_MODES}")
        self.mode = mode
        self.index_dtype = np.dtype(index_dtype)
        self.hidden_dtype = hidden_dtype
        super().__init__(model, layers, stored_k, rows_per_chunk=rows_per_chunk,
                         tail_temperatures=tail_temperatures)

    def _to_storage(self, j: int, h: torch.Tensor) -> torch.Tensor:
        if self.hidden_dtype == "bfloat16":
            return h.to(torch.bfloat16).view(torch.int16)  # raw bits, stored as uint16
        h16 = h.to(torch.float16)
        _check_float16_range(j, h, h16)
        return h16

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
        """One batch in storage dtypes; ``seed`` seeds the draws of a sampled cache."""
        device = self.head.weight.device
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(device)
        final, captured = self.forward(ids)
        out = {INPUT_IDS: input_ids.astype(np.int32, copy=False)}
        if self.mode in TOPK_MODES:
            top_ids, top_vals, tails, tempered = self.top_k_tail(final)
            out[LOGIT_TAIL] = tails.to(torch.float16).cpu().numpy()
            if self.tail_temperatures:
                out[LOGIT_TAIL_TEMPERED] = tempered.to(torch.float16).cpu().numpy()
            if self.mode == "topk-q8":
                top_ids, quant, value_range = encode_top_k(top_ids, top_vals)  # ids delta-coded
                out[LOGIT_QUANT] = quant.cpu().numpy()
                out[LOGIT_RANGE] = value_range.cpu().numpy()
            else:
                out[LOGIT_VALUES] = top_vals.to(torch.float16).cpu().numpy()
            out[LOGIT_INDICES] = top_ids.to(torch.int32).cpu().numpy().astype(self.index_dtype)
        elif self.mode == "sampled":
            sample_ids, counts, logp_mean = self.sampled(final, seed)
            out[LOGIT_SAMPLE_LOGP] = logp_mean.float().cpu().numpy()
            out[LOGIT_INDICES] = sample_ids.to(torch.int32).cpu().numpy().astype(self.index_dtype)
            out[LOGIT_COUNTS] = counts.to(torch.int32).cpu().numpy().astype(np.uint16)
        for j in self.layers:
            if self.hidden_dtype == "int8":
                q, scale, kept, pos = hidden_q8.quantize(captured[j])
                _check_float16_range(j, captured[j], kept, scale)  # fp16 outlier tokens and scales
                out[hidden_key(j)] = q.cpu().numpy()
                out[hidden_scale_key(j)] = scale.cpu().numpy()
                out[hidden_outliers_key(j)] = kept.cpu().numpy()
                out[hidden_outlier_pos_key(j)] = pos.cpu().numpy()
                continue
            stored = self._to_storage(j, captured[j]).cpu().numpy()
            out[hidden_key(j)] = stored.view(np.uint16) if self.hidden_dtype == "bfloat16" else stored
        return out

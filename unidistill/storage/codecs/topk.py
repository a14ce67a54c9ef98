"""The top-k logit representations: ``topk`` (the K most likely ids with fp16 log-probs) and
``topk-q8`` (the same in about half the bytes), each with the log of the mass outside the K ids
and the tempered tails at ``tail_temperatures``; and the math they share.

``topk-q8`` delta-codes the ids in ascending order and stores the log-probs as uint8 steps below
the position's maximum. Quantizing log-probs (not probabilities) keeps the relative error of
every stored probability below exp(step / 2) - 1, for the rare ids as much as the likely ones;
with K = 64 the spread max - min is a few nats, so a step is a few hundredths of a nat.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.storage.codecs.arrays import (
    LOGIT_INDICES, LOGIT_QUANT, LOGIT_RANGE, LOGIT_TAIL, LOGIT_TAIL_TEMPERED, LOGIT_VALUES, Grid, zstd,
)
from unidistill.storage.codecs.base import HookedForward, LogitCodec

TAIL_APPROXIMATIONS = ("uniform",)
Q8_LEVELS = 255
_MIN_STEP = 1e-4  # keeps a flat row (all K log-probs equal) decodable


def uniform_tail(log_tail: np.ndarray, temperature: float, n_tail: int) -> np.ndarray:
    """Approximate ``log Σ_tail p_i^(1/T)`` from the tail's mass alone, as if it were spread
    evenly over its ``n_tail`` ids: ``log_tail / T + (1 - 1/T) · log n_tail``.

    For T > 1 this over-estimates (a real tail is concentrated on a few ids, and the sum of
    p^(1/T) at a fixed mass is largest when spread evenly); for T < 1 it under-estimates. Use it
    only for a temperature the cache has no exact tempered tail for; its error on a real teacher
    is measured in benchmarks/results/tempered_tail_cpu.md.
    """
    lt = log_tail.astype(np.float32)  # -inf when the top-k hold the whole vocabulary (n_tail 0)
    return lt / temperature + (1.0 - 1.0 / temperature) * np.float32(math.log(max(n_tail, 1)))


def truncate_top_k(values: np.ndarray, log_tail: np.ndarray, k: int,
                   temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k most likely of the stored ids and fold the rest into the tail bucket.

    values (..., K) are log-probs at T = 1 sorted in descending order; ``log_tail`` (...) is the
    tempered tail ``log Σ_tail p^(1/T)`` at ``temperature`` (at T = 1 the log of the tail mass).
    The new tail is ``log(exp(tail) + Σ_dropped p^(1/T))``, computed in fp32 with logsumexp, so
    it stays the exact tempered tail of the k kept ids.
    """
    if k == values.shape[-1]:
        return values, log_tail
    dropped = torch.from_numpy(values[..., k:].astype(np.float32)) / temperature  # (..., K-k)
    tail = torch.from_numpy(log_tail.astype(np.float32)).unsqueeze(-1)   # (..., 1)
    new_tail = torch.logsumexp(torch.cat([dropped, tail], dim=-1), dim=-1)
    return values[..., :k], new_tail.numpy().astype(log_tail.dtype)


def encode_top_k(ids: torch.Tensor, logp: torch.Tensor):
    """ids (.., K) and logp (.., K) sorted by probability -> (deltas (.., K) int64, quant (.., K)
    uint8, range (.., 2) float16 = (max, step)), all in ascending id order."""
    order = ids.argsort(dim=-1)
    ids_sorted = ids.gather(-1, order)
    logp_sorted = logp.float().gather(-1, order)
    top = logp.float().amax(-1, keepdim=True).half().float()                 # (.., 1) as stored
    low = logp.float().amin(-1, keepdim=True)
    step = ((top - low) / Q8_LEVELS).clamp(min=_MIN_STEP).half().float()    # (.., 1) as stored
    quant = ((top - logp_sorted) / step).round().clamp(0, Q8_LEVELS).to(torch.uint8)
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


class TopK(LogitCodec):
    """``topk``: ``logits/indices`` [N, L, K] (uint16 if V <= 65535, else int32) the teacher's K
    most likely ids sorted by probability, ``logits/values`` [N, L, K] fp16 their log-probs at
    T = 1, ``logits/tail`` [N, L] fp16 the log of the mass outside them (-inf when K = V) and,
    for the temperatures T != 1 in ``tail_temperatures``, ``logits/tail_tempered`` [N, L, M] fp16
    ``log Σ_tail p^(1/T)``. With it the teacher over the K ids and one tail bucket is exact at T
    (bucket log-weights ``logp / T`` and that tail, renormalised; ``log_tail / T`` would be
    wrong: the tail is not one token). Caches written before that array have no temperatures.
    """

    mode = "topk"
    summary = "top-k ids + tail"
    has_top_k = True

    @classmethod
    def stored_k_for(cls, *, top_k: int, samples: int) -> int:
        return top_k

    def _check_temperatures(self) -> None:
        temps = self.tail_temperatures
        if any(not t > 0 or t == 1.0 for t in temps):
            raise ConfigError(f"tail temperatures must be > 0 and != 1 (T = 1 is logits/tail "
                              f"itself); got {list(temps)}")

    # -- the log-probs: fp16 here, 8-bit steps in topk-q8 -------------------------------------
    def _value_specs(self, grid: Grid) -> dict[str, dict]:
        return {LOGIT_VALUES: grid.spec((grid.seq_len, self.stored_k), "float16", float("nan"), zstd())}

    def _encode_values(self, ids: torch.Tensor, logp: torch.Tensor) -> dict[str, np.ndarray]:
        return {LOGIT_VALUES: logp.to(torch.float16).cpu().numpy(), LOGIT_INDICES: self._store_ids(ids)}

    def _decode_values(self, got: dict) -> tuple[np.ndarray, np.ndarray]:
        return got[LOGIT_INDICES], got[LOGIT_VALUES]

    def _value_names(self) -> list[str]:
        return [LOGIT_VALUES]

    # -- arrays, encode, decode ---------------------------------------------------------------
    def array_specs(self, grid: Grid) -> dict[str, dict]:
        specs = {LOGIT_INDICES: self._ids_spec(grid), **self._value_specs(grid)}
        specs[LOGIT_TAIL] = grid.spec((grid.seq_len,), "float16", float("nan"), zstd())
        if self.tail_temperatures:
            specs[LOGIT_TAIL_TEMPERED] = grid.spec((grid.seq_len, len(self.tail_temperatures)),
                                                   "float16", float("nan"), zstd())
        return specs

    def encode(self, teacher: HookedForward, final: torch.Tensor, seed: int = 0) -> dict[str, np.ndarray]:
        top_ids, top_vals, tails, tempered = teacher.top_k_tail(final)
        out = {LOGIT_TAIL: tails.to(torch.float16).cpu().numpy()}
        if self.tail_temperatures:
            out[LOGIT_TAIL_TEMPERED] = tempered.to(torch.float16).cpu().numpy()
        out.update(self._encode_values(top_ids, top_vals))
        return out

    def read_names(self, temperature: float) -> list[str]:
        names = [LOGIT_INDICES, *self._value_names(), LOGIT_TAIL]
        if temperature in self.tail_temperatures:
            names.append(LOGIT_TAIL_TEMPERED)
        return names

    def decode(self, got: dict[str, np.ndarray], *, kd_top_k: int | None, temperature: float,
               hidden: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        """Ids and log-probs sorted by probability, cut to ``kd_top_k`` with the dropped ids folded
        into the tail, which is the tail statistic at ``temperature`` (see :meth:`tempered_tail`)."""
        k = kd_top_k or self.stored_k
        ids, values = self._decode_values(got)
        values, tail = truncate_top_k(values, self.tempered_tail(got, temperature), k, temperature)
        return dict(teacher_ids=ids[:, :k], teacher_logp=values, teacher_log_tail=tail)

    def tempered_tail(self, got: dict, temperature: float) -> np.ndarray:
        """fp32 ``log Σ_tail p^(1/T)`` of the stored K ids' tail: stored at T = 1 and at the
        cached temperatures, else the uniform-tail approximation (allowed by
        :meth:`check_temperature`)."""
        tail = got[LOGIT_TAIL].astype(np.float32)
        if temperature == 1.0:
            return tail
        if temperature in self.tail_temperatures:
            m = self.tail_temperatures.index(temperature)
            return got[LOGIT_TAIL_TEMPERED][..., m].astype(np.float32)
        return uniform_tail(tail, temperature, self.vocab_size - self.stored_k)

    # -- requests -----------------------------------------------------------------------------
    def check_kd_top_k(self, kd_top_k: int, where) -> None:
        if not 1 <= kd_top_k <= self.stored_k:
            raise CacheMismatchError(f"top_k={kd_top_k} asked, but cache {where} stores "
                                     f"k={self.stored_k}; use 1 <= top_k <= {self.stored_k} "
                                     "or rebuild the cache with a larger --top-k")

    def check_temperature(self, temperature: float, tail_approximation: str | None, where) -> bool:
        if temperature == 1.0 or temperature in self.tail_temperatures:
            return False
        if tail_approximation is not None:
            return True
        stored = [1.0, *self.tail_temperatures]
        raise CacheMismatchError(
            f"cache {where} has the exact tempered tail for T in {stored} only, not for "
            f"T = {temperature:g}. Rebuild it with `cache-build --temperatures "
            f"{','.join(f'{t:g}' for t in sorted({*stored, temperature}))}`, train at one of "
            f"{stored}, or accept the uniform-tail approximation with --tail-approximation "
            "uniform (its error on a real teacher: README, 'Temperatures')")

    def describe(self) -> str:
        temps = ",".join(f"{t:g}" for t in [1.0, *self.tail_temperatures])
        return f"top-{self.stored_k} + tail, T = {temps}"


class TopKQ8(TopK):
    """``topk-q8``: the top-k + tail of ``topk`` in about half the bytes. ``logits/indices`` holds
    the ids in ascending order, delta-coded (first id, then differences: they compress far better
    than ids in probability order), ``logits/quant`` [N, L, K] uint8 the log-probs in that order
    as ``round((max - logp) / step)``, ``logits/range`` [N, L, 2] fp16 (max, step) per position
    (step = (max - min) / 255); tails as ``topk``. Decoding restores ids and log-probs sorted by
    probability, each log-prob within step / 2, so every consumer sees what ``topk`` gives.
    """

    mode = "topk-q8"
    summary = "the same, compact"

    def _value_specs(self, grid: Grid) -> dict[str, dict]:
        # no spare uint8 value for a sentinel: an unwritten chunk shows in logits/range (NaN)
        return {LOGIT_QUANT: grid.spec((grid.seq_len, self.stored_k), "uint8", 0, zstd()),
                LOGIT_RANGE: grid.spec((grid.seq_len, 2), "float16", float("nan"), zstd())}

    def _encode_values(self, ids: torch.Tensor, logp: torch.Tensor) -> dict[str, np.ndarray]:
        deltas, quant, value_range = encode_top_k(ids, logp)
        return {LOGIT_QUANT: quant.cpu().numpy(), LOGIT_RANGE: value_range.cpu().numpy(),
                LOGIT_INDICES: self._store_ids(deltas)}

    def _decode_values(self, got: dict) -> tuple[np.ndarray, np.ndarray]:
        return decode_top_k(got[LOGIT_INDICES], got[LOGIT_QUANT], got[LOGIT_RANGE])

    def _value_names(self) -> list[str]:
        return [LOGIT_QUANT, LOGIT_RANGE]

    def describe(self) -> str:
        return super().describe() + ", 8-bit log-probs"

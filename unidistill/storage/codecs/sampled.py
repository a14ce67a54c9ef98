"""The ``sampled`` logit representation: S ids drawn from the teacher at T = 1, kept as the
distinct ids with their counts (random-sampling KD), and the math that turns them into targets."""

from __future__ import annotations

import logging

import numpy as np
import torch

from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.storage.codecs.arrays import LOGIT_COUNTS, LOGIT_INDICES, LOGIT_SAMPLE_LOGP, Grid, zstd
from unidistill.storage.codecs.base import HookedForward, LogitCodec

logger = logging.getLogger(__name__)


def counts_to_buckets(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts (.., S) of a sampled cache -> log(count / S) (.., S) and a log-tail of -inf (..).

    The empirical distribution of the draws as top-k style buckets: unused slots (count 0) get
    -inf, and nothing lies outside the drawn ids, so the forward KL against it is the sparse
    soft cross-entropy minus the constant entropy of the sample.
    """
    n = counts.shape[-1]
    with np.errstate(divide="ignore"):
        logp = np.log(counts.astype(np.float32) / n)
    return logp, np.full(counts.shape[:-1], -np.inf, dtype=np.float32)


def sample_kl_offset(sample_logp: np.ndarray, teacher_logp_mean: np.ndarray) -> np.ndarray:
    """What to subtract from KL(sample || q) to get the unbiased estimate of KL(teacher || q).

    sample_logp (.., S) = log(count / S) per slot (-inf for unused ones), teacher_logp_mean (..)
    = Σ (count / S) log p(id). KL(sample || q) = Σ w (log w - log q), the estimate is
    Σ w (log p - log q), so the offset is Σ w log w - Σ w log p: a constant per position, so
    the gradient is unchanged, but the logged KL is 0 for a student equal to the teacher.
    """
    w = np.exp(sample_logp)
    neg_entropy = (w * np.where(w > 0, sample_logp, 0.0)).sum(-1)  # unused slots: 0, not 0 * -inf
    return (neg_entropy - teacher_logp_mean).astype(np.float32)


class Sampled(LogitCodec):
    """``sampled``: ``logits/indices`` and ``logits/counts`` [N, L, S] (counts uint16): S draws with
    replacement from the teacher at T = 1 as the distinct ids (ascending) with their counts;
    unused slots id 0, count 0. ``stored_k`` (``top_k`` in the manifest) is S. With
    ``sample_logp``, ``logits/sample_logp`` [N, L] fp32 holds the draws' mean teacher log-prob
    ``Σ (c / S) log p``: with it the KL estimate ``Σ (c / S) (log p - log q)`` is unbiased and 0
    for a student equal to the teacher (without it only the soft cross-entropy against the sample
    is known, off by the sample's entropy). Caches written before it have ``sample_logp`` False.
    """

    mode = "sampled"
    summary = "--samples draws per position"
    temperatures_served = "serves T = 1 only (its ids are draws at T = 1)"
    draws = True

    @classmethod
    def stored_k_for(cls, *, top_k: int, samples: int) -> int:
        return samples

    def array_specs(self, grid: Grid) -> dict[str, dict]:
        specs = {LOGIT_INDICES: self._ids_spec(grid),
                 LOGIT_COUNTS: grid.spec((grid.seq_len, self.stored_k), "uint16", 0xFFFF, zstd())}
        if self.sample_logp:
            specs[LOGIT_SAMPLE_LOGP] = grid.spec((grid.seq_len,), "float32", float("nan"), zstd())
        return specs

    def encode(self, teacher: HookedForward, final: torch.Tensor, seed: int = 0) -> dict[str, np.ndarray]:
        sample_ids, counts, logp_mean = teacher.sampled(final, seed)
        out = {}
        if self.sample_logp:
            out[LOGIT_SAMPLE_LOGP] = logp_mean.float().cpu().numpy()
        out[LOGIT_INDICES] = self._store_ids(sample_ids)
        out[LOGIT_COUNTS] = counts.to(torch.int32).cpu().numpy().astype(np.uint16)
        return out

    def read_names(self, temperature: float) -> list[str]:
        return [LOGIT_INDICES, LOGIT_COUNTS] + ([LOGIT_SAMPLE_LOGP] if self.sample_logp else [])

    def decode(self, got: dict[str, np.ndarray], *, kd_top_k: int | None, temperature: float,
               hidden: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        """The empirical distribution of the draws (:func:`counts_to_buckets`) and, when the
        draws' teacher log-prob is stored, ``teacher_kl_offset`` (:func:`sample_kl_offset`)."""
        logp, tail = counts_to_buckets(got[LOGIT_COUNTS])
        out = dict(teacher_ids=got[LOGIT_INDICES], teacher_logp=logp, teacher_log_tail=tail)
        if self.sample_logp:
            out["teacher_kl_offset"] = sample_kl_offset(logp, got[LOGIT_SAMPLE_LOGP])
        return out

    def check_temperature(self, temperature: float, tail_approximation: str | None, where) -> bool:
        if temperature == 1.0:
            return False
        raise CacheMismatchError(f"cache {where} holds ids sampled from the teacher at T = 1, an "
                                 f"estimate at that temperature only; got T = {temperature:g}. "
                                 "Use T = 1, or a topk or exact cache")

    def check_training(self, manifest: dict, where, *, temperature: float, kl_direction: str) -> None:
        """The KL is an estimate at the sampling temperature, forward only."""
        sampled_t = manifest["settings"]["sampling"]["temperature"]
        if temperature != sampled_t:
            raise ConfigError(f"cache {where} holds ids sampled from the teacher at T = "
                              f"{sampled_t:g}, so its KL is an estimate at that temperature only; "
                              f"got --temperature {temperature:g}. Pass --temperature {sampled_t:g}, "
                              "or build a topk or exact cache for other temperatures")
        if not self.sample_logp:
            logger.warning("cache %s was built before sampled caches stored the draws' teacher "
                           "log-probs: training is the same, but the logged KL is against the "
                           "sample (higher by the sample's entropy), not an estimate of "
                           "KL(teacher || student)", where)
        if kl_direction != "forward":
            raise ConfigError(f"kl_direction {kl_direction!r} needs the teacher's probability of "
                              f"every id the student puts mass on, which a sampled cache ({where}) "
                              "does not have; use --kl-direction forward, or a topk or exact cache")

    def describe(self) -> str:
        return f"{self.stored_k} draws per position (ids + counts)"

"""Random access to a finished teacher cache, one sequence at a time."""

from __future__ import annotations

import asyncio
import math
import os

import numpy as np
import torch
import zarr
from zarr.core.sync import sync as zarr_sync

from unidistill.errors import (
    CacheIncompleteError,
    CacheMismatchError,
    CacheNotFoundError,
    ConfigError,
)
from unidistill.storage.layout import (
    FORMAT_VERSION,
    INPUT_IDS,
    LOGIT_COUNTS,
    LOGIT_INDICES,
    LOGIT_QUANT,
    LOGIT_RANGE,
    LOGIT_SAMPLE_LOGP,
    LOGIT_TAIL,
    LOGIT_TAIL_TEMPERED,
    LOGIT_VALUES,
    TOPK_MODES,
    CacheLayout,
    hidden_key,
    hidden_outlier_pos_key,
    hidden_outliers_key,
    hidden_scale_key,
)
from unidistill.storage import hidden_q8
from unidistill.storage.location import as_location
from unidistill.storage.manifest import STATUS_COMPLETE
from unidistill.storage.quantize import decode_top_k
from unidistill.storage.manifest import read_manifest


def decode_hidden(a: np.ndarray, logical_dtype: str) -> torch.Tensor:
    """Hidden states from :meth:`CacheReader.read` as a torch tensor: bf16 from its raw bits,
    fp16 as stored, int8 already dequantized to fp32 by the reader."""
    if logical_dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


TAIL_APPROXIMATIONS = ("uniform",)


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


def _async_array(array: zarr.Array):
    """The public ``Array.async_array`` (zarr-python #3556; the installed 3.1.6 has it); the
    private attribute it returns only on older 3.1 releases, which setup.cfg still allows."""
    if hasattr(type(array), "async_array"):
        return array.async_array
    return array._async_array


class CacheReader:
    """Reads sequences of a cache: ids, teacher targets and chosen hidden layers.

    Opening checks the format version and (unless ``require_complete=False``, used by
    ``cache-verify``) that the build finished.
    """

    def __init__(self, root, *, require_complete: bool = True):
        self.location = as_location(root)
        self.root = self.location.root  # a Path for a local cache, the URL for a remote one
        manifest = read_manifest(self.location)
        if manifest is None:
            self.location.check_container("read")  # a missing bucket says so
            raise CacheNotFoundError(f"no unidistill cache at {self.root} (no manifest found); "
                                     "check the path or URL, or build one with "
                                     "`unidistill cache-build`")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(f"cache {self.root} has format version "
                                     f"{manifest.get('format_version')}, this unidistill reads "
                                     f"version {FORMAT_VERSION}")
        if require_complete and manifest.get("status") != STATUS_COMPLETE:
            raise CacheIncompleteError(
                f"cache {self.root} is not complete (status {manifest.get('status')!r}); "
                "rerun the same `unidistill cache-build` command to finish it")
        self.manifest = manifest
        self.layout = CacheLayout.from_dict(manifest["layout"])
        self._group = None
        self._group_pid = None
        self._opened = None

    @property
    def group(self) -> zarr.Group:
        # Opened lazily, and again in each process: a reader pickled into DataLoader workers (or
        # inherited through fork) opens its own store there; a remote store's client cannot
        # cross a fork.
        if self._group is None or self._group_pid != os.getpid():
            self._group = self.location.open_group(mode="r")
            self._group_pid = os.getpid()
            self._opened = None  # arrays of another process's group
        return self._group

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_group=None, _group_pid=None, _opened=None)
        return state

    def __len__(self) -> int:
        return self.layout.n_sequences

    @property
    def layers(self) -> tuple[int, ...]:
        return self.layout.layers

    @property
    def logits_mode(self) -> str:
        return self.layout.logits_mode

    @property
    def final_layer(self) -> int:
        """The teacher's last ``hidden_states`` index (its final normed state)."""
        return int(self.manifest["settings"]["teacher"]["n_layers"])

    def head(self, device="cpu"):
        """The teacher's output head of an exact-logits cache on ``device``: (weight (V, D), bias
        or None, :class:`~unidistill.model_logits.LogitTransform`); the teacher's logits are
        ``transform(final_hidden @ weight.T + bias)`` (see :func:`~unidistill.storage.head.read_logit_transform`)."""
        from unidistill.storage.head import read_head, read_logit_transform

        if self.logits_mode != "exact":
            raise CacheMismatchError(f"cache {self.root} stores {self.logits_mode} logits, not the "
                                     "teacher's head; only an exact-logits cache has one")
        transform = read_logit_transform(self.manifest, self.root)
        return (*read_head(self.location, device), transform)

    def check_request(self, layers=None, kd_top_k: int | None = None, temperature: float = 1.0,
                      tail_approximation: str | None = None) -> bool:
        """Refuse what this cache cannot serve; True when the tail at ``temperature`` will come
        from ``tail_approximation`` rather than from the cache (see :meth:`check_temperature`)."""
        missing = [j for j in (layers or ()) if j not in self.layout.layers]
        if missing:
            raise CacheMismatchError(f"teacher layers {missing} are not in cache {self.root}; it "
                                     f"holds layers {list(self.layout.layers)}")
        self.check_kd_top_k(kd_top_k)
        return self.check_temperature(temperature, tail_approximation)

    def check_kd_top_k(self, kd_top_k: int | None) -> None:
        """The one check of a training top-k (``kd_top_k``, ``--top-k`` of distill-from-cache)
        against what the cache holds: a top-k cache, and 1 <= kd_top_k <= its ``stored_k``."""
        if kd_top_k is None:
            return
        if self.logits_mode not in TOPK_MODES:
            raise CacheMismatchError(f"top_k={kd_top_k} asked, but cache {self.root} stores "
                                     f"{self.logits_mode} logits, which have no top-k to cut; "
                                     "leave --top-k unset")
        stored_k = self.layout.stored_k
        if not 1 <= kd_top_k <= stored_k:
            raise CacheMismatchError(f"top_k={kd_top_k} asked, but cache {self.root} stores "
                                     f"k={stored_k}; use 1 <= top_k <= {stored_k} "
                                     "or rebuild the cache with a larger --top-k")

    def check_temperature(self, temperature: float, tail_approximation: str | None = None) -> bool:
        """Refuse a KD temperature whose teacher distribution this cache cannot give exactly,
        unless a tail approximation is asked for; True when that approximation will be used."""
        if tail_approximation is not None and tail_approximation not in TAIL_APPROXIMATIONS:
            raise ConfigError(f"tail approximation {tail_approximation!r} is not one of "
                              f"{TAIL_APPROXIMATIONS}")
        if temperature == 1.0 or self.logits_mode == "exact":
            return False
        if self.logits_mode == "sampled":
            raise CacheMismatchError(f"cache {self.root} holds ids sampled from the teacher at "
                                     f"T = 1, an estimate at that temperature only; got T = "
                                     f"{temperature:g}. Use T = 1, or a topk or exact cache")
        if temperature in self.layout.tail_temperatures:
            return False
        if tail_approximation is not None:
            return True
        stored = [1.0, *self.layout.tail_temperatures]
        raise CacheMismatchError(
            f"cache {self.root} has the exact tempered tail for T in {stored} only, not for "
            f"T = {temperature:g}. Rebuild it with `cache-build --temperatures "
            f"{','.join(f'{t:g}' for t in sorted({*stored, temperature}))}`, train at one of "
            f"{stored}, or accept the uniform-tail approximation with --tail-approximation "
            "uniform (its error on a real teacher: README, 'Temperatures')")

    def read(self, index: int, *, layers=None, kd_top_k: int | None = None,
             logits: bool = True, temperature: float = 1.0,
             tail_approximation: str | None = None) -> dict:
        """One sequence: ``input_ids (L,)``, the teacher's logit targets and ``hidden`` =
        {layer: (L, D) stored dtype; int8 comes back dequantized to float32}.

        Logit targets: ``teacher_ids/teacher_logp (L, k)`` and ``teacher_log_tail (L,)`` for top-k
        and sampled caches (sampled: the empirical distribution of the draws, see
        :func:`counts_to_buckets`); ``teacher_final_hidden (L, D)`` for exact caches, to go
        through :meth:`head`. ``teacher_log_tail`` is the tail statistic at ``temperature``:
        ``log Σ_tail p^(1/T)`` (the log tail mass at T = 1), exact where the cache stores it,
        else from ``tail_approximation`` (see :meth:`check_temperature`). The log-probs stay
        at T = 1; the loss divides them by T.
        """
        layers = list(self.layout.layers if layers is None else layers)
        self.check_request(layers, kd_top_k, temperature if logits else 1.0, tail_approximation)
        if not 0 <= index < self.layout.n_sequences:
            raise IndexError(f"sequence {index} out of range 0..{self.layout.n_sequences - 1}")
        mode = self.logits_mode
        names = [INPUT_IDS]
        if logits:
            names += {"topk": [LOGIT_INDICES, LOGIT_VALUES, LOGIT_TAIL],
                      "topk-q8": [LOGIT_INDICES, LOGIT_QUANT, LOGIT_RANGE, LOGIT_TAIL],
                      "sampled": [LOGIT_INDICES, LOGIT_COUNTS]}.get(mode, [])
            if mode == "sampled" and self.layout.sample_logp:
                names.append(LOGIT_SAMPLE_LOGP)
            if temperature in self.layout.tail_temperatures:
                names.append(LOGIT_TAIL_TEMPERED)
        hidden_layers = layers + ([self.final_layer] if logits and mode == "exact" else [])
        for j in dict.fromkeys(hidden_layers):
            names += self._hidden_names(j)
        got = self.fetch(names, index)
        out = {"input_ids": got[INPUT_IDS]}
        k = kd_top_k or self.layout.stored_k
        if logits and mode in TOPK_MODES:
            if mode == "topk":
                ids, values = got[LOGIT_INDICES], got[LOGIT_VALUES]
            else:
                ids, values = decode_top_k(got[LOGIT_INDICES], got[LOGIT_QUANT], got[LOGIT_RANGE])
            tail = self._tempered_tail(got, temperature)
            values, tail = truncate_top_k(values, tail, k, temperature)
            out.update(teacher_ids=ids[:, :k], teacher_logp=values, teacher_log_tail=tail)
        elif logits and mode == "sampled":
            logp, tail = counts_to_buckets(got[LOGIT_COUNTS])
            out.update(teacher_ids=got[LOGIT_INDICES], teacher_logp=logp, teacher_log_tail=tail)
            if self.layout.sample_logp:
                out["teacher_kl_offset"] = sample_kl_offset(logp, got[LOGIT_SAMPLE_LOGP])
        elif logits:
            out["teacher_final_hidden"] = self._decode_hidden(self.final_layer, got)
        out["hidden"] = {j: self._decode_hidden(j, got) for j in layers}
        return out

    def _tempered_tail(self, got: dict, temperature: float) -> np.ndarray:
        """fp32 ``log Σ_tail p^(1/T)`` of the stored K ids' tail (checked in ``read``)."""
        tail = got[LOGIT_TAIL].astype(np.float32)
        if temperature == 1.0:
            return tail
        if temperature in self.layout.tail_temperatures:
            m = self.layout.tail_temperatures.index(temperature)
            return got[LOGIT_TAIL_TEMPERED][..., m].astype(np.float32)
        return uniform_tail(tail, temperature, self.layout.vocab_size - self.layout.stored_k)

    def fetch(self, names, index) -> dict[str, np.ndarray]:
        """``{name: array[index]}`` for several arrays, read concurrently: one sequence spans
        3-12 arrays, and on an object store each read is a round trip, so they go out together
        on Zarr's event loop rather than one after another."""
        arrays = self._arrays()

        async def one(name):
            return name, await _async_array(arrays[name]).getitem(index)

        async def together():
            return await asyncio.gather(*(one(n) for n in names))

        return dict(zarr_sync(together()))

    def _arrays(self) -> dict[str, zarr.Array]:
        # opened once per process (each open reads the array's metadata: a request remotely)
        group = self.group  # reopened, and the arrays dropped, in a new process
        if self._opened is None:
            self._opened = {name: group[name] for name in self.layout.array_specs()}
        return self._opened

    def _hidden_names(self, layer: int) -> list[str]:
        if self.layout.hidden_dtype != "int8":
            return [hidden_key(layer)]
        return [hidden_key(layer), hidden_scale_key(layer), hidden_outliers_key(layer),
                hidden_outlier_pos_key(layer)]

    def _decode_hidden(self, layer: int, got: dict) -> np.ndarray:
        """One sequence of a hidden layer as stored (fp16, bf16 bits), int8 dequantized."""
        if self.layout.hidden_dtype != "int8":
            return got[hidden_key(layer)]
        return hidden_q8.dequantize(*(got[n] for n in self._hidden_names(layer)))

    def read_array_unit(self, name: str, unit: int) -> np.ndarray:
        start, stop = self.layout.unit_range(unit)
        return self.group[name][start:stop]

"""Training on several caches at once (``distill-from-cache --cache A --cache B``): the check
that they can share one run, and their concatenation as one map-style dataset.

Caches can be concatenated when one student learns the same thing from each and their items
collate: the same teacher (weights, tokenizer, vocabulary, an exact cache's head and logit
transform), the same logit representation as the run reads it (mode, k, stored tail
temperatures, whether a sampled cache stores its draws' log-prob), the same sequence length and
packing, the hidden dtype when hidden states are read, and the hidden layers the run uses. The
first cache given is the reference; each other one is compared with it, and the first difference
is refused before anything is trained, naming both caches, the field, both values and the fix.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import ConcatDataset

from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.storage import CacheReader

_SAME_TEACHER = "build every cache of one run from the same teacher (cache-info shows the settings)"


@dataclass(frozen=True)
class _Agreement:
    """One field every cache of a run must share: its name in the refusal, how to read it from
    a cache, and how to fix a difference."""

    name: str
    value: Callable[[CacheReader], object]
    fix: str


def _teacher(reader: CacheReader) -> dict:
    return reader.manifest["settings"]["teacher"]


def _served_k(kd_top_k: int | None) -> Callable[[CacheReader], int]:
    """The ids per position a read gives (``--top-k`` truncates a top-k cache's stored k)."""
    def value(reader: CacheReader) -> int:
        if kd_top_k is not None and reader.layout.logit_codec.has_top_k:
            return kd_top_k
        return reader.layout.stored_k
    return value


def agreements(*, kd_top_k: int | None, reads_hidden: bool) -> list[_Agreement]:
    """What the caches of one run must share; ``reads_hidden``: hidden states are read (a hidden
    loss, or an exact cache's final state), so their dtype decides how items collate."""
    fields = [
        _Agreement("teacher weight fingerprint", lambda r: _teacher(r)["weights_fingerprint"],
                   _SAME_TEACHER),
        _Agreement("tokenizer fingerprint", lambda r: r.manifest["settings"]["tokenizer"]["fingerprint"],
                   "build every cache with the teacher's own tokenizer"),
        _Agreement("vocabulary size", lambda r: r.layout.vocab_size, _SAME_TEACHER),
        _Agreement("logits mode", lambda r: r.layout.logits_mode,
                   "rebuild one of them with the other's cache-build --logits"),
        _Agreement("ids per position (top-k or draws)", _served_k(kd_top_k),
                   "for top-k caches pass --top-k N with N at most the smaller k (both then serve "
                   "N ids), or rebuild with the same cache-build --top-k / --samples"),
        _Agreement("stored KD temperatures", lambda r: list(r.layout.tail_temperatures),
                   "rebuild one of them with the other's cache-build --temperatures"),
        _Agreement("stored draw log-probs (sample_logp)", lambda r: r.layout.sample_logp,
                   "rebuild the older sampled cache with this unidistill"),
        _Agreement("sequence length", lambda r: r.layout.seq_len,
                   "rebuild one of them with the other's cache-build --seq-len"),
        # documents and none collate together (the same token fields); stream has none of them
        _Agreement("packing (documents kept apart or not)",
                   lambda r: "kept apart" if r.packed else "stream",
                   "rebuild the stream one with cache-build --packing documents or none"),
    ]
    if reads_hidden:
        fields.append(_Agreement("hidden dtype", lambda r: r.layout.hidden_dtype,
                                 "rebuild one of them with the other's cache-build --hidden-dtype"))
    return fields


_HEAD = [
    _Agreement("teacher output head (sha256 of lm_head.safetensors)",
               lambda r: (r.manifest.get("head") or {}).get("sha256"),
               "exact-logits caches can be mixed only when they hold the same teacher head: "
               + _SAME_TEACHER + ", or use top-k caches"),
    _Agreement("teacher logit transform", lambda r: _teacher(r).get("logit_transform"),
               "exact-logits caches can be mixed only with the same logit post-processing: "
               + _SAME_TEACHER),
]


def check_caches_agree(readers: list[CacheReader], *, kd_top_k: int | None,
                       reads_hidden: bool, teacher_layers=()) -> None:
    """Refuse caches that cannot train one run together (see the module docstring): the same
    cache twice, a field of :func:`agreements` (and, for exact caches, the head) that differs
    from the first cache's, or a cache without one of ``teacher_layers`` (the hidden loss's)."""
    first = readers[0]
    fields = agreements(kd_top_k=kd_top_k, reads_hidden=reads_hidden)
    if first.layout.logit_codec.has_head:
        fields += _HEAD
    seen = {}
    for reader in readers:
        fingerprint = reader.manifest["fingerprint"]
        if fingerprint in seen:
            raise ConfigError(f"caches {seen[fingerprint]} and {reader.root} are the same cache "
                              f"(fingerprint {fingerprint[:16]}); give each cache once to --cache")
        seen[fingerprint] = reader.root
    for reader in readers[1:]:
        for field in fields:
            mine, theirs = field.value(first), field.value(reader)
            if mine != theirs:
                raise CacheMismatchError(
                    f"caches {first.root} and {reader.root} differ in their {field.name}: {mine!r} "
                    f"and {theirs!r}; every cache of one run must share it. Fix: {field.fix}")
        missing = sorted(set(teacher_layers) - set(reader.layers))
        if missing:
            raise CacheMismatchError(
                f"caches {first.root} and {reader.root} differ in their hidden layers: the hidden "
                f"loss uses teacher layers {sorted(teacher_layers)}, which {first.root} holds "
                f"({list(first.layers)}) but {reader.root} lacks {missing} (it holds "
                f"{list(reader.layers)}). Fix: --align-layers with student blocks whose teacher "
                "layers every cache holds, --gamma 0, or rebuild with cache-build --layers "
                "including them")


class ConcatCacheDataset(ConcatDataset):
    """Several :class:`~unidistill.trainer.dataset.CacheDataset` as one, in the order given: index
    ``i`` of the whole is sequence ``i`` of the first cache while ``i`` is below its length, then
    of the next, so an epoch sees every sequence of every cache once, and the sampler shuffles
    across caches. A batch is read as one concurrent gather per cache it touches."""

    @property
    def seq_len(self) -> int:
        return self.datasets[0].seq_len

    def __getitems__(self, indices) -> list[dict[str, torch.Tensor]]:
        indices = [int(i) for i in indices]
        by_part: dict[int, list[tuple[int, int]]] = {}  # dataset -> [(batch position, its index)]
        for position, index in enumerate(indices):
            if not 0 <= index < len(self):
                raise IndexError(f"item {index} out of range 0..{len(self) - 1}")
            part = bisect.bisect_right(self.cumulative_sizes, index)
            start = self.cumulative_sizes[part - 1] if part else 0
            by_part.setdefault(part, []).append((position, index - start))
        items: list = [None] * len(indices)
        for part, wanted in by_part.items():
            got = self.datasets[part].__getitems__([local for _, local in wanted])
            for (position, _), item in zip(wanted, got):
                items[position] = item
        return items

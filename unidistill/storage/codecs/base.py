"""What every logit representation of a cache provides: the interface of a logit codec.

A codec is one class per ``--logits`` kind, in the style of Zarr's codecs: it owns its arrays
(the ``create_array`` specs it adds to a layout), encodes the hooked teacher's torch outputs to
those arrays in storage dtypes, names what a read must fetch and decodes it to the reader's
fields (``teacher_ids``, ``teacher_logp``, ``teacher_log_tail``, ``teacher_kl_offset``,
``teacher_final_hidden``), describes itself for ``cache-info``, and refuses what it cannot
hold or serve. The mode string is looked up once, in :mod:`.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch

from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.storage.codecs.arrays import MAX_SAMPLES, Grid, index_dtype_for, zstd

if TYPE_CHECKING:  # the layout imports the codecs, never the other way round
    from unidistill.storage.codecs.hidden import HiddenCodec
    from unidistill.storage.layout import CacheLayout


class HookedForward(Protocol):
    """What a logit codec asks of the hooked teacher (:class:`unidistill.models.teacher.HookedTeacher`,
    which storage does not import): its top-k with tails, or its draws, of final hidden states."""

    def top_k_tail(self, final: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def sampled(self, final: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class LogitCodec(ABC):
    """One logit representation, with the layout values it depends on.

    ``stored_k`` is the ids per position (K ids, S draws, 0 for exact; None for a runner that
    only runs forwards); ``index_dtype`` the ids' storage dtype (None: the smallest that holds
    ``vocab_size`` ids and a sentinel, as a layout has it).
    """

    stored_k: int | None
    vocab_size: int
    tail_temperatures: tuple[float, ...] = ()
    sample_logp: bool = False
    index_dtype: np.dtype | None = None

    mode: ClassVar[str]  # the --logits name, the layout's logits_mode
    summary: ClassVar[str]  # what it stores, in a few words (the --logits refusal lists them)
    has_top_k: ClassVar[bool] = False  # holds the teacher's most likely ids: --top-k, tempered tails
    draws: ClassVar[bool] = False  # its ids are draws from the teacher (sample_logp, sampling settings)
    needs_final_layer: ClassVar[bool] = False  # the last hidden layer is always cached
    has_head: ClassVar[bool] = False  # the teacher's head is stored beside the arrays
    # why --temperatures does not apply to a cache without top-k ids
    temperatures_served: ClassVar[str] = ""

    @classmethod
    def from_layout(cls, layout: "CacheLayout") -> "LogitCodec":
        return cls(layout.stored_k, layout.vocab_size, layout.tail_temperatures, layout.sample_logp)

    @classmethod
    @abstractmethod
    def stored_k_for(cls, *, top_k: int, samples: int) -> int:
        """The layout's ``stored_k`` from ``cache-build``'s ``--top-k`` and ``--samples``."""

    @classmethod
    def check_hidden_codec(cls, hidden: "HiddenCodec") -> None:
        """Refuse a hidden dtype this representation cannot be built with (before anything loads)."""

    @property
    def ids_dtype(self) -> np.dtype:
        return index_dtype_for(self.vocab_size) if self.index_dtype is None else np.dtype(self.index_dtype)

    # -- layout -------------------------------------------------------------------------------
    def check_layout(self) -> None:
        """Refuse layout values this representation cannot hold (:class:`CacheLayout` checks)."""
        self._check_stored_k()
        self._check_temperatures()
        self._check_sample_logp()

    def _check_stored_k(self) -> None:
        if not 1 <= self.stored_k <= MAX_SAMPLES:
            raise ConfigError(f"top_k (ids per position, or draws per position when sampled) must "
                              f"be between 1 and {MAX_SAMPLES}; got {self.stored_k}")

    def _check_temperatures(self) -> None:
        if self.tail_temperatures:
            raise ConfigError(f"tempered tails belong to top-k caches; a {self.mode} cache cannot "
                              f"store tail temperatures {list(self.tail_temperatures)}")

    def _check_sample_logp(self) -> None:
        if self.sample_logp and not self.draws:
            raise ConfigError(f"sample_logp belongs to sampled caches, not {self.mode}")

    @abstractmethod
    def array_specs(self, grid: Grid) -> dict[str, dict]:
        """name -> ``create_array`` keyword arguments of the arrays this representation adds."""

    def _ids_spec(self, grid: Grid) -> dict:
        ids = self.ids_dtype
        return grid.spec((grid.seq_len, self.stored_k), ids, -1 if ids.kind == "i" else 0xFFFF, zstd())

    def _store_ids(self, ids: torch.Tensor) -> np.ndarray:
        return ids.to(torch.int32).cpu().numpy().astype(self.ids_dtype)

    # -- build --------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, teacher: HookedForward, final: torch.Tensor, seed: int = 0) -> dict[str, np.ndarray]:
        """The teacher's final hidden states (B, L, D) on its device -> {array name: (B, ...)}
        in storage dtypes; ``seed`` seeds draws."""

    # -- read ---------------------------------------------------------------------------------
    @abstractmethod
    def read_names(self, temperature: float) -> list[str]:
        """The logit arrays a read at ``temperature`` fetches."""

    def hidden_layers(self, final_layer: int) -> list[int]:
        """Hidden layers a read of the logits needs besides the asked ones."""
        return []

    @abstractmethod
    def decode(self, got: dict[str, np.ndarray], *, kd_top_k: int | None, temperature: float,
               hidden: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        """One sequence's fetched arrays -> the reader's teacher fields; ``hidden`` holds the
        decoded layers :meth:`hidden_layers` asked for (nothing else)."""

    # -- what a request may ask ------------------------------------------------------------------
    def check_kd_top_k(self, kd_top_k: int, where) -> None:
        """Refuse a training top-k (``--top-k`` of distill-from-cache) the cache ``where`` cannot cut."""
        raise CacheMismatchError(f"top_k={kd_top_k} asked, but cache {where} stores {self.mode} "
                                 "logits, which have no top-k to cut; leave --top-k unset")

    @abstractmethod
    def check_temperature(self, temperature: float, tail_approximation: str | None, where) -> bool:
        """Refuse a KD temperature T != 1 this cache cannot serve; True when the tail at T comes
        from ``tail_approximation`` rather than from the cache."""

    def check_training(self, manifest: dict, where, *, temperature: float, kl_direction: str) -> None:
        """Refuse a training with a logit loss that this cache cannot feed (run before training)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for ``cache-info``."""

"""The registries of representations: the only place a ``--logits`` mode or a ``--hidden-dtype``
name is looked up. A new representation is one codec class added here (plus its tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from unidistill.errors import ConfigError
from unidistill.storage.codecs.base import LogitCodec
from unidistill.storage.codecs.exact import Exact
from unidistill.storage.codecs.hidden import BFloat16, Float16, HiddenCodec, Int8
from unidistill.storage.codecs.sampled import Sampled
from unidistill.storage.codecs.topk import TopK, TopKQ8

if TYPE_CHECKING:
    from unidistill.storage.layout import CacheLayout

LOGIT_CODECS: dict[str, type[LogitCodec]] = {c.mode: c for c in (TopK, TopKQ8, Sampled, Exact)}
HIDDEN_CODECS: dict[str, type[HiddenCodec]] = {c.dtype: c for c in (Float16, BFloat16, Int8)}
LOGITS_MODES = tuple(LOGIT_CODECS)


def logit_codec_class(mode: str) -> type[LogitCodec]:
    """The codec class of a ``--logits`` mode (a layout's ``logits_mode``)."""
    try:
        return LOGIT_CODECS[mode]
    except KeyError:
        raise ConfigError(f"logits mode {mode!r} is not one of {LOGITS_MODES}") from None


def logit_codec(layout: "CacheLayout") -> LogitCodec:
    """The logit codec of a layout, with its stored k, vocabulary, temperatures and draws."""
    return logit_codec_class(layout.logits_mode).from_layout(layout)


def hidden_codec(dtype: str) -> HiddenCodec:
    """The codec of a ``--hidden-dtype`` (a layout's ``hidden_dtype``)."""
    try:
        return HIDDEN_CODECS[dtype]()
    except KeyError:
        raise ConfigError(f"hidden dtype {dtype!r} is not supported; expected one of "
                          f"{sorted(HIDDEN_CODECS)}") from None


def modes_with_top_k() -> tuple[str, ...]:
    """The logit modes that hold the teacher's most likely ids (``--top-k``, ``--temperatures``)."""
    return tuple(m for m, c in LOGIT_CODECS.items() if c.has_top_k)

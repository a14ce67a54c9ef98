"""Representation codecs: one class per logit representation (``topk``, ``topk-q8``, ``sampled``,
``exact``) and per hidden dtype (``float16``, ``bfloat16``, ``int8``), in the style of Zarr's
codecs. Each owns its arrays, encode (teacher outputs -> storage dtypes), the arrays a read
fetches and decode (-> the reader's fields), a ``cache-info`` line and its checks; the
registries in :mod:`.registry` are the only place a mode or dtype name is looked up."""

from unidistill.storage.codecs.base import LogitCodec
from unidistill.storage.codecs.hidden import HiddenCodec
from unidistill.storage.codecs.registry import (
    HIDDEN_CODECS, LOGIT_CODECS, LOGITS_MODES, hidden_codec, logit_codec, logit_codec_class,
    modes_with_top_k,
)

__all__ = ["HIDDEN_CODECS", "LOGIT_CODECS", "LOGITS_MODES", "HiddenCodec", "LogitCodec", "hidden_codec",
           "logit_codec", "logit_codec_class", "modes_with_top_k"]

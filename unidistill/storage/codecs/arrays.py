"""The array names of the cache format (v1, and v2's token arrays) and the one recipe every array follows.

Each array is chunked one sequence per inner chunk and sharded ``shard_size`` sequences per
shard (:meth:`Grid.spec`), so shard index u of every array forms work unit u. The codecs of
:mod:`unidistill.storage.codecs` say which of these names a cache holds; these constants are
re-exported by :mod:`unidistill.storage.layout`, where the format is documented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

INPUT_IDS = "input_ids"
TARGET_MASK = "target_mask"  # format v2: 1 = the token is a training target, 0 = context or padding
DOCUMENT_IDS = "document_ids"  # format v2: one id per segment, in data order
PAD_DOCUMENT = -2  # document_ids of padding (-1 is the fill value)
PACKINGS = ("stream", "documents", "none")  # how examples share the rows of a cache
LOGIT_INDICES = "logits/indices"
LOGIT_VALUES = "logits/values"
LOGIT_TAIL = "logits/tail"
LOGIT_COUNTS = "logits/counts"
LOGIT_QUANT = "logits/quant"
LOGIT_RANGE = "logits/range"
LOGIT_TAIL_TEMPERED = "logits/tail_tempered"
LOGIT_SAMPLE_LOGP = "logits/sample_logp"
HEAD_FILE = "lm_head.safetensors"
HIDDEN_PREFIX = "hidden/"

MAX_SAMPLES = 65534  # counts are uint16 and 65535 is their fill sentinel
UINT16_MAX_VOCAB = 65535  # 65535 itself is the fill sentinel, so the largest id must be below it


def hidden_key(layer: int) -> str:
    return f"{HIDDEN_PREFIX}{layer}"


def hidden_scale_key(layer: int) -> str:
    """The per-channel scales (one row per block of tokens) of an int8 hidden layer."""
    return f"{HIDDEN_PREFIX}{layer}_scale"


def hidden_outliers_key(layer: int) -> str:
    """The fp16 tokens an int8 hidden layer keeps apart, one set per sequence."""
    return f"{HIDDEN_PREFIX}{layer}_outliers"


def hidden_outlier_pos_key(layer: int) -> str:
    return f"{HIDDEN_PREFIX}{layer}_outlier_pos"


def index_dtype_for(vocab_size: int) -> np.dtype:
    """Smallest integer dtype whose range holds every token id and one spare sentinel."""
    return np.dtype("uint16") if vocab_size <= UINT16_MAX_VOCAB else np.dtype("int32")


def zstd(shuffle: bool = True) -> list:
    """Blosc-zstd (byte shuffle unless told) + crc32c: ids, log-probs, scales, int8 codes."""
    mode = BloscShuffle.shuffle if shuffle else BloscShuffle.noshuffle
    return [BloscCodec(cname="zstd", clevel=3, shuffle=mode), Crc32cCodec()]


def lz4() -> list:
    """Blosc-lz4 + crc32c: raw fp16/bf16 states barely compress, a fast codec keeps the writer ahead."""
    return [BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.shuffle), Crc32cCodec()]


@dataclass(frozen=True)
class Grid:
    """The sequence axis every array shares: N sequences of L tokens, ``shard_size`` per shard."""

    n_sequences: int
    seq_len: int
    shard_size: int

    def spec(self, inner: tuple[int, ...], dtype, fill, compressors: list) -> dict:
        """Keyword arguments of ``zarr.Group.create_array`` for an array of shape (N, *inner):
        one sequence per inner chunk, ``shard_size`` sequences per shard."""
        inner = tuple(int(d) for d in inner)
        return dict(shape=(self.n_sequences, *inner), chunks=(1, *inner),
                    shards=(self.shard_size, *inner), dtype=np.dtype(dtype), fill_value=fill,
                    compressors=compressors)

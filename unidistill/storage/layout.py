"""Cache formats v1 and v2: the arrays of a teacher cache, their shapes, dtypes, chunks and codecs.

A cache is one Zarr v3 group. Every array is sharded along the sequence axis with the same
shard size, and one shard index of every array together forms a *work unit*: the builder writes
whole units, so no two writers ever touch one shard (a write into a shard rewrites all of it).

| array            | shape       | dtype                          | inner chunk      |
|------------------|-------------|--------------------------------|------------------|
| input_ids        | [N, L]      | int32                          | one sequence     |
| logits/indices   | [N, L, K]   | uint16 if V <= 65535 else int32| one sequence     |
| logits/values    | [N, L, K]   | float16 (log-probs at T = 1)   | one sequence     |
| logits/tail      | [N, L]      | float16 (log of mass off the K)| one sequence     |
| logits/tail_tempered | [N, L, M] | float16 (log Σ_tail p^(1/T) for each T of ``tail_temperatures``) | one sequence |
| hidden/<j>       | [N, L, D]   | float16, bfloat16 as uint16, or int8 | one sequence |
| hidden/<j>_scale | [N, ⌈L/64⌉, D] | float16 (int8 only: per channel and 64-token block) | one sequence |
| hidden/<j>_outliers | [N, 2, D] | float16 (int8 only: each sequence's 2 highest-norm tokens) | one sequence |
| hidden/<j>_outlier_pos | [N, 2] | int32 (int8 only: their positions)  | one sequence |

Format v2 (``packing`` ``documents`` or ``none``: documents kept apart) adds ``target_mask``
[N, L] uint8 and ``document_ids`` [N, L] int32 (:mod:`unidistill.storage.codecs.tokens`); a
``stream`` cache is format v1, its manifest as before (the layout has no ``packing`` key).

The ``logits/*`` arrays depend on the logit representation (``logits_mode``: ``topk`` above,
``topk-q8``, ``sampled``, ``exact``) and the ``hidden/<j>*`` arrays on ``hidden_dtype``; each
representation is a codec of :mod:`unidistill.storage.codecs`, which declares its arrays and
documents them. A layout is its token arrays, its logit codec's arrays and, per cached layer, its
hidden codec's arrays, in that order.

Fill values are sentinels that real data never holds (-1 ids, NaN floats, 0xFFFF bf16 NaN), so a
chunk that was never written cannot pass for data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

from unidistill.errors import ConfigError
from unidistill.storage.codecs import (
    LOGITS_MODES, HiddenCodec, LogitCodec, hidden_codec, logit_codec, logit_codec_class,
)
from unidistill.storage.codecs.arrays import (  # noqa: F401  (the format's names, re-exported)
    HEAD_FILE, HIDDEN_PREFIX, INPUT_IDS, LOGIT_COUNTS, LOGIT_INDICES, LOGIT_QUANT, LOGIT_RANGE,
    LOGIT_SAMPLE_LOGP, LOGIT_TAIL, LOGIT_TAIL_TEMPERED, LOGIT_VALUES, MAX_SAMPLES, UINT16_MAX_VOCAB,
    DOCUMENT_IDS, PACKINGS, PAD_DOCUMENT, TARGET_MASK, Grid, hidden_key, hidden_outlier_pos_key, hidden_outliers_key, hidden_scale_key, index_dtype_for,
    zstd,
)

from unidistill.storage.codecs.tokens import STREAM, TokenCodec

FORMAT_VERSION = 1  # a stream cache's (and the only one before packed caches)
PACKED_FORMAT_VERSION = 2  # a cache with target_mask and document_ids
READABLE_FORMAT_VERSIONS = (FORMAT_VERSION, PACKED_FORMAT_VERSION)
STORED_K_KEY = "top_k"  # CacheLayout.stored_k's key in the manifest (format v1; and in cache-info --json)


@dataclass(frozen=True)
class CacheLayout:
    """Everything that fixes the arrays' shapes and dtypes."""

    n_sequences: int
    seq_len: int
    stored_k: int  # ids per position: K (top-k modes), S draws (sampled) or 0 (exact); "top_k" on disk
    vocab_size: int
    hidden_size: int
    layers: tuple[int, ...]
    hidden_dtype: str = "float16"
    shard_size: int = 16
    logits_mode: str = "topk"
    tail_temperatures: tuple[float, ...] = ()  # T != 1 with an exact tempered tail (top-k modes)
    sample_logp: bool = False  # sampled mode: the mean teacher log-prob of the draws is stored
    packing: str = STREAM  # stream | documents | none (codecs.tokens); not stream = format v2

    def __post_init__(self):
        self.token_codec.check_layout()
        hidden_codec(self.hidden_dtype)  # an unknown name is refused here, with the known ones
        logit_codec_class(self.logits_mode)
        object.__setattr__(self, "layers", tuple(sorted(int(j) for j in self.layers)))
        temps = tuple(sorted({float(t) for t in self.tail_temperatures}))
        object.__setattr__(self, "tail_temperatures", temps)
        self.logit_codec.check_layout()  # stored_k, tail temperatures, sample_logp
        if self.shard_size < 1:
            raise ConfigError(f"shard size must be >= 1 sequence, got {self.shard_size}")

    @cached_property
    def token_codec(self) -> TokenCodec:
        """The token arrays' codec (:mod:`unidistill.storage.codecs.tokens`)."""
        return TokenCodec(self.packing)

    @property
    def format_version(self) -> int:
        """1 for a stream cache, 2 for one with the token arrays of packed documents."""
        return PACKED_FORMAT_VERSION if self.token_codec.packed else FORMAT_VERSION

    @cached_property
    def logit_codec(self) -> LogitCodec:
        """The codec of ``logits_mode`` (:mod:`unidistill.storage.codecs`)."""
        return logit_codec(self)

    @cached_property
    def hidden_codec(self) -> HiddenCodec:
        """The codec of ``hidden_dtype`` (:mod:`unidistill.storage.codecs`)."""
        return hidden_codec(self.hidden_dtype)

    @property
    def grid(self) -> Grid:
        return Grid(self.n_sequences, self.seq_len, self.shard_size)

    @property
    def n_units(self) -> int:
        return math.ceil(self.n_sequences / self.shard_size)

    def unit_range(self, unit: int) -> tuple[int, int]:
        start = unit * self.shard_size
        return start, min(start + self.shard_size, self.n_sequences)

    def to_dict(self) -> dict:
        """The manifest's ``layout``, with its on-disk keys (``stored_k`` is stored as ``top_k``)."""
        d = asdict(self)
        d = {STORED_K_KEY if k == "stored_k" else k: v for k, v in d.items()}
        d["layers"] = list(self.layers)
        d["tail_temperatures"] = list(self.tail_temperatures)
        if self.packing == STREAM:  # a format v1 manifest, byte for byte (and its fingerprint)
            del d["packing"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CacheLayout":
        d = {"stored_k" if k == STORED_K_KEY else k: v for k, v in d.items()}
        return cls(**{**d, "layers": tuple(d["layers"]),
                      "tail_temperatures": tuple(d.get("tail_temperatures", ()))})

    def array_specs(self) -> dict[str, dict]:
        """name -> keyword arguments of ``zarr.Group.create_array``: the token arrays
        (``input_ids``, and ``target_mask``, ``document_ids`` when packed), the logit codec's
        arrays, then each layer's hidden arrays."""
        grid = self.grid
        specs = self.token_codec.array_specs(grid)
        specs.update(self.logit_codec.array_specs(grid))
        for j in self.layers:
            specs.update(self.hidden_codec.array_specs(j, grid, self.hidden_size))
        return specs

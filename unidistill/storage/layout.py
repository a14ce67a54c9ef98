"""Cache format v1: the arrays of a teacher cache, their shapes, dtypes, chunks and codecs.

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

The ``logits/*`` arrays depend on the logit representation (``logits_mode``):

* ``topk`` (above): the K most likely ids, their log-probs and the log of the remaining mass;
  plus, for each temperature T != 1 in ``tail_temperatures``, the tempered tail statistic
  ``log Σ_tail p_i^(1/T)`` (``logits/tail_tempered``). With it the teacher's distribution over
  the K ids and one tail bucket is exact at T: bucket log-weights ``logp_i / T`` and that tail,
  renormalised. The tail is not one token, so ``log_tail / T`` would be wrong (for T > 1 it
  leaves out most of the tempered tail's mass). Caches written before this array existed have
  ``tail_temperatures = ()``;
* ``topk-q8``: the same top-k + tail in about half the bytes: ``logits/indices`` holds the ids in
  ascending order, delta-coded (first id, then differences; they compress far better than ids in
  probability order), ``logits/quant`` [N, L, K] uint8 the log-probs in the same order as
  ``round((max - logp) / step)``, ``logits/range`` [N, L, 2] float16 (max, step) per position
  (step = (max - min) / 255), and ``logits/tail`` as above. The reader restores ids and
  log-probs sorted by probability, so every consumer sees what ``topk`` gives;
* ``sampled``: ``logits/indices`` [N, L, S] and ``logits/counts`` [N, L, S] (uint16): S ids drawn
  with replacement from the teacher's distribution at T = 1, stored as the distinct ids with
  their counts (unused slots: id 0, count 0). ``stored_k`` (``top_k`` in the manifest) holds S,
  the draws per position.
  ``logits/sample_logp`` [N, L] float32 holds the mean teacher log-prob of the S draws,
  ``Σ_i (c_i / S) log p_i``: with it the KL estimate ``Σ_i (c_i / S) (log p_i - log q_i)`` is
  unbiased and exactly 0 for a student equal to the teacher (without it only the soft
  cross-entropy against the sample is known, which is off by the sample's entropy). Caches
  written before it existed have ``sample_logp = False``;
* ``exact``: no logit arrays. The final normed hidden state (layer n) is always cached and the
  teacher's output head is stored once as ``lm_head.safetensors``, so the full-vocabulary
  teacher logits can be rebuilt offline at any temperature. ``stored_k`` is 0.

Fill values are sentinels that real data never holds (-1 ids, NaN floats, 0xFFFF bf16 NaN), so a
chunk that was never written cannot pass for data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from unidistill.errors import ConfigError
from unidistill.storage.hidden_q8 import OUTLIERS, n_blocks

FORMAT_VERSION = 1

INPUT_IDS = "input_ids"
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

# logical hidden dtype -> (numpy storage dtype, sentinel fill value)
HIDDEN_DTYPES = {
    "float16": (np.dtype("float16"), float("nan")),
    "bfloat16": (np.dtype("uint16"), 0xFFFF),  # zarr has no bf16: raw bits; 0xFFFF is a bf16 NaN
    "int8": (np.dtype("int8"), -128),  # + scales and outlier tokens, see storage.hidden_q8
}
LOGITS_MODES = ("topk", "topk-q8", "sampled", "exact")
TOPK_MODES = ("topk", "topk-q8")  # modes that hold the teacher's K most likely ids
MAX_SAMPLES = 65534  # counts are uint16 and 65535 is their fill sentinel
UINT16_MAX_VOCAB = 65535  # 65535 itself is the fill sentinel, so the largest id must be below it
STORED_K_KEY = "top_k"  # CacheLayout.stored_k's key in the manifest (format v1; and in cache-info --json)


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

    def __post_init__(self):
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ConfigError(
                f"hidden dtype {self.hidden_dtype!r} is not supported; expected one of "
                f"{sorted(HIDDEN_DTYPES)}"
            )
        if self.logits_mode not in LOGITS_MODES:
            raise ConfigError(f"logits mode {self.logits_mode!r} is not one of {LOGITS_MODES}")
        if self.logits_mode == "exact" and self.stored_k != 0:
            raise ConfigError(f"an exact-logits cache stores no top-k ids, so top_k must be 0; got "
                              f"{self.stored_k}")
        if self.logits_mode != "exact" and not 1 <= self.stored_k <= MAX_SAMPLES:
            raise ConfigError(f"top_k (ids per position, or draws per position when sampled) must "
                              f"be between 1 and {MAX_SAMPLES}; got {self.stored_k}")
        if self.shard_size < 1:
            raise ConfigError(f"shard size must be >= 1 sequence, got {self.shard_size}")
        object.__setattr__(self, "layers", tuple(sorted(int(j) for j in self.layers)))
        temps = tuple(sorted({float(t) for t in self.tail_temperatures}))
        if temps and self.logits_mode not in TOPK_MODES:
            raise ConfigError(f"tempered tails belong to top-k caches; a {self.logits_mode} cache "
                              f"cannot store tail temperatures {list(temps)}")
        if any(not t > 0 or t == 1.0 for t in temps):
            raise ConfigError(f"tail temperatures must be > 0 and != 1 (T = 1 is logits/tail "
                              f"itself); got {list(temps)}")
        object.__setattr__(self, "tail_temperatures", temps)
        if self.sample_logp and self.logits_mode != "sampled":
            raise ConfigError(f"sample_logp belongs to sampled caches, not {self.logits_mode}")

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
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CacheLayout":
        d = {"stored_k" if k == STORED_K_KEY else k: v for k, v in d.items()}
        return cls(**{**d, "layers": tuple(d["layers"]),
                      "tail_temperatures": tuple(d.get("tail_temperatures", ()))})

    def array_specs(self) -> dict[str, dict]:
        """name -> keyword arguments of ``zarr.Group.create_array``."""
        n, length, k, s = self.n_sequences, self.seq_len, self.stored_k, self.shard_size
        idx = index_dtype_for(self.vocab_size)
        ints = [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
        floats = [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
        # Raw fp16/bf16 states barely compress: a fast codec keeps the writer ahead. int8 codes
        # do compress (about 1.1x with zstd), which pays for their scales.
        if self.hidden_dtype == "int8":
            hidden = [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.noshuffle), Crc32cCodec()]
        else:
            hidden = [BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.shuffle), Crc32cCodec()]

        def spec(shape, dtype, fill, codecs):
            chunks = (1,) + tuple(shape[1:])
            return dict(shape=shape, chunks=chunks, shards=(s,) + tuple(shape[1:]),
                        dtype=dtype, fill_value=fill, compressors=codecs)

        specs = {INPUT_IDS: spec((n, length), np.dtype("int32"), -1, ints)}
        if self.logits_mode != "exact":
            specs[LOGIT_INDICES] = spec((n, length, k), idx, -1 if idx.kind == "i" else 0xFFFF, ints)
        if self.logits_mode == "topk":
            specs[LOGIT_VALUES] = spec((n, length, k), np.dtype("float16"), float("nan"), floats)
        if self.logits_mode == "topk-q8":
            # no spare uint8 value for a sentinel: an unwritten chunk shows in logits/range (NaN)
            specs[LOGIT_QUANT] = spec((n, length, k), np.dtype("uint8"), 0, ints)
            specs[LOGIT_RANGE] = spec((n, length, 2), np.dtype("float16"), float("nan"), floats)
        if self.logits_mode in TOPK_MODES:
            specs[LOGIT_TAIL] = spec((n, length), np.dtype("float16"), float("nan"), floats)
            if self.tail_temperatures:
                specs[LOGIT_TAIL_TEMPERED] = spec((n, length, len(self.tail_temperatures)),
                                                  np.dtype("float16"), float("nan"), floats)
        elif self.logits_mode == "sampled":
            specs[LOGIT_COUNTS] = spec((n, length, k), np.dtype("uint16"), 0xFFFF, ints)
            if self.sample_logp:
                specs[LOGIT_SAMPLE_LOGP] = spec((n, length), np.dtype("float32"), float("nan"), floats)
        store_dtype, fill = HIDDEN_DTYPES[self.hidden_dtype]
        for j in self.layers:
            specs[hidden_key(j)] = spec((n, length, self.hidden_size), store_dtype, fill, hidden)
            if self.hidden_dtype == "int8":
                kept = min(OUTLIERS, length)
                specs[hidden_scale_key(j)] = spec((n, n_blocks(length), self.hidden_size),
                                                  np.dtype("float16"), float("nan"), floats)
                specs[hidden_outliers_key(j)] = spec((n, kept, self.hidden_size), np.dtype("float16"),
                                                     float("nan"), floats)
                specs[hidden_outlier_pos_key(j)] = spec((n, kept), np.dtype("int32"), -1, ints)
        return specs

"""A map-style torch Dataset over a teacher cache, its collator, and the check that a student
can read the cache (same vocabulary, same tokenizer).

Map-style, so the Trainer's samplers, shuffling, resumption and distributed sharding just work.
Items are flat dicts of equal-shape tensors, so batches are torch's ``default_collate`` (which
puts a worker's output in shared memory). The Zarr store is opened lazily in each DataLoader
worker (the reader drops its handle when pickled).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from unidistill.errors import CacheMismatchError, ConfigError
from unidistill.fingerprint import tokenizer_fingerprint
from unidistill.model_logits import CHECK_SEQUENCES
from unidistill.models.targets import TeacherTargets
from unidistill.storage import CacheReader, decode_hidden


def check_student_matches_cache(reader: CacheReader, tokenizer, student_config) -> None:
    cached = reader.manifest["settings"]["tokenizer"]["fingerprint"]
    mine = tokenizer_fingerprint(tokenizer)
    vocab_cache, vocab_student = reader.layout.vocab_size, student_config.vocab_size
    if vocab_student != vocab_cache:
        raise CacheMismatchError(f"the student's vocabulary has {vocab_student} entries, the cache's "
                                 f"teacher {vocab_cache}; distillation needs the same vocabulary. "
                                 "Use a student made from the teacher (e.g. `unidistill prune`) or "
                                 "rebuild the cache with a teacher of the student's tokenizer.")
    if mine != cached:
        raise CacheMismatchError(f"the student's tokenizer (fingerprint {mine[:16]}) differs from the "
                                 f"cache's (fingerprint {cached[:16]}); token ids would not line up. "
                                 "Use the teacher's tokenizer for the student.")


def sample_input_ids(reader: CacheReader, n: int = CHECK_SEQUENCES) -> np.ndarray:
    """The first ``n`` cached sequences' ids (n, L): what the start-up logit checks run on."""
    return np.stack([reader.read(i, layers=[], logits=False)["input_ids"]
                     for i in range(min(n, len(reader)))])


class CacheDataset(Dataset):
    """Items: ``input_ids (L,)`` and the teacher's targets for the sequence as the flat fields of
    :meth:`TeacherTargets.to_fields <unidistill.models.targets.TeacherTargets.to_fields>`: the
    sparse ids, log-probs and tail at the KD ``temperature`` (see ``CacheReader.read``) of top-k
    and sampled caches, or the final teacher state of exact caches (whose head the trainer takes
    from ``reader.head()``), and the hidden states of each requested teacher layer.

    Low-precision tensors stay as stored (fp16 / bf16) to keep host memory and copies small;
    the losses upcast to fp32.

    ``local_dir`` (a read-through folder for a remote cache) and ``prefetch`` (shards read ahead)
    are the reader's (:class:`~unidistill.storage.reader.CacheReader`); with a reader given as
    ``cache``, set them on the reader.
    """

    def __init__(self, cache, *, layers=(), kd_top_k: int | None = None, logits: bool = True,
                 temperature: float = 1.0, tail_approximation: str | None = None,
                 local_dir=None, prefetch: int | None = None):
        if isinstance(cache, CacheReader):
            if local_dir is not None or prefetch is not None:
                raise ConfigError(f"CacheDataset got an open CacheReader and local_dir={local_dir!r}, "
                                  f"prefetch={prefetch!r}; give those to the CacheReader "
                                  "(CacheReader(cache, local_dir=..., prefetch=...)) or pass the "
                                  "cache path instead of the reader")
            self.reader = cache
        else:
            self.reader = CacheReader(cache, local_dir=local_dir, prefetch=prefetch)
        self.layers = sorted(layers)
        self.kd_top_k = kd_top_k
        self.logits = logits
        self.temperature = temperature
        self.tail_approximation = tail_approximation
        self.reader.check_request(self.layers, kd_top_k, temperature if logits else 1.0,
                                  tail_approximation)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list[dict[str, torch.Tensor]]:
        """A DataLoader batch as one concurrent read of every array of every sequence
        (:meth:`CacheReader.read_many`); the DataLoader calls this with the batch's indices."""
        seqs = self.reader.read_many(indices, layers=self.layers, kd_top_k=self.kd_top_k,
                                     logits=self.logits, temperature=self.temperature,
                                     tail_approximation=self.tail_approximation)
        return [self._item(seq) for seq in seqs]

    def _item(self, seq: dict) -> dict[str, torch.Tensor]:
        dtype = self.reader.layout.hidden_dtype
        targets = TeacherTargets(hidden={j: decode_hidden(h, dtype) for j, h in seq["hidden"].items()})
        if self.logits and "teacher_final_hidden" in seq:
            targets.final_hidden = decode_hidden(seq["teacher_final_hidden"], dtype)
        elif self.logits:
            targets.ids = torch.from_numpy(seq["teacher_ids"].astype(np.int32))
            targets.logp = torch.from_numpy(seq["teacher_logp"])
            targets.log_tail = torch.from_numpy(seq["teacher_log_tail"])
            if "teacher_kl_offset" in seq:  # sampled caches: turns the logged KL unbiased
                targets.kl_offset = torch.from_numpy(seq["teacher_kl_offset"])
        return {"input_ids": torch.from_numpy(seq["input_ids"].astype(np.int64)),
                **targets.to_fields()}

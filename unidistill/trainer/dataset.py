"""A map-style torch Dataset over a teacher cache, its collator, and the check that a student
can read the cache (its tokenizer, a head covering the cache's vocabulary).

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
from unidistill.fingerprint import tokenizer_fingerprint, tokenizer_matches
from unidistill.model_logits import CHECK_SEQUENCES
from unidistill.models.batch import TokenFields
from unidistill.models.targets import TeacherTargets
from unidistill.storage import CacheReader, decode_hidden


def check_student_matches_cache(reader: CacheReader, tokenizer, student_config, *,
                                kl_direction: str | None = None,
                                kd_top_k: int | None = None) -> None:
    """Refuse a student that cannot learn from (or be scored on) the cache: another tokenizer,
    a head smaller than the cache's vocabulary, or a reverse KL the padded head makes infinite.

    A head padded beyond the cache's vocabulary (same tokenizer, ``vocab_size`` rounded up, e.g.
    to a multiple of 64) is accepted: every cached teacher id is below the cache's V, the
    student's extra logits are mass of its softmax like any other (they count in CE and KL as the
    model would use them), and the teacher gives those ids no probability (an exact cache's
    teacher logits are padded with -inf, ``losses.divergences.pad_teacher_logits``; a top-k
    cache's tail bucket holds the student's extra mass against the teacher's tail). Tokenizers
    that differ only in their pad id match (``fingerprint.tokenizer_matches``).

    ``kl_direction`` (the training KL, None when it is not trained) and ``kd_top_k``: a reverse
    KL is refused for a padded student when the teacher's distribution is known over every id
    (an exact cache, or top-k holding the whole vocabulary): the teacher's mass on the extra ids
    is exactly 0, so KL(student || teacher) would be infinite.
    """
    cached = reader.manifest["settings"]["tokenizer"]["fingerprint"]
    vocab_cache, vocab_student = reader.layout.vocab_size, student_config.vocab_size
    if vocab_student < vocab_cache:
        raise CacheMismatchError(f"the student's vocabulary has {vocab_student} entries, fewer than "
                                 f"the cache's teacher {vocab_cache}; the teacher's ids from "
                                 f"{vocab_student} up have no student logit. Use a student made from "
                                 "the teacher (e.g. `unidistill prune`), whose head keeps all "
                                 f"{vocab_cache} rows, or rebuild the cache with a teacher of the "
                                 "student's tokenizer.")
    if not tokenizer_matches(tokenizer, cached):
        mine = tokenizer_fingerprint(tokenizer)
        raise CacheMismatchError(f"the student's tokenizer (fingerprint {mine[:16]}) differs from the "
                                 f"cache's (fingerprint {cached[:16]}) in its vocabulary or its BOS, "
                                 "EOS or UNK id; token ids would not line up. Use the teacher's "
                                 "tokenizer for the student (a different pad id alone is fine).")
    codec = reader.layout.logit_codec
    k = reader.layout.stored_k if kd_top_k is None else kd_top_k
    whole = codec.has_head or (codec.has_top_k and k >= vocab_cache)
    if vocab_student > vocab_cache and kl_direction == "reverse" and whole:
        raise ConfigError(f"--kl-direction reverse with a student head of {vocab_student} rows on "
                          f"a cache whose teacher has {vocab_cache} ids: the teacher gives the "
                          f"student's {vocab_student - vocab_cache} extra ids no probability, so "
                          "KL(student || teacher) is infinite wherever the student gives them any. "
                          "Use --kl-direction forward or jsd (both finite and exact here), or a "
                          "top-k cache with k below the vocabulary (its tail bucket takes the "
                          "extra ids).")


def sample_input_ids(reader: CacheReader, n: int = CHECK_SEQUENCES) -> np.ndarray:
    """The first ``n`` cached sequences' ids (n, L): what the start-up logit checks run on."""
    return np.stack([reader.read(i, layers=[], logits=False)["input_ids"]
                     for i in range(min(n, len(reader)))])


def sample_document_ids(reader: CacheReader) -> np.ndarray | None:
    """The first cached row's document ids (1, L), None for a stream cache: what the start-up
    segment-isolation check runs on."""
    if not reader.packed:
        return None
    return reader.read(0, layers=[], logits=False)["document_ids"][None]


def check_student_template(reader: CacheReader, tokenizer) -> None:
    """Refuse a student whose chat template renders the probe conversation to other ids than the
    teacher's did when the cache was built (a chat cache's ``settings.data.probe_ids``): it would
    be trained on one format and prompted in another. Equal ids pass, whatever the template's
    text; a student made by ``unidistill prune`` keeps the teacher's tokenizer and passes."""
    from unidistill.text.chat import ChatTemplateError, template_probe

    cached = reader.manifest["settings"]["data"].get("probe_ids")
    if cached is None:  # not a chat cache
        return
    fix = ("Save the student with the teacher's tokenizer (its chat template included: "
           "tokenizer.chat_template = <the cache's settings.data.chat_template>, then "
           "save_pretrained), or rebuild the cache with a teacher of the student's template")
    try:
        mine = template_probe(tokenizer)
    except ChatTemplateError as e:
        raise CacheMismatchError(f"cache {reader.root} holds conversations rendered with the "
                                 f"teacher's chat template, but the student's tokenizer cannot "
                                 f"render them: {e}. {fix}") from e
    if mine == list(cached):
        return
    at = next((i for i, (a, b) in enumerate(zip(mine, cached)) if a != b), min(len(mine), len(cached)))
    got = mine[at] if at < len(mine) else "<end>"
    want = cached[at] if at < len(cached) else "<end>"
    shown = tokenizer.convert_ids_to_tokens([t for t in (got, want) if t != "<end>"])
    raise CacheMismatchError(
        f"the student's chat template renders the probe conversation differently from the "
        f"teacher's that built cache {reader.root}: first difference at token {at}, id {got} "
        f"from the student, {want} in the cache (tokens {shown}); {len(mine)} vs {len(cached)} "
        f"tokens in all. The student would learn one chat format and be prompted in another. {fix}")


class CacheDataset(Dataset):
    """Items: the token fields of :class:`~unidistill.models.batch.TokenFields` (``input_ids (L,)``,
    and for a packed cache ``target_mask`` and ``document_ids``) and the teacher's targets for the sequence as the flat fields of
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

    @property
    def seq_len(self) -> int:
        return self.reader.layout.seq_len

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
        tokens = TokenFields(torch.from_numpy(seq["input_ids"].astype(np.int64)))
        if "document_ids" in seq:  # a packed cache (CacheReader.read)
            tokens.target_mask = torch.from_numpy(seq["target_mask"])
            tokens.document_ids = torch.from_numpy(seq["document_ids"])
        return {**tokens.to_fields(), **targets.to_fields()}

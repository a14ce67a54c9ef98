"""Fingerprints that tie a cache to the tokenizer, teacher weights and data it was built from."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch


# the special ids a fingerprint covers; pad is not among them (see tokenizer_fingerprint)
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "unk_token_id")
# what caches built before the pad id was left out hashed
_LEGACY_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def _vocab_hash(tokenizer):
    """sha256 of the vocabulary (token -> id, in id order), not finalized: the specials follow."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256()
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    return h


def _with_specials(vocab_hash, special: dict) -> str:
    h = vocab_hash.copy()
    h.update(json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and the BOS, EOS and UNK ids.

    Two tokenizers with the same fingerprint map text to the same ids, whatever their class
    (fast or slow) or where they were loaded from. The pad id is left out: it never reaches a
    cache (sequences are packed, documents joined with EOS, no padding), and the common
    ``tokenizer.pad_token = tokenizer.eos_token`` must not make a student's tokenizer differ from
    its teacher's. Caches built before this recorded a fingerprint that also hashed the pad id;
    :func:`tokenizer_matches` still accepts them.
    """
    return _with_specials(_vocab_hash(tokenizer),
                          {name: getattr(tokenizer, name, None) for name in _SPECIAL_IDS})


def tokenizer_matches(tokenizer, recorded: str) -> bool:
    """Whether ``recorded`` (a cache's ``settings.tokenizer.fingerprint``) is this tokenizer's.

    True for :func:`tokenizer_fingerprint`, and for the fingerprint caches built before the pad
    id was left out recorded (vocabulary + BOS, EOS, PAD, UNK ids) when it equals this
    tokenizer's with some pad id: none, or any id of the vocabulary. So an old cache is accepted
    exactly when the tokenizers differ at most in their pad id, as a new one is. The search
    hashes the vocabulary once and then only the few bytes of the special ids per candidate
    (about 0.1 s for 49 152 ids), and runs only when the current fingerprint does not match.
    """
    vocab_hash = _vocab_hash(tokenizer)
    special = {name: getattr(tokenizer, name, None) for name in _LEGACY_SPECIAL_IDS}
    if _with_specials(vocab_hash, {k: special[k] for k in _SPECIAL_IDS}) == recorded:
        return True
    ids = sorted(set(tokenizer.get_vocab().values()))
    for pad in (special["pad_token_id"], None, *ids):
        if _with_specials(vocab_hash, {**special, "pad_token_id": pad}) == recorded:
            return True
    return False


def weights_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """sha256 over every parameter's name, shape, dtype and an evenly strided sample of values.

    Sampling keeps this cheap for large teachers while any retraining, pruning or other
    checkpoint changes it.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step].to("cpu", torch.float32).numpy()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def ids_fingerprint(ids: np.ndarray) -> str:
    """sha256 of packed token ids: the exact training text of a cache."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int32).tobytes()).hexdigest()


WHOLE_FILE_LIMIT = 64 << 20  # bytes; larger files are identified without reading them whole
_EDGE = 1 << 20


def file_digest(path) -> str:
    """sha256 identifying one local file's content.

    Files up to 64 MiB are hashed whole. Larger ones (model weights) by their size, modification
    time and first and last MiB: any rewrite (retraining, pruning again) changes the time, and a
    copy that does not keep it only costs a needless recomputation, never a stale result.
    """
    from pathlib import Path

    path = Path(path)
    stat = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if stat.st_size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: f.read(_EDGE), b""):
                h.update(block)
        else:
            h.update(f"size={stat.st_size} mtime_ns={stat.st_mtime_ns}".encode())
            h.update(f.read(_EDGE))
            f.seek(stat.st_size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def path_fingerprint(path, include=None) -> str:
    """sha256 over a file's :func:`file_digest`, or over a folder's files (relative path and digest,
    recursively); ``include(relative_path) -> bool`` picks a folder's files (default: all)."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if include is None or include(rel):
            h.update(f"{rel}\0{file_digest(file)}\n".encode())
    return h.hexdigest()

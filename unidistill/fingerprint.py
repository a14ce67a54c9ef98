"""Fingerprints that tie a cache to the tokenizer, teacher weights and data it was built from."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and the special tokens.

    Two tokenizers with the same fingerprint map text to the same ids, whatever their class
    (fast or slow) or where they were loaded from.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {name: getattr(tokenizer, name, None)
               for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    h = hashlib.sha256()
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


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

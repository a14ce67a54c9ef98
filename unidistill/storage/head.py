"""The teacher's output head inside an exact-logits cache (``lm_head.safetensors``).

Written once, atomically, before any unit; its sha256 goes into the manifest when the build
finishes, and ``cache-verify`` checks it. Stored in fp32, so the only rounding in the rebuilt
teacher logits is the cached final hidden state's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import safetensors.torch
import torch

from unidistill.errors import CacheError
from unidistill.storage.files import atomic_write_bytes
from unidistill.storage.layout import HEAD_FILE


def write_head(root, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Store the head (weight (V, D), optional bias (V,)) unless an earlier run already did."""
    path = Path(root) / HEAD_FILE
    if path.is_file():
        return
    tensors = {"weight": weight.detach().to("cpu", torch.float32).contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().to("cpu", torch.float32).contiguous()
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata={"format": "pt"}))


def head_digest(root) -> str:
    return hashlib.sha256((Path(root) / HEAD_FILE).read_bytes()).hexdigest()


def read_head(root, device="cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, D) fp32, bias (V,) or None) of an exact-logits cache, loaded onto ``device``."""
    path = Path(root) / HEAD_FILE
    if not path.is_file():
        raise CacheError(f"{path} is missing: an exact-logits cache keeps the teacher's output head "
                         f"there. Rebuild the cache (its unit data alone cannot rebuild the logits)")
    tensors = safetensors.torch.load_file(path, device=str(device))
    return tensors["weight"], tensors.get("bias")

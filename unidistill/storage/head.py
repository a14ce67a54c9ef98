"""The teacher's output head inside an exact-logits cache (``lm_head.safetensors``).

Written once, atomically, before any unit; its sha256 goes into the manifest when the build
finishes, and ``cache-verify`` checks it. Stored in fp32, so the only rounding in the rebuilt
teacher logits is the cached final hidden state's.

The head alone is not the teacher's logits for every family (Gemma-2 softcaps them, Cohere and
Granite scale them): the build records the teacher's
:class:`~unidistill.model_logits.LogitTransform` in the manifest
(``settings.teacher.logit_transform``), and :func:`read_logit_transform` gives it back.
"""

from __future__ import annotations

import hashlib

import safetensors.torch
import torch

from unidistill.errors import CacheError, CacheMismatchError
from unidistill.model_logits import PLAIN_HEAD_ARCHITECTURES, LogitTransform
from unidistill.storage.layout import HEAD_FILE
from unidistill.storage.location import as_location


def write_head(root, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Store the head (weight (V, D), optional bias (V,)) unless an earlier run already did.

    ``root``: the cache folder, URL or :class:`CacheLocation`."""
    loc = as_location(root)
    if loc.is_file(HEAD_FILE):
        return
    tensors = {"weight": weight.detach().to("cpu", torch.float32).contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().to("cpu", torch.float32).contiguous()
    loc.write_bytes(HEAD_FILE, safetensors.torch.save(tensors, metadata={"format": "pt"}))


def head_digest(root) -> str | None:
    """sha256 of the head file, None when there is none."""
    data = as_location(root).read_bytes(HEAD_FILE)
    return None if data is None else hashlib.sha256(data).hexdigest()


def read_head(root, device="cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, D) fp32, bias (V,) or None) of an exact-logits cache, loaded onto ``device``."""
    loc = as_location(root)
    if not loc.is_file(HEAD_FILE):
        raise CacheError(f"{HEAD_FILE} is missing from {loc}: an exact-logits cache keeps the "
                         "teacher's output head there. Rebuild the cache (its unit data alone "
                         "cannot rebuild the logits)")
    if loc.is_local:
        tensors = safetensors.torch.load_file(loc.root / HEAD_FILE, device=str(device))
    else:
        tensors = {k: v.to(device) for k, v in safetensors.torch.load(loc.read_bytes(HEAD_FILE)).items()}
    return tensors["weight"], tensors.get("bias")


def read_logit_transform(manifest: dict, where) -> LogitTransform:
    """The teacher's logit transform recorded in a cache's ``manifest``.

    Caches built before it was recorded have none. Such a cache is read with the identity only
    when its teacher's architecture is one whose logits are the plain head's
    (``PLAIN_HEAD_ARCHITECTURES``, e.g. Llama: exactly what that build's head-only logits were);
    any other is refused, since its softcap or scale cannot be known from the cache.
    """
    teacher = manifest["settings"]["teacher"]
    if "logit_transform" in teacher:
        return LogitTransform.from_dict(teacher["logit_transform"])
    architecture = teacher.get("architecture")
    if architecture in PLAIN_HEAD_ARCHITECTURES:
        return LogitTransform()
    raise CacheMismatchError(
        f"cache {where} was built before unidistill recorded the teacher's logit post-processing, "
        f"and its teacher ({architecture}) is not one whose logits are its plain output head "
        f"({', '.join(PLAIN_HEAD_ARCHITECTURES)}); a softcap or logit scale would be missing from "
        "every rebuilt teacher logit. Rebuild the cache with this unidistill "
        "(`unidistill cache-build ... --overwrite`)")

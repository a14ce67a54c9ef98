"""Running a model on packed rows whose segments (documents) must not attend to each other.

transformers 5 keeps packed sequences apart by itself when it is given per-segment
``position_ids``, **no cache** and **no** 2D ``attention_mask``: ``create_causal_mask`` then
finds the sequences where consecutive position ids do not differ by 1
(``masking_utils.find_packed_sequence_indices``) and ANDs the causal mask with "same sequence",
for sdpa, eager and flex alike. The detection only runs when ``attention_mask is None and cache
is None`` (``masking_utils._preprocess_mask_arguments``), and Llama-family models make a
``DynamicCache`` whenever ``use_cache`` is true, which is the config default: so
``model(ids, position_ids=pos)`` alone still attends across documents. ``use_cache=False`` is
required. Flash attention separates sequences from ``position_ids`` only at batch size 1
(``modeling_flash_attention_utils._is_packed_sequence``), so it is refused for packed rows.

Every segment starts at position 0 and is non-empty, so transformers' rule (a position step
other than +1 starts a sequence) finds exactly our segments. :func:`check_segment_isolation` is
the start-up check that a model honours it.
"""

from __future__ import annotations

import numpy as np
import torch

from unidistill.errors import ConfigError

FLASH_PREFIX = "flash"


class SegmentIsolationError(ConfigError):
    """A model whose packed forward lets segments see each other."""


def position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids (B, L) -> position ids (B, L) int64 that restart at 0 at every change of id
    (padding runs restart too: they come after the real tokens and are never trained)."""
    new = torch.ones_like(document_ids, dtype=torch.bool)                 # (B, L) segment starts
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    idx = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    return idx - torch.where(new, idx, 0).cummax(-1).values


def attention_implementation(model) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def check_packable(model, role: str) -> None:
    """Refuse an attention implementation that cannot keep packed segments apart here."""
    impl = attention_implementation(model)
    if impl.startswith(FLASH_PREFIX):
        raise ConfigError(f"the {role} runs attention with {impl!r}, which separates packed "
                          "documents only for a batch of one row; this cache keeps documents "
                          "apart in rows of several. Load the model with attn_implementation="
                          "'sdpa' (or 'eager'), or build the cache with --packing stream")


def segment_kwargs(model, document_ids: torch.Tensor | None) -> dict:
    """Forward keyword arguments that keep the segments of ``document_ids`` (B, L) apart:
    per-segment ``position_ids`` and ``use_cache=False`` (and never an ``attention_mask``).
    ``{}`` for a stream batch (``document_ids`` None): its forward stays exactly as before."""
    if document_ids is None:
        return {}
    check_packable(model, "model")
    return {"position_ids": position_ids(document_ids.long()), "use_cache": False}


def _final_state(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model(input_ids=ids, output_hidden_states=True, **kwargs)
    return out.hidden_states[-1].float()                                   # (1, l, D)


def isolation_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) of a segment's states packed vs alone: 4 ulp of the model's dtype."""
    if dtype == torch.bfloat16:
        return 2 ** -5, 2 ** -5
    if dtype == torch.float16:
        return 2 ** -8, 2 ** -8
    return 1e-4, 1e-4


@torch.no_grad()
def check_segment_isolation(model, input_ids, document_ids, *, role: str) -> None:
    """Start-up check on one packed row (its first two segments, at most): their final states in
    the packed forward must equal each run alone, to 4 ulp of the model's dtype; else the model
    (a custom one, or an attention that ignores packed ``position_ids``) is refused, naming its
    type, attention implementation and the largest difference."""
    check_packable(model, role)
    ids = torch.as_tensor(np.asarray(input_ids)).long().reshape(-1, np.shape(input_ids)[-1])[:1]
    docs = torch.as_tensor(np.asarray(document_ids)).long().reshape(ids.shape)[:1]
    device = next(model.parameters()).device
    ids, docs = ids.to(device), docs.to(device)
    starts = [0] + [t for t in range(1, docs.shape[1]) if docs[0, t] != docs[0, t - 1]]
    bounds = list(zip(starts, starts[1:] + [docs.shape[1]]))[:2]
    if len(bounds) < 2:
        return  # one segment in the row: nothing to keep apart
    packed = _final_state(model, ids[:, :bounds[-1][1]], **segment_kwargs(model, docs[:, :bounds[-1][1]]))
    dtype = next(model.parameters()).dtype
    atol, rtol = isolation_tolerance(dtype)
    worst = 0.0
    ok = True
    for start, stop in bounds:
        alone = _final_state(model, ids[:, start:stop], use_cache=False)
        diff = (packed[:, start:stop] - alone).abs()
        worst = max(worst, float(diff.max()))
        ok = ok and bool((diff <= atol + rtol * alone.abs()).all())
    if not ok:
        raise SegmentIsolationError(
            f"the {role} ({type(model).__name__}, model_type "
            f"{getattr(model.config, 'model_type', None)!r}, attention "
            f"{attention_implementation(model)!r}) does not keep packed documents apart: a "
            f"document's final states packed with another differ from the document alone by up to "
            f"{worst:.4g} (tolerance {atol:g} + {rtol:g} x |state|). Its forward ignores per-document "
            "position_ids without a cache (transformers' packed-sequence masks). Load it with "
            "attn_implementation='sdpa' or 'eager', or build the cache with --packing stream")

"""``--hidden-dtype auto`` (the default): a storage dtype for the teacher's hidden states that
holds them on any model.

* A teacher computing in bfloat16 (or float16) gets its own dtype: storing its states as
  anything else either rounds them again or cannot hold them (some families' middle layers
  reach 8.5e4, beyond float16's 65 504).
* A float32 teacher gets float16 (three more mantissa bits than bfloat16) only where a
  calibration batch (the build's first batch) shows it safe: every cached layer's largest
  |value| at most 65 504 / ``SAFETY_MARGIN``, as other batches may reach further; else bfloat16.
  The margin is 2: the embedded SmolLM2-135M peaks near 24 000 (massive outlier channels, the
  same on every batch) and keeps float16, whose error on its states is 8x smaller than
  bfloat16's (benchmarks/results/storage_cpu.md: 2.1e-4 against 1.7e-3). A later batch beyond
  65 504 is still refused by the codec, with the command that rebuilds in bfloat16.
* A logit representation that needs a given dtype (``exact`` rebuilds the logits from a float16
  final state) gets that one.

The choice is the layout's ``hidden_dtype`` in the manifest, so a resumed build compares the
resolved dtype, whichever way it was asked for; the reason is in the build record.
"""

from __future__ import annotations

import numpy as np
import torch

from unidistill.errors import ConfigError
from unidistill.models.teacher import HookedTeacher
from unidistill.storage.codecs import hidden_codec, logit_codec_class

AUTO = "auto"
FLOAT16_MAX = 65504.0
SAFETY_MARGIN = 2.0
_OWN_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _accepted(logits_mode: str, dtype: str) -> bool:
    try:
        logit_codec_class(logits_mode).check_hidden_codec(hidden_codec(dtype))
    except ConfigError:
        return False
    return True


def calibration_peak(model, layers, ids: np.ndarray, document_ids: np.ndarray | None = None) -> float:
    """The largest |hidden state| over ``layers`` on the batch ``ids`` (B, L), run as the build
    runs it (a packed batch's documents apart: each document start is a massive token)."""
    teacher = HookedTeacher(model, layers, None)
    try:
        device = teacher.head.weight.device
        docs = None if document_ids is None else torch.as_tensor(np.array(document_ids)).long().to(device)
        _, captured = teacher.forward(torch.as_tensor(np.array(ids), dtype=torch.long).to(device), docs)
    finally:
        teacher.close()
    return max(float(t.float().abs().max()) for t in captured.values())


def resolve_hidden_dtype(requested: str, logits_mode: str, model, layers,
                         calibration_ids: np.ndarray,
                         calibration_documents: np.ndarray | None = None) -> tuple[str, str]:
    """(storage dtype, why) for ``--hidden-dtype requested``; ``auto`` as the module says."""
    if requested != AUTO:
        return requested, f"--hidden-dtype {requested}"
    if not layers:
        return "float16", "no hidden layers are cached"
    allowed = [dtype for dtype in ("float16", "bfloat16") if _accepted(logits_mode, dtype)]
    if len(allowed) == 1:
        return allowed[0], f"--logits {logits_mode} needs {allowed[0]} hidden states"
    own = _OWN_DTYPES.get(next(model.parameters()).dtype)
    if own is not None:
        return own, f"the teacher computes in {own}"
    peak = calibration_peak(model, layers, calibration_ids, calibration_documents)
    safe = FLOAT16_MAX / SAFETY_MARGIN
    if peak <= safe:
        return "float16", f"float32 teacher, calibration batch peak |x| = {peak:.4g} <= {safe:g}"
    return "bfloat16", (f"float32 teacher, calibration batch peak |x| = {peak:.4g} > {safe:g} "
                        f"(float16's 65504 / {SAFETY_MARGIN:g})")

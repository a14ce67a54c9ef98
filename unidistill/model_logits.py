"""A model's own logits from its final hidden state: ``transform(head(h))``.

Several families do not stop at the output head. Their ``ForCausalLM.forward`` (transformers 5,
read from the modeling code, not guessed) continues with:

============================================================  =========================================
model_type                                                    after ``logits = self.lm_head(h)``
============================================================  =========================================
gemma2, gemma3_text, vaultgemma, nanochat                     ``logits = cap * tanh(logits / cap)``,
                                                              cap = ``config.final_logit_softcapping``
                                                              (skipped when it is None)
cohere, cohere2, cohere2_moe                                  ``logits = logits * config.logit_scale``
granite, granitemoe, granitemoeshared, granitemoehybrid,      ``logits = logits / config.logits_scaling``
granite_swa, granitemoe_swa
============================================================  =========================================

Everything that builds logits from a hidden state (the cache builder's top-k and sampled paths,
an exact cache rebuilt in the trainer and in ``evaluate``, the fused and chunked losses on the
student side, the online teacher) goes through :class:`LogitTransform`. A family not in the table
is taken as a plain head, and :func:`check_logit_transform` compares ``transform(head(h))`` with
``model(ids).logits`` on a few short sequences at start-up, so an unknown post-processing is
refused instead of silently distilled against.

Note ``gemma3`` (``Gemma3ForConditionalGeneration``) is not ``gemma3_text``: its forward applies
no softcap in transformers 5, whatever its text config says, so it is a plain head here too.

This module imports nothing else of unidistill but :mod:`unidistill.errors`: the cache builder,
the storage layer and the trainer all stand on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unidistill.errors import ConfigError

SOFTCAP_TYPES = ("gemma2", "gemma3_text", "vaultgemma", "nanochat")
MULTIPLY_TYPES = ("cohere", "cohere2", "cohere2_moe")            # logits * logit_scale
DIVIDE_TYPES = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa",
                "granitemoe_swa")                                # logits / logits_scaling
# Causal LM classes whose forward is ``logits = self.lm_head(h)`` and nothing else: an exact cache
# built before the transform was recorded is safe to read as identity only for these.
PLAIN_HEAD_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                            "Qwen3ForCausalLM")

CHECK_SEQUENCES = 2   # the start-up check runs the model on this many sequences ...
CHECK_POSITIONS = 64  # ... of at most this many tokens: cheap next to any real batch


class LogitTransformError(ConfigError):
    """``transform(head(final hidden))`` is not the model's own logits."""


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``head(h)``: ``softcap * tanh(scale * z / softcap)``, or ``scale * z``
    without a softcap. Identity by default (a plain head).

    Scaling comes first, then the cap: no family in transformers does both, but this order is the
    one of models that do (an output multiplier, then the softcap).
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale != 0):
            raise ConfigError(f"logit scale {self.scale!r} must be a finite non-zero number")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ConfigError(f"logit softcap {self.softcap!r} must be a finite number > 0, or None")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from its head's output (any shape, dtype kept); differentiable.

        Callers pass fp32 head outputs: in bf16 the cap's division and tanh would add their own
        rounding on top of the matmul's."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def derivative(self, logits: torch.Tensor) -> torch.Tensor | float:
        """d apply(z) / dz, from the transformed logits ``apply(z)`` themselves: ``scale`` without
        a softcap, ``scale * (1 - (apply(z) / softcap)^2)`` with one (tanh' = 1 - tanh^2)."""
        if self.softcap is None:
            return self.scale
        return self.scale * (1.0 - (logits / self.softcap).square())

    def to_dict(self) -> dict:
        return {"scale": self.scale, "softcap": self.softcap}

    @classmethod
    def from_dict(cls, d: dict) -> LogitTransform:
        unknown = set(d) - {"scale", "softcap"}
        if unknown:
            raise ConfigError(f"unknown logit transform fields {sorted(unknown)}; expected scale, softcap")
        return cls(scale=float(d["scale"]), softcap=None if d["softcap"] is None else float(d["softcap"]))

    def describe(self) -> str:
        if self.is_identity:
            return "plain head"
        parts = [f"x {self.scale:g}"] if self.scale != 1.0 else []
        if self.softcap is not None:
            parts.append(f"softcap {self.softcap:g}")
        return ", ".join(parts)

    @classmethod
    def from_config(cls, config) -> LogitTransform:
        """The transform a causal LM of this config applies (identity for unknown families)."""
        kind = getattr(config, "model_type", None)
        if kind in SOFTCAP_TYPES:
            cap = getattr(config, "final_logit_softcapping", None)
            return cls(softcap=None if cap is None else float(cap))
        if kind in MULTIPLY_TYPES:
            return cls(scale=_number(config, "logit_scale", kind))
        if kind in DIVIDE_TYPES:
            return cls(scale=1.0 / _number(config, "logits_scaling", kind))
        return cls()


def _number(config, name: str, kind: str) -> float:
    value = getattr(config, name, None)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value == 0:
        raise ConfigError(f"{kind} config has {name} = {value!r}; its forward uses it to scale the "
                          "logits, so it must be a non-zero number. Fix the model's config.json")
    return float(value)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                transform: LogitTransform | None) -> torch.Tensor:
    """fp32 logits (.., V) of hidden (.., D) through the head (weight (V, D), bias (V,) or None)
    and the model's transform (None: plain head). Differentiable.

    The matmul runs in the weight's dtype (an fp32 copy of a large (V, D) head would cost GBs);
    the transform is fp32."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    return logits if transform is None else transform.apply(logits)


@dataclass(frozen=True)
class OutputHead:
    """A model's output head as the losses use it: ``transform(hidden @ weight.T + bias)``."""

    weight: torch.Tensor                 # (V, D)
    bias: torch.Tensor | None = None     # (V,)
    transform: LogitTransform | None = None

    @classmethod
    def of(cls, model) -> OutputHead:
        """The head of a causal LM, with the transform its config implies."""
        head = model.get_output_embeddings()
        return cls(head.weight, head.bias, LogitTransform.from_config(model.config))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits (.., V) of hidden (.., D); see :func:`head_logits`."""
        return head_logits(hidden, self.weight, self.bias, self.transform)


def logit_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for ``transform(head(h))`` against the model's own logits in ``dtype``.

    The head's matmul is the same on both sides; what differs is the rounding of the transform
    (the model rounds each step in its dtype, we do it in fp32): a few units in the last place.
    """
    if dtype == torch.bfloat16:
        return 2 ** -5, 2 ** -5       # 8-bit mantissa: 4 ulp
    if dtype == torch.float16:
        return 2 ** -8, 2 ** -8       # 11-bit mantissa: 4 ulp
    return 1e-4, 1e-4


@torch.no_grad()
def check_logit_transform(model, input_ids, transform: LogitTransform | None = None, *,
                          role: str = "model", final_hidden: torch.Tensor | None = None
                          ) -> LogitTransform:
    """Refuse a model whose ``transform(head(final hidden))`` is not ``model(ids).logits``.

    input_ids (B, L), numpy or torch: only the first ``CHECK_SEQUENCES`` x ``CHECK_POSITIONS``
    are run. ``transform`` defaults to :meth:`LogitTransform.from_config`; ``final_hidden``
    (B, L, D) is the final state the caller itself builds logits from (default: the model's
    ``hidden_states[-1]``, what the trainer and ``evaluate`` use), cut the same way.
    Returns the transform checked. Raises :class:`LogitTransformError` naming the model type and
    the largest difference.
    """
    transform = LogitTransform.from_config(model.config) if transform is None else transform
    head = model.get_output_embeddings()
    if isinstance(input_ids, np.ndarray):
        input_ids = torch.from_numpy(input_ids.astype(np.int64))
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    ids = input_ids[:CHECK_SEQUENCES, :CHECK_POSITIONS].to(head.weight.device, torch.long)
    out = model(input_ids=ids, output_hidden_states=final_hidden is None)
    if final_hidden is None:
        final_hidden = out.hidden_states[-1]                                 # (b, l, D)
    final_hidden = final_hidden[:CHECK_SEQUENCES, :CHECK_POSITIONS]
    expected = out.logits.float()                                            # (b, l, V)
    rebuilt = transform.apply(head(final_hidden).float())                    # (b, l, V)
    atol, rtol = logit_tolerance(out.logits.dtype)
    diff = (rebuilt - expected).abs()
    if bool((diff <= atol + rtol * expected.abs()).all()):
        return transform
    kind = getattr(model.config, "model_type", None)
    raise LogitTransformError(
        f"the {role} ({type(model).__name__}, model_type {kind!r}) computes logits that are not "
        f"its output head applied to its final hidden state with the known post-processing "
        f"({transform.describe()}): max |difference| {float(diff.max()):.4g} over "
        f"{tuple(ids.shape)} tokens (tolerance {atol:g} + {rtol:g} x |logit| in "
        f"{str(out.logits.dtype).removeprefix('torch.')}). unidistill builds logits as "
        "transform(head(final hidden)) and knows the transforms of "
        f"{', '.join(SOFTCAP_TYPES + MULTIPLY_TYPES + DIVIDE_TYPES)} (softcap / scale); this "
        "model's forward does something else after its head. Add its post-processing to "
        "unidistill.model_logits.LogitTransform.from_config, or use a model of a supported family")

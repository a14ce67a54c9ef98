"""The ``exact`` logit representation: no logit arrays; the teacher's final normed hidden state
(layer n) is always cached and its output head stored once (``lm_head.safetensors``, fp32), so
the full-vocabulary teacher logits are rebuilt offline, chunk by chunk, at any temperature."""

from __future__ import annotations

import numpy as np
import torch

from unidistill.errors import ConfigError
from unidistill.storage.codecs.arrays import HEAD_FILE, Grid
from unidistill.storage.codecs.base import HookedForward, LogitCodec


class Exact(LogitCodec):
    """``exact``: ``stored_k`` is 0; a read of the logits gives ``teacher_final_hidden`` (L, D), to
    go through the head (:meth:`unidistill.storage.CacheReader.head`). Every temperature and
    either KL direction; the teacher's logit transform must be recorded (or known)."""

    mode = "exact"
    summary = "final hidden state + the head, full vocabulary offline"
    needs_final_layer = True
    has_head = True
    temperatures_served = "serves every temperature exactly (it rebuilds the full logits)"

    @classmethod
    def stored_k_for(cls, *, top_k: int, samples: int) -> int:
        return 0

    @classmethod
    def check_hidden_codec(cls, hidden) -> None:
        if not hidden.keeps_exact_logits:
            raise ConfigError(f"--logits exact rebuilds the teacher's logits from its cached final "
                              f"hidden state, which --hidden-dtype {hidden.dtype} would round "
                              "(the logits would no longer be exact); use --hidden-dtype float16 "
                              "with exact logits, or --logits topk-q8 to keep the cache small")

    def _check_stored_k(self) -> None:
        if self.stored_k != 0:
            raise ConfigError(f"an exact-logits cache stores no top-k ids, so top_k must be 0; got "
                              f"{self.stored_k}")

    def array_specs(self, grid: Grid) -> dict[str, dict]:
        return {}

    def encode(self, teacher: HookedForward, final: torch.Tensor, seed: int = 0) -> dict[str, np.ndarray]:
        return {}  # the final layer is among the cached hidden layers

    def read_names(self, temperature: float) -> list[str]:
        return []

    def hidden_layers(self, final_layer: int) -> list[int]:
        return [final_layer]

    def decode(self, got: dict[str, np.ndarray], *, kd_top_k: int | None, temperature: float,
               hidden: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        (final,) = hidden.values()  # the one layer hidden_layers asked for
        return {"teacher_final_hidden": final}

    def check_temperature(self, temperature: float, tail_approximation: str | None, where) -> bool:
        return False  # every temperature, from the full logits

    def check_training(self, manifest: dict, where, *, temperature: float, kl_direction: str) -> None:
        """The teacher's logits are ``transform(head(final))``: its transform must be readable."""
        from unidistill.storage.head import read_logit_transform  # head imports the layout

        read_logit_transform(manifest, where)

    def describe(self) -> str:
        return f"exact: final layer + {HEAD_FILE}"

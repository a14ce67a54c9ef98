"""The loss recipe: weights, temperature, KL direction, hidden-state kind and chunk size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unidistill.errors import ConfigError
from unidistill.trainer.losses.divergences import KL_DIRECTIONS, choice_error
from unidistill.trainer.losses.hidden import HIDDEN_KINDS


@dataclass(frozen=True)
class LossTerms:
    """The three loss terms of one step, each an fp32 scalar (already reduced)."""
    ce: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor


def validate_loss_weights(alpha: float, beta: float, gamma: float, temperature: float) -> None:
    """Raise ConfigError unless the weights are >= 0, not all zero, and temperature > 0."""
    for name, value in (("alpha (CE weight)", alpha), ("beta (KL weight)", beta),
                        ("gamma (hidden-state weight)", gamma)):
        if value < 0:
            raise ConfigError(f"{name} is {value}, but loss weights must be >= 0; "
                              "set it to 0 to turn that term off")
    if alpha == 0 and beta == 0 and gamma == 0:
        raise ConfigError("alpha, beta and gamma are all 0, so there is nothing to train on; "
                          "set at least one loss weight > 0")
    if not temperature > 0:
        raise ConfigError(f"temperature is {temperature}, but it must be > 0; "
                          "use 1.0 for the teacher's own distribution")


def compound_loss(terms: LossTerms, alpha: float, beta: float, gamma: float,
                  temperature: float) -> torch.Tensor:
    """alpha * ce + beta * T^2 * kl + gamma * hidden.

    T^2 keeps the KL gradient's scale independent of T (softening by T shrinks it by ~1/T^2).
    """
    return alpha * terms.ce + beta * temperature ** 2 * terms.kl + gamma * terms.hidden


@dataclass(frozen=True)
class LossConfig:
    """One recipe of ``alpha * CE + beta * T^2 * KL + gamma * hidden``, checked once.

    ``chunk_size`` is the number of positions whose logits (B, chunk, V) exist at a time.
    """

    alpha: float = 0.5
    beta: float = 0.5
    gamma: float = 0.0
    temperature: float = 1.0
    kl_direction: str = "forward"
    hidden_loss: str = "cosine"
    chunk_size: int = 64

    def __post_init__(self):
        validate_loss_weights(self.alpha, self.beta, self.gamma, self.temperature)
        if self.kl_direction not in KL_DIRECTIONS:
            raise choice_error("KL direction", self.kl_direction, KL_DIRECTIONS)
        if self.hidden_loss not in HIDDEN_KINDS:
            raise choice_error("hidden-state loss kind", self.hidden_loss, HIDDEN_KINDS)
        if not (isinstance(self.chunk_size, int) and self.chunk_size >= 1):
            raise ConfigError(f"chunk_size must be a positive number of positions, got "
                              f"{self.chunk_size!r}")

    @classmethod
    def from_args(cls, args) -> LossConfig:
        """The recipe of a :class:`~unidistill.trainer.arguments.DistillationArguments`."""
        return cls(alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                   temperature=args.kd_temperature, kl_direction=args.kl_direction,
                   hidden_loss=args.hidden_loss, chunk_size=args.logits_chunk_size)

    @property
    def kl_weight(self) -> float:
        """beta * T^2: the weight of the KL term as trained."""
        return self.beta * self.temperature ** 2

    def combine(self, terms: LossTerms) -> torch.Tensor:
        return compound_loss(terms, self.alpha, self.beta, self.gamma, self.temperature)

"""Loss terms for distilling a student from a teacher cache (or a live teacher).

- :mod:`.divergences`: next-token CE, the bucketed and full-vocabulary KL (forward, reverse, JSD);
- :mod:`.hidden`: hidden-state losses (mse, nmse, cnmse, cosine);
- :mod:`.config`: the recipe (:class:`LossConfig`) and ``alpha * CE + beta * T^2 * KL + gamma * hidden``;
- :mod:`.logit_loss`: the one chunked logit loss, a training mode fused with the head and an
  evaluation mode without gradients;
- :mod:`.distillation`: the whole loss of a training step.
"""

from unidistill.trainer.losses.config import (
    LossConfig,
    LossTerms,
    compound_loss,
    validate_loss_weights,
)
from unidistill.trainer.losses.distillation import distillation_loss, hidden_alignment_loss
from unidistill.trainer.losses.divergences import (
    IGNORE_INDEX,
    KL_DIRECTIONS,
    bucket_log_probs,
    cross_entropy_per_position,
    full_vocab_log_probs,
    kl_per_position,
    masked_mean,
    masked_sum,
    next_token_labels,
)
from unidistill.trainer.losses.hidden import (
    HIDDEN_KINDS,
    hidden_state_loss,
    hidden_state_loss_per_position,
)
from unidistill.trainer.losses.logit_loss import (
    SUMS,
    LogitSums,
    logit_loss,
    logit_sums,
    sums_from_logits,
)

__all__ = [
    "HIDDEN_KINDS", "IGNORE_INDEX", "KL_DIRECTIONS", "SUMS", "LogitSums", "LossConfig", "LossTerms",
    "bucket_log_probs", "compound_loss", "cross_entropy_per_position", "distillation_loss",
    "full_vocab_log_probs", "hidden_alignment_loss", "hidden_state_loss",
    "hidden_state_loss_per_position", "kl_per_position", "logit_loss", "logit_sums", "masked_mean",
    "masked_sum", "next_token_labels", "sums_from_logits", "validate_loss_weights",
]

"""``DistillationArguments``: the Trainer's arguments plus the distillation knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from unidistill.errors import ConfigError
from unidistill.trainer.losses import HIDDEN_KINDS, KL_DIRECTIONS, validate_loss_weights
from unidistill.trainer.projectors import PROJECTOR_INITS


def _has_accelerator() -> bool:
    import torch

    has_accelerator = getattr(torch, "accelerator", None)
    if has_accelerator is not None and hasattr(has_accelerator, "is_available"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def _distributed_without_accelerator() -> bool:
    from unidistill.distributed import world_size_from_env

    return world_size_from_env() > 1 and not _has_accelerator()


@dataclass
class DistillationArguments(TrainingArguments):
    """Loss weights: L = alpha*CE + beta*T^2*KL_T + gamma*L_hidden.

    The defaults (0.5 CE + 0.5 KL at T = 1, no hidden loss; the CLI's lr 3e-4 with a cosine
    schedule) are the recipe that did best in the recovery experiment
    (benchmarks/results/recovery_cpu.md, recovery_cpu-long.md): T = 2, the hidden losses and a
    hidden-only warm-up gave no measurable gain, lr 1e-3 and 1e-4 did worse, and at 4x the
    tokens CE + KD beat CE on text the student did not train on."""

    # the measured best (see above), for every entry point: the CLI, --config and ablate alike
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "learning-rate schedule"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the next-token cross-entropy"})
    beta: float = field(default=0.5, metadata={"help": "weight of the T^2-scaled KL to the teacher"})
    gamma: float = field(default=0.0, metadata={"help": "weight of the hidden-state loss"})
    kd_temperature: float = field(default=1.0, metadata={"help": "KL temperature T (not a sampling temperature)"})
    tail_approximation: str | None = field(default=None, metadata={
        "help": "for a top-k cache without the exact tempered tail at --temperature: 'uniform' "
                "spreads the tail mass evenly over the untaken ids (an approximation, see README); "
                "unset = refuse such a temperature"})
    kl_direction: str = field(default="forward", metadata={"help": f"one of {KL_DIRECTIONS}"})
    hidden_loss: str = field(default="cosine", metadata={"help": f"one of {HIDDEN_KINDS}"})
    layer_map: str = field(default="uniform", metadata={
        "help": "uniform | last | original | explicit JSON {student: teacher} or a .json file"})
    hidden_warmup_steps: int = field(default=0, metadata={
        "help": "optimizer steps at the start that train the hidden-state loss alone (no CE, no KL), "
                "before the full loss; needs gamma > 0 and aligned layers"})
    align_layers: str = field(default="cached", metadata={
        "help": "which mapped student blocks get a hidden loss: 'cached' (those whose teacher layer "
                "is in the cache), 'all' (every block; the cache must hold all), or a list 4,8,12"})
    projector_init: str = field(default="auto", metadata={
        "help": f"auto or one of {PROJECTOR_INITS}; auto = channels for a student whose config "
                f"records the teacher channels it kept (unidistill prune), else xavier"})
    projector_learning_rate: float | None = field(default=None, metadata={
        "help": "learning rate of the projectors (default: learning_rate)"})
    force_projectors: bool = field(default=False, metadata={
        "help": "learnable projectors even when student and teacher widths match"})
    kd_top_k: int | None = field(default=None, metadata={"help": "use the k most likely cached ids (<= stored k)"})
    logits_chunk_size: int = field(default=64, metadata={"help": "positions per chunk of fp32 log-probs"})

    def __post_init__(self):
        if self.fsdp and (self.use_cpu or not _has_accelerator()):
            # accelerate turns FSDP on only for GPU launches; on the CPU the Trainer would run
            # plain DDP (or fail with one process) while the user asked for sharding
            raise ConfigError(
                f"fsdp={self.fsdp!r} asked on a run without GPUs (use_cpu={self.use_cpu}); FSDP "
                "runs only on GPU launches (accelerate launch --config_file examples/fsdp.yaml). "
                "On CPUs use data parallel instead: torchrun --nproc_per_node N -m unidistill.cli "
                "distill-from-cache ...")
        if not self.use_cpu and _distributed_without_accelerator():
            # `torchrun` / `accelerate launch --multi_gpu` on a machine without GPUs: accelerate
            # makes a gloo process group only when asked for the CPU, and would otherwise run
            # each process alone on its own copy of the data.
            self.use_cpu = True
        super().__post_init__()
        validate_loss_weights(self.alpha, self.beta, self.gamma, self.kd_temperature)
        if self.kl_direction not in KL_DIRECTIONS:
            raise ConfigError(f"kl_direction {self.kl_direction!r} is not one of {KL_DIRECTIONS}")
        if self.hidden_loss not in HIDDEN_KINDS:
            raise ConfigError(f"hidden_loss {self.hidden_loss!r} is not one of {HIDDEN_KINDS}")
        if self.projector_init not in ("auto", *PROJECTOR_INITS):
            raise ConfigError(f"projector_init {self.projector_init!r} is not one of {PROJECTOR_INITS}")
        if self.logits_chunk_size < 1:
            raise ConfigError(f"logits_chunk_size must be >= 1, got {self.logits_chunk_size}")
        if self.hidden_warmup_steps < 0:
            raise ConfigError(f"hidden_warmup_steps must be >= 0, got {self.hidden_warmup_steps}")
        if self.hidden_warmup_steps and self.gamma <= 0:
            raise ConfigError(
                f"hidden_warmup_steps={self.hidden_warmup_steps} trains the hidden-state loss alone, "
                f"but gamma is {self.gamma}: set gamma > 0 (e.g. --gamma 0.2) or drop the warm-up")
        if self.hidden_warmup_steps and 0 < self.max_steps <= self.hidden_warmup_steps:
            raise ConfigError(
                f"hidden_warmup_steps={self.hidden_warmup_steps} is not below max_steps="
                f"{self.max_steps}: the run would never train CE or KL; lower the warm-up")
        if self.kd_top_k is not None and self.kd_top_k < 1:
            raise ConfigError(f"kd_top_k must be >= 1, got {self.kd_top_k}")
        self.remove_unused_columns = False  # teacher fields are not arguments of model.forward

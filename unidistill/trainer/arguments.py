"""``DistillationArguments``: the Trainer's arguments plus the distillation knobs."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

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


# TrainingArguments fields that a distillation run cannot honour: set to anything but their
# default they are refused with the reason (never ignored), from every entry point.
_NO_EVALUATION_SET = ("a distillation run has no evaluation set: evaluate the student with "
                      "`unidistill evaluate`, or compare runs with `unidistill ablate`")
NOT_HONOURED = {
    **dict.fromkeys(
        ("do_eval", "do_predict", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start",
         "per_device_eval_batch_size", "eval_accumulation_steps", "eval_do_concat_batches",
         "eval_use_gather_object", "prediction_loss_only", "include_for_metrics", "batch_eval_metrics",
         "bf16_full_eval", "fp16_full_eval", "load_best_model_at_end", "metric_for_best_model",
         "greater_is_better"), _NO_EVALUATION_SET),
    "do_train": "the Trainer does not read it (it is for training scripts); a distillation run always trains",
    "label_names": "the distillation loss takes its next-token labels from the cached ids itself",
    "resume_from_checkpoint": "the Trainer does not read it: give distill-from-cache "
                              "--resume-from-checkpoint, or distill_from_cache(resume_from_checkpoint=...)",
    "remove_unused_columns": "the teacher's targets ride in the batch beside the input ids and the "
                             "student's forward does not take them, so the Trainer must keep them",
}


@dataclass
class DistillationArguments(TrainingArguments):
    """Loss weights: L = alpha*CE + beta*T^2*KL_T + gamma*L_hidden.

    The defaults are the recipe, the one default of every entry point (``distill-from-cache``'s
    options are generated from these fields, ``--config`` files and ``ablate`` build this class):
    0.5 CE + 0.5 KL at T = 1, no hidden loss, lr 3e-4 with a cosine schedule, one epoch over the
    cache (runs of a fixed budget set ``max_steps``), a log line every 10 steps, no reporting
    integration. It did best in the recovery experiment (benchmarks/results/recovery_cpu.md,
    recovery_cpu-long.md): T = 2, the hidden losses and a hidden-only warm-up gave no measurable
    gain, lr 1e-3 and 1e-4 did worse, and at 4x the tokens CE + KD beat CE on text the student
    did not train on. The Trainer fields in :data:`NOT_HONOURED` are refused when set."""

    # the recipe (see above), for every entry point: the CLI, --config and ablate alike
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={
        "help": "learning-rate schedule"})
    num_train_epochs: float = field(default=1.0, metadata={
        "help": "passes over the cache (max_steps > 0 overrides it)"})
    logging_steps: float = field(default=10, metadata={
        "help": "log the loss and its components every N optimizer steps (N < 1: a share of the run)"})
    report_to: None | str | list[str] = field(default="none", metadata={
        "help": "reporting integrations: none, all, or a comma-separated list (tensorboard, wandb, ...)"})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "must stay False: the batch carries the teacher's targets beside the input ids"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the next-token cross-entropy"})
    beta: float = field(default=0.5, metadata={"help": "weight of the T^2-scaled KL to the teacher"})
    gamma: float = field(default=0.0, metadata={
        "help": "weight of the hidden-state loss (no measurable gain in "
                "benchmarks/results/recovery_cpu.md)"})
    kd_temperature: float = field(default=1.0, metadata={
        "help": "KL temperature T, not a sampling temperature (T = 2 was no better than 1 in the "
                "recovery experiment)"})
    tail_approximation: str | None = field(default=None, metadata={
        "choices": ("uniform",),
        "help": "a top-k cache serves exactly the temperatures it was built with (cache-build "
                "--temperatures); 'uniform' accepts any other T with the tail mass spread evenly "
                "over the untaken ids (an approximation, see README); unset = refuse such a T"})
    kl_direction: str = field(default="forward", metadata={
        "choices": KL_DIRECTIONS,
        "help": "KL(teacher || student) (forward), KL(student || teacher) (reverse) or Jensen-Shannon"})
    hidden_loss: str = field(default="cosine", metadata={
        "choices": HIDDEN_KINDS,
        "help": "nmse: the error over the teacher's energy; cnmse: the same per channel, averaged, "
                "so massive-activation channels do not dominate"})
    layer_map: str = field(default="uniform", metadata={
        "help": "uniform | last | original | explicit JSON {student: teacher} or a .json file"})
    hidden_warmup_steps: int = field(default=0, metadata={
        "help": "optimizer steps at the start that train the hidden-state loss alone (no CE, no KL), "
                "before the full loss; needs gamma > 0 and aligned layers"})
    align_layers: str = field(default="cached", metadata={
        "help": "which mapped student blocks get a hidden loss: 'cached' (those whose teacher layer "
                "is in the cache), 'all' (every block; the cache must hold all), or a list 4,8,12"})
    projector_init: str = field(default="auto", metadata={
        "choices": ("auto", *PROJECTOR_INITS),
        "help": "auto = channels for a student whose config records the teacher channels it kept "
                "(unidistill prune, width pruning), else xavier"})
    projector_learning_rate: float | None = field(default=None, metadata={
        "help": "learning rate of the projectors (default: learning_rate)"})
    force_projectors: bool = field(default=False, metadata={
        "help": "learnable projectors even when student and teacher widths match"})
    kd_top_k: int | None = field(default=None, metadata={
        "help": "use the k most likely cached ids (<= the cache's k; default: all of them)"})
    logits_chunk_size: int = field(default=64, metadata={
        "help": "positions per chunk of fp32 log-probs (memory: batch x chunk x vocabulary x 4 bytes)"})
    cache_local_dir: str | None = field(default=None, metadata={
        "help": "a remote cache (s3://...) only: local folder for a read-through copy; each shard "
                "file is copied whole on its first read and read from there after, and the next "
                "shards are copied ahead in the background (unset: every read goes to the store)"})

    def __post_init__(self):
        if self.fsdp and (self.use_cpu or not _has_accelerator()):
            # accelerate turns FSDP on only for GPU launches; on the CPU the Trainer would run
            # plain DDP (or fail with one process) while the user asked for sharding
            raise ConfigError(
                f"fsdp={self.fsdp!r} asked on a run without GPUs (use_cpu={self.use_cpu}); FSDP "
                "runs only on GPU launches (accelerate launch --config_file examples/fsdp.yaml). "
                "On CPUs use data parallel instead: torchrun --nproc_per_node N -m unidistill.cli "
                "distill-from-cache ...")
        self._refuse_not_honoured()
        if not self.use_cpu and _distributed_without_accelerator():
            # `torchrun` / `accelerate launch --multi_gpu` on a machine without GPUs (or where
            # torch does not see them): training N processes on the CPU may be what was meant,
            # or a broken GPU set-up; it is never chosen silently. (With use_cpu, accelerate
            # makes the gloo process group a CPU run needs.)
            from unidistill.distributed import world_size_from_env

            raise ConfigError(
                f"{world_size_from_env()} processes were launched (WORLD_SIZE), but torch sees no "
                "GPU or other accelerator, so they would train on the CPU. Pass --use-cpu "
                "(use_cpu=True) to train on the CPU over gloo, or check the GPUs "
                "(python -c 'import torch; print(torch.cuda.is_available())') and the CUDA build "
                "of torch")
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

    def _refuse_not_honoured(self) -> None:
        for f in fields(self):
            if f.name not in NOT_HONOURED:
                continue
            default = f.default_factory() if f.default is MISSING else f.default
            if getattr(self, f.name) != default:
                raise ConfigError(
                    f"{f.name}={getattr(self, f.name)!r} cannot be honoured: {NOT_HONOURED[f.name]}; "
                    f"leave it at its default ({default!r})")

"""``distill-from-cache``: train a student from a teacher cache."""

from __future__ import annotations

import click

from unidistill.cli.common import config_option, friendly_errors
from unidistill.cli.training_options import (
    TrainingCommand,
    distillation_arguments,
    help_all_option,
    training_options,
)


@click.command("distill-from-cache", cls=TrainingCommand)
@config_option
@click.option("--cache", required=True, multiple=True, type=click.Path(),
              help="Teacher cache built by cache-build. Repeatable: the run trains on the caches "
                   "concatenated in the order given (they must share the teacher, tokenizer, logits "
                   "mode and k, temperatures, seq_len and the hidden layers used); a --config file "
                   "takes one path or a list.")
@click.option("--student", required=True, help="Student model folder (same tokenizer as the teacher).")
@training_options
@click.option("--resume-from-checkpoint", default=None,
              help="A checkpoint folder, or 'last' for the newest in --out.")
@help_all_option
@click.pass_context
@friendly_errors
def distill_from_cache_cmd(ctx, cache, student, resume_from_checkpoint, **_training):
    """Train a student from a teacher cache: alpha*CE + beta*T^2*KL + gamma*hidden.

    Every option but --cache, --student and --resume-from-checkpoint is a field of
    DistillationArguments (a transformers TrainingArguments), with the same default wherever it
    is set: here, in a --config file or in an ablate variants file.

    \b
    Data parallel (DDP; gloo on CPU), per-device batch x N per step:
      torchrun --nproc_per_node N -m unidistill.cli distill-from-cache ...
      accelerate launch --multi_gpu --num_processes N -m unidistill.cli distill-from-cache ...
    """
    from unidistill.trainer.run import distill_from_cache

    args = distillation_arguments(ctx)
    resume = True if resume_from_checkpoint == "last" else resume_from_checkpoint
    distill_from_cache(list(cache), student, args, resume_from_checkpoint=resume)
    if args.should_save:  # once, from the main process of a multi-process run
        click.echo(f"student saved to {args.output_dir} "
                   "(loads with AutoModelForCausalLM.from_pretrained)")

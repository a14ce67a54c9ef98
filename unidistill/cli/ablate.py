"""``ablate``: several distillation runs from one cache, evaluated side by side."""

from __future__ import annotations

import click

from unidistill.cli.common import config_option, friendly_errors, with_options
from unidistill.cli.training_options import field_option

# training options that replace the variants file's common ones for every run
OVERRIDES = ("max_steps", "learning_rate", "per_device_train_batch_size", "seed", "use_cpu")
_OVERRIDE_HELP = " (every run; replaces the variants file's common value)"

ABLATE_OPTIONS = [  # ablate's options, in --help order
    click.option("--cache", required=True, multiple=True, type=click.Path(),
                 help="The teacher cache every run trains on; repeatable: the caches concatenated, "
                      "in the order given. A run in --variants may name its own (cache: a path or "
                      "a list)."),
    click.option("--student", required=True, help="Student model folder (e.g. from unidistill prune)."),
    click.option("--teacher", required=True, help="The teacher, evaluated for the recovery baseline."),
    click.option("--heldout", required=True, multiple=True,
                 help="Held-out text (e.g. builtin:stdlib_docs: its heldout split). Repeatable: every "
                      "model is evaluated on each set; the table gets one block of columns per set."),
    click.option("--heldout-split", default=None, multiple=True,
                 help="Split of --heldout [default: heldout for built-in text and local files]; once "
                      "for every set or once per --heldout, in the same order."),
    click.option("--heldout-cache", default=None, multiple=True, type=click.Path(),
                 help="Teacher cache of held-out text: adds top-1 agreement and KL to the table; none "
                      "or one per --heldout, in the same order."),
    click.option("--heldout-name", "heldout_names", default=None, multiple=True,
                 help="Names of the held-out sets, one per --heldout [default: the source without "
                      "'builtin:', or the file stem]."),
    click.option("--out", required=True,
                 help="Folder for the runs, ablation.json and ablation.md. Rerunning keeps what was "
                      "made with the same settings and redoes the rest; a run trained under other "
                      "settings is moved to OUT/_replaced/, not deleted."),
    click.option("--variants", "variants_file", default=None, type=click.Path(exists=True, dir_okay=False),
                 help="YAML with 'common' (options of every run) and 'variants' (list of {name, ...}); "
                      "their keys are distill-from-cache's options with _ (alpha, kd_temperature, ...)."),
    click.option("--variant", "variant_specs", multiple=True,
                 help="NAME:key=value,... e.g. ce+kl:alpha=0.5,beta=0.5,gamma=0 (repeatable); "
                      "online=full trains against the live teacher instead of the cache."),
    *(field_option(name, default=None, help_suffix=_OVERRIDE_HELP) for name in OVERRIDES),
    click.option("--eval-sequences", type=int, default=32, show_default=True),
    click.option("--device", default="auto", show_default=True, help="Device for the evaluations."),
]


@click.command("ablate")
@config_option
@with_options(ABLATE_OPTIONS)
@friendly_errors
def ablate_cmd(variants_file, variant_specs, eval_sequences, heldout_names, **kwargs):
    """Several distillation runs from one cache, evaluated side by side: perplexity and next-token
    accuracy, each also as a ratio to the teacher, and the share of the log-perplexity gap closed.

    Each run and each evaluation records the settings that produced it; a rerun keeps the pieces
    whose settings match, redoes the others and says so (evaluations are redone in place; a run
    whose training settings changed is trained again and its old folder moved to OUT/_replaced/).
    """
    from unidistill.ablate import ablate, format_table, plan_from_options

    overrides = {name: kwargs.pop(name) for name in OVERRIDES}
    variants, common = plan_from_options(variants_file, variant_specs, overrides)
    table = ablate(variants=variants, common=common, eval_sequences=eval_sequences or None,
                   heldout_names=heldout_names or None,
                   log=lambda message: click.echo(message, err=True), **kwargs)
    click.echo(format_table(table))

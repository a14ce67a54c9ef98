"""Command line: parsing only; the work lives in the packages.

* :mod:`.common`: our errors as refusals, ``--config``, option lists;
* :mod:`.cache`: ``cache-build``, ``cache-info``, ``cache-verify``;
* :mod:`.distill`: ``distill-from-cache``, whose training options :mod:`.training_options`
  generates from :class:`~unidistill.trainer.arguments.DistillationArguments`;
* :mod:`.ablate`: ``ablate``; :mod:`.tools`: ``generate``, ``prune``, ``evaluate``, ``report``.

``distill-from-cache`` and ``ablate`` are loaded when first asked for: their options come from
the training arguments, whose import (transformers, torch) the other commands need not pay.
"""

from __future__ import annotations

import importlib

import click

from unidistill import __version__
from unidistill.cli.cache import cache_build, cache_info_cmd, cache_verify_cmd
from unidistill.cli.tools import evaluate_cmd, generate_cmd, prune_cmd, report_cmd

# command name -> (module, attribute), imported on first use
_LAZY = {"distill-from-cache": ("unidistill.cli.distill", "distill_from_cache_cmd"),
         "ablate": ("unidistill.cli.ablate", "ablate_cmd")}


class _Group(click.Group):
    """A group whose commands in ``_LAZY`` are imported when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *_LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str):
        if cmd_name not in self.commands and cmd_name in _LAZY:
            module, attribute = _LAZY[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="unidistill")
def main():
    """Offline two-phase knowledge distillation: cache a teacher once, distill students from it."""


for _command in (cache_build, cache_info_cmd, cache_verify_cmd, generate_cmd, prune_cmd,
                 evaluate_cmd, report_cmd):
    main.add_command(_command)


def __getattr__(name: str):
    """``from unidistill.cli import distill_from_cache_cmd`` (and ``ablate_cmd``) still work."""
    for module, attribute in _LAZY.values():
        if name == attribute:
            return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

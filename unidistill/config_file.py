"""``--config run.yaml``: a file of option values; flags on the command line override it."""

from __future__ import annotations

from pathlib import Path

import click
import yaml


def load_config_option(ctx: click.Context, _param, value):
    """Eager click callback: the file's keys become the command's defaults.

    Keys are option names with dashes or underscores (``learning_rate`` or ``learning-rate``).
    Unknown keys are an error that lists the valid ones.
    """
    if not value:
        return value
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"config file {path} does not exist", ctx=ctx, param=_param)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of option: value, got "
                                 f"{type(data).__name__}", ctx=ctx, param=_param)
    known = {p.name for p in ctx.command.params if p.name != "config"}
    normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise click.BadParameter(f"unknown keys in {path}: {unknown}; valid keys: {sorted(known)}",
                                 ctx=ctx, param=_param)
    ctx.default_map = {**(ctx.default_map or {}), **normalised}
    return value

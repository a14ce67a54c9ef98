"""``--config run.yaml``: a file of option values; flags on the command line override it."""

from __future__ import annotations

import difflib
from pathlib import Path

import click
import yaml


def config_keys(command: click.Command) -> dict[str, str]:
    """Every key a config file may use -> the parameter it sets: the parameter's name and each of
    its long option names, with - or _ (``kd_temperature``, ``temperature``, ``kd-temperature``
    all set ``--temperature``)."""
    keys = {}
    for param in command.params:
        if not isinstance(param, click.Option) or not param.expose_value:
            continue  # --config, --help, --help-all, --version
        for name in (param.name, *(o for o in param.opts if o.startswith("--"))):
            keys[name.lstrip("-").replace("-", "_")] = param.name
    return keys


def load_config_option(ctx: click.Context, _param, value):
    """Eager click callback: the file's keys become the command's defaults.

    Keys are option names with dashes or underscores (``learning_rate`` or ``learning-rate``,
    ``out`` or ``output_dir``). A repeatable option (``cache``) takes a list, or one value.
    Unknown keys, and two keys for one option, are errors that say
    which keys are valid.
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
    keys = config_keys(ctx.command)
    given = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(given) - set(keys))
    if unknown:
        close = {k: difflib.get_close_matches(k, list(keys), n=1) for k in unknown}
        hints = "; ".join(f"{k}: did you mean {m[0]}?" for k, m in close.items() if m)
        has_help_all = any(p.name == "help_all" for p in ctx.command.params)
        everything = ("the options that `--help-all` lists" if has_help_all
                      else str(sorted(set(keys.values()))))
        raise click.BadParameter(f"unknown keys in {path}: {unknown}" + (f" ({hints})" if hints else "")
                                 + f"; valid keys: {everything}, with - or _", ctx=ctx, param=_param)
    by_param: dict[str, list[str]] = {}
    for key in given:
        by_param.setdefault(keys[key], []).append(key)
    twice = {p: ks for p, ks in by_param.items() if len(ks) > 1}
    if twice:
        raise click.BadParameter(f"{path} sets one option under several keys: {twice}; keep one key "
                                 "for each", ctx=ctx, param=_param)
    repeatable = {p.name for p in ctx.command.params if isinstance(p, click.Option) and p.multiple}
    values = {keys[k]: [v] if keys[k] in repeatable and isinstance(v, str) else v
              for k, v in given.items()}  # one value of a repeatable option: a list of one
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value

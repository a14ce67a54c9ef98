"""What the commands share: our errors as refusals (exit code 2), ``--config``, option lists."""

from __future__ import annotations

import functools

import click

from unidistill.errors import UnidistillError


class RefusedError(click.ClickException):
    exit_code = 2


def friendly_errors(fn):
    """Our own errors become a one-paragraph message and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UnidistillError as e:
            raise RefusedError(str(e)) from e

    return wrapper


def config_option(fn):
    """``--config FILE``: a YAML/JSON file of option values, overridden by the flags given."""
    from unidistill.config_file import load_config_option

    return click.option("--config", type=click.Path(), is_eager=True, expose_value=False,
                        callback=load_config_option,
                        help="YAML/JSON file of option values (flags override it).")(fn)


def with_options(options):
    """Apply a list of ``click.option(...)`` decorators, in the order listed (first = first in
    ``--help``), so that a command with many options keeps them beside it, not stacked on it."""

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate

"""The training options of ``distill-from-cache``, generated from ``DistillationArguments``.

One option per field of :class:`~unidistill.trainer.arguments.DistillationArguments` (the
distillation knobs and every ``TrainingArguments`` field): named as the field with dashes
(``learning_rate`` -> ``--learning-rate``; a few fields also keep the short name the command
always had, :data:`ALIASES`), its help from ``metadata["help"]``, its type from the annotation
(a choice for enums, literals and ``metadata["choices"]``; ``--x/--no-x`` for booleans; JSON for
dicts; a comma-separated list for lists), its shown default from the field. Only the options
given (on the command line or in ``--config``) are passed to the dataclass, so every default is
the dataclass's own: the command, ``--config`` files and ``ablate`` get the same arguments.

``--help`` lists the distillation options and the common Trainer ones; ``--help-all`` adds every
other Trainer option. The fields a distillation run cannot honour
(:data:`~unidistill.trainer.arguments.NOT_HONOURED`) are accepted by the parser and refused by
the dataclass with the reason; a field no command-line value can express is refused here.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
import types
import typing
from enum import Enum
from inspect import isclass

import click
from click.core import ParameterSource
from transformers import TrainingArguments

from unidistill.trainer.arguments import NOT_HONOURED, DistillationArguments

# fields that keep the option name the command had before the options were generated
ALIASES = {"output_dir": "--out", "kd_temperature": "--temperature", "kd_top_k": "--top-k"}
# the Trainer options --help shows (the rest: --help-all), in this order
COMMON = ("max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_steps",
          "per_device_train_batch_size", "gradient_accumulation_steps", "optim", "weight_decay",
          "max_grad_norm", "seed", "data_seed", "bf16", "activation_checkpointing", "torch_compile",
          "use_cpu", "dataloader_num_workers", "logging_steps", "save_steps", "save_total_limit",
          "report_to")
# fields the command takes as options of its own (not passed to the dataclass)
COMMAND_OWN = ("resume_from_checkpoint",)
FIELDS = {f.name: f for f in dataclasses.fields(DistillationArguments) if f.init}
DISTILLATION = tuple(name for name in FIELDS
                     if name not in {f.name for f in dataclasses.fields(TrainingArguments)})
OTHER = tuple(name for name in FIELDS
              if name not in (*DISTILLATION, *COMMON, *COMMAND_OWN, "output_dir"))
SECTIONS = {"output_dir": "Options", **dict.fromkeys(DISTILLATION, "Distillation options"),
            **dict.fromkeys(COMMON, "Common Trainer options"),
            **dict.fromkeys(OTHER, "Other Trainer options (TrainingArguments)")}
_HINTS = typing.get_type_hints(DistillationArguments)


class _Json(click.ParamType):
    """A dict field: a JSON object (a dict as it is from ``--config``); where the field also takes
    text, anything not starting with ``{`` is kept as text (a file path, e.g. ``--fsdp-config``)."""

    name = "json"

    def __init__(self, text_too: bool):
        self.text_too = text_too

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        if isinstance(value, str) and self.text_too and not value.lstrip().startswith("{"):
            return value
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as e:
            self.fail(f"{value!r} is not JSON ({e.msg} at character {e.pos}); give a JSON object "
                      "such as '{\"key\": 1}'" + (" or a file path" if self.text_too else ""), param, ctx)
        if not isinstance(parsed, dict):
            self.fail(f"{value!r} is not a JSON object; give one such as '{{\"key\": 1}}'", param, ctx)
        return parsed


class _List(click.ParamType):
    """A list field: comma-separated values (a list as it is from ``--config``); where the field
    also takes text, one value stays text (``--report-to none``)."""

    name = "list"

    def __init__(self, text_too: bool):
        self.text_too = text_too

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        if not isinstance(value, str):
            self.fail(f"{value!r} ({type(value).__name__}) is not a list; give comma-separated "
                      "values such as a,b", param, ctx)
        items = [v.strip() for v in value.split(",") if v.strip()]
        return value if self.text_too and len(items) <= 1 else items


class _TextOrBool(click.ParamType):
    """Text, or a boolean as it is from ``--config`` (fields typed ``str | bool``)."""

    name = "text"

    def convert(self, value, param, ctx):
        return value if isinstance(value, bool) else str(value)


def _members(annotation) -> list:
    """The types a field takes: None left out, ``Literal[False]`` as bool."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    if annotation is type(None):
        return []
    if typing.get_origin(annotation) is typing.Literal and typing.get_args(annotation) == (False,):
        return [bool]
    return [annotation]


def click_type(name: str):
    """The click type of a field's option: a ``click.ParamType``, "flag" for a boolean, or None
    for a field no command-line value can express."""
    field, members = FIELDS[name], _members(_HINTS[name])
    origins = {typing.get_origin(m) or m for m in members}
    enums = [m for m in members if isclass(m) and issubclass(m, Enum)]
    if field.metadata.get("choices"):
        return click.Choice([str(c) for c in field.metadata["choices"]])
    if typing.get_origin(members[0]) is typing.Literal:
        return click.Choice([str(c) for c in typing.get_args(members[0])])
    if enums:
        return click.Choice([e.value for e in enums[0]])
    if dict in origins:
        return _Json(text_too=str in origins)
    if list in origins:
        return _List(text_too=str in origins)
    if origins == {bool}:
        return "flag"
    if str in origins:
        return _TextOrBool() if bool in origins else click.STRING
    return {frozenset({int}): click.INT, frozenset({float}): click.FLOAT}.get(frozenset(origins))


def _default(name: str):
    field = FIELDS[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def _cannot_express(ctx, param, value):
    if value is not None and ctx.get_parameter_source(param.name) is not ParameterSource.DEFAULT:
        raise click.BadParameter(
            f"{param.name} takes a {_members(_HINTS[param.name])[0].__name__} object, which no "
            "command-line value can express; set it in accelerate's config file (accelerate "
            "launch --config_file ...) or build DistillationArguments in Python", ctx=ctx, param=param)
    return value


def field_option(name: str, *, default=dataclasses.MISSING, required: bool = False, help_suffix: str = ""):
    """The click option of one field; ``default`` replaces the field's (e.g. None for an
    override that is applied only when given)."""
    kind = click_type(name)
    flags = [f"--{name.replace('_', '-')}"]
    if name in ALIASES:
        flags.insert(0, ALIASES[name])
    shown = _default(name) if default is dataclasses.MISSING else default
    shown = shown.value if isinstance(shown, Enum) else shown
    help_text = FIELDS[name].metadata.get("help", "") + help_suffix
    unset = shown is None or shown is False or (isinstance(shown, (str, list)) and not shown)
    attrs = dict(default=shown, show_default=not unset, required=required, hidden=name in NOT_HONOURED)
    if kind == "flag":  # no field with an alias is a boolean
        return click.option(f"{flags[0]}/--no-{flags[0][2:]}", name, help=help_text, **attrs)
    if kind is None:
        return click.option(*flags, name, type=click.STRING, callback=_cannot_express, help=help_text,
                            **attrs)
    if isinstance(kind, click.Choice) and len(kind.choices) > 6:  # too long for a metavar
        attrs["metavar"] = "NAME"
        listed = ", ".join(map(str, kind.choices))
        help_text += f" (one of: {listed})" if len(kind.choices) <= 16 else " (a wrong name lists them all)"
    return click.option(*flags, name, type=kind, help=help_text, **attrs)


def _print_all_help(ctx: click.Context, _param, value):
    if value and not ctx.resilient_parsing:
        ctx.meta[_HELP_ALL] = True
        click.echo(ctx.get_help(), color=ctx.color)
        ctx.exit()


_HELP_ALL = "unidistill.help_all"


def training_options(fn):
    """Every field's option: ``--out`` (required) first, then the sections in their order."""
    options = [field_option(name, required=name == "output_dir")
               for name in ("output_dir", *DISTILLATION, *COMMON, *OTHER)]
    for option in reversed(options):
        fn = option(fn)
    return fn


help_all_option = click.option(
    "--help-all", is_flag=True, expose_value=False, is_eager=True, callback=_print_all_help,
    help="Show every option, the other Trainer options included, and exit.")


def _paragraph(formatter: click.HelpFormatter, text: str) -> None:
    """A paragraph wrapped between words only (option names are not cut at their dashes)."""
    width = max(formatter.width - formatter.current_indent, 20)
    lines = textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)
    formatter.write("".join(" " * formatter.current_indent + line + "\n" for line in lines))


class TrainingCommand(click.Command):
    """A command whose help lists its options by section: its own, the distillation options,
    the common Trainer ones and, with ``--help-all``, every other Trainer option."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        show_all = ctx.meta.get(_HELP_ALL, False)
        rows: dict[str, list] = {}
        left_out = 0
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            section = SECTIONS.get(param.name, "Options")
            if record is not None and section.startswith("Other") and not show_all:
                left_out += 1
            elif record is not None:
                rows.setdefault(section, []).append(record)
        for section in dict.fromkeys(("Options", *SECTIONS.values())):
            if rows.get(section):
                with formatter.section(section):
                    formatter.write_dl(rows[section])
        formatter.write_paragraph()
        if left_out:
            _paragraph(formatter, f"{left_out} more Trainer options (every TrainingArguments field, e.g. "
                                  "--adam-beta1, --fsdp, --dataloader-prefetch-factor, "
                                  "--torch-compile-mode) are accepted: --help-all lists them.")
        else:
            refused = ", ".join(f"--{n.replace('_', '-')}" for n in NOT_HONOURED if n not in COMMAND_OWN)
            _paragraph(formatter, f"Refused, since a distillation run cannot honour them: {refused}.")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            e.message = (f"No such option: {e.option_name} (the options of this command: "
                         f"{ctx.command_path} --help-all).")
            raise


def distillation_arguments(ctx: click.Context) -> DistillationArguments:
    """The arguments of the options given on the command line or in ``--config``; every other
    field keeps the dataclass's default."""
    given = {name: value for name, value in ctx.params.items()
             if name in FIELDS and name not in COMMAND_OWN
             and ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)}
    return DistillationArguments(**given)

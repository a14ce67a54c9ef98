"""The runs of an ablation: ``--variant`` and ``--variants`` files, their checks, the common
options, and the ``DistillationArguments`` each run trains with."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from unidistill.errors import ConfigError

FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
SHOWN = ("alpha", "beta", "gamma", "kd_temperature", "kl_direction", "layer_map", "hidden_loss",
         "hidden_warmup_steps", "kd_top_k", "learning_rate", "lr_scheduler_type")

ONLINE = "online"
CACHE = "cache"  # a run's own caches (one path or a list), instead of ablate's --cache


def online_top_k(value, name: str) -> int | None:
    """The ``online`` setting of a run: ``full`` -> None (all ids), a positive int -> top-K."""
    if isinstance(value, str) and value.lower() == "full":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(f"run {name!r} has online={value!r}; expected 'full' (the live teacher's "
                      f"whole distribution) or a positive int K (its top-K)")


def cache_paths(value, where: str) -> list[str]:
    """One cache path or a list of them (trained on concatenated, in that order) as a list."""
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"{where} has cache={value!r}; expected a cache path or a non-empty list "
                          "of them (the run trains on the caches concatenated, in that order)")
    return list(paths)


def argument_defaults() -> dict:
    """Every distill-from-cache argument name with its default."""
    from unidistill.trainer.arguments import DistillationArguments

    return {f.name: f.default_factory() if f.default is dataclasses.MISSING
            and f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(DistillationArguments)}


def parse_variant(text: str) -> dict:
    """``'name:alpha=1,beta=0,layer_map=last'`` -> {"name": ..., "alpha": 1.0, ...}."""
    import yaml

    name, sep, rest = text.partition(":")
    if not sep:
        raise ConfigError(f"--variant {text!r} has no name; write it as NAME:key=value,key=value, "
                          "e.g. ce+kl:alpha=0.5,beta=0.5,gamma=0")
    variant = {"name": name.strip()}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--variant {text!r}: {item!r} is not key=value")
        variant[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return variant


def read_variants_file(path) -> dict:
    """A ``--variants`` YAML file: ``common`` (options of every run) and a ``variants`` list."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("variants", []), list):
        raise ConfigError(f"{path} must hold a mapping with a 'variants' list")
    return spec


# what every ablation run sets unless its common options say otherwise
ABLATION_COMMON = {"report_to": [], "logging_steps": 1, "save_strategy": "no"}


def ablation_plan(spec: dict, variant_specs=(), **overrides) -> tuple[list[dict], dict]:
    """The runs and their common options: ``spec`` (a variants file's content, or {}), then the
    ``NAME:key=value,...`` ``variant_specs`` after its variants; ``overrides`` that are not None
    (command-line options such as ``max_steps``) replace the file's common options."""
    common = {**ABLATION_COMMON, **(spec.get("common") or {})}
    common.update({key: value for key, value in overrides.items() if value is not None})
    variants = list(spec.get("variants") or []) + [parse_variant(v) for v in variant_specs]
    return variants, common


def plan_from_options(variants_file=None, variant_specs=(), overrides: dict | None = None
                      ) -> tuple[list[dict], dict]:
    """:func:`ablation_plan` from ``ablate``'s options: the ``--variants`` file (or None), the
    ``--variant`` specs, and the options that override the file's common ones (None = not given)."""
    spec = read_variants_file(variants_file) if variants_file else {}
    return ablation_plan(spec, variant_specs, **(overrides or {}))


def run_arguments(output_dir, settings: dict, common: dict):
    """The ``DistillationArguments`` one run trains with: ``common``, then the run's own settings
    (its ``online`` and ``cache`` settings are not arguments), in ``output_dir``."""
    from unidistill.trainer.arguments import DistillationArguments

    train = {k: v for k, v in settings.items() if k not in ("name", ONLINE, CACHE)}
    return DistillationArguments(output_dir=str(output_dir), **{**common, **train})


def check_variants(common: dict, variants: list[dict]) -> None:
    """Names unique and usable as folders; every key a distillation argument."""
    if not variants:
        raise ConfigError("no runs to compare: give --variant NAME:key=value,... (repeatable) or a "
                          "--variants file with a 'variants' list")
    known = set(argument_defaults()) - {"output_dir"}  # a run's folder is OUT/<name>
    names = []
    for v in variants:
        name = str(v.get("name", ""))
        if not FOLDER_NAME.match(name):
            raise ConfigError(f"run name {name!r} must start with a letter or digit and hold only "
                              "letters, digits and _ . + - (it becomes a folder name)")
        names.append(name)
        unknown = sorted(set(v) - known - {"name", ONLINE, CACHE})
        if ONLINE in v:
            online_top_k(v[ONLINE], name)
        if CACHE in v:
            cache_paths(v[CACHE], f"run {name!r}")
        if unknown:
            raise ConfigError(f"run {name!r} sets unknown options {unknown}; use distill-from-cache "
                              "argument names such as alpha, beta, gamma, kd_temperature, layer_map, "
                              "hidden_loss, kd_top_k, learning_rate, max_steps")
    unknown = sorted(set(common) - known)
    if unknown:
        raise ConfigError(f"common options {unknown} are not distill-from-cache arguments"
                          + (" (ablate puts each run in OUT/<name>: leave output_dir out)"
                             if "output_dir" in unknown else ""))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"run names {duplicates} appear more than once; names must be unique")

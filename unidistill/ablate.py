"""``unidistill ablate``: several distillation runs from ONE cache, each evaluated, in one table.

The runs differ only in what the user lists (loss weights, layer map, hidden loss, temperature,
k, ...); everything else comes from ``common``. The teacher and the untrained student are
evaluated on the same held-out text, so each run's **recovery** can be read off:

    recovery % = 100 * (nll_student - nll_run) / (nll_student - nll_teacher)

the share of the teacher-student gap in log-perplexity that the run closes. Finished runs are
kept: rerunning the same command skips every run whose ``eval.json`` exists, and a run stopped
mid-way continues from its last checkpoint. ``ablation.json`` and ``ablation.md`` are rewritten after every run.

A run may also be the **online baseline**: ``online: full`` (or ``online: K``) loads the teacher
and trains on the same cached token ids with targets from the live teacher (all V ids, or its
top-K), which measures what the cache's top-k + tail costs on the same token budget.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from unidistill.errors import ConfigError
from unidistill.storage.files import atomic_write_bytes, atomic_write_json
from unidistill.storage.writer import read_manifest

ABLATION_JSON, ABLATION_MD = "ablation.json", "ablation.md"
EVAL_FILE = "eval.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
SHOWN = ("alpha", "beta", "gamma", "kd_temperature", "layer_map", "hidden_loss", "kd_top_k")


ONLINE = "online"


def online_top_k(value, name: str) -> int | None:
    """The ``online`` setting of a run: ``full`` -> None (all ids), a positive int -> top-K."""
    if isinstance(value, str) and value.lower() == "full":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(f"run {name!r} has online={value!r}; expected 'full' (the live teacher's "
                      f"whole distribution) or a positive int K (its top-K)")


def _argument_defaults() -> dict:
    """Every distill-from-cache argument name with its default."""
    from unidistill.trainer.arguments import DistillationArguments

    return {f.name: f.default for f in dataclasses.fields(DistillationArguments)}


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


def check_variants(common: dict, variants: list[dict]) -> None:
    """Names unique and usable as folders; every key a distillation argument."""
    if not variants:
        raise ConfigError("no runs to compare: give --variant NAME:key=value,... (repeatable) or a "
                          "--variants file with a 'variants' list")
    known = set(_argument_defaults())
    names = []
    for v in variants:
        name = str(v.get("name", ""))
        if not _NAME.match(name):
            raise ConfigError(f"run name {name!r} must start with a letter or digit and hold only "
                              "letters, digits and _ . + - (it becomes a folder name)")
        names.append(name)
        unknown = sorted(set(v) - known - {"name", ONLINE})
        if ONLINE in v:
            online_top_k(v[ONLINE], name)
        if unknown:
            raise ConfigError(f"run {name!r} sets unknown options {unknown}; use distill-from-cache "
                              "argument names such as alpha, beta, gamma, kd_temperature, layer_map, "
                              "hidden_loss, kd_top_k, learning_rate, max_steps")
    unknown = sorted(set(common) - known)
    if unknown:
        raise ConfigError(f"common options {unknown} are not distill-from-cache arguments")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"run names {duplicates} appear more than once; names must be unique")


def recovery(nll_run: float | None, nll_student: float | None, nll_teacher: float | None) -> float | None:
    if None in (nll_run, nll_student, nll_teacher) or nll_student == nll_teacher:
        return None
    return 100.0 * (nll_student - nll_run) / (nll_student - nll_teacher)


def _evaluate_to(folder: Path, model: str, heldout: str, heldout_cache, eval_kwargs) -> dict:
    from unidistill.evaluate import evaluate

    path = folder / EVAL_FILE
    if path.is_file():
        return json.loads(path.read_text())
    result = json.loads(evaluate(model, data=heldout, cache=heldout_cache, **eval_kwargs).to_json())
    atomic_write_json(path, result)
    return result


def _row(name: str, settings: dict, ev: dict, ref: dict, tokens_per_s) -> dict:
    return {"name": name, "settings": settings, "perplexity": ev.get("perplexity"),
            "nll": ev.get("nll"), "recovery_pct": recovery(ev.get("nll"), ref["student"], ref["teacher"]),
            "top1_agreement": ev.get("top1_agreement"), "kl_to_teacher": ev.get("kl_to_teacher"),
            "tokens_per_s": tokens_per_s}


def format_table(table: dict) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [f"# Ablation from cache `{table['cache']}`", "",
             f"Teacher `{table['teacher']}`, student `{table['student']}`, held-out `{table['heldout']}`.",
             "Recovery = share of the student-teacher gap in log-perplexity closed by the run.", "",
             "| run | settings | perplexity | recovery % | top-1 agreement | KL to teacher | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        lines.append(f"| {r['name']} | {settings} | {num(r['perplexity'], '.3f')} | "
                     f"{num(_no_negative_zero(r['recovery_pct']), '.1f')} | {num(r['top1_agreement'], '.3f')} | "
                     f"{num(None if r['kl_to_teacher'] is None else max(r['kl_to_teacher'], 0.0), '.4f')} | {num(r['tokens_per_s'], '.0f')} |")
    return "\n".join(lines) + "\n"


def _no_negative_zero(x):
    return None if x is None else (0.0 if abs(x) < 0.05 else x)


def ablate(cache, student: str, teacher: str, heldout: str, out, *, variants: list[dict],
           common: dict | None = None, heldout_cache=None, eval_sequences: int | None = 32,
           eval_batch_size: int = 4, device: str = "auto", progress: bool = True) -> dict:
    """Run every variant, evaluate it, and write the table; returns the table as a dict."""
    from unidistill.trainer.arguments import DistillationArguments
    from unidistill.trainer.run import distill_from_cache

    common = dict(common or {})
    check_variants(common, variants)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eval_kwargs = dict(max_sequences=eval_sequences, batch_size=eval_batch_size, device=device,
                       progress=progress, **_heldout_apart(cache, heldout, heldout_cache))
    ref_teacher = _evaluate_to(_mkdir(out / "_teacher"), teacher, heldout, heldout_cache, eval_kwargs)
    ref_student = _evaluate_to(_mkdir(out / "_student"), student, heldout, heldout_cache, eval_kwargs)
    ref = {"teacher": ref_teacher.get("nll"), "student": ref_student.get("nll")}
    fingerprint = (read_manifest(cache) or {}).get("fingerprint")  # each run records it too
    table = {"cache": str(cache), "cache_fingerprint": fingerprint, "teacher": teacher, "student": student, "heldout": heldout,
             "heldout_cache": None if heldout_cache is None else str(heldout_cache), "common": common,
             "rows": [_row("teacher", {}, ref_teacher, ref, None),
                      _row("student (before)", {}, ref_student, ref, None)]}
    defaults = _argument_defaults()
    for variant in variants:
        name = variant["name"]
        run_dir = out / name
        settings = {k: v for k, v in variant.items() if k != "name"}
        stats_path = run_dir / "train_speed.json"
        if not (run_dir / EVAL_FILE).is_file():
            train = {k: v for k, v in settings.items() if k != ONLINE}
            args = DistillationArguments(output_dir=str(run_dir), **{**common, **train})
            resume = any(run_dir.glob("checkpoint-*"))  # a run stopped mid-way continues
            online = {}
            if ONLINE in settings:
                online = dict(teacher_model=_load_teacher(teacher),
                              online_top_k=online_top_k(settings[ONLINE], name))
            trainer = distill_from_cache(cache, student, args, resume_from_checkpoint=resume or None,
                                         **online)
            atomic_write_json(stats_path, {"tokens_per_s": _tokens_per_second(trainer),
                                           "train_seconds": _train_seconds(trainer)})
        ev = _evaluate_to(run_dir, str(run_dir), heldout, heldout_cache, eval_kwargs)
        speed = json.loads(stats_path.read_text())["tokens_per_s"] if stats_path.is_file() else None
        shown = {k: settings.get(k, common.get(k, defaults[k])) for k in SHOWN}
        if ONLINE in settings:
            shown[ONLINE] = settings[ONLINE]
        table["rows"].append(_row(name, shown, ev, ref, speed))
        atomic_write_json(out / ABLATION_JSON, table)
        atomic_write_bytes(out / ABLATION_MD, format_table(table).encode())
    return table


def _heldout_apart(cache, heldout: str, heldout_cache) -> dict:
    """Refuse held-out text or a held-out cache that shares documents with the training cache;
    returns the evaluation's held-out share (the training cache's, for the same local source)."""
    from unidistill.cache_builder.data import default_eval_split, source_kind
    from unidistill.cache_builder.splits import check_caches_apart

    train = ((read_manifest(cache) or {}).get("settings") or {}).get("data") or {}
    share = train.get("heldout_share") if heldout == train.get("source") else None
    if heldout_cache is not None:
        check_caches_apart(train, ((read_manifest(heldout_cache) or {}).get("settings") or {}).get("data") or {})
    check_caches_apart(train, {"source": heldout, "config": train.get("config"),
                               "split": default_eval_split(heldout), "heldout_share": share})
    return {"heldout_share": share} if source_kind(heldout) == "local" else {}


def _load_teacher(teacher: str):
    from unidistill.cache_builder.teacher import load_model, resolve_model_source

    return load_model(resolve_model_source(teacher))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _train_seconds(trainer) -> float | None:
    final = [h for h in trainer.state.log_history if "train_runtime" in h]
    return final[-1]["train_runtime"] if final else None


def _tokens_per_second(trainer) -> float | None:
    """Training tokens per second of the run (all steps, data loading included)."""
    final = [h for h in trainer.state.log_history if "train_runtime" in h]
    if not final:
        return None
    args = trainer.args
    seq_len = trainer.train_dataset.reader.layout.seq_len
    tokens = (trainer.state.global_step * args.per_device_train_batch_size
              * args.gradient_accumulation_steps * args.world_size * seq_len)
    return tokens / final[-1]["train_runtime"]

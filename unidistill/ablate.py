"""``unidistill ablate``: several distillation runs from ONE cache, each evaluated, in one table.

The runs differ only in what the user lists (loss weights, layer map, hidden loss, temperature,
k, ...); everything else comes from ``common``. The teacher and the untrained student are
evaluated on the same held-out text, and each run is put next to them three ways:

- **perplexity ÷ teacher** (1 = the teacher's perplexity);
- **next-token accuracy** (share of positions whose argmax is the actual next token) and
  **accuracy ÷ teacher**: the analogue of "% of the teacher's benchmark score";
- **log-perplexity gap closed %** (``recovery_pct``):

      100 * (nll_student - nll_run) / (nll_student - nll_teacher)

  the share of the untrained student's gap to the teacher in log-perplexity that the run closes.
  It flatters a student that starts worse than a uniform guess over the vocabulary (log-perplexity
  above ln V, which the table reports): most of such a gap is closed by learning token
  frequencies. Read it with the two ratios.

**What is kept on a rerun, and when it is redone.** Each piece records what produced it:
``<run>/ablate_run.json`` the run's training settings (every distill argument, defaults filled
in, bookkeeping such as logging and saving left out; ``online``; the training cache's
fingerprint; the student's files), and every ``eval.json`` (``_teacher/``, ``_student/``, each
run's) under ``produced_by`` the evaluation's settings (the model's files, ``--heldout`` and its
split, the held-out file's content, the ``--heldout-cache`` fingerprint, ``--eval-sequences``,
the metrics version). Rerunning the command keeps every piece whose record matches and redoes
the others, saying why in the log:

- an evaluation whose settings changed is simply redone (its model is still there);
- a run whose training settings changed (or that an older version made without a record) is
  trained again from scratch (a distill argument added since the run was recorded counts as
  unchanged while it is at its default, which keeps the old behaviour), and its old folder -- a
  trained model the user may want -- is **moved**, never deleted, to ``_replaced/<run>-<time>/``
  (delete it when it is not wanted);
- a run stopped mid-way with the same settings continues from its last checkpoint; its
  checkpoints are never resumed under other settings.

Files are identified by content (files above 64 MiB by size, modification time and first and
last MiB; see :func:`unidistill.fingerprint.file_digest`); a hub id by its name only (pin a
revision by downloading it). The evaluation's batch size and device are not recorded: they do not
change the numbers beyond rounding. ``ablation.json`` and ``ablation.md`` are rewritten after every run.

**Several held-out sets.** ``heldout`` (with ``heldout_split`` and ``heldout_cache``) may be a
list: every model is then evaluated on each set, e.g. the training domain's held-out split and text
of another kind. Each set has a name (its source without ``builtin:`` or its file stem, or the one
given); the first set's evaluation is ``eval.json``, the others' ``eval.<name>.json``, each with
its own ``produced_by``. Every row of ``ablation.json`` keeps the first set's numbers at its top
level (as with one set) and holds every set's under ``heldout_sets[name]``; the markdown table gets
one block of columns per set. Each set is refused, like a single one, when it shares documents
with the training cache.

A run may also be the **online baseline**: ``online: full`` (or ``online: K``) loads the teacher
and trains on the same cached token ids with targets from the live teacher (all V ids, or its
top-K), which measures what the cache's top-k + tail costs on the same token budget.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable

from unidistill.errors import ConfigError
from unidistill.storage.files import atomic_write_bytes, atomic_write_json
from unidistill.storage.manifest import diff_settings
from unidistill.storage.manifest import read_manifest

ABLATION_JSON, ABLATION_MD = "ablation.json", "ablation.md"
EVAL_FILE = "eval.json"
RUN_SETTINGS_FILE = "ablate_run.json"   # in each run folder: what trained it, and whether it finished
TRAIN_SPEED_FILE = "train_speed.json"   # in each run folder: its training tokens/s and seconds
PRODUCED_BY = "produced_by"             # in each eval.json: what produced the evaluation
REPLACED_DIR = "_replaced"              # run folders whose settings changed are moved here
# Distill arguments that change files and logs but not the trained weights.
BOOKKEEPING = frozenset({
    "output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step",
    "logging_nan_inf_filter", "report_to", "run_name", "save_strategy", "save_steps",
    "save_total_limit", "save_only_model", "save_safetensors", "disable_tqdm",
    "overwrite_output_dir", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
    "hub_private_repo", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "log_level", "log_level_replica",
    "project"})
# Files of a model folder that decide its outputs (top level only: not its checkpoints).
_MODEL_FILE = re.compile(r"^(config\.json|generation_config\.json|projectors\.json|tokenizer[^/]*"
                         r"|special_tokens_map\.json|vocab\.[^/]*|merges\.txt|chat_template\.[^/]*"
                         r"|[^/]*\.(safetensors|gguf|pt|bin))$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
SHOWN = ("alpha", "beta", "gamma", "kd_temperature", "kl_direction", "layer_map", "hidden_loss",
         "hidden_warmup_steps", "kd_top_k", "learning_rate", "lr_scheduler_type")


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
    """Share (%) of the student-teacher gap in log-perplexity (mean NLL) that the run closes."""
    if None in (nll_run, nll_student, nll_teacher) or nll_student == nll_teacher:
        return None
    return 100.0 * (nll_student - nll_run) / (nll_student - nll_teacher)


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference (e.g. a run's perplexity / the teacher's), None where undefined."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """One held-out set: text ``data`` (its ``split``; None = evaluate's default) and optionally
    the teacher's cache of it (adds top-1 agreement and KL to the teacher)."""

    name: str
    data: str
    split: str | None = None
    cache: str | None = None


def heldout_name(data: str) -> str:
    """A short name for held-out text: ``builtin:kjv_bible`` -> ``kjv_bible``, a path -> its stem."""
    text = data.split(":", 1)[1] if data.startswith("builtin:") else Path(data).stem or data
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text) or "heldout"


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [None if v is None else str(v) for v in value]


def heldout_sets(heldout, heldout_split=None, heldout_cache=None, names=None) -> list[HeldOut]:
    """The held-out sets from ``ablate``'s arguments, each a str or a list (in the same order).

    ``heldout_split``: none (evaluate's default), one for every set, or one per set.
    ``heldout_cache``: none, or one per set (a list may hold None for a set without one; a single
    cache with a single set). ``names``: one per set, default :func:`heldout_name`."""
    data = _as_list(heldout)
    if not data:
        raise ConfigError("no held-out text: give --heldout (repeatable)")
    splits, caches = _as_list(heldout_split), _as_list(heldout_cache)
    if len(splits) not in (0, 1, len(data)):
        raise ConfigError(f"{len(splits)} --heldout-split values {splits} for {len(data)} held-out "
                          f"sets {data}; give one for all or one per --heldout, in the same order")
    if len(caches) not in (0, len(data)):
        raise ConfigError(f"{len(caches)} --heldout-cache values for {len(data)} held-out sets "
                          f"{data}: a held-out cache belongs to one text; give one per --heldout, "
                          "in the same order")
    splits = splits * len(data) if len(splits) == 1 else splits or [None] * len(data)
    caches = caches or [None] * len(data)
    names = [heldout_name(d) for d in data] if names is None else [str(n) for n in names]
    if len(names) != len(data):
        raise ConfigError(f"{len(names)} names {names} for {len(data)} held-out sets {data}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"held-out set names {duplicates} appear more than once (from {data}); "
                          "each set needs its own name: evaluate each text once")
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ConfigError(f"held-out set names {bad} must start with a letter or digit and hold "
                          "only letters, digits and _ . + - (they name eval files)")
    return [HeldOut(*fields) for fields in zip(names, data, splits, caches)]


def eval_file(index: int, heldout: HeldOut) -> str:
    """The first held-out set's evaluation is ``eval.json`` (as with one set), the others'
    ``eval.<name>.json``."""
    return EVAL_FILE if index == 0 else f"eval.{heldout.name}.json"


# ---- what produced each piece ------------------------------------------------------------------

def _canonical(obj):
    """A JSON round trip: the form in which settings are recorded and compared."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def model_identity(model: str) -> dict:
    """What identifies a model's outputs: its files' fingerprint where they are local (folder,
    GGUF file, builtin), else its hub id."""
    from unidistill.fingerprint import path_fingerprint
    from unidistill.models.loading import resolve_model_source

    source = resolve_model_source(model)
    folder = Path(source.path)
    if not folder.is_dir():
        return {"hub_id": model}
    if source.gguf_file:
        return {"gguf_file": source.gguf_file, "files": path_fingerprint(folder / source.gguf_file)}
    return {"files": path_fingerprint(folder, include=lambda rel: bool(_MODEL_FILE.match(rel))
                                      and rel != "training_args.bin")}


def data_identity(data: str) -> dict:
    """``--heldout`` as given, plus its content's fingerprint when it is a local file or folder."""
    from unidistill.fingerprint import path_fingerprint

    path = Path(data).expanduser()
    return {"data": data, "files": path_fingerprint(path) if path.exists() else None}


def training_settings(settings: dict, common: dict, cache_fingerprint, student_id: dict,
                      teacher_id: dict | None) -> dict:
    """The canonical record of what trains a run (see the module docstring)."""
    given = {**common, **{k: v for k, v in settings.items() if k != ONLINE}}
    arguments = {k: v for k, v in {**_argument_defaults(), **given}.items() if k not in BOOKKEEPING}
    record = {"arguments": arguments, "cache_fingerprint": cache_fingerprint, "student": student_id}
    if ONLINE in settings:
        record.update(online=settings[ONLINE], teacher=teacher_id)
    return _canonical(record)


def evaluation_settings(model_id: dict, heldout: dict, split: str | None, heldout_cache_fingerprint,
                        eval_sequences: int | None) -> dict:
    """The canonical record of what produces an evaluation (see the module docstring)."""
    from unidistill.evaluate import METRICS_VERSION

    return _canonical({"model": model_id, "heldout": heldout, "split": split,
                       "heldout_cache_fingerprint": heldout_cache_fingerprint,
                       "eval_sequences": eval_sequences, "metrics_version": METRICS_VERSION})


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _changes(old: dict, new: dict) -> str:
    return "; ".join(diff_settings(old, new, "before", "now")) or "(no difference)"


def _evaluate_to(folder: Path, label: str, model: str, settings: dict, log, file: str = EVAL_FILE,
                 **evaluate_kwargs) -> dict:
    """``folder/file`` when it was produced by ``settings``, else a fresh evaluation."""
    from unidistill.evaluate import evaluate

    path = folder / file
    old = _read_json(path)
    if old is not None and old.get(PRODUCED_BY) == settings:
        return old
    if old is not None:
        why = (_changes(old[PRODUCED_BY], settings) if isinstance(old.get(PRODUCED_BY), dict)
               else "it records no settings (an older unidistill made it)")
        log(f"{label}: evaluating again, the stored evaluation does not match: {why}")
    result = json.loads(evaluate(model, **evaluate_kwargs).to_json())
    result[PRODUCED_BY] = settings
    atomic_write_json(_mkdir(folder) / file, result)
    return result


def same_training(recorded, settings: dict) -> bool:
    """Whether a run recorded with ``recorded`` trained as ``settings`` would.

    Equal records, or equal once the arguments that did not exist when the run was recorded are
    added at their defaults: a new distill argument's default keeps what training did before
    (``hidden_warmup_steps=0``, for instance), so it does not retrain the runs made before it. A
    run that sets such an argument to anything else differs."""
    if recorded == settings:
        return True
    if not isinstance(recorded, dict) or not isinstance(recorded.get("arguments"), dict):
        return False
    old, now = recorded["arguments"], settings.get("arguments") or {}
    defaults = _canonical(_argument_defaults())
    added = {k: now[k] for k in set(now) - set(old) if k in defaults and now[k] == defaults[k]}
    return {**recorded, "arguments": {**old, **added}} == settings


def _prepare_run(run_dir: Path, name: str, settings: dict, out: Path, log) -> bool:
    """Make ``run_dir`` belong to ``settings``; True when the run already finished training.

    A folder trained under other settings (or without a record) is moved to ``_replaced/``."""
    record = _read_json(run_dir / RUN_SETTINGS_FILE)
    if record is not None and same_training(record.get("settings"), settings):
        if record.get("settings") != settings:  # recorded before an argument existed: add it
            atomic_write_json(run_dir / RUN_SETTINGS_FILE, {**record, "settings": settings})
        return bool(record.get("trained"))
    if run_dir.is_dir() and any(run_dir.iterdir()):
        why = ("its settings changed: " + _changes(record["settings"], settings)
               if isinstance(record, dict) and isinstance(record.get("settings"), dict)
               else "it records no settings (an older unidistill made it)")
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = out / REPLACED_DIR / f"{name}-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = out / REPLACED_DIR / f"{name}-{stamp}-{n}"
        _mkdir(target.parent)
        run_dir.rename(target)
        log(f"run {name!r}: training again from scratch, {why}; the old folder is kept as {target}")
    atomic_write_json(_mkdir(run_dir) / RUN_SETTINGS_FILE, {"settings": settings, "trained": False})
    return False


# ---- the table ---------------------------------------------------------------------------------

METRICS = ("perplexity", "nll", "perplexity_ratio", "accuracy", "accuracy_ratio", "recovery_pct",
           "top1_agreement", "kl_to_teacher")
HELDOUT_SETS = "heldout_sets"  # in each row of ablation.json: every held-out set's metrics by name


def _metrics(ev: dict, ref: dict) -> dict:
    """A model's numbers on one held-out set, next to the teacher's and the untrained student's."""
    return {"perplexity": ev.get("perplexity"), "nll": ev.get("nll"),
            "perplexity_ratio": ratio(ev.get("perplexity"), ref["teacher"].get("perplexity")),
            "accuracy": ev.get("accuracy"),
            "accuracy_ratio": ratio(ev.get("accuracy"), ref["teacher"].get("accuracy")),
            "recovery_pct": recovery(ev.get("nll"), ref["student"].get("nll"), ref["teacher"].get("nll")),
            "top1_agreement": ev.get("top1_agreement"), "kl_to_teacher": ev.get("kl_to_teacher")}


def _row(name: str, settings: dict, evs: dict[str, dict], refs: dict[str, dict], tokens_per_s) -> dict:
    """One row: the first held-out set's metrics at the top level, every set's by name."""
    per_set = {set_name: _metrics(ev, refs[set_name]) for set_name, ev in evs.items()}
    first = next(iter(per_set.values()))
    return {"name": name, "settings": settings, **first, HELDOUT_SETS: per_set,
            "tokens_per_s": tokens_per_s}


def uniform_baseline_note(table: dict) -> str | None:
    """One sentence on the uniform guess ln V, and whether the untrained student is worse than it."""
    uniform = table.get("uniform_nll")
    if uniform is None:
        return None
    note = (f"Uniform guess over the V = {table.get('vocab_size')} ids: log-perplexity ln V = "
            f"{uniform:.2f} (perplexity {math.exp(uniform):,.0f}).")
    student = next((r for r in table["rows"] if r["name"] == "student (before)"), None)
    if student is not None and student.get("nll") is not None and student["nll"] > uniform:
        note += (f" The untrained student ({student['nll']:.2f}) is worse than that guess: much of "
                 "its gap is closed by learning token frequencies, so the gap-closed % flatters; "
                 "read the ratios to the teacher.")
    return note


_COLUMNS = (("perplexity", "perplexity"), ("perplexity ÷ teacher", "perplexity_ratio"),
            ("next-token accuracy", "accuracy"), ("accuracy ÷ teacher", "accuracy_ratio"),
            ("log-ppl gap closed %", "recovery_pct"), ("top-1 agreement", "top1_agreement"),
            ("KL to teacher", "kl_to_teacher"))


def _cells(m: dict) -> list[str]:
    from unidistill.evaluate import format_number as num

    kl = m.get("kl_to_teacher")
    return [num(m.get("perplexity"), ".3f"), format_ratio(m.get("perplexity_ratio")),
            num(m.get("accuracy"), ".3f"), format_ratio(m.get("accuracy_ratio")),
            num(_no_negative_zero(m.get("recovery_pct")), ".1f"), num(m.get("top1_agreement"), ".3f"),
            num(None if kl is None else max(kl, 0.0), ".4f")]


def table_heldout_names(table: dict) -> list[str]:
    """The names of an ablation's held-out sets, in order ([] for a table of one set written
    before there could be several)."""
    return [h["name"] for h in table.get("heldouts") or []]


def format_table(table: dict) -> str:
    """The markdown table of an ablation (``ablation.json``; keys an older version did not write
    show as -). Several held-out sets: one block of columns per set, headed ``name: column``."""
    from unidistill.evaluate import format_number as num

    names = table_heldout_names(table)
    several = len(names) > 1
    if several:
        where = "; ".join(f"{h['name']} = `{h['data']}` ({h.get('split') or 'default split'})"
                          for h in table["heldouts"])
    else:
        where = f"`{table['heldout']}`"
    lines = [f"# Ablation from cache `{table['cache']}`", "",
             f"Teacher `{table['teacher']}`, student `{table['student']}`, held-out {where}.",
             "Perplexity and accuracy ÷ teacher: the run's value over the teacher's. Next-token "
             "accuracy: share of positions whose most likely token is the actual next one. "
             "Log-ppl gap closed % (recovery): share of the untrained student's gap to the teacher "
             "in log-perplexity that the run closes."]
    note = uniform_baseline_note(table)
    lines += [note] if note else []
    blocks = names if several else [None]
    header = ["run", "settings"] + [f"{n}: {c}" if n else c for n in blocks for c, _ in _COLUMNS] + ["tokens/s"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table["rows"]:
        order = SHOWN + (ONLINE,)  # ablation.json stores keys sorted: show them in this order
        shown = sorted(r["settings"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        settings = ", ".join(f"{k}={v}" for k, v in shown)
        metrics = [(r.get(HELDOUT_SETS) or {}).get(n, {}) if n else r for n in blocks]
        cells = [r["name"], settings] + [c for m in metrics for c in _cells(m)] + [
            num(r.get("tokens_per_s"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_ratio(x: float | None) -> str:
    """A ratio to the teacher: two decimals, or three significant digits from 1000 up."""
    return "-" if x is None else format(x, ".2f" if abs(x) < 1000 else ".3g")


def _no_negative_zero(x):
    return None if x is None else (0.0 if abs(x) < 0.05 else x)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ablate(cache, student: str, teacher: str, heldout, out, *, variants: list[dict],
           common: dict | None = None, heldout_cache=None, heldout_split=None,
           heldout_names=None, eval_sequences: int | None = 32, eval_batch_size: int = 4,
           device: str = "auto", progress: bool = True, log: Callable[[str], None] = _stderr) -> dict:
    """Run every variant, evaluate it on every held-out set, and write the table; returns it.

    ``heldout``, ``heldout_split``, ``heldout_cache``: one held-out set (str) or several (lists in
    the same order, see :func:`heldout_sets`). Pieces made with the same settings are kept, the
    others redone (see the module docstring); ``log`` gets one line for each piece redone and why.
    A split None: evaluate's default (``heldout`` for built-in text and local files)."""
    common = dict(common or {})
    check_variants(common, variants)
    sets = heldout_sets(heldout, heldout_split, heldout_cache, heldout_names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # each set: refused when it shares documents with the cache; its evaluation settings
    apart = {h.name: _heldout_apart(cache, h.data, h.cache, h.split) for h in sets}
    fingerprint = (read_manifest(cache) or {}).get("fingerprint")  # each run records it too
    heldout_fingerprints = {h.name: None if h.cache is None else (read_manifest(h.cache) or {}).get("fingerprint")
                            for h in sets}
    heldout_ids = {h.name: data_identity(h.data) for h in sets}
    student_id, teacher_id = model_identity(student), model_identity(teacher)

    def evaluations(folder: Path, label: str, model: str, model_id: dict) -> dict[str, dict]:
        """The model's evaluation on every held-out set, by set name."""
        result = {}
        for index, h in enumerate(sets):
            settings = {**evaluation_settings(model_id, heldout_ids[h.name], h.split,
                                              heldout_fingerprints[h.name], eval_sequences),
                        **apart[h.name]}
            where = f" on {h.name}" if len(sets) > 1 else ""
            result[h.name] = _evaluate_to(
                folder, label + where, model, settings, log, eval_file(index, h), data=h.data,
                split=h.split, cache=h.cache, max_sequences=eval_sequences, **apart[h.name],
                batch_size=eval_batch_size, device=device, progress=progress)
        return result

    teacher_evs = evaluations(out / "_teacher", "teacher", teacher, teacher_id)
    student_evs = evaluations(out / "_student", "student (before)", student, student_id)
    refs = {h.name: {"teacher": teacher_evs[h.name], "student": student_evs[h.name]} for h in sets}
    table = _new_table(cache, fingerprint, teacher, student, sets, heldout_fingerprints,
                       eval_sequences, common, refs)
    table["rows"] = [_row("teacher", {}, teacher_evs, refs, None),
                     _row("student (before)", {}, student_evs, refs, None)]
    defaults = _argument_defaults()
    for variant in variants:
        name = variant["name"]
        run_dir = out / name
        settings = {k: v for k, v in variant.items() if k != "name"}
        stats_path = run_dir / TRAIN_SPEED_FILE
        record = training_settings(settings, common, fingerprint, student_id,
                                   teacher_id if ONLINE in settings else None)
        if not _prepare_run(run_dir, name, record, out, log):
            _train_run(cache, student, teacher, run_dir, name, settings, record, common)
        evs = evaluations(run_dir, f"run {name!r}", str(run_dir), model_identity(str(run_dir)))
        speed = json.loads(stats_path.read_text())["tokens_per_s"] if stats_path.is_file() else None
        shown = {k: settings.get(k, common.get(k, defaults[k])) for k in SHOWN}
        if ONLINE in settings:
            shown[ONLINE] = settings[ONLINE]
        table["rows"].append(_row(name, shown, evs, refs, speed))
        atomic_write_json(out / ABLATION_JSON, table)
        atomic_write_bytes(out / ABLATION_MD, format_table(table).encode())
    return table


def _new_table(cache, fingerprint, teacher: str, student: str, sets: list[HeldOut],
               heldout_fingerprints: dict, eval_sequences, common: dict, refs: dict) -> dict:
    """``ablation.json`` before its rows: what the runs trained on and were evaluated on."""
    first, first_ref = sets[0], refs[sets[0].name]
    return {"cache": str(cache), "cache_fingerprint": fingerprint, "teacher": teacher, "student": student,
            "heldout": first.data, "heldout_split": first.split, "heldout_cache": first.cache,
            "heldout_cache_fingerprint": heldout_fingerprints[first.name],
            "heldouts": [{"name": h.name, "data": h.data, "split": h.split, "cache": h.cache,
                          "cache_fingerprint": heldout_fingerprints[h.name],
                          "eval_file": eval_file(i, h)} for i, h in enumerate(sets)],
            "eval_sequences": eval_sequences,
            "vocab_size": first_ref["teacher"].get("vocab_size"),
            "uniform_nll": first_ref["teacher"].get("uniform_nll"),
            "common": common}


def _train_run(cache, student: str, teacher: str, run_dir: Path, name: str, settings: dict,
               record: dict, common: dict) -> None:
    """Train one run (on the live teacher with ``online``), resuming a checkpoint left under
    the same settings; record its speed and that it finished."""
    from unidistill.trainer.arguments import DistillationArguments
    from unidistill.trainer.run import distill_from_cache

    train = {k: v for k, v in settings.items() if k != ONLINE}
    args = DistillationArguments(output_dir=str(run_dir), **{**common, **train})
    resume = any(run_dir.glob("checkpoint-*"))  # stopped mid-way under these settings
    online = {}
    if ONLINE in settings:
        online = dict(teacher_model=_load_teacher(teacher),
                      online_top_k=online_top_k(settings[ONLINE], name))
    trainer = distill_from_cache(cache, student, args, resume_from_checkpoint=resume or None,
                                 **online)
    atomic_write_json(run_dir / TRAIN_SPEED_FILE, {"tokens_per_s": _tokens_per_second(trainer),
                                                   "train_seconds": _train_seconds(trainer)})
    atomic_write_json(run_dir / RUN_SETTINGS_FILE, {"settings": record, "trained": True})


def _heldout_apart(cache, heldout: str, heldout_cache, split: str | None = None) -> dict:
    """Refuse held-out text or a held-out cache that shares documents with the training cache;
    returns the evaluation's held-out share (the training cache's, for the same local source)."""
    from unidistill.text.data import default_eval_split, source_kind
    from unidistill.text.splits import check_caches_apart

    train = ((read_manifest(cache) or {}).get("settings") or {}).get("data") or {}
    share = train.get("heldout_share") if heldout == train.get("source") else None
    if heldout_cache is not None:
        check_caches_apart(train, ((read_manifest(heldout_cache) or {}).get("settings") or {}).get("data") or {})
    check_caches_apart(train, {"source": heldout, "config": train.get("config"),
                               "split": split or default_eval_split(heldout), "heldout_share": share})
    return {"heldout_share": share} if source_kind(heldout) == "local" else {}


def _load_teacher(teacher: str):
    from unidistill.models.loading import load_model, resolve_model_source

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

"""What produced each piece of an ablation, and whether a rerun keeps it (see the package
docstring): the records of runs and evaluations, their comparison, and the moving aside of a run
trained under other settings."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from unidistill.ablate.variants import CACHE, ONLINE, argument_defaults
from unidistill.storage.files import atomic_write_json
from unidistill.storage.manifest import diff_settings

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
    "project", "cache_local_dir"})
# Files of a model folder that decide its outputs (top level only: not its checkpoints).
_MODEL_FILE = re.compile(r"^(config\.json|generation_config\.json|projectors\.json|tokenizer[^/]*"
                         r"|special_tokens_map\.json|vocab\.[^/]*|merges\.txt|chat_template\.[^/]*"
                         r"|[^/]*\.(safetensors|gguf|pt|bin))$")


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


def training_settings(settings: dict, common: dict, cache_fingerprints: list, student_id: dict,
                      teacher_id: dict | None) -> dict:
    """The canonical record of what trains a run (see the package docstring).

    ``cache_fingerprints``: of the caches it trains on, in training order. One cache is recorded
    as ``cache_fingerprint`` (as before runs could have several, so their records still match),
    several as the ``cache_fingerprints`` list: another list, or another order, retrains."""
    given = {**common, **{k: v for k, v in settings.items() if k not in (ONLINE, CACHE)}}
    arguments = {k: v for k, v in {**argument_defaults(), **given}.items() if k not in BOOKKEEPING}
    caches = ({"cache_fingerprint": cache_fingerprints[0]} if len(cache_fingerprints) == 1
              else {"cache_fingerprints": list(cache_fingerprints)})
    record = {"arguments": arguments, **caches, "student": student_id}
    if ONLINE in settings:
        record.update(online=settings[ONLINE], teacher=teacher_id)
    return _canonical(record)


def evaluation_settings(model_id: dict, heldout: dict, split: str | None, heldout_cache_fingerprint,
                        eval_sequences: int | None) -> dict:
    """The canonical record of what produces an evaluation (see the package docstring)."""
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


def evaluate_to(folder: Path, label: str, model: str, settings: dict, log, file: str = EVAL_FILE,
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
    atomic_write_json(mkdir(folder) / file, result)
    return result


def _what_trains(arguments: dict) -> dict:
    """The arguments that decide the trained weights, as records are compared: without
    ``remove_unused_columns`` (always False in effect: records made while its default was the
    Trainer's True say True) and without ``num_train_epochs`` when ``max_steps`` > 0 overrides it
    (records made while its default was the Trainer's 3.0 say 3.0)."""
    inert = {"remove_unused_columns"}
    if isinstance(arguments.get("max_steps"), int) and arguments["max_steps"] > 0:
        inert.add("num_train_epochs")
    return {k: v for k, v in arguments.items() if k not in inert}


def same_training(recorded, settings: dict) -> bool:
    """Whether a run recorded with ``recorded`` trained as ``settings`` would.

    Equal records, or equal once the arguments that did not exist when the run was recorded are
    added at their defaults: a new distill argument's default keeps what training did before
    (``hidden_warmup_steps=0``, for instance), so it does not retrain the runs made before it. A
    run that sets such an argument to anything else differs. Arguments without effect on the
    weights (:func:`_what_trains`) are left out of the comparison."""
    if recorded == settings:
        return True
    if not isinstance(recorded, dict) or not isinstance(recorded.get("arguments"), dict):
        return False
    old, now = recorded["arguments"], settings.get("arguments") or {}
    defaults = _canonical(argument_defaults())
    added = {k: now[k] for k in set(now) - set(old) if k in defaults and now[k] == defaults[k]}
    return ({**recorded, "arguments": _what_trains({**old, **added})}
            == {**settings, "arguments": _what_trains(now)})


def prepare_run(run_dir: Path, name: str, settings: dict, out: Path, log) -> bool:
    """Make ``run_dir`` belong to ``settings``; True when the run already finished training.

    A folder trained under other settings (or without a record) is moved to ``_replaced/``."""
    record = _read_json(run_dir / RUN_SETTINGS_FILE)
    if record is not None and same_training(record.get("settings"), settings):
        if record.get("settings") != settings:  # recorded before an argument existed, or a default moved
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
        mkdir(target.parent)
        run_dir.rename(target)
        log(f"run {name!r}: training again from scratch, {why}; the old folder is kept as {target}")
    atomic_write_json(mkdir(run_dir) / RUN_SETTINGS_FILE, {"settings": settings, "trained": False})
    return False


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path

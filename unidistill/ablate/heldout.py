"""The held-out sets of an ablation: names, splits, caches, and the refusal of text that shares
documents with the training cache."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from unidistill.ablate.records import EVAL_FILE
from unidistill.ablate.variants import FOLDER_NAME
from unidistill.errors import ConfigError
from unidistill.storage.manifest import read_manifest


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
    bad = [n for n in names if not FOLDER_NAME.match(n)]
    if bad:
        raise ConfigError(f"held-out set names {bad} must start with a letter or digit and hold "
                          "only letters, digits and _ . + - (they name eval files)")
    return [HeldOut(*fields) for fields in zip(names, data, splits, caches)]


def eval_file(index: int, heldout: HeldOut) -> str:
    """The first held-out set's evaluation is ``eval.json`` (as with one set), the others'
    ``eval.<name>.json``."""
    return EVAL_FILE if index == 0 else f"eval.{heldout.name}.json"


def heldout_apart(cache, heldout: str, heldout_cache, split: str | None = None) -> dict:
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

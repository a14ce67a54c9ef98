"""Held-out splits: which documents of a text source are kept apart from training.

A source that is not a hub data set has three splits: ``train``, ``heldout`` and ``all``
(eval-only texts have ``heldout`` and ``all`` only). A document belongs to ``heldout`` when the
SHA-256 of its key, read as a number in [0, 1), is below the held-out share, else to ``train``.
The key of a local document is its text, so the split needs no index, does not depend on the
order of files or rows, survives streaming, and puts duplicate documents on the same side. Train
and held-out therefore never share a document, as long as both are taken with the same share:
the share is recorded in a cache's manifest (``settings.data.heldout_share``), a resumed build
with another share is refused, and :func:`check_caches_apart` compares a training cache with a
held-out one.
"""

from __future__ import annotations

import hashlib

from unidistill.errors import DataError

SPLITS = ("train", "heldout", "all")
EVAL_ONLY_SPLITS = ("heldout", "all")
# 5 %: enough held-out text for a perplexity estimate from a file of a few hundred documents
# (about 1 in 20 documents), while training keeps 95 % of what the user gave.
DEFAULT_HELDOUT_SHARE = 0.05


def key_position(key: str) -> float:
    """Where ``key`` falls in [0, 1): the first 8 bytes of its SHA-256 as a fraction."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def in_split(key: str, split: str, heldout_share: float) -> bool:
    """Whether the document with this key belongs to ``split`` (train / heldout / all)."""
    if split == "all":
        return True
    held_out = key_position(key) < heldout_share
    return held_out if split == "heldout" else not held_out


def check_split(split: str, valid: tuple[str, ...], source: str) -> None:
    """Raise DataError, listing the valid splits, when ``source`` has no split ``split``."""
    if split in valid:
        return
    hint = ""
    if split == "train" and "train" not in valid:
        hint = f" {source} is text for evaluation only: nothing may train on it."
    raise DataError(f"split {split!r} of {source} does not exist; expected one of {valid}.{hint} "
                    "Pass --split with one of them.")


def check_heldout_share(share: float) -> None:
    if not 0.0 < share < 1.0:
        raise DataError(f"the held-out share is {share}; it must be between 0 and 1 (exclusive), "
                        f"e.g. {DEFAULT_HELDOUT_SHARE} to hold out about 1 document in "
                        f"{round(1 / DEFAULT_HELDOUT_SHARE)}")


def check_caches_apart(train: dict, heldout: dict) -> None:
    """Refuse a held-out cache that may share documents with a training cache.

    ``train`` and ``heldout`` are the ``settings.data`` records of the two manifests. Caches of
    different sources are not compared (nothing links their documents). Two caches of one source
    must not hold the same split; where the splits are ours (train / heldout / all), they must be
    ``train`` and ``heldout`` taken with the same held-out share. A hub data set's own splits
    (``train`` and ``test``, say) are the data set's business.
    """
    if (train.get("source"), train.get("config")) != (heldout.get("source"), heldout.get("config")):
        return
    source = train.get("source")
    splits = (train.get("split"), heldout.get("split"))
    ours = all(s in SPLITS for s in splits)
    if splits[0] == splits[1] or (ours and splits != ("train", "heldout")):
        raise DataError(f"the training cache and the held-out cache both hold {source}, split "
                        f"{splits[0]!r} and {splits[1]!r}: they share documents. Build the "
                        "training cache with --split train and the held-out one with --split heldout.")
    shares = (train.get("heldout_share"), heldout.get("heldout_share"))
    if ours and shares[0] != shares[1]:
        raise DataError(f"the training cache of {source} was split with held-out share {shares[0]} "
                        f"and the held-out cache with {shares[1]}: with different shares they "
                        "share documents. Rebuild one with the other's --heldout-share.")

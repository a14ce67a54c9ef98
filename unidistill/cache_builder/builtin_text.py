"""Built-in text sources, ``--data builtin:NAME``: nothing downloaded, each split fixed.

=========================  ===================  ==========================================
source                     splits               held out
=========================  ===================  ==========================================
``builtin:pydoc_topics``   train, heldout, all  every 10th topic (sorted by name); train
                                                also drops "if", whose text is "else"'s
=========================  ===================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from unidistill.cache_builder.splits import SPLITS, check_split
from unidistill.errors import DataError

PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinText:
    name: str
    splits: tuple[str, ...]
    documents: Callable[[str], list[str]]  # split -> documents


def _pydoc_topics(split: str) -> list[str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held_out = keys[::10]
    if split == "heldout":
        return [topics[k] for k in held_out]
    if split == "train":  # "if" and "else" are one text: the held-out one is not trained on
        held_texts = {topics[k] for k in held_out}
        return [topics[k] for i, k in enumerate(keys) if i % 10 and topics[k] not in held_texts]
    return [topics[k] for k in keys]


BUILTIN_TEXTS = {t.name: t for t in (
    BuiltinText("builtin:pydoc_topics", SPLITS, _pydoc_topics),
)}


def builtin_text(data: str) -> BuiltinText:
    try:
        return BUILTIN_TEXTS[data]
    except KeyError:
        raise DataError(f"unknown built-in text {data!r}; expected one of {sorted(BUILTIN_TEXTS)}") from None


def builtin_documents(data: str, split: str) -> list[str]:
    """The documents of the built-in source ``data`` in ``split`` (refused if it has no such split)."""
    text = builtin_text(data)
    check_split(split, text.splits, data)
    return text.documents(split)

"""Built-in text sources, ``--data builtin:NAME``: nothing downloaded, each split fixed.

=========================  ===================  ==========================================
source                     splits               held out
=========================  ===================  ==========================================
``builtin:pydoc_topics``   train, heldout, all  every 10th topic (sorted by name); train
                                                also drops "if", whose text is "else"'s
``builtin:stdlib_docs``    train, heldout, all  the modules whose name hashes below 0.1
``builtin:kjv_bible``      heldout, all         everything: evaluation only
``builtin:python_qa``      train, heldout, all  conversations: the API questions of the
                                                held-out stdlib_docs modules, the reference
                                                questions of pydoc_topics' held-out topics
=========================  ===================  ==========================================

``pydoc_topics`` (CPython's reference topics, ``pydoc_data.topics``) and ``stdlib_docs`` (pydoc's
documentation of the standard library's modules, :mod:`.stdlib_docs`) are both Python
documentation, from different texts: the language reference's prose versus the modules'
docstrings. Train on one and evaluate on the other's held-out split only knowing that they share
a domain. ``kjv_bible`` (:mod:`.kjv_bible`) is English prose of another kind, for evaluation only.

``python_qa`` (:mod:`.python_qa`) holds conversations (lists of ``{role, content}`` messages) made
from the same two texts, not plain text: :func:`builtin_rows` gives them as rows with a
``messages`` column, the shape of a local file of conversations, and :func:`builtin_documents`,
which the plain-text pipeline reads, refuses them rather than turn them into strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from unidistill.text import kjv_bible, python_qa, stdlib_docs
from unidistill.text.splits import EVAL_ONLY_SPLITS, SPLITS, check_split, in_split
from unidistill.errors import DataError

PREFIX = "builtin:"
TEXT, CONVERSATIONS = "text", "conversations"
# the column each kind of row holds (builtin_rows), as in a local file
ROW_FIELD = {TEXT: "text", CONVERSATIONS: "messages"}


@dataclass(frozen=True)
class BuiltinText:
    name: str
    splits: tuple[str, ...]
    documents: Callable[[str], list]  # split -> documents (str) or conversations (list of messages)
    kind: str = TEXT  # TEXT or CONVERSATIONS


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


def _stdlib_docs(split: str) -> list[str]:
    names = [n for n in stdlib_docs.MODULES if in_split(n, split, stdlib_docs.HELDOUT_SHARE)]
    return [text for _, text in stdlib_docs.documents(names)]


def _kjv_bible(split: str) -> list[str]:
    return [text for _, text in kjv_bible.chapters()]  # every split is all of it


BUILTIN_TEXTS = {t.name: t for t in (
    BuiltinText("builtin:pydoc_topics", SPLITS, _pydoc_topics),
    BuiltinText("builtin:stdlib_docs", SPLITS, _stdlib_docs),
    BuiltinText("builtin:kjv_bible", EVAL_ONLY_SPLITS, _kjv_bible),
    BuiltinText("builtin:python_qa", SPLITS, python_qa.conversations, CONVERSATIONS),
)}


def builtin_text(data: str) -> BuiltinText:
    try:
        return BUILTIN_TEXTS[data]
    except KeyError:
        raise DataError(f"unknown built-in text {data!r}; expected one of {sorted(BUILTIN_TEXTS)}") from None


def check_plain_text(data: str, reader: str = "this command") -> None:
    """Refuse a built-in source of conversations where ``reader`` takes plain text documents."""
    text = builtin_text(data)
    if text.kind != TEXT:
        plain = sorted(n for n, t in BUILTIN_TEXTS.items() if t.kind == TEXT)
        raise DataError(f"{data} holds conversations (rows with a 'messages' column: lists of "
                        f"{{role, content}} messages), not plain text, and {reader} reads plain text "
                        f"documents; it would train or score on the conversations turned into "
                        f"strings, without their chat template. Pass a text source ({', '.join(plain)}, "
                        "a file or a hub data set); cache-build reads conversations (it renders them "
                        "with the teacher's chat template)")


def builtin_documents(data: str, split: str) -> list[str]:
    """The documents of the built-in text ``data`` in ``split`` (refused if it has no such split,
    or holds conversations)."""
    text = builtin_text(data)
    check_split(split, text.splits, data)
    check_plain_text(data, "the plain-text reader (iter_documents)")
    return text.documents(split)


def builtin_rows(data: str, split: str) -> list[dict]:
    """The built-in source ``data`` in ``split`` as rows: ``{"text": document}`` for text,
    ``{"messages": [{"role": ..., "content": ...}, ...]}`` for conversations."""
    text = builtin_text(data)
    check_split(split, text.splits, data)
    field = ROW_FIELD[text.kind]
    return [{field: item} for item in text.documents(split)]

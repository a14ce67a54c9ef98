"""Text in, packed token ids out.

Sources (``--data``) and their splits (``--split``):
- built-in text, nothing downloaded (:mod:`.builtin_text`; sizes in SmolLM2 tokens, CPython 3.11):
  ``builtin:pydoc_topics``, CPython's 79 reference topics (105 K train, 8 K held out);
  ``builtin:stdlib_docs``, pydoc's pages of 186 standard library modules, one document per module
  (503 K train, 63 K held out; the text changes with the Python version);
  both with splits ``train``, ``heldout`` and ``all``;
  ``builtin:kjv_bible``, the King James Bible (990 K; needs ``unidistill[evaltext]``), English
  prose of another kind for evaluation only: splits ``heldout`` and ``all``;
  ``builtin:python_qa`` (:mod:`.python_qa`), conversations made from those two texts' docstrings
  and sections, not plain text (read by :func:`iter_conversations`; every other reader here
  refuses it): 600 conversations, 1 363 questions, 92 K tokens in train (55 K of them assistant
  targets), 100 conversations, 252 questions, 16 K tokens in held-out, rendered with SmolLM2's
  chat template.
- a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file (one document per row), or a
  ``.txt``/``.md``/``.rst`` file or a folder of such files (one document per file), with splits
  ``train``, ``heldout`` and ``all``: a document is held out when the SHA-256 of its text falls
  below ``heldout_share`` (default 0.05, about 1 document in 20; :mod:`.splits`), so the split is
  the same whatever the order of rows or files, and duplicates land on the same side.
- a Hugging Face hub data set id (``HuggingFaceTB/cosmopedia`` with ``--data-config stories``),
  always streamed, so caching a slice never downloads a whole split; its splits are its own.

Packing: every document is tokenized without special tokens and followed by EOS; the token stream
is cut into sequences of exactly ``seq_len`` tokens; the remainder that does not fill a sequence
is dropped. The result is deterministic for the same source, split, tokenizer and settings.
:func:`iter_packed` yields the sequences as the documents are read (the build streams them, see
:mod:`unidistill.cache_builder.packed`); :func:`pack_documents` returns them all as one array.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from unidistill.text.builtin_text import (
    BUILTIN_TEXTS,
    CONVERSATIONS,
    PREFIX,
    builtin_documents,
    builtin_rows,
    builtin_text,
    check_plain_text,
)
from unidistill.text.chat import parse_messages
from unidistill.text.splits import (
    DEFAULT_HELDOUT_SHARE,
    SPLITS,
    check_heldout_share,
    check_split,
    in_split,
)
from unidistill.errors import DataError

BUILTIN_PYDOC = "builtin:pydoc_topics"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                 ".txt": "text", ".md": "text", ".rst": "text"}


def _looks_like_path(data: str) -> bool:
    return (data.startswith(("/", ".", "~")) or Path(data).suffix.lower() in LOCAL_FORMATS
            or Path(data).exists())


def source_kind(data: str) -> str:
    """``builtin``, ``local`` (a file or folder) or ``hub`` (a hub data set id)."""
    if data.startswith(PREFIX):
        return "builtin"
    return "local" if _looks_like_path(data) else "hub"


def resolve_heldout_share(data: str, heldout_share: float | None) -> float | None:
    """The held-out share that splits ``data``: the given or default one for local sources, None
    for the others, whose splits are fixed (built-in text) or their own (hub data sets)."""
    if source_kind(data) == "local":
        share = DEFAULT_HELDOUT_SHARE if heldout_share is None else heldout_share
        check_heldout_share(share)
        return share
    if heldout_share is not None:
        raise DataError(f"a held-out share ({heldout_share}) was given for {data}, but only local "
                        "files and folders are split by share; built-in text has fixed splits and "
                        "a hub data set has its own. Drop --heldout-share.")
    return None


def check_data_split(data: str, split: str, heldout_share: float | None = None) -> None:
    """Refuse, before anything is loaded, a split or held-out share that ``data`` cannot have,
    and a built-in source of conversations: the commands that call this read plain text."""
    _check_source_split(data, split, heldout_share)
    if source_kind(data) == "builtin":
        check_plain_text(data)


def is_conversation_source(data: str) -> bool:
    """True for a built-in source of conversations (``builtin:python_qa``); other sources hold
    conversations when ``--messages-field`` names the column."""
    return source_kind(data) == "builtin" and builtin_text(data).kind == CONVERSATIONS


def check_conversation_split(data: str, split: str, heldout_share: float | None = None) -> None:
    """Refuse, before anything is loaded, a split or held-out share ``data`` cannot have, and a
    built-in source of plain text read as conversations."""
    _check_source_split(data, split, heldout_share)
    if source_kind(data) == "builtin" and not is_conversation_source(data):
        raise DataError(f"{data} is plain text, not conversations; drop --messages-field, or pass "
                        f"one of {sorted(n for n, t in BUILTIN_TEXTS.items() if t.kind == CONVERSATIONS)} "
                        "or a file or hub data set whose rows hold a list of messages")


def _check_source_split(data: str, split: str, heldout_share: float | None) -> None:
    resolve_heldout_share(data, heldout_share)
    kind = source_kind(data)
    if kind == "builtin":
        check_split(split, builtin_text(data).splits, data)
    elif kind == "local":
        check_split(split, SPLITS, data)


def default_eval_split(data: str) -> str:
    """The split evaluation reads when none is named: ``heldout`` where the source has one
    (built-in text, local files and folders), ``train`` for a hub data set."""
    return "train" if source_kind(data) == "hub" else "heldout"


def _local_dataset(path: Path):
    from datasets import load_dataset

    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*")
                       if p.is_file() and LOCAL_FORMATS.get(p.suffix.lower()) == "text")
        if not files:
            raise DataError(f"data folder {path} holds no .txt/.md/.rst files; expected a folder of "
                            "text files (one document each) or a .jsonl/.parquet/.csv file")
        return load_dataset("text", data_files=files, sample_by="document", split="train",
                            streaming=True)
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"data file {path} has an unknown extension {path.suffix!r}; expected one of "
                        f"{sorted(LOCAL_FORMATS)}")
    kwargs = {"sample_by": "document"} if fmt == "text" else {}
    # datasets names the one split of a set of local files "train"; ours is chosen below
    return load_dataset(fmt, data_files=str(path), split="train", streaming=True, **kwargs)


def iter_documents(data: str, *, data_config: str | None = None, split: str = "train",
                   text_field: str = "text", heldout_share: float | None = None) -> Iterator[str]:
    """Yield the documents of ``split`` of a source as strings, streaming where the source allows.

    Local files and folders are split by document (see the module docstring) with
    ``heldout_share`` (None: the default, 0.05); built-in text has fixed splits; a hub data set's
    splits are its own. A split the source does not have is refused with the valid ones.
    """
    check_data_split(data, split, heldout_share)
    kind = source_kind(data)
    share = resolve_heldout_share(data, heldout_share)
    if kind == "builtin":
        yield from builtin_documents(data, split)
        return
    rows = _rows(data, data_config, split)
    try:
        for text in _texts(rows, data, text_field):
            if kind == "hub" or in_split(text, split, share):
                yield text
    except DataError:
        raise
    except Exception as e:  # parse errors of a local file, network errors of a stream
        raise DataError(f"could not read documents from {data}: {type(e).__name__}: {e}") from e


def iter_conversations(data: str, *, data_config: str | None = None, split: str = "train",
                       messages_field: str = "messages",
                       heldout_share: float | None = None) -> Iterator[list[dict]]:
    """Yield the conversations of ``split`` of a source: each a list of ``{role, content}``
    messages, checked by :func:`.chat.parse_messages`.

    The rows' ``messages_field`` holds the conversation (built-in conversations have the column
    ``messages``). Local files are split as documents are, by the SHA-256 of the conversation's
    canonical JSON (sorted keys), so the split does not depend on the order of rows.
    """
    _check_source_split(data, split, heldout_share)
    kind = source_kind(data)
    share = resolve_heldout_share(data, heldout_share)
    if kind == "builtin":
        if builtin_text(data).kind != CONVERSATIONS:
            raise DataError(f"{data} is plain text, not conversations; expected one of "
                            f"{sorted(n for n, t in BUILTIN_TEXTS.items() if t.kind == CONVERSATIONS)}, "
                            "or a file or hub data set whose rows hold a list of messages")
        rows, messages_field = builtin_rows(data, split), "messages"
    else:
        rows = _rows(data, data_config, split)
    try:
        for n, row in enumerate(rows):
            if messages_field not in row:
                raise DataError(f"messages field {messages_field!r} not found in {data}; its rows have "
                                f"fields {sorted(row)}. Pass --messages-field with one of them.")
            messages = parse_messages(row[messages_field], f"row {n}, field {messages_field!r} of {data}")
            key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            if kind != "local" or in_split(key, split, share):
                yield messages
    except DataError:
        raise
    except Exception as e:  # parse errors of a local file, network errors of a stream
        raise DataError(f"could not read conversations from {data}: {type(e).__name__}: {e}") from e


def _rows(data: str, data_config: str | None, split: str):
    """The rows of a local file or folder, or of a hub data set (streamed)."""
    if source_kind(data) == "local":
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"data path {path} does not exist; expected a file or folder of text, "
                            f"a hub data set id, or one of {sorted(BUILTIN_TEXTS)}")
        if path.is_file() and path.stat().st_size == 0:
            return []  # an empty file holds no rows (datasets cannot even infer its schema)
        return _local_dataset(path)
    from datasets import load_dataset

    try:
        return load_dataset(data, data_config, split=split, streaming=True)
    except Exception as e:
        raise DataError(f"could not open hub data set {data!r} (config {data_config!r}, split "
                        f"{split!r}): {type(e).__name__}: {e}") from e


def _texts(rows, data: str, text_field: str) -> Iterator[str]:
    for n, row in enumerate(rows):
        if text_field not in row:
            raise DataError(f"text field {text_field!r} not found in {data}; its rows have fields "
                            f"{sorted(row)}. Pass --text-field with one of them.")
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"field {text_field!r} of row {n} in {data} holds {type(text).__name__}, "
                            "expected a string")
        yield text


def iter_packed(documents: Iterable[str], tokenizer, seq_len: int,
                max_sequences: int | None = None, batch_docs: int = 64) -> Iterator[np.ndarray]:
    """Tokenize, join with EOS and yield ``(seq_len,)`` int32 sequences, as the text comes.

    Documents are read ``batch_docs`` at a time (one tokenizer call) and only when the sequences
    already read are used up, so what is held at once is one batch of documents' tokens and the
    remainder that did not fill a sequence; reading stops once ``max_sequences`` are out. The
    sequences are those :func:`pack_documents` returns, in the same order. Raises
    :class:`DataError` after the last document when not one whole sequence came out.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which packing puts between documents; "
                        "set tokenizer.eos_token")
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    docs = iter(documents)
    carry = np.empty(0, dtype=np.int32)  # tokens read but not yet a whole sequence
    n_docs = n_tokens = n_out = 0
    while max_sequences is None or n_out < max_sequences:
        batch = list(islice(docs, batch_docs))
        if not batch:
            break
        n_docs += len(batch)
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        tokens = np.asarray([t for ids in encoded for t in (*ids, eos)], dtype=np.int32)
        n_tokens += tokens.size
        stream = np.concatenate([carry, tokens])
        whole = stream.size // seq_len
        if max_sequences is not None:
            whole = min(whole, max_sequences - n_out)
        for i in range(whole):
            yield stream[i * seq_len:(i + 1) * seq_len].copy()
        n_out += whole
        carry = stream[whole * seq_len:].copy()
    if n_out == 0:
        raise DataError(f"the data holds {n_tokens} tokens in {n_docs} documents, fewer than one "
                        f"sequence of seq_len={seq_len}; add text or lower --seq-len")


def pack_documents(documents: Iterable[str], tokenizer, seq_len: int,
                   max_sequences: int | None = None, batch_docs: int = 64) -> np.ndarray:
    """Tokenize, join with EOS and cut into ``[N, seq_len]`` int32 (N <= max_sequences): every
    sequence of :func:`iter_packed`, held at once."""
    return np.stack(list(iter_packed(documents, tokenizer, seq_len, max_sequences, batch_docs)))

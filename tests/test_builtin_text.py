"""Built-in text: its splits share no document, and unknown splits or names are refused."""

from __future__ import annotations


import pytest

from unidistill.cache_builder.builtin_text import BUILTIN_TEXTS
from unidistill.cache_builder.data import iter_documents
from unidistill.errors import DataError


def test_pydoc_topics_splits_are_disjoint_and_fixed():
    from pydoc_data.topics import topics

    train, held, every = (list(iter_documents("builtin:pydoc_topics", split=s))
                          for s in ("train", "heldout", "all"))
    assert held == [topics[k] for k in sorted(topics)[::10]]  # every 10th topic, as before
    # topics "if" and "else" are one text; "else" is held out, so "if" is not trained on
    assert topics["if"] == topics["else"] and topics["if"] in held
    assert (len(train), len(held), len(every)) == (70, 8, 79)
    assert not set(train) & set(held) and set(train) | set(held) == set(every)


@pytest.mark.parametrize("data", sorted(BUILTIN_TEXTS))
def test_unknown_split_of_builtin_text_is_refused(data):
    with pytest.raises(DataError, match=rf"split 'validation' of {data} does not exist; expected one of"):
        list(iter_documents(data, split="validation"))


def test_unknown_builtin_text_is_refused():
    with pytest.raises(DataError, match=r"unknown built-in text 'builtin:nope'; expected one of "
                                        r"\['builtin:pydoc_topics'\]"):
        list(iter_documents("builtin:nope"))

"""builtin:python_qa: conversations from Python's own documentation, deterministic, split apart,
readable as rows with a ``messages`` column, refused where plain text is read, and renderable
with SmolLM2's chat template (whose sizes are the ones the docs quote)."""

from __future__ import annotations

import json
import sys

import pytest

from unidistill.errors import DataError
from unidistill.text import python_qa, stdlib_docs
from unidistill.text.builtin_text import builtin_documents, builtin_rows
from unidistill.text.data import iter_conversations, iter_documents

from .test_builtin_text import STDLIB_HELDOUT

ON_311 = sys.version_info[:2] == (3, 11)  # the figures below were measured on CPython 3.11


@pytest.fixture(scope="module")
def qa():
    return {split: python_qa.conversations(split) for split in ("train", "heldout", "all")}


def _keys(conversations):
    return sorted(json.dumps(c, sort_keys=True) for c in conversations)


def test_splits_partition_the_conversations(qa):
    assert _keys(qa["train"] + qa["heldout"]) == _keys(qa["all"])  # separate interpreters, same text
    assert not set(_keys(qa["train"])) & set(_keys(qa["heldout"]))
    questions = {split: {m["content"] for c in qa[split] for m in c if m["role"] == "user"
                         and not m["content"].startswith("And ")} for split in ("train", "heldout")}
    assert not questions["train"] & questions["heldout"]
    if ON_311:
        assert [len(qa[s]) for s in ("train", "heldout", "all")] == [600, 100, 700]


def test_held_out_api_questions_are_about_the_held_out_modules(qa):
    asked = {m["content"].split("`")[1].rsplit(".", 1)[0] for c in qa["heldout"] for m in c
             if m["role"] == "user" and "`" in m["content"]}
    assert asked <= set(STDLIB_HELDOUT) and len(asked) >= 15  # 19 of the 24 on 3.11
    trained = {m["content"].split("`")[1] for c in qa["train"] for m in c
               if m["role"] == "user" and "`" in m["content"]}
    assert not {q.rsplit(".", 1)[0] for q in trained if "." in q} & set(STDLIB_HELDOUT)
    # "if" and "else" are one topic text; "else" is held out, so the "if" section is too
    held_reference = [c[1]["content"] for c in qa["heldout"] if "`" not in c[1]["content"]]
    assert 'Explain the "if" statement in Python.' in held_reference


def test_conversations_have_the_documented_shape(qa):
    for conversation in qa["all"]:
        roles = [m["role"] for m in conversation]
        assert roles[0] == "system" and conversation[0]["content"] == python_qa.SYSTEM
        assert roles[1:] == ["user", "assistant"] * ((len(roles) - 1) // 2)
        assert 1 <= (len(roles) - 1) // 2 <= python_qa.TURNS_PER_CONVERSATION
        for m in conversation[2::2]:
            words = m["content"].split()
            assert python_qa.MIN_WORDS <= len(words) <= python_qa.MAX_WORDS
            assert m["content"][-1] in ".!?"
    dumps = next(c for c in qa["heldout"] if c[1]["content"] == "What does `json.dumps` do?")
    assert dumps[2]["content"].startswith("Serialize ``obj`` to a JSON formatted ``str``.")
    assert dumps[3]["content"] == "And `json.load`?"


def test_answer_takes_whole_sentences_of_prose():
    doc = "dumps(obj, *, indent=None) -> str\n\nSerialize obj to a JSON string. It is fast.\n\n" \
          "    indented block: not prose.\n\n>>> dumps(1)\n'1'\n\nMore prose follows here, and it ends."
    assert python_qa.answer(doc) == ("Serialize obj to a JSON string. It is fast. "
                                     "More prose follows here, and it ends.")
    assert python_qa.answer(doc, max_words=9) == "Serialize obj to a JSON string. It is fast."
    assert python_qa.answer(doc, max_words=5) is None  # no whole sentence fits
    # a colon that introduced a block ends the sentence; a short one ("For example:") is dropped
    assert python_qa.answer("The statement is used for conditional execution:\n\n   grammar\n\n"
                            "For example:\n\n   x = 1") == "The statement is used for conditional execution."
    assert python_qa.answer("Too short.") is None
    assert python_qa.sections("Title\n*****\n\nBody one.\n\nSub\n===\n\nBody two.\n") == [
        ("Title", "\nBody one.\n"), ("Sub", "\nBody two.")]


def test_rows_and_iter_conversations(qa):
    rows = builtin_rows("builtin:python_qa", "heldout")
    assert rows == [{"messages": c} for c in qa["heldout"]]
    assert list(iter_conversations("builtin:python_qa", split="heldout")) == qa["heldout"]
    assert builtin_rows("builtin:pydoc_topics", "heldout")[0].keys() == {"text"}
    with pytest.raises(DataError, match=r"builtin:pydoc_topics is plain text, not conversations; "
                                        r"expected one of \['builtin:python_qa'\]"):
        next(iter_conversations("builtin:pydoc_topics", split="heldout"))
    with pytest.raises(DataError, match="split 'test' of builtin:python_qa does not exist"):
        next(iter_conversations("builtin:python_qa", split="test"))


def test_local_conversations_are_split_by_their_content(tmp_path, qa):
    path = tmp_path / "chats.jsonl"
    with open(path, "w") as f:
        for c in qa["all"][:200]:
            f.write(json.dumps({"chat": c, "id": 1}) + "\n")
    splits = {s: list(iter_conversations(str(path), split=s, messages_field="chat"))
              for s in ("train", "heldout", "all")}
    assert splits["all"] == qa["all"][:200]
    assert 0 < len(splits["heldout"]) < 30 and len(splits["train"]) + len(splits["heldout"]) == 200
    assert not set(_keys(splits["train"])) & set(_keys(splits["heldout"]))
    with pytest.raises(DataError, match=r"messages field 'messages' not found in .*\['chat', 'id'\]. "
                                        "Pass --messages-field"):
        next(iter_conversations(str(path), split="all"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"message 0 of row 0, field 'messages' of .*bad.jsonl has role 'bot'"):
        next(iter_conversations(str(bad), split="all"))


def test_plain_text_readers_refuse_the_conversations():
    with pytest.raises(DataError, match=r"builtin:python_qa holds conversations .* not plain text.*"
                                        r"builtin:pydoc_topics"):
        next(iter_documents("builtin:python_qa", split="train"))
    with pytest.raises(DataError, match="holds conversations"):
        builtin_documents("builtin:python_qa", "heldout")
    from click.testing import CliRunner

    from unidistill.cli import main

    # (cache-build reads conversations since step 2b: tests/test_chat_cache.py)
    refused = CliRunner().invoke(main, ["evaluate", "--model", "no-such-model", "--data",
                                        "builtin:python_qa"])
    assert refused.exit_code == 2 and "holds conversations" in refused.output, refused.output


def test_every_conversation_renders_with_smollm2s_template(qa):
    """The sizes quoted in unidistill/text/data.py: conversations, questions, tokens, targets."""
    from unidistill.models.loading import load_tokenizer, resolve_model_source
    from unidistill.text.chat import PREFIX_DIFF, render_conversation

    tok = load_tokenizer(resolve_model_source("builtin:smollm2"))
    sizes = {}
    for split in ("train", "heldout"):
        rendered = [render_conversation(tok, c) for c in qa[split]]
        assert {r.mask_method for r in rendered} == {PREFIX_DIFF}
        assert all(len(r.turns) == (len(c) - 1) // 2 for r, c in zip(rendered, qa[split]))
        sizes[split] = (len(rendered), sum(len(r.turns) for r in rendered),
                        sum(len(r.ids) for r in rendered), sum(sum(r.target) for r in rendered))
    if ON_311:
        assert sizes == {"train": (600, 1363, 92063, 55289), "heldout": (100, 252, 15957, 9242)}
    assert len(stdlib_docs.MODULES) == 186

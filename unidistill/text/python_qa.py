"""``builtin:python_qa``: conversations about Python, made offline from its own documentation.

Two kinds of conversation, each opened by the system message :data:`SYSTEM`:

* **API questions.** The public functions and classes of each module of
  :data:`.stdlib_docs.MODULES` (its ``__all__`` when it has one, else the public names defined in
  it), in name order, three to a conversation: the user asks "What does `json.dumps` do?" (for a
  class "What is `json.JSONDecoder`?"), then "And `json.loads`?"; the assistant answers with the
  start of the object's own docstring (:func:`answer`). Objects without a docstring, or whose
  docstring gives no answer, are left out.
* **Reference questions.** One conversation per section heading of the language reference's
  topics (``pydoc_data.topics``, as ``builtin:pydoc_topics``): "Explain the "if" statement in
  Python.", answered with the start of the section. A heading that occurs in several topics is
  asked once.

An answer is the prose of a text (paragraphs that are not indented, no doctest or call-signature
lines) whitespace-joined and cut after the last whole sentence that keeps it within
:data:`MAX_WORDS` words; a sentence that ends with a colon (it introduced a code block or list)
ends with a full stop instead, or is dropped when under five words ("For example:"). Answers
under :data:`MIN_WORDS` words are left out.

Splits (``train``, ``heldout``, ``all``), kept apart as in the text sources: an API conversation
is held out when its module is (the same 24 modules as ``builtin:stdlib_docs``, by the SHA-256
of the module name); a reference heading is held out when any topic it occurs in is held out
(every 10th topic, as ``builtin:pydoc_topics``). So no question, and no module or topic, is in
both splits.

The docstrings are read in a fresh interpreter (``-I -S``, as :mod:`.stdlib_docs` renders), so
the result is the same in every run of one Python build; like ``stdlib_docs`` it changes with the
Python version. Measured on CPython 3.11, rendered with SmolLM2's chat template (pinned in
``tests/test_python_qa.py``; building all three splits takes about 1 s):

=========  =============  =========  ===============================  ======  =======  ======
split      conversations  questions  of which API / reference         tokens  targets  share
=========  =============  =========  ===============================  ======  =======  ======
train      600            1 363      1 227 (464 conv.) / 136          92 063  55 289   60 %
heldout    100            252        238 (86 conv., 19 modules) / 14  15 957  9 242    58 %
=========  =============  =========  ===============================  ======  =======  ======

(targets: assistant tokens with the end-of-turn token; the rest is the system prompt, the
questions and the template.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from unidistill.errors import DataError
from unidistill.text import stdlib_docs
from unidistill.text.splits import in_split

SYSTEM = "You answer questions about Python and its standard library briefly."
MAX_WORDS, MIN_WORDS = 60, 5
TURNS_PER_CONVERSATION = 3
REFERENCE_HELDOUT_EVERY = 10  # every 10th topic by name, as builtin:pydoc_topics

# Runs in a fresh interpreter (-I -S: the standard library only); prints
# {module: [[name, "function" | "class", docstring], ...]} for the public objects with a docstring.
_READ_DOCSTRINGS = """
import importlib, inspect, json, sys, warnings
warnings.simplefilter("ignore")
out = {}
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    declared = getattr(module, "__all__", None)
    names = sorted(set(declared)) if declared is not None else sorted(
        n for n in dir(module) if not n.startswith("_"))
    items = []
    for attr in names:
        obj = getattr(module, attr, None)
        kind = "class" if inspect.isclass(obj) else "function" if inspect.isroutine(obj) else None
        if kind is None or (declared is None and getattr(obj, "__module__", None) != name):
            continue
        doc = obj.__doc__  # its own: inspect.getdoc would inherit a base class's
        if isinstance(doc, str) and doc.strip():
            items.append([attr, kind, inspect.cleandoc(doc)])
    out[name] = items
json.dump(out, sys.stdout)
"""

_SIGNATURE = re.compile(r"^[\w.]+\(.*\)|.* -> ")
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+")
_HEADING_RULE = re.compile(r"[*=\-]{3,}")


def answer(text: str, max_words: int = MAX_WORDS) -> str | None:
    """The start of ``text``'s prose, cut at a sentence end within ``max_words`` words (module
    docstring); None when not even :data:`MIN_WORDS` words of it are left."""
    prose = " ".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if _is_prose(p))
    words: list[str] = []
    for sentence in _SENTENCE_END.split(prose):
        n = len(sentence.split())
        if sentence.endswith(":"):
            if n < 5:
                continue
            sentence = sentence[:-1] + "."
        if len(words) + n > max_words:
            break
        words += sentence.split()
    if not words or words[-1][-1] not in ".!?" or len(words) < MIN_WORDS:
        return None
    return " ".join(words)


def _is_prose(paragraph: str) -> bool:
    first = paragraph.lstrip("\n").split("\n", 1)[0]
    return bool(first.strip()) and not first[0].isspace() and not first.startswith(">>>") \
        and not _SIGNATURE.match(first)


def read_docstrings(names) -> dict[str, list[tuple[str, str, str]]]:
    """``{module: [(name, "function" | "class", docstring), ...]}`` read in a fresh interpreter."""
    names = list(names)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _READ_DOCSTRINGS, *names],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DataError(f"reading the docstrings of builtin:python_qa failed ({sys.executable} exited "
                        f"with {proc.returncode}); it imports the standard library modules of "
                        f"builtin:stdlib_docs, which a full CPython 3.11-3.13 install has:\n"
                        f"{proc.stderr[-2000:]}")
    return {name: [tuple(item) for item in items] for name, items in json.loads(proc.stdout).items()}


def _api_question(module: str, name: str, kind: str, first: bool) -> str:
    qualified = name if module == "builtins" else f"{module}.{name}"
    if not first:
        return f"And `{qualified}`?"
    return f"What is `{qualified}`?" if kind == "class" else f"What does `{qualified}` do?"


def api_conversations(modules) -> list[list[dict]]:
    """The API conversations of ``modules``, in module order, then name order."""
    conversations = []
    for module, items in read_docstrings(modules).items():
        answered = [(name, kind, a) for name, kind, doc in items if (a := answer(doc))]
        for start in range(0, len(answered), TURNS_PER_CONVERSATION):
            messages = [{"role": "system", "content": SYSTEM}]
            for i, (name, kind, text) in enumerate(answered[start:start + TURNS_PER_CONVERSATION]):
                messages += [{"role": "user", "content": _api_question(module, name, kind, i == 0)},
                             {"role": "assistant", "content": text}]
            conversations.append(messages)
    return conversations


def sections(text: str) -> list[tuple[str, str]]:
    """``(heading, body)`` of each section of a reference topic: a heading is a line underlined
    by a rule of ``*``, ``=`` or ``-`` of its own length."""
    lines = text.splitlines()
    starts = [i for i in range(len(lines) - 1) if lines[i].strip() and
              _HEADING_RULE.fullmatch(lines[i + 1]) and len(lines[i + 1]) == len(lines[i])]
    return [(lines[s], "\n".join(lines[s + 2:end]))
            for s, end in zip(starts, [*starts[1:], len(lines)])]


def _reference_question(heading: str) -> str:
    subject = heading[0].lower() + heading[1:] if heading[1:2].islower() else heading
    return f"Explain {subject} in Python."


def reference_conversations(split: str) -> list[list[dict]]:
    """One conversation per section heading of ``pydoc_data.topics`` in ``split``, in topic order."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held_topics = set(keys[::REFERENCE_HELDOUT_EVERY])
    found: dict[str, tuple[str, bool]] = {}  # heading -> (answer, held out anywhere)
    for key in keys:
        for heading, body in sections(topics[key]):
            text, held = found.get(heading, (answer(body), False))
            found[heading] = (text, held or key in held_topics)
    conversations = []
    for heading, (text, held) in found.items():
        if text and _in_split(held, split):
            conversations.append([{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": _reference_question(heading)},
                                  {"role": "assistant", "content": text}])
    return conversations


def _in_split(held_out: bool, split: str) -> bool:
    return split == "all" or held_out == (split == "heldout")


def conversations(split: str) -> list[list[dict]]:
    """Every conversation of ``split``: the API ones, then the reference ones."""
    modules = [m for m in stdlib_docs.MODULES if in_split(m, split, stdlib_docs.HELDOUT_SHARE)]
    return api_conversations(modules) + reference_conversations(split)

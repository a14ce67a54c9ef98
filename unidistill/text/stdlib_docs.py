"""``builtin:stdlib_docs``: pydoc's plain-text documentation of the standard library's modules.

One document per module of :data:`MODULES`, a fixed, sorted list of 186 modules and
submodules that ship with CPython 3.11 to 3.13 (none is removed or deprecated for removal in
those versions' release notes; run here on 3.11 only), import quickly and without side effects
(no GUI, no terminal or browser), and need no optional system library (no ssl, sqlite3, lzma,
bz2, ctypes, curses, readline). A module that does not import is an error, never skipped.
Rendering all of them takes a few seconds, in a fresh interpreter (see :func:`render`); nothing
is cached on disk.

The text is what ``pydoc.render_doc(module, renderer=pydoc.plaintext)`` prints, minus what is not
documentation or not reproducible: the MODULE REFERENCE link and FILE path (they name the Python
version and the install), DATA, PACKAGE CONTENTS and SUBMODULES (reprs of runtime values and of
whatever else is imported), the "inherited from" and "Data and other attributes" parts of each
class and its ``__dict__``/``__weakref__`` entries (the same text repeated in hundreds of classes,
and reprs whose order can follow the hash seed), and memory addresses in default values
(``<object object at 0x7f...>``). The result is the same in every run of one Python build. It is NOT the same across Python versions or operating
systems: docstrings, signatures and the members of modules such as ``time`` or ``socketserver``
change with them, so compare numbers measured on this corpus only within one Python minor
version (the cache manifest records the source name, not the Python version: note it beside your
results). Measured on CPython 3.11: 2.29 M characters, 566 K SmolLM2 tokens (503 K in train,
63 K in held-out), rendered in about 4 s of one CPU core.

Held-out split: a module is held out when the SHA-256 of its NAME falls below
:data:`HELDOUT_SHARE` (24 of the 186; see :mod:`unidistill.text.splits`), so the
held-out modules are the same in every Python version, whatever their text. No module's text is
in both splits; what they share is pydoc's own phrasing of special methods (``__eq__`` "Return
self==value.", ``__new__`` "Create and return a new object."): 8 % of the held-out 12-word
shingles also occur in train on 3.11. Against ``builtin:pydoc_topics`` (the language
reference), under 1 % of its shingles occur here: the two are one domain, not one text.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from unidistill.errors import DataError

HELDOUT_SHARE = 0.1

MODULES = tuple(sorted("""
abc argparse array ast asyncio atexit base64 bdb binascii bisect builtins cProfile calendar cmath
cmd code codecs codeop collections collections.abc colorsys compileall concurrent.futures
configparser contextlib contextvars copy copyreg csv dataclasses datetime decimal difflib dis
doctest email email.charset email.contentmanager email.encoders email.errors email.generator
email.header email.headerregistry email.iterators email.message email.mime.text email.parser
email.policy email.utils enum faulthandler filecmp fileinput fnmatch fractions ftplib functools gc
getopt getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser http http.client
http.cookiejar http.cookies http.server imaplib importlib importlib.abc importlib.machinery
importlib.metadata importlib.resources importlib.util inspect io ipaddress itertools json
linecache locale logging logging.config logging.handlers mailbox marshal math mimetypes
modulefinder multiprocessing multiprocessing.pool multiprocessing.shared_memory netrc numbers
operator optparse pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint profile
pstats py_compile pyclbr pydoc queue quopri random re reprlib runpy sched secrets selectors shelve
shlex shutil smtplib socketserver stat statistics string struct subprocess symtable sysconfig
tabnanny tarfile tempfile textwrap threading time timeit tokenize tomllib trace traceback
tracemalloc types typing unicodedata unittest unittest.mock urllib.error urllib.parse
urllib.request urllib.response urllib.robotparser uuid venv warnings wave weakref webbrowser
wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom
xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.sax xml.sax.handler xml.sax.saxutils
xml.sax.xmlreader xmlrpc.client xmlrpc.server zipapp zipfile zipimport zlib zoneinfo
""".split()))

# Top-level sections of pydoc's text output that are not reproducible documentation.
_DROPPED_SECTIONS = {"MODULE REFERENCE", "DATA", "FILE", "PACKAGE CONTENTS", "SUBMODULES"}
_SECTION = re.compile(r"^[A-Z][A-Z ]*$")
# A part of a class box: "     |  Methods inherited from builtins.object:"; group 1 = the box's
# prefix, group 2 = the part's title
_PART_HEADER = re.compile(r"^(\s*\|\s+)([A-Z][\w ]*(?: from [\w.]+)?):$")
_DROPPED_PART = re.compile(r".* inherited from .+|Data and other attributes defined here$")
_BOILERPLATE = {"__dict__": "dictionary for instance variables",  # + " (if defined)" before 3.12
                "__weakref__": "list of weak references to the object"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# Runs in a fresh interpreter started with -I -S: the standard library and nothing else on the
# path (no site-packages, no PYTHON* variables, no working directory), so no installed package can
# shadow a standard module, the caller's imports leave no trace in the text, and the imports done
# here stay out of the caller's process. pydoc's introspection also runs faster there: inspect
# scans every module in sys.modules for each class it looks up, and the caller may hold thousands.
_RENDER = """
import importlib, json, pydoc, sys, warnings
warnings.simplefilter("ignore")  # introspection touches deprecated attributes
pages = {}
for name in sys.argv[1:]:
    try:
        pages[name] = {"text": pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)}
    except ImportError as e:
        pages[name] = {"error": f"{type(e).__name__}: {e}"}
json.dump(pages, sys.stdout)
"""


def render(names) -> dict[str, str]:
    """pydoc's plain-text pages of the modules ``names``, rendered in a fresh interpreter."""
    names = list(names)
    if not names:
        return {}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _RENDER, *names], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise DataError(f"rendering the documentation of builtin:stdlib_docs failed ({sys.executable} "
                        f"exited with {proc.returncode}):\n{proc.stderr[-2000:]}")
    pages = json.loads(proc.stdout)
    failed = {n: p["error"] for n, p in pages.items() if "error" in p}
    if failed:
        raise DataError(f"builtin:stdlib_docs documents standard library modules that this Python "
                        f"cannot import: {failed}; they ship with every CPython build that the "
                        "corpus supports (3.11-3.13). Use a full CPython install, or another --data.")
    return {n: pages[n]["text"] for n in names}


def clean(text: str) -> str:
    """Drop the parts of a pydoc text page that are not reproducible documentation."""
    lines = _drop_sections(text.splitlines())
    lines = _drop_class_parts(lines)
    return _ADDRESS.sub("", "\n".join(lines)).strip() + "\n"


def _drop_sections(lines: list[str]) -> list[str]:
    out, dropping = [], False
    for line in lines:
        if _SECTION.match(line):
            dropping = line in _DROPPED_SECTIONS
        if not dropping:
            out.append(line)
    return out


def _drop_class_parts(lines: list[str]) -> list[str]:
    """Remove the "inherited from" and "Data and other attributes" parts of class boxes, the
    ``__dict__``/``__weakref__`` entries every plain class has, and parts left empty.

    A class box's parts are separated by ``|  -----`` lines at the box's own indentation; a
    part runs to the next separator of the same box or to the end of the box.
    """
    lines = _drop_boilerplate(lines)
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _PART_HEADER.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        prefix = m.group(1)
        box, separator = prefix.rstrip(), prefix + "-" * 10
        end = i + 1
        while end < len(lines) and lines[end].startswith(box) and not lines[end].startswith(separator):
            end += 1
        body_empty = all(line.strip(" |") == "" for line in lines[i + 1:end])
        if not (_DROPPED_PART.match(m.group(2)) or body_empty):
            out.append(lines[i])
            i += 1
            continue
        while out and out[-1].startswith(box) and (out[-1].strip(" |") == ""
                                                   or out[-1].startswith(separator)):
            out.pop()  # the separator and blank box lines before the dropped part
        i = end
    return out


def _drop_boilerplate(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        name = lines[i].strip(" |")
        if name in _BOILERPLATE and i + 1 < len(lines) and lines[i + 1].strip(" |").startswith(
                _BOILERPLATE[name]):
            i += 2
            if out and i < len(lines) and out[-1].strip(" |") == "" and lines[i].strip(" |") == "":
                i += 1  # the blank line between two entries
            continue
        out.append(lines[i])
        i += 1
    return out


def documents(names=MODULES) -> list[tuple[str, str]]:
    """``(module name, cleaned documentation)`` for each module, in the order given."""
    return [(name, clean(text)) for name, text in render(names).items()]

"""The one-way import rules of docs/ARCHITECTURE.md, written as import-linter contracts in
setup.cfg: a violation fails the suite, not only ``make test``'s ``lint-imports`` step."""

from __future__ import annotations

import ast
import configparser
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import unidistill

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _contracts() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config


def _listed(value: str) -> list[str]:
    return [m.strip() for line in value.strip().splitlines() for m in line.replace(":", "|").split("|")
            if m.strip()]


def _top_level_modules() -> set[str]:
    return {f"unidistill.{m.name}" for m in pkgutil.iter_modules(unidistill.__path__)}


def test_the_import_contracts_are_kept():
    """``lint-imports`` (the test extra's import-linter) passes on this tree."""
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} is missing: pip install -e '.[test]'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "0 broken" in run.stdout


def test_every_module_sits_in_a_layer():
    """A new top-level module cannot escape the rules: each one is in the layers contract, and
    each one but the CLI in the contract that forbids importing the CLI."""
    config = _contracts()
    modules = _top_level_modules()
    layered = _listed(config["importlinter:contract:layers"]["layers"])
    assert sorted(layered) == sorted(modules)
    assert layered[0] == "unidistill.cli"
    sources = _listed(config["importlinter:contract:cli"]["source_modules"])
    assert sorted(sources) == sorted(modules - {"unidistill.cli"})
    phases = _listed(config["importlinter:contract:phases"]["modules"])
    assert phases == ["unidistill.cache_builder", "unidistill.trainer"]


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _oversized() -> list[str]:
    """Every module of unidistill over MAX_MODULE_LINES lines and every function (or method) over
    MAX_FUNCTION_LINES, counted from its first decorator to its last line: a command's stacked
    click options count, so a command with many options keeps them in a list beside it
    (``unidistill.cli.common.with_options``)."""
    found = []
    for path in sorted((REPO / "unidistill").rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(REPO)
        n_lines = len(source.splitlines())
        if n_lines > MAX_MODULE_LINES:
            found.append(f"{where}: {n_lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                length = node.end_lineno - first + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{where}:{node.lineno} {node.name}(): {length} lines")
    return found


def test_no_module_over_400_lines_and_no_function_over_60():
    """Issue 14's size limits, over every module of the package."""
    assert _oversized() == []

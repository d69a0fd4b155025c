"""The code stays easy to read: short functions, shallow nesting, a short verb (``make lint`` runs this)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60
MAX_DEPTH = 4
CONTROL = (ast.If, ast.For, ast.While, ast.Try, ast.With, ast.AsyncFor, ast.AsyncWith, ast.Match)
SOURCES = sorted(p for package in ("converter", "jobs") for p in (REPO / package).rglob("*.py"))


def nesting(node: ast.AST, depth: int = 0) -> int:
    """How deep control flow nests inside ``node`` (nested functions and classes count on their own)."""
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        deepest = max(deepest, nesting(child, depth + isinstance(child, CONTROL)))
    return deepest


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_functions_are_short_and_shallow(path):
    long = [f"{f.name}: {f.end_lineno - f.lineno + 1} lines" for f in functions(path)
            if f.end_lineno - f.lineno + 1 > MAX_LINES]
    deep = [f"{f.name}: depth {nesting(f)}" for f in functions(path) if nesting(f) > MAX_DEPTH]
    assert not long and not deep, f"{path.name}: {long + deep}"


def test_the_verb_reads_in_one_sitting():
    assert len((REPO / "converter" / "convert.py").read_text().splitlines()) <= 200


def test_the_checks_can_fail():
    deep = ast.parse("def f(x):\n    for a in x:\n        if a:\n            while a:\n                with a:\n"
                     "                    try:\n                        pass\n                    finally:\n"
                     "                        pass\n")
    assert nesting(deep.body[0]) == 5

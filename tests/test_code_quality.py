"""The linter, the formatter and the type checker run with the tests, so CI enforces them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["kaio", "tests", "benchmarks"]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    result = _run("ruff", "check", "--no-cache", *SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_code_is_formatted():
    result = _run("ruff", "format", "--check", "--no-cache", *SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr


# Small enough to hold in one's head: the guide is ~300 lines a class and ~60 a function.
MAX_CLASS_LINES = 310
MAX_FUNCTION_LINES = 70


def test_no_class_or_function_of_kaio_outgrows_the_guide():
    too_long = []
    for path in sorted((ROOT / "kaio").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    too_long.append(f"{path.relative_to(ROOT)}: {node.name} is {lines} lines (at most {limit})")
    assert not too_long, "\n".join(too_long)


@pytest.mark.xdist_group("mypy")
def test_mypy_finds_no_type_error(tmp_path):
    # A private cache: a shared one would be written by concurrent runs.
    result = _run("mypy", "--cache-dir", str(tmp_path / "mypy-cache"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.xdist_group("probe")
def test_tests_of_one_xdist_group_are_sent_to_one_worker(request):
    """The tests sharing a real run (a module-scoped fixture) are one xdist_group, so that the run is made once.
    pytest 9.2 with pytest-xdist 3.8 ignores the groups without a word (pytest-xdist#1386): say it here."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        pytest.skip("not run by xdist workers: every test is in this one process")
    assert request.node.nodeid.endswith("@probe"), "--dist loadgroup did not see this test's xdist_group"

"""The checkout passes its linter and its type checker, as configured in pyproject.toml ([tool.ruff], [tool.mypy]).

Both come with the dev extra and run from this Python's environment; a finding fails the test with the tool's report.
mypy's first run takes about a minute (it then keeps a cache in .mypy_cache/).
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_ruff_finds_nothing():
    result = _run("ruff", "check", "--no-fix", "--output-format", "concise", ".")
    assert result.returncode == 0, f"ruff check . found:\n{result.stdout}{result.stderr}"


def test_mypy_finds_nothing():
    result = _run("mypy")  # the files and options of [tool.mypy]
    assert result.returncode == 0, f"mypy found:\n{result.stdout}{result.stderr}"

"""The style gates run with the tests: ruff over everything, mypy --strict over src/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    proc = run("ruff", "check", "src", "tests", "benchmarks", "scripts", "examples")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict() -> None:
    proc = run("mypy")  # strict, on src/: see [tool.mypy] in pyproject.toml
    assert proc.returncode == 0, proc.stdout + proc.stderr

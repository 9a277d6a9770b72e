"""The core is covered 100 % by branch, by its own network-free tests (tests/core)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_rca_core_branch_coverage_is_complete(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/core",
            "-q",
            "-p",
            "no:cacheprovider",
            "--cov=rca_core",
            "--cov-branch",
            "--cov-report=term-missing:skip-covered",
            "--cov-fail-under=100",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COVERAGE_FILE": str(tmp_path / ".coverage")},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

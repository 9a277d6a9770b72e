"""The docs are executable and current.

- Every ```python block of README.md and docs/*.md runs (the blocks of one
  page share a namespace, in order, as a reader would run them).
- The state diagram in docs/concepts.md is the one the core's tables draw.
- Every relative link of README.md and docs/*.md points at a file that exists.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from rca_core import state_diagram

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gen_docs

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_examples_run(page: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TASK_FILES_DIR", str(tmp_path))
    monkeypatch.setenv("WORKER_TOKEN", "docs-token")
    name = f"docs_{page.stem.replace('-', '_')}"
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    for n, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{page.name}[{n}]", "exec"), module.__dict__)


@pytest.mark.parametrize("region", sorted(gen_docs.REGIONS), ids=lambda r: r[1])
def test_generated_regions_are_current(region: tuple[str, str]) -> None:
    page, marker = region
    assert gen_docs.region_text(page, marker) == gen_docs.REGIONS[region](), (
        f"docs/{page} is stale: run .venv/bin/python scripts/gen_docs.py"
    )


def test_state_diagram_has_every_transition() -> None:
    diagram = state_diagram()
    from rca_core._state import LINK_TRANSITIONS, WORKER_TRANSITIONS

    for (src, event), dst in [*WORKER_TRANSITIONS.items(), *LINK_TRANSITIONS.items()]:
        assert f"{src.name} --> {dst.name}: {event.value}" in diagram


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a broken link, a missing page or an orphan page fails."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "concepts" / "index.html").is_file()

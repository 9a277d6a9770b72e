"""Regenerate the parts of the docs that come from the code.

    .venv/bin/python scripts/gen_docs.py

rewrites the marked regions of docs/concepts.md (the state diagram, from the
core's transition tables) and docs/configuration.md (the configuration table,
from the config's settings). tests/test_docs.py fails when they are stale.
"""

from __future__ import annotations

import re
from pathlib import Path

from rca_core import state_diagram
from rca_core._config import configuration_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"

REGIONS = {
    ("concepts.md", "state-diagram"): lambda: "```mermaid\n" + state_diagram() + "```\n",
    ("configuration.md", "config-table"): configuration_reference,
}


def region_text(page: str, marker: str) -> str:
    text = (DOCS / page).read_text()
    found = re.search(rf"<!-- {marker}:begin -->\n(.*?)<!-- {marker}:end -->", text, re.S)
    if not found:
        raise SystemExit(f"{page} lost its {marker} markers")
    return found.group(1)


def main() -> None:
    for (page, marker), make in REGIONS.items():
        path = DOCS / page
        text = path.read_text()
        generated = make()
        new = re.sub(
            rf"(<!-- {marker}:begin -->\n).*?(<!-- {marker}:end -->)",
            lambda m, generated=generated: m.group(1) + generated + m.group(2),
            text,
            flags=re.S,
        )
        path.write_text(new)


if __name__ == "__main__":
    main()

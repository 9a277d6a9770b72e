"""configuration_reference(): the settings table of docs/configuration.md, from the settings.

tests/test_docs.py checks that the page holds the current table; this checks the
table itself: one well-formed row per setting, in the order WorkerConfig reads them.
"""

from __future__ import annotations

from rca_core._config import SETTING_DOCS, WorkerConfig, configuration_reference


def rows() -> list[list[str]]:
    text = configuration_reference()
    assert text.endswith("|\n")
    lines = text.splitlines()
    assert lines[:2] == ["| variable | default | meaning |", "|---|---|---|"]
    cells = [line.split(" | ") for line in lines[2:]]
    for line, row in zip(lines[2:], cells, strict=True):
        assert line.startswith("| ") and line.endswith(" |"), line
        assert len(row) == 3, f"a cell of this row holds a '|': {line}"
    return [[row[0][2:], row[1], row[2][:-2]] for row in cells]


def test_one_row_per_setting_in_the_order_they_are_read() -> None:
    read = [name for name in vars(WorkerConfig({})) if name.isupper()]
    assert [name for name, _, _ in rows()] == [f"`{name}`" for name in read]
    assert set(SETTING_DOCS) == set(read)


def test_each_row_shows_the_documented_default_and_meaning() -> None:
    for name, default, meaning in rows():
        assert (default, meaning) == SETTING_DOCS[name.strip("`")], name
        assert default and meaning.endswith("."), name

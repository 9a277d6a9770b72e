"""TaskFiles' shared implementation: names never leave the task folder."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from rca_core import INVALID_INPUT_ERROR, TaskFailure
from rca_core._taskfiles import TaskFilesBase

T = TypeVar("T")


class InlineFiles(TaskFilesBase):
    """Runs the blocking calls inline: enough to test the logic without threads."""

    async def _run(self, func: Callable[[], T]) -> T:
        return func()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_write_read_list_exists_path_to(tmp_path: Path) -> None:
    files = InlineFiles(str(tmp_path / "task"))

    async def scenario() -> None:
        assert await files.list() == []  # the folder does not exist yet
        await files.write("a.txt", "hello")
        await files.write("sub/b.bin", b"\x00\x01")  # bytes switch to binary mode
        assert await files.read("a.txt") == "hello"
        assert await files.read("sub/b.bin", "rb") == b"\x00\x01"
        assert await files.list() == ["a.txt", "sub"]
        assert await files.exists("a.txt") and not await files.exists("nope")
        path = await files.path_to("deep/er/c.txt")
        assert path == str(tmp_path / "task" / "deep" / "er" / "c.txt")
        assert os.path.isdir(os.path.dirname(path))
        assert await files.get_root() == str(tmp_path / "task") == files.root
        async with files.open("d.txt", "w") as f:
            assert await f.write("line1\nline2\n") == 12
            assert f.name.endswith("d.txt")
        async with files.open("d.txt") as f:
            assert await f.readline() == "line1\n"
            assert await f.seek(0) == 0
            assert await f.read() == "line1\nline2\n"

    run(scenario())
    assert repr(files) == f"InlineFiles({str(tmp_path / 'task')!r})"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "", "a\x00b"])
def test_names_that_escape_are_refused(tmp_path: Path, name: str) -> None:
    files = InlineFiles(str(tmp_path / "task"))
    with pytest.raises(TaskFailure) as info:
        run(files.write(name, "x"))
    assert info.value.code == INVALID_INPUT_ERROR
    assert not (tmp_path / "x").exists()


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    task = tmp_path / "task"
    task.mkdir()
    (task / "link").symlink_to(outside)
    files = InlineFiles(str(task))
    with pytest.raises(TaskFailure, match="leads outside the task folder"):
        run(files.write("link/x.txt", "x"))
    assert list(outside.iterdir()) == []


def test_the_base_class_needs_an_adapter() -> None:
    with pytest.raises(NotImplementedError):
        run(TaskFilesBase("/tmp/x").list())

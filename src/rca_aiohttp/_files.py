"""``TaskFiles``: a task's private folder, with asynchronous file helpers.

Every name is checked twice: lexically by the core (no absolute names, no
``..`` out of the folder) and on disk here (no symlink pointing outside). The
blocking file calls run in a thread, so a big read or write never stalls the
event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO, Any

from rca_core._errors import INVALID_INPUT_ERROR, TaskFailure
from rca_core._paths import is_within, join_inside

__all__ = ["TaskFiles"]


class TaskFiles:
    """Files of one task, under ``TASK_FILES_DIR/<task id>``; deleted after the result is sent."""

    def __init__(self, task_dir: str) -> None:
        self._root = os.path.abspath(task_dir)

    def __repr__(self) -> str:
        return f"TaskFiles({self._root!r})"

    @property
    def root(self) -> str:
        return self._root

    def _checked(self, name: str) -> str:
        """The path for ``name``; creates the task folder; refuses escapes (blocking)."""
        path = join_inside(self._root, name)
        os.makedirs(self._root, exist_ok=True)
        real_root = os.path.realpath(self._root)
        if not is_within(real_root, os.path.realpath(path)):
            raise TaskFailure(
                INVALID_INPUT_ERROR, f"file name {name!r} leads outside the task folder"
            )
        return path

    async def get_root(self) -> str:
        """The task folder (created if needed)."""
        await asyncio.to_thread(os.makedirs, self._root, exist_ok=True)
        return self._root

    async def path_to(self, name: str) -> str:
        """The full path of ``name`` in the task folder; parent folders are created."""

        def work() -> str:
            path = self._checked(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return path

        return await asyncio.to_thread(work)

    async def read(self, name: str, mode: str = "r") -> str | bytes:
        def work() -> str | bytes:
            with open(self._checked(name), mode) as f:
                data: str | bytes = f.read()
                return data

        return await asyncio.to_thread(work)

    async def write(self, name: str, data: str | bytes, mode: str = "w") -> None:
        if isinstance(data, bytes) and "b" not in mode:
            mode += "b"

        def work() -> None:
            path = self._checked(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, mode) as f:
                f.write(data)

        await asyncio.to_thread(work)

    async def list(self) -> list[str]:
        """Names in the task folder (top level), sorted."""

        def work() -> list[str]:
            try:
                return sorted(os.listdir(self._root))
            except FileNotFoundError:
                return []

        return await asyncio.to_thread(work)

    async def exists(self, name: str) -> bool:
        def work() -> bool:
            return os.path.exists(self._checked(name))

        return await asyncio.to_thread(work)

    @asynccontextmanager
    async def open(self, name: str, mode: str = "r") -> AsyncIterator[_AsyncFile]:
        """``async with files.open(name, mode) as f``, then ``await f.read()`` etc."""

        def work() -> IO[Any]:
            path = self._checked(name)
            if any(m in mode for m in "wax+"):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            return open(path, mode)

        f = await asyncio.to_thread(work)
        try:
            yield _AsyncFile(f)
        finally:
            await asyncio.to_thread(f.close)


class _AsyncFile:
    """A file object whose blocking methods run in a thread."""

    def __init__(self, f: IO[Any]) -> None:
        self._f = f

    async def read(self, size: int = -1) -> Any:
        return await asyncio.to_thread(self._f.read, size)

    async def write(self, data: Any) -> int:
        return await asyncio.to_thread(self._f.write, data)

    async def readline(self) -> Any:
        return await asyncio.to_thread(self._f.readline)

    async def seek(self, offset: int, whence: int = 0) -> int:
        return await asyncio.to_thread(self._f.seek, offset, whence)

    @property
    def name(self) -> str:
        return str(self._f.name)

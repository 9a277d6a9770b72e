"""``TaskFiles``: a task's private folder, with asynchronous file helpers, on any anyio backend.

The same class as ``rca_aiohttp.TaskFiles`` with the same guarantees: every
name is checked lexically by the core (no absolute names, no ``..`` out of the
folder) and on disk here (no symlink pointing outside). The blocking calls run
in worker threads through ``anyio.to_thread``, so they work on asyncio and on
trio alike and a big read or write never stalls the event loop.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import IO, Any, TypeVar

import anyio
import anyio.to_thread

from rca_core._errors import INVALID_INPUT_ERROR, TaskFailure
from rca_core._paths import is_within, join_inside

__all__ = ["TaskFiles"]

T = TypeVar("T")


async def _in_thread(func: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(func)


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
        if not is_within(os.path.realpath(self._root), os.path.realpath(path)):
            raise TaskFailure(
                INVALID_INPUT_ERROR, f"file name {name!r} leads outside the task folder"
            )
        return path

    async def get_root(self) -> str:
        """The task folder (created if needed)."""
        await _in_thread(functools.partial(os.makedirs, self._root, exist_ok=True))
        return self._root

    async def path_to(self, name: str) -> str:
        """The full path of ``name`` in the task folder; parent folders are created."""

        def work() -> str:
            path = self._checked(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return path

        return await _in_thread(work)

    async def read(self, name: str, mode: str = "r") -> str | bytes:
        def work() -> str | bytes:
            with open(self._checked(name), mode) as f:
                data: str | bytes = f.read()
                return data

        return await _in_thread(work)

    async def write(self, name: str, data: str | bytes, mode: str = "w") -> None:
        if isinstance(data, bytes) and "b" not in mode:
            mode += "b"

        def work() -> None:
            path = self._checked(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, mode) as f:
                f.write(data)

        await _in_thread(work)

    async def list(self) -> list[str]:
        """Names in the task folder (top level), sorted."""

        def work() -> list[str]:
            try:
                return sorted(os.listdir(self._root))
            except FileNotFoundError:
                return []

        return await _in_thread(work)

    async def exists(self, name: str) -> bool:
        return await _in_thread(lambda: os.path.exists(self._checked(name)))

    @asynccontextmanager
    async def open(self, name: str, mode: str = "r") -> AsyncIterator[_AsyncFile]:
        """``async with files.open(name, mode) as f``, then ``await f.read()`` etc."""

        def work() -> IO[Any]:
            path = self._checked(name)
            if any(m in mode for m in "wax+"):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            return open(path, mode)

        f = await _in_thread(work)
        try:
            yield _AsyncFile(f)
        finally:
            # Shielded: a cancelled handler must still close (and flush) its file.
            with anyio.CancelScope(shield=True):
                await _in_thread(f.close)


class _AsyncFile:
    """A file object whose blocking methods run in a thread."""

    def __init__(self, f: IO[Any]) -> None:
        self._f = f

    async def read(self, size: int = -1) -> Any:
        return await _in_thread(functools.partial(self._f.read, size))

    async def write(self, data: Any) -> int:
        return await _in_thread(functools.partial(self._f.write, data))

    async def readline(self) -> Any:
        return await _in_thread(self._f.readline)

    async def seek(self, offset: int, whence: int = 0) -> int:
        return await _in_thread(functools.partial(self._f.seek, offset, whence))

    @property
    def name(self) -> str:
        return str(self._f.name)

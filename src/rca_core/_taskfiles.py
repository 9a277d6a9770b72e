"""``TaskFiles``, written once: a task's private folder with asynchronous helpers.

Every name is checked twice: lexically (:func:`._paths.join_inside`: no
absolute names, no ``..`` out of the folder) and on disk (no symlink that
leads outside). The blocking calls run in worker threads; *how* is the only
thing an adapter adds (``asyncio.to_thread`` or ``anyio.to_thread``), by
overriding :meth:`TaskFilesBase._run` (and :meth:`TaskFilesBase._close` where
closing must survive a cancellation). No event loop library is imported here.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import IO, Any, TypeVar

from ._errors import INVALID_INPUT_ERROR, TaskFailure
from ._paths import is_within, join_inside

__all__ = ["AsyncFile", "TaskFilesBase"]

T = TypeVar("T")


class TaskFilesBase:
    """Files of one task, under ``TASK_FILES_DIR/<task id>``; deleted after the result is sent."""

    def __init__(self, task_dir: str) -> None:
        self._root = os.path.abspath(task_dir)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._root!r})"

    async def _run(self, func: Callable[[], T]) -> T:
        """Run the blocking ``func`` in a worker thread (the adapter's way)."""
        raise NotImplementedError

    async def _close(self, f: IO[Any]) -> None:
        await self._run(f.close)

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

    def _checked_with_parent(self, name: str) -> str:
        path = self._checked(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    async def get_root(self) -> str:
        """The task folder (created if needed)."""
        await self._run(lambda: os.makedirs(self._root, exist_ok=True))
        return self._root

    async def path_to(self, name: str) -> str:
        """The full path of ``name`` in the task folder; parent folders are created."""
        return await self._run(lambda: self._checked_with_parent(name))

    async def read(self, name: str, mode: str = "r") -> str | bytes:
        def work() -> str | bytes:
            with open(self._checked(name), mode) as f:
                data: str | bytes = f.read()
                return data

        return await self._run(work)

    async def write(self, name: str, data: str | bytes, mode: str = "w") -> None:
        if isinstance(data, bytes) and "b" not in mode:
            mode += "b"

        def work() -> None:
            with open(self._checked_with_parent(name), mode) as f:
                f.write(data)

        await self._run(work)

    async def list(self) -> list[str]:
        """Names in the task folder (top level), sorted."""

        def work() -> list[str]:
            try:
                return sorted(os.listdir(self._root))
            except FileNotFoundError:
                return []

        return await self._run(work)

    async def exists(self, name: str) -> bool:
        return await self._run(lambda: os.path.exists(self._checked(name)))

    @asynccontextmanager
    async def open(self, name: str, mode: str = "r") -> AsyncIterator[AsyncFile]:
        """``async with files.open(name, mode) as f``, then ``await f.read()`` etc."""

        def work() -> IO[Any]:
            writing = any(m in mode for m in "wax+")
            path = self._checked_with_parent(name) if writing else self._checked(name)
            return open(path, mode)

        f = await self._run(work)
        try:
            yield AsyncFile(f, self)
        finally:
            await self._close(f)


class AsyncFile:
    """A file object whose blocking methods run in a thread."""

    def __init__(self, f: IO[Any], owner: TaskFilesBase) -> None:
        self._f = f
        self._owner = owner

    async def read(self, size: int = -1) -> Any:
        return await self._owner._run(lambda: self._f.read(size))

    async def write(self, data: Any) -> int:
        return await self._owner._run(lambda: self._f.write(data))

    async def readline(self) -> Any:
        return await self._owner._run(self._f.readline)

    async def seek(self, offset: int, whence: int = 0) -> int:
        return await self._owner._run(lambda: self._f.seek(offset, whence))

    @property
    def name(self) -> str:
        return str(self._f.name)

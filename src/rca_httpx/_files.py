"""``TaskFiles`` on any anyio backend: the core's implementation, with ``anyio.to_thread``."""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any, TypeVar

import anyio
import anyio.to_thread

from rca_core._taskfiles import TaskFilesBase

__all__ = ["TaskFiles"]

T = TypeVar("T")


class TaskFiles(TaskFilesBase):
    """Files of one task, under ``TASK_FILES_DIR/<task id>``; deleted after the result is sent.

    The same class as ``rca_aiohttp.TaskFiles``, with the same guarantees; the
    blocking calls run through ``anyio.to_thread`` so they work on asyncio and
    on trio alike.
    """

    async def _run(self, func: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(func)

    async def _close(self, f: IO[Any]) -> None:
        # Shielded: a cancelled handler must still close (and flush) its file;
        # on trio a cancellation stays in force for every later await.
        with anyio.CancelScope(shield=True):
            await self._run(f.close)

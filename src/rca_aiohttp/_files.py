"""``TaskFiles`` on asyncio: the core's implementation, with ``asyncio.to_thread``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from rca_core._taskfiles import TaskFilesBase

__all__ = ["TaskFiles"]

T = TypeVar("T")


class TaskFiles(TaskFilesBase):
    """Files of one task, under ``TASK_FILES_DIR/<task id>``; deleted after the result is sent.

    Methods (all asynchronous): ``path_to``, ``read``, ``write``, ``list``,
    ``exists``, ``get_root``, and ``open`` (an async context manager). A name
    that leaves the task folder (``..``, an absolute path, a symlink pointing
    out) fails the task with ``INVALID_INPUT_ERROR``.
    """

    async def _run(self, func: Callable[[], T]) -> T:
        return await asyncio.to_thread(func)

"""rca_aiohttp: the rca-worker SDK on asyncio + aiohttp.

Drop-in for the reference SDK: replace ``avtomatika_worker`` with
``rca_aiohttp`` in your imports.
"""

from __future__ import annotations

from rca_core._errors import (
    INVALID_INPUT_ERROR,
    PERMANENT_ERROR,
    TRANSIENT_ERROR,
    ConfigError,
    TaskFailure,
)

from ._files import TaskFiles
from ._worker import Worker
from .config import WorkerConfig

__all__ = [
    "INVALID_INPUT_ERROR",
    "PERMANENT_ERROR",
    "TRANSIENT_ERROR",
    "ConfigError",
    "TaskFailure",
    "TaskFiles",
    "Worker",
    "WorkerConfig",
]

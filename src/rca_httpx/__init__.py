"""rca_httpx: the rca-worker SDK on anyio + httpx, on asyncio or trio.

The same API and behaviour as ``rca_aiohttp`` (replace ``avtomatika_worker``
with ``rca_httpx`` in your imports). ``worker.run()`` runs on asyncio;
``worker.run(backend="trio")`` or ``RCA_BACKEND=trio`` runs it on trio, and
``await worker.serve()`` runs inside whichever loop is already running.
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

"""Error codes of the RCA wire and the exceptions the core shares with adapters.

The three codes are the orchestrator's own vocabulary: it retries a task on
``TRANSIENT_ERROR``, quarantines the job on ``PERMANENT_ERROR`` and fails it
without retry on ``INVALID_INPUT_ERROR``.
"""

from __future__ import annotations

__all__ = [
    "INVALID_INPUT_ERROR",
    "PERMANENT_ERROR",
    "TRANSIENT_ERROR",
    "ConfigError",
    "TaskFailure",
]

TRANSIENT_ERROR = "TRANSIENT_ERROR"
PERMANENT_ERROR = "PERMANENT_ERROR"
INVALID_INPUT_ERROR = "INVALID_INPUT_ERROR"


class ConfigError(ValueError):
    """A configuration value is wrong.

    The message always names the variable (or attribute), the bad value and
    what was expected, so that a worker that fails at startup says why.
    """


class TaskFailure(Exception):
    """A task cannot succeed, for a reason the orchestrator should hear.

    Raised by the SDK's own steps around a handler (parameter binding, S3
    transfers, path checks) and allowed in user handlers too: the worker turns
    it into ``{"status": "failure", "error": {"code": code, "message": message}}``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

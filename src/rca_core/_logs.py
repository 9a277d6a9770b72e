"""Logging helpers: secrets never reach a log line.

The SDK's own messages never include tokens, but a library exception can
quote a URL with a password in it, and a handler may log what it was given.
:class:`Redactor` is a filter that every record of the SDK's loggers passes
through while a worker runs; it replaces each secret by ``***`` in the
formatted message and in the exception text.
"""

from __future__ import annotations

import contextvars
import json
import logging
import traceback
from collections.abc import Iterable

__all__ = [
    "SDK_LOGGERS",
    "JsonFormatter",
    "Redactor",
    "TaskContext",
    "TextFormatter",
    "configure_logging",
    "reset_current_task",
    "set_current_task",
]

SDK_LOGGERS = ("rca_core.worker", "rca_core.driver", "rca_core.config", "rca_aiohttp", "rca_httpx")


class Redactor(logging.Filter):
    """Replace secrets in records; attach with :meth:`install`, detach with :meth:`remove`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first: redacting a short secret must not leave part of a longer one.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            message = record.getMessage()
        except Exception as exc:
            # A message that cannot be formatted (a bad format, an argument whose str()
            # raises) must not make the log call raise, as it would here, at the call
            # site. Its arguments are dropped: logging's error report prints them raw.
            fmt = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
            message = f"{fmt} [log arguments could not be formatted: {type(exc).__name__}]"
            record.msg, record.args = message, None
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = self.redact(text).rstrip("\n")
            record.exc_info = None
        return True

    def install(self, names: Iterable[str] = SDK_LOGGERS) -> None:
        for name in names:
            logging.getLogger(name).addFilter(self)

    def remove(self, names: Iterable[str] = SDK_LOGGERS) -> None:
        for name in names:
            logging.getLogger(name).removeFilter(self)


# -- which task a log line is about --------------------------------------------------

_current_task: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "rca_current_task", default=None
)


def set_current_task(task_id: str, job_id: str) -> contextvars.Token[tuple[str, str] | None]:
    """Mark the running context as working on a task (handlers, their threads, S3 steps)."""
    return _current_task.set((task_id, job_id))


def reset_current_task(token: contextvars.Token[tuple[str, str] | None]) -> None:
    _current_task.reset(token)


class TaskContext(logging.Filter):
    """Adds ``task_id`` and ``job_id`` to every record logged while a task runs.

    Contextvars follow asyncio tasks, trio tasks and ``to_thread`` calls, so a
    handler's own ``logging.info(...)`` lines carry the ids too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current_task.get()
        if current is not None and not hasattr(record, "task_id"):
            record.task_id, record.job_id = current
        return True


class TextFormatter(logging.Formatter):
    """Plain text; lines about a task end with ``[task=… job=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        task_id = getattr(record, "task_id", None)
        if task_id is not None:
            first, sep, rest = text.partition("\n")
            text = f"{first} [task={task_id} job={getattr(record, 'job_id', '')}]{sep}{rest}"
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, task/job ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("task_id", "job_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def configure_logging(log_format: str, level: int = logging.INFO) -> bool:
    """Set up the root logger for ``LOG_FORMAT``, unless the application already did.

    Returns whether it configured anything: a program that called
    ``logging.basicConfig`` (as the reference README's examples do) keeps its
    own setup, and only gets the task ids added.
    """
    root = logging.getLogger()
    if root.handlers:
        for handler in root.handlers:
            if not any(isinstance(f, TaskContext) for f in handler.filters):
                handler.addFilter(TaskContext())
        return False
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(TaskContext())
    root.addHandler(handler)
    root.setLevel(level)
    return True

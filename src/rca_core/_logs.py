"""Logging helpers: secrets never reach a log line.

The SDK's own messages never include tokens, but a library exception can
quote a URL with a password in it, and a handler may log what it was given.
:class:`Redactor` is a filter that every record of the SDK's loggers passes
through while a worker runs; it replaces each secret by ``***`` in the
formatted message and in the exception text.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable

__all__ = ["SDK_LOGGERS", "Redactor"]

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
        message = record.getMessage()
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

"""Blocking local-disk steps of S3 transfers, shared by both adapters.

The core's transfer plan (``_s3plan``) is pure and asks the disk only through
the small :class:`LocalDisk` protocol; these are the blocking calls behind it
and the temp-file-then-rename writer. They touch the local filesystem and
nothing else (no network, no event loop): each adapter runs them in worker
threads its own way (``asyncio.to_thread`` or ``anyio.to_thread``), which is
the only part that differs between the two. The state machine never imports
this module.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._s3plan import FileKind

__all__ = [
    "DiskError",
    "LocalDisk",
    "PartFile",
    "make_folders",
    "on_disk",
    "write_empty",
]

_T = TypeVar("_T")


class LocalDisk:
    """The disk facts :func:`rca_core._s3plan.plan_uploads` asks for."""

    def resolve(self, path: str) -> str | None:
        real = os.path.realpath(path)
        return real if os.path.lexists(real) else None

    def stat(self, path: str) -> tuple[FileKind, int]:
        try:
            info = os.stat(path)
        except OSError:
            return "missing", 0
        if stat.S_ISREG(info.st_mode):
            return "file", info.st_size
        if stat.S_ISDIR(info.st_mode):
            return "dir", 0
        return "other", 0

    def walk(self, folder: str, limit: int) -> Sequence[str]:
        found: list[str] = []
        for current, dirs, files in os.walk(folder, onerror=_raise_walk_error, followlinks=False):
            relative = os.path.relpath(current, folder)
            base = "" if relative == "." else relative.replace(os.sep, "/") + "/"
            linked = [d for d in dirs if os.path.islink(os.path.join(current, d))]
            for name in sorted(files) + sorted(linked):
                found.append(base + name)
                if len(found) >= limit:
                    return found
            dirs.sort()
        return found


def _raise_walk_error(error: OSError) -> None:
    """``os.walk`` must not skip an unreadable folder silently."""
    raise error


class DiskError(Exception):
    """A local disk failure (full, read-only, permissions) while storing an input.

    Kept apart from ``OSError`` so that a local ``FileNotFoundError`` is never
    mistaken for a missing S3 object: it classifies as ``other`` (transient).
    """


def on_disk(action: Callable[[], _T], what: str) -> _T:
    try:
        return action()
    except OSError as exc:
        raise DiskError(f"local disk: cannot {what}: {exc}") from exc


class PartFile:
    """A temporary file beside ``dest`` that becomes ``dest`` only when complete.

    A lock serialises ``write`` against ``discard``: when a download is
    cancelled while a write still runs in a thread, the file is closed only
    after that write returns, never under it.
    """

    def __init__(self, dest: str) -> None:
        self._dest = dest
        fd, self._tmp = on_disk(
            lambda: tempfile.mkstemp(
                prefix=f".{os.path.basename(dest)[:40]}.",
                suffix=".part",
                dir=os.path.dirname(dest),
            ),
            f"create a file next to {dest}",
        )
        self._file: Any = os.fdopen(fd, "wb")
        self._lock = threading.Lock()

    def write(self, chunk: bytes) -> None:
        with self._lock:
            if not self._file.closed:  # a write queued before a discard is dropped
                on_disk(lambda: self._file.write(chunk), f"write {self._dest}")

    def commit(self) -> None:
        with self._lock:
            on_disk(self._file.close, f"write {self._dest}")
            on_disk(lambda: os.replace(self._tmp, self._dest), f"create {self._dest}")

    def discard(self) -> None:
        """Drop the temporary file; never raises over the original failure."""
        with self._lock, contextlib.suppress(OSError):
            try:
                self._file.close()
            finally:
                os.unlink(self._tmp)


def make_folders(folders: Sequence[str]) -> None:
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise DiskError(f"local disk: cannot create folder {folder}: {exc}") from exc


def write_empty(path: str) -> None:
    part = PartFile(path)
    part.commit()

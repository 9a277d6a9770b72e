"""Pure path arithmetic that keeps names from the network inside the task folder.

A task id or a file name comes from the orchestrator or from a handler; either
may hold ``..``, an absolute path or a NUL. Nothing here touches the disk: the
adapters add the one check that needs it (symlinks, via ``realpath``) and pass
the resolved paths back to :func:`is_within`.
"""

from __future__ import annotations

import hashlib
import os
import re

from ._errors import INVALID_INPUT_ERROR, TaskFailure

__all__ = ["is_within", "join_inside", "task_dir_name"]

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def task_dir_name(task_id: str) -> str:
    """A folder name for a task: the id itself when harmless, else a digest of it."""
    if _SAFE_ID.fullmatch(task_id) and task_id not in (".", ".."):
        return task_id
    digest = hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"task-{digest}"


def join_inside(root: str, name: str) -> str:
    """``root/name``, refusing any name that would leave ``root`` lexically.

    Absolute names, ``..`` segments that climb out, empty names and NUL bytes
    raise :class:`TaskFailure` with ``INVALID_INPUT_ERROR``.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise TaskFailure(INVALID_INPUT_ERROR, f"invalid file name {name!r}")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise TaskFailure(
            INVALID_INPUT_ERROR,
            f"file name {name!r} is absolute; use a name relative to the task folder",
        )
    root_norm = os.path.normpath(root)
    joined = os.path.normpath(os.path.join(root_norm, name))
    if not is_within(root_norm, joined) or joined == root_norm:
        raise TaskFailure(INVALID_INPUT_ERROR, f"file name {name!r} escapes the task folder")
    return joined


def is_within(root: str, path: str) -> bool:
    """Whether ``path`` is ``root`` or below it (both already normalized or resolved)."""
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:
        return False

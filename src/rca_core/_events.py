"""What goes into the machine (events, past tense) and what comes out (effects, commands).

All are frozen, slotted, keyword-only dataclasses: cheap to build on the hot
path, impossible to mutate after the fact, and unambiguous at call sites.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._wire import HttpRequest

__all__ = [
    "CancelHandler",
    "CancelRequest",
    "CancelRequested",
    "CleanupTask",
    "CloseCommandChannel",
    "CommandChannelClosed",
    "CommandChannelOpened",
    "CommandReceived",
    "DrainRequested",
    "Effect",
    "Event",
    "HandlerFinished",
    "HotCacheChanged",
    "OpenCommandChannel",
    "ProgressReported",
    "RequestFailed",
    "ResponseReceived",
    "SendCommandMessage",
    "SendRequest",
    "StartHandler",
    "Task",
    "WorkerStopped",
]


# -- the task as handed to an adapter ---------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Task:
    """A task accepted by the worker, ready for its handler."""

    task_id: str
    job_id: str
    name: str  # the task name the handler is registered under
    params: Any
    priority: int
    tracing_context: Any
    params_metadata: Any
    orchestrator_url: str


# -- events: inputs, in the past tense ---------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseReceived:
    """An HTTP reply to :class:`SendRequest` ``request_id`` arrived (any status)."""

    request_id: int
    status: int
    body: bytes = b""
    retry_after: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestFailed:
    """The request got no HTTP reply: refused, reset, timed out, TLS failure…"""

    request_id: int
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class HandlerFinished:
    """A task's handler is over; ``result`` is the wire result object to report."""

    task_id: str
    result: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class CommandChannelOpened:
    channel: int


@dataclass(frozen=True, kw_only=True, slots=True)
class CommandChannelClosed:
    channel: int
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class CommandReceived:
    channel: int
    text: str | bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class CancelRequested:
    """A local request to cancel a task (e.g. from an operator tool)."""

    task_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class DrainRequested:
    """SIGTERM/SIGINT or ``stop()``: the first drains, the next one cancels."""

    reason: str = "stop requested"


@dataclass(frozen=True, kw_only=True, slots=True)
class ProgressReported:
    task_id: str
    progress: float
    message: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class HotCacheChanged:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


Event = (
    ResponseReceived
    | RequestFailed
    | HandlerFinished
    | CommandChannelOpened
    | CommandChannelClosed
    | CommandReceived
    | CancelRequested
    | DrainRequested
    | ProgressReported
    | HotCacheChanged
)


# -- effects: outputs, as commands -------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class SendRequest:
    """Perform ``request``; answer with ResponseReceived or RequestFailed."""

    request_id: int
    request: HttpRequest
    purpose: str  # "register", "heartbeat", "poll" or "result": for logs and metrics


@dataclass(frozen=True, kw_only=True, slots=True)
class CancelRequest:
    """Abandon request ``request_id``; answer with RequestFailed (or its reply if it won)."""

    request_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StartHandler:
    """Run the handler for ``task``; answer with HandlerFinished exactly once."""

    task: Task
    timeout: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class CancelHandler:
    """Cancel a running handler; it still answers with HandlerFinished."""

    task_id: str
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class CleanupTask:
    """The task is over for good: its files may go."""

    task_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenCommandChannel:
    """Open the WebSocket ``url``; answer with CommandChannelOpened or …Closed."""

    channel: int
    url: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class CloseCommandChannel:
    channel: int


@dataclass(frozen=True, kw_only=True, slots=True)
class SendCommandMessage:
    channel: int
    text: str


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerStopped:
    """The machine is done: every task is over and every result delivered or accounted for."""

    undelivered: int = 0


Effect = (
    SendRequest
    | CancelRequest
    | StartHandler
    | CancelHandler
    | CleanupTask
    | OpenCommandChannel
    | CloseCommandChannel
    | SendCommandMessage
    | WorkerStopped
)

"""rca_core: the sans-IO protocol core of the rca-worker SDK.

No sockets, no event loop, no clock, no global randomness: adapters feed it
events with the current time and perform the effects it returns.
"""

from __future__ import annotations

from ._backoff import Backoff, backoff_delay
from ._errors import (
    INVALID_INPUT_ERROR,
    PERMANENT_ERROR,
    TRANSIENT_ERROR,
    ConfigError,
    TaskFailure,
)
from ._events import (
    CancelHandler,
    CancelRequest,
    CancelRequested,
    CleanupTask,
    CloseCommandChannel,
    CommandChannelClosed,
    CommandChannelOpened,
    CommandReceived,
    DrainRequested,
    Effect,
    Event,
    HandlerFinished,
    HotCacheChanged,
    OpenCommandChannel,
    ProgressReported,
    RequestFailed,
    ResponseReceived,
    SendCommandMessage,
    SendRequest,
    StartHandler,
    Task,
    WorkerStopped,
)
from ._machine import MachineSettings, Orchestrator, WorkerMachine
from ._selection import FAILOVER, ROUND_ROBIN, Candidate, Selector
from ._slots import SlotError, Slots
from ._state import (
    LinkState,
    LocalProtocolError,
    WorkerState,
    state_diagram,
)
from ._wire import HttpRequest, WireV1

__all__ = [
    "FAILOVER",
    "INVALID_INPUT_ERROR",
    "PERMANENT_ERROR",
    "ROUND_ROBIN",
    "TRANSIENT_ERROR",
    "Backoff",
    "CancelHandler",
    "CancelRequest",
    "CancelRequested",
    "Candidate",
    "CleanupTask",
    "CloseCommandChannel",
    "CommandChannelClosed",
    "CommandChannelOpened",
    "CommandReceived",
    "ConfigError",
    "DrainRequested",
    "Effect",
    "Event",
    "HandlerFinished",
    "HotCacheChanged",
    "HttpRequest",
    "LinkState",
    "LocalProtocolError",
    "MachineSettings",
    "OpenCommandChannel",
    "Orchestrator",
    "ProgressReported",
    "RequestFailed",
    "ResponseReceived",
    "Selector",
    "SendCommandMessage",
    "SendRequest",
    "SlotError",
    "Slots",
    "StartHandler",
    "Task",
    "TaskFailure",
    "WireV1",
    "WorkerMachine",
    "WorkerState",
    "WorkerStopped",
    "backoff_delay",
    "state_diagram",
]

"""Every state of the worker and every transition between them, as data.

Rule: no other module assigns a lifecycle or link state except through
:func:`worker_transition` / :func:`link_transition`, and a ``(state, input)``
pair missing from the tables raises :class:`LocalProtocolError`. The docs draw
the state diagram from these tables (``rca_core.state_diagram()``).
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "LINK_TRANSITIONS",
    "WORKER_TRANSITIONS",
    "LinkInput",
    "LinkState",
    "LocalProtocolError",
    "WorkerInput",
    "WorkerState",
    "link_transition",
    "state_diagram",
    "worker_transition",
]


class LocalProtocolError(RuntimeError):
    """The machine was driven in a way its tables do not allow: a bug in the caller."""


class WorkerState(Enum):
    CREATED = "created"
    RUNNING = "running"
    DRAINING = "draining"  # no new polls; running tasks finish, results go out
    CANCELLING = "cancelling"  # the drain deadline passed or a second signal came
    STOPPED = "stopped"


class WorkerInput(Enum):
    START = "start"
    DRAIN = "drain"
    DRAIN_DEADLINE = "drain deadline"
    SETTLED = "settled"  # no task left and no result undelivered
    GIVE_UP = "give up"  # the final grace ran out with results still undelivered


WORKER_TRANSITIONS: dict[tuple[WorkerState, WorkerInput], WorkerState] = {
    (WorkerState.CREATED, WorkerInput.START): WorkerState.RUNNING,
    (WorkerState.CREATED, WorkerInput.DRAIN): WorkerState.STOPPED,
    (WorkerState.RUNNING, WorkerInput.DRAIN): WorkerState.DRAINING,
    (WorkerState.DRAINING, WorkerInput.DRAIN): WorkerState.CANCELLING,
    (WorkerState.DRAINING, WorkerInput.DRAIN_DEADLINE): WorkerState.CANCELLING,
    (WorkerState.DRAINING, WorkerInput.SETTLED): WorkerState.STOPPED,
    (WorkerState.CANCELLING, WorkerInput.DRAIN): WorkerState.CANCELLING,
    (WorkerState.CANCELLING, WorkerInput.SETTLED): WorkerState.STOPPED,
    (WorkerState.CANCELLING, WorkerInput.GIVE_UP): WorkerState.STOPPED,
    (WorkerState.STOPPED, WorkerInput.DRAIN): WorkerState.STOPPED,
}


class LinkState(Enum):
    """The worker's standing with one orchestrator."""

    UNREGISTERED = "unregistered"
    REGISTERING = "registering"
    REGISTERED = "registered"


class LinkInput(Enum):
    SEND_REGISTER = "send register"
    REGISTER_OK = "register ok"
    REGISTER_FAILED = "register failed"
    FORGOTTEN = "forgotten"  # heartbeat said the orchestrator does not know us


LINK_TRANSITIONS: dict[tuple[LinkState, LinkInput], LinkState] = {
    (LinkState.UNREGISTERED, LinkInput.SEND_REGISTER): LinkState.REGISTERING,
    (LinkState.REGISTERING, LinkInput.REGISTER_OK): LinkState.REGISTERED,
    (LinkState.REGISTERING, LinkInput.REGISTER_FAILED): LinkState.UNREGISTERED,
    (LinkState.REGISTERED, LinkInput.FORGOTTEN): LinkState.UNREGISTERED,
    (LinkState.REGISTERED, LinkInput.SEND_REGISTER): LinkState.REGISTERING,
}


def worker_transition(state: WorkerState, event: WorkerInput) -> WorkerState:
    try:
        return WORKER_TRANSITIONS[state, event]
    except KeyError:
        raise LocalProtocolError(
            f"worker: no transition from {state.value} on {event.value}"
        ) from None


def link_transition(state: LinkState, event: LinkInput) -> LinkState:
    try:
        return LINK_TRANSITIONS[state, event]
    except KeyError:
        raise LocalProtocolError(
            f"link: no transition from {state.value} on {event.value}"
        ) from None


def state_diagram() -> str:
    """Both tables as a Mermaid ``stateDiagram-v2`` (for the docs)."""
    lines = ["stateDiagram-v2", "    state Worker {"]
    lines.append(f"        [*] --> {WorkerState.CREATED.name}")
    for (src, ev), dst in WORKER_TRANSITIONS.items():
        lines.append(f"        {src.name} --> {dst.name}: {ev.value}")
    lines.append(f"        {WorkerState.STOPPED.name} --> [*]")
    lines.append("    }")
    lines.append("    state Link {")
    lines.append(f"        [*] --> {LinkState.UNREGISTERED.name}")
    for (lsrc, lev), ldst in LINK_TRANSITIONS.items():
        lines.append(f"        {lsrc.name} --> {ldst.name}: {lev.value}")
    lines.append("    }")
    return "\n".join(lines) + "\n"

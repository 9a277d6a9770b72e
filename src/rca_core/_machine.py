"""The worker as a sans-IO state machine.

Feed it events (:mod:`._events`) with the current time; collect the effects it
wants performed with :meth:`WorkerMachine.effects`; call
:meth:`WorkerMachine.handle_timer` when :meth:`WorkerMachine.next_deadline`
passes. It owns every decision (what to request, when to retry, which
orchestrator to poll, which task may start, what to report) and no I/O: the
clock and the randomness come in from outside, so a test can replay any
timeline exactly.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._backoff import Backoff
from ._errors import PERMANENT_ERROR, TRANSIENT_ERROR
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
from ._results import failure_result, timeout_result
from ._selection import FAILOVER, Candidate, Selector
from ._skills import hot_skills
from ._slots import Slots
from ._state import (
    LinkInput,
    LinkState,
    LocalProtocolError,
    WorkerInput,
    WorkerState,
    link_transition,
    worker_transition,
)
from ._wire import (
    CancelCommand,
    MalformedTask,
    NoTask,
    OrchestratorTask,
    ReplyKind,
    WireV1,
)

__all__ = ["MachineSettings", "Orchestrator", "WorkerMachine"]

log = logging.getLogger("rca_core.worker")

#: Seconds between retries of something that is wrong on our side (bad token,
#: 4xx on register): retry, since an operator may fix it, but slowly.
SLOW_RETRY_CAP = 60.0
#: After the drain deadline cancelled what was left, results get this long to go out.
SHUTDOWN_GRACE = 10.0
#: Cancels that arrived before their task, remembered at most this many.
PRECANCELLED_LIMIT = 1000
CANCELLED_BY_ORCHESTRATOR = "cancelled by the orchestrator"


@dataclass(frozen=True, kw_only=True, slots=True)
class Orchestrator:
    """One orchestrator, with its effective token already chosen."""

    url: str
    token: str = field(repr=False)
    priority: int = 10
    weight: int = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class MachineSettings:
    """Everything the machine decides by; built from the validated config."""

    worker_id: str
    worker_type: str
    orchestrators: tuple[Orchestrator, ...]
    tasks: Mapping[str, str | None]  # task name -> task type (slot group) or None
    mode: str = FAILOVER
    max_concurrent_tasks: int = 10
    task_type_limits: Mapping[str, int] = field(default_factory=dict)
    skill_dependencies: Mapping[str, Sequence[str]] = field(default_factory=dict)
    heartbeat_interval: float = 15.0
    heartbeat_debounce: float = 0.1
    poll_timeout: float = 30.0
    retry_base: float = 0.5
    retry_cap: float = 5.0
    result_retry_base: float = 1.0
    result_retry_cap: float = 30.0
    result_max_retries: int = 5
    shutdown_timeout: float = 30.0
    task_timeout: float | None = None
    outbox_limit: int = 1000
    max_parallel_polls: int = 0
    websockets: bool = False
    cost_per_skill: Mapping[str, Any] = field(default_factory=dict)
    installed_models: Sequence[Any] = ()
    installed_software: Mapping[str, Any] = field(default_factory=dict)
    hostname: str = "localhost"
    ip_address: str = "127.0.0.1"
    cpu_cores: int = 1
    gpu_model: str | None = None
    gpu_vram_gb: float = 0.0


class _Link:
    """The worker's standing with one orchestrator."""

    __slots__ = (
        "abandon_polls",
        "busy_heartbeat",
        "channel_open",
        "channel_wanted",
        "healthy",
        "heartbeat_due",
        "heartbeat_ok_since_register",
        "heartbeat_request",
        "heartbeat_retry",
        "heartbeats_answered",
        "heartbeats_sent",
        "index",
        "orch",
        "poll_failure_seen",
        "poll_retry",
        "polls",
        "register_request",
        "register_retry",
        "reported_idle",
        "state",
        "ws_retry",
    )

    def __init__(self, index: int, orch: Orchestrator, settings: MachineSettings) -> None:
        self.index = index
        self.orch = orch
        self.state = LinkState.UNREGISTERED
        self.healthy = True
        self.register_retry = Backoff(base=settings.retry_base, cap=settings.retry_cap)
        self.register_request: int | None = None
        self.heartbeat_retry = Backoff(base=settings.retry_base, cap=settings.retry_cap)
        self.heartbeat_request: int | None = None
        self.heartbeats_sent = 0
        self.heartbeats_answered = 0  # replies (or failures) to heartbeats, counted in order
        self.reported_idle: bool | None = None  # the status the last heartbeat carried
        self.heartbeat_due: float | None = None
        self.heartbeat_ok_since_register = False
        self.poll_retry = Backoff(base=settings.retry_base, cap=settings.retry_cap)
        # The last request id issued when a poll failure came in: a reply to a poll
        # sent before that (in flight meanwhile) tells nothing about the link now.
        self.poll_failure_seen = 0
        self.polls: set[int] = set()
        self.ws_retry = Backoff(base=settings.retry_base, cap=max(settings.retry_cap, 10.0))
        self.channel_wanted = False  # an OpenCommandChannel is out or the channel is open
        self.channel_open = False
        self.abandon_polls = False  # draining: cancel parked polls once "busy" is acknowledged
        self.busy_heartbeat: int | None = None  # the first heartbeat sent after draining began

    def move(self, event: LinkInput) -> None:
        self.state = link_transition(self.state, event)


class _Running:
    """A task the worker accepted and has not yet finished."""

    __slots__ = ("cancel_reason", "deadline", "link", "started", "task", "task_type")

    def __init__(self, task: Task, task_type: str | None, link: int) -> None:
        self.task = task
        self.task_type = task_type
        self.link = link
        self.started = False
        self.deadline: float | None = None
        self.cancel_reason: str | None = None


class _Outgoing:
    """A result on its way to the orchestrator that assigned the task."""

    __slots__ = (
        "after_heartbeat",
        "attempts",
        "job_id",
        "link",
        "request",
        "result",
        "retry",
        "server_errors",
        "task_id",
    )

    def __init__(
        self, task_id: str, job_id: str, link: int, result: Mapping[str, Any], retry: Backoff
    ) -> None:
        self.task_id = task_id
        self.job_id = job_id
        self.link = link
        self.result = result
        self.retry = retry
        self.request: int | None = None
        # Send only once heartbeat number ``after_heartbeat`` of the link was answered.
        self.after_heartbeat = 0
        self.attempts = 0
        self.server_errors = 0


class WorkerMachine:
    """One worker's protocol state. Not thread-safe: drive it from one thread or task."""

    def __init__(
        self,
        settings: MachineSettings,
        *,
        rng: random.Random,
        wire: WireV1 | None = None,
    ) -> None:
        if not settings.orchestrators:
            raise ValueError("at least one orchestrator is needed")
        if settings.max_concurrent_tasks < 1:
            raise ValueError("max_concurrent_tasks must be at least 1")
        self.settings = settings
        self._rng = rng
        # The client waits longer than the server holds a poll (see PROTOCOL.md).
        self._wire = wire or WireV1(poll_timeout=max(settings.poll_timeout, 30.0) + 15.0)
        self._state = WorkerState.CREATED
        self._links = [_Link(i, o, settings) for i, o in enumerate(settings.orchestrators)]
        self._selector = Selector(settings.mode, len(self._links))
        self._slots = Slots(
            limit=settings.max_concurrent_tasks, type_limits=settings.task_type_limits
        )
        self._effects: list[Effect] = []
        self._next_request = 0
        # request id -> (purpose, link index, task id for results)
        self._requests: dict[int, tuple[str, int, str | None]] = {}
        self._cancelled_requests: set[int] = set()
        self._tasks: dict[str, _Running] = {}
        self._waiting: deque[str] = deque()
        self._outbox: dict[str, _Outgoing] = {}
        self._hot_cache: list[str] = []
        self._precancelled: dict[str, float] = {}
        self._drain_deadline: float | None = None
        self._give_up_deadline: float | None = None
        # When the pump last ran: a poll backoff that had expired by then and still
        # sent nothing is waiting on an event (health, slots, outbox), not on time.
        self._pumped_at = float("-inf")
        self.counters: dict[str, int] = {
            "tasks_received": 0,
            "tasks_rejected": 0,
            "results_acknowledged": 0,
            "results_dropped": 0,
            "result_retries": 0,
            "requests_failed": 0,
        }

    # -- public surface ---------------------------------------------------------------

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def registered(self) -> bool:
        """Registered with at least one orchestrator (a readiness signal)."""
        return any(link.state is LinkState.REGISTERED for link in self._links)

    def effects(self) -> list[Effect]:
        """The effects produced since the last call, in order."""
        out, self._effects = self._effects, []
        return out

    def start(self, now: float) -> None:
        self._state = worker_transition(self._state, WorkerInput.START)
        self._pump(now)

    def handle(self, event: Event, now: float) -> None:
        if isinstance(event, ResponseReceived):
            self._on_reply(event.request_id, event.status, event.retry_after, event.body, now)
        elif isinstance(event, RequestFailed):
            self._on_reply(event.request_id, None, None, event.reason.encode(), now)
        elif isinstance(event, HandlerFinished):
            self._on_handler_finished(event, now)
        elif isinstance(event, CommandReceived):
            self._on_command(event, now)
        elif isinstance(event, CommandChannelOpened):
            self._on_channel_opened(event)
        elif isinstance(event, CommandChannelClosed):
            self._on_channel_closed(event, now)
        elif isinstance(event, CancelRequested):
            self._cancel_task(event.task_id, "requested", now)
        elif isinstance(event, DrainRequested):
            self._on_drain(event, now)
        elif isinstance(event, ProgressReported):
            self._on_progress(event)
        elif isinstance(event, HotCacheChanged):
            self._on_hot_cache(event, now)
        else:
            raise LocalProtocolError(f"unknown event {event!r}")
        self._pump(now)

    def handle_timer(self, now: float) -> None:
        if self._state is WorkerState.DRAINING and self._drain_deadline is not None:
            if now >= self._drain_deadline:
                self._begin_cancelling(now, "the drain deadline passed")
        if self._state is WorkerState.CANCELLING and self._give_up_deadline is not None:
            if now >= self._give_up_deadline:
                self._give_up()
        for running in list(self._tasks.values()):
            if (
                running.deadline is not None
                and now >= running.deadline
                and running.cancel_reason is None
            ):
                self._cancel_task(running.task.task_id, "timeout", now)
        self._pump(now)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must be called next (None: only on events)."""
        if self._state in (WorkerState.CREATED, WorkerState.STOPPED):
            return None
        times: list[float] = []
        add = times.append
        active = self._state is WorkerState.RUNNING
        for link in self._links:
            if link.state is LinkState.UNREGISTERED and link.register_request is None:
                add(link.register_retry.not_before)
            elif link.state is LinkState.REGISTERED:
                if link.heartbeat_request is None and link.heartbeat_due is not None:
                    add(link.heartbeat_due)
                if (
                    self.settings.websockets
                    and not link.channel_wanted
                    and self._state is not WorkerState.CANCELLING
                ):
                    add(link.ws_retry.not_before)
                if (
                    active
                    and link.poll_retry.failures
                    and self._slots.free > 0
                    and link.poll_retry.not_before > self._pumped_at
                ):
                    add(link.poll_retry.not_before)
        for out in self._outbox.values():
            if out.request is None and self._heartbeat_settled(out):
                add(out.retry.not_before)
        if self.settings.task_timeout:  # without TASK_TIMEOUT no task has a deadline
            for running in self._tasks.values():
                if running.deadline is not None and running.cancel_reason is None:
                    add(running.deadline)
        if self._state is WorkerState.DRAINING and self._drain_deadline is not None:
            add(self._drain_deadline)
        if self._state is WorkerState.CANCELLING and self._give_up_deadline is not None:
            add(self._give_up_deadline)
        return min(times) if times else None

    def snapshot(self) -> dict[str, Any]:
        """A picture of the machine for health checks, metrics and debugging."""
        return {
            "state": self._state.value,
            "slots": self._slots.snapshot(),
            "tasks": len(self._tasks),
            "outbox": len(self._outbox),
            "hot_cache": list(self._hot_cache),
            "orchestrators": [
                {
                    "url": link.orch.url,
                    "state": link.state.value,
                    "healthy": link.healthy,
                    "announced": link.heartbeat_ok_since_register,
                    "polls": len(link.polls),
                    "command_channel": link.channel_open,
                }
                for link in self._links
            ],
            "counters": dict(self.counters),
        }

    # -- what the worker can take now -----------------------------------------------------

    def _accepting(self) -> list[str]:
        if self._state is not WorkerState.RUNNING:
            return []
        if self._slots.held >= self._slots.limit or len(self._outbox) >= self.settings.outbox_limit:
            return []
        return [
            name for name, ttype in self.settings.tasks.items() if self._slots.type_accepting(ttype)
        ]

    def _heartbeat_body(self) -> dict[str, Any]:
        accepting = self._accepting()
        return self._wire.heartbeat_state(
            load=self._slots.held,
            idle=bool(accepting),
            supported_tasks=accepting,
            hot_cache=self._hot_cache,
            skill_dependencies=self.settings.skill_dependencies,
            hot_skills=hot_skills(self.settings.skill_dependencies, self._hot_cache),
        )

    def _state_changed(self, now: float) -> None:
        """Something a heartbeat reports changed: send one soon (debounced)."""
        due = now + self.settings.heartbeat_debounce
        for link in self._links:
            if link.state is LinkState.REGISTERED and (
                link.heartbeat_due is None or link.heartbeat_due > due
            ):
                link.heartbeat_due = due

    # -- the pump: everything that should go out now -----------------------------------

    def _request(self, purpose: str, link: int, request: Any, task_id: str | None = None) -> int:
        self._next_request += 1
        rid = self._next_request
        self._requests[rid] = (purpose, link, task_id)
        self._effects.append(SendRequest(request_id=rid, request=request, purpose=purpose))
        return rid

    def _pump(self, now: float) -> None:
        self._pumped_at = now
        state = self._state
        if state in (WorkerState.CREATED, WorkerState.STOPPED):
            return
        settings = self.settings
        for link in self._links:
            if link.state is LinkState.UNREGISTERED:
                if link.register_request is None and link.register_retry.ready(now):
                    self._send_register(link)
            elif link.state is LinkState.REGISTERED:
                if (
                    link.heartbeat_request is None
                    and link.heartbeat_due is not None
                    and now >= link.heartbeat_due
                ):
                    self._send_heartbeat(link, now)
                if (
                    settings.websockets
                    and not link.channel_wanted
                    and state is not WorkerState.CANCELLING
                    and link.ws_retry.ready(now)
                ):
                    url, headers = self._wire.command_channel(
                        url=link.orch.url, token=link.orch.token, worker_id=settings.worker_id
                    )
                    link.channel_wanted = True
                    self._effects.append(
                        OpenCommandChannel(channel=link.index, url=url, headers=headers)
                    )
        for out in self._outbox.values():
            if out.request is None and out.retry.ready(now) and self._heartbeat_settled(out):
                self._send_result(out)
        self._start_waiting(now)
        if state is WorkerState.RUNNING:
            self._send_polls(now)
        else:
            self._maybe_settle()

    def _send_register(self, link: _Link) -> None:
        s = self.settings
        info = self._wire.registration_info(
            worker_id=s.worker_id,
            worker_type=s.worker_type,
            supported_tasks=self._accepting(),
            max_concurrent_tasks=s.max_concurrent_tasks,
            cost_per_skill=s.cost_per_skill,
            installed_models=s.installed_models,
            installed_software=s.installed_software,
            hostname=s.hostname,
            ip_address=s.ip_address,
            cpu_cores=s.cpu_cores,
            gpu_model=s.gpu_model,
            gpu_vram_gb=s.gpu_vram_gb,
            websockets=s.websockets,
        )
        link.move(LinkInput.SEND_REGISTER)
        req = self._wire.register(url=link.orch.url, token=link.orch.token, info=info)
        link.register_request = self._request("register", link.index, req)

    def _send_heartbeat(self, link: _Link, now: float) -> None:
        body = self._heartbeat_body()
        req = self._wire.heartbeat(
            url=link.orch.url,
            token=link.orch.token,
            worker_id=self.settings.worker_id,
            state=body,
        )
        link.reported_idle = body["status"] == "idle"
        link.heartbeats_sent += 1
        link.heartbeat_due = None
        link.heartbeat_request = self._request("heartbeat", link.index, req)
        if link.abandon_polls and link.busy_heartbeat is None:
            link.busy_heartbeat = link.heartbeat_request

    def _send_result(self, out: _Outgoing) -> None:
        link = self._links[out.link]
        try:
            req = self._wire.result(
                url=link.orch.url,
                token=link.orch.token,
                worker_id=self.settings.worker_id,
                job_id=out.job_id,
                task_id=out.task_id,
                result=out.result,
            )
        except (TypeError, ValueError) as exc:
            # Not JSON (a set, NaN, an object): retrying cannot help, and raising
            # here would fail every later pump. Report the failure instead.
            message = f"the handler's result cannot be sent as JSON: {exc}"
            log.error("task %s (job %s): %s: %r", out.task_id, out.job_id, message, out.result)
            error = {"code": PERMANENT_ERROR, "message": message}
            out.result = {"status": "failure", "error": error}
            self._send_result(out)
            return
        if out.attempts:
            self.counters["result_retries"] += 1
        out.attempts += 1
        out.request = self._request("result", link.index, req, out.task_id)

    def _send_polls(self, now: float) -> None:
        settings = self.settings
        if len(self._outbox) >= settings.outbox_limit:
            return  # the orchestrator is not taking results: take no more work
        if self._slots.free <= 0:
            return  # every slot is polling or busy: the usual case, decided before counting
        polls_out = sum(len(link.polls) for link in self._links)
        cap = settings.max_parallel_polls or settings.max_concurrent_tasks
        while polls_out < cap and self._slots.free > 0:
            candidates = [
                Candidate(
                    index=link.index,
                    priority=link.orch.priority,
                    weight=link.orch.weight,
                    healthy=link.healthy,
                    available=link.state is LinkState.REGISTERED
                    and link.heartbeat_ok_since_register
                    and link.poll_retry.ready(now)
                    # backing off: one poll probes the link; the others follow its success
                    and not (link.poll_retry.failures and link.polls),
                )
                for link in self._links
            ]
            chosen = self._selector.choose(candidates)
            if chosen is None:
                return
            link = self._links[chosen]
            self._slots.reserve_for_poll()
            req = self._wire.poll(
                url=link.orch.url, token=link.orch.token, worker_id=settings.worker_id
            )
            link.polls.add(self._request("poll", chosen, req))
            polls_out += 1

    def _start_waiting(self, now: float) -> None:
        if not self._waiting:
            return
        still: deque[str] = deque()
        while self._waiting:
            task_id = self._waiting.popleft()
            running = self._tasks.get(task_id)
            if running is None or running.started:
                continue
            if self._slots.type_full(running.task_type):
                still.append(task_id)
                continue
            self._slots.unwait(running.task_type)
            self._start(running, now)
        self._waiting = still

    def _start(self, running: _Running, now: float) -> None:
        self._slots.start(running.task_type)
        running.started = True
        timeout = self.settings.task_timeout
        if timeout:
            running.deadline = now + timeout
        self._effects.append(StartHandler(task=running.task, timeout=timeout))

    # -- replies -------------------------------------------------------------------------

    def _on_reply(
        self, rid: int, status: int | None, retry_after: str | None, body: bytes, now: float
    ) -> None:
        entry = self._requests.pop(rid, None)
        if entry is None:
            log.debug("reply to unknown request %s ignored", rid)
            return
        purpose, index, task_id = entry
        link = self._links[index]
        abandoned = rid in self._cancelled_requests
        self._cancelled_requests.discard(rid)
        if status is None and not abandoned:
            self.counters["requests_failed"] += 1
        if purpose == "poll":
            link.polls.discard(rid)
            self._on_poll_reply(link, rid, status, retry_after, body, now, abandoned)
        elif purpose == "heartbeat":
            link.heartbeat_request = None
            link.heartbeats_answered = link.heartbeats_sent
            if link.abandon_polls and link.busy_heartbeat == rid:
                # "busy" reached the orchestrator (or it is unreachable): nothing new
                # will be dispatched to us, so the parked polls may go.
                link.abandon_polls = False
                link.busy_heartbeat = None
                self._abandon_polls(link)
            self._on_heartbeat_reply(link, status, retry_after, body, now)
        elif purpose == "register":
            link.register_request = None
            self._on_register_reply(link, status, retry_after, body, now)
        else:
            assert task_id is not None
            self._on_result_reply(task_id, status, retry_after, body, now)

    def _on_register_reply(
        self, link: _Link, status: int | None, retry_after: str | None, body: bytes, now: float
    ) -> None:
        outcome = self._wire.parse_register(status, retry_after, body)
        if outcome.kind == ReplyKind.OK:
            link.move(LinkInput.REGISTER_OK)
            link.register_retry.succeeded()
            link.healthy = True
            link.heartbeat_ok_since_register = False
            link.heartbeat_due = now  # say "idle" and what we take right away
            log.info("registered with %s as %s", link.orch.url, self.settings.worker_id)
            return
        link.move(LinkInput.REGISTER_FAILED)
        link.healthy = False
        if outcome.kind == ReplyKind.RETRY:
            link.register_retry.cap = self.settings.retry_cap  # a 4xx's slow cap no longer applies
            delay = link.register_retry.failed(now, self._rng, outcome.retry_after)
            log.warning(
                "registration with %s failed (%s); retrying in %.1fs",
                link.orch.url,
                _detail(outcome.detail, body, status),
                delay,
            )
        else:
            link.register_retry.cap = SLOW_RETRY_CAP
            delay = link.register_retry.failed(now, self._rng, outcome.retry_after)
            log.error(
                "registration with %s refused (%s); check WORKER_TOKEN and the worker's "
                "settings. Retrying in %.1fs",
                link.orch.url,
                _detail(outcome.detail, body, status),
                delay,
            )

    def _on_heartbeat_reply(
        self, link: _Link, status: int | None, retry_after: str | None, body: bytes, now: float
    ) -> None:
        if link.state is not LinkState.REGISTERED:
            return  # a heartbeat that crossed a re-registration: nothing to learn
        outcome = self._wire.parse_heartbeat(status, retry_after, body)
        if outcome.kind == ReplyKind.OK and outcome.unknown_worker:
            log.warning(
                "%s no longer knows this worker (%s); registering again",
                link.orch.url,
                outcome.detail,
            )
            link.move(LinkInput.FORGOTTEN)
            link.heartbeat_due = None
            link.register_retry.succeeded()
            return
        if outcome.kind == ReplyKind.OK:
            link.healthy = True
            link.heartbeat_retry.succeeded()
            link.heartbeat_ok_since_register = True
            if link.heartbeat_due is None:
                link.heartbeat_due = now + self.settings.heartbeat_interval
            return
        if outcome.kind != ReplyKind.RETRY or status is None or status >= 500:
            link.healthy = False
        delay = link.heartbeat_retry.failed(now, self._rng, outcome.retry_after)
        link.heartbeat_due = now + min(delay, self.settings.heartbeat_interval)
        log.warning(
            "heartbeat to %s failed (%s)", link.orch.url, _detail(outcome.detail, body, status)
        )

    def _on_poll_reply(
        self,
        link: _Link,
        rid: int,
        status: int | None,
        retry_after: str | None,
        body: bytes,
        now: float,
        abandoned: bool,
    ) -> None:
        if status is None and abandoned:
            self._slots.poll_empty()
            return
        parsed = self._wire.parse_poll(status, retry_after, body)
        if isinstance(parsed, NoTask):
            self._slots.poll_empty()
            outcome = parsed.outcome
            if outcome.kind == ReplyKind.OK:
                self._poll_succeeded(link, rid)
                return
            if status == 404 and link.state is LinkState.REGISTERED:
                link.move(LinkInput.FORGOTTEN)
                link.heartbeat_due = None
            elif status != 429:
                link.healthy = False
            delay = link.poll_retry.failed(now, self._rng, outcome.retry_after)
            if not link.healthy and link.state is LinkState.REGISTERED:
                # Probe with a heartbeat as soon as the poll backoff ends: its
                # success is what brings a failed-over worker back to this one.
                probe = now + delay
                if link.heartbeat_due is None or link.heartbeat_due > probe:
                    link.heartbeat_due = probe
            link.poll_failure_seen = self._next_request
            log.warning(
                "poll of %s failed (%s); next poll there in %.1fs",
                link.orch.url,
                _detail(outcome.detail, body, status),
                delay,
            )
            return
        if isinstance(parsed, MalformedTask):
            # A server that answers polls with garbage is misbehaving: back off as
            # for an error, or a worker would poll it again at once, in a spin.
            self._slots.poll_empty()
            link.poll_retry.failed(now, self._rng)
            link.poll_failure_seen = self._next_request
            self._reject(
                parsed.job_id,
                parsed.task_id,
                link,
                f"malformed task from {link.orch.url}: {parsed.reason}",
                now,
            )
            return
        self._poll_succeeded(link, rid)
        self._on_task(link, parsed, now)

    def _poll_succeeded(self, link: _Link, rid: int) -> None:
        """A poll answered: the link is well, unless the poll left before a failure came in.

        Such a poll was parked or in flight while another one failed: its answer says
        nothing about the link now, and must not cut short a backoff (a ``Retry-After``
        of a 429 that came in meanwhile) nor bring back a link marked unhealthy.
        """
        if rid > link.poll_failure_seen:
            link.poll_retry.succeeded()
            link.healthy = True

    def _on_task(self, link: _Link, t: OrchestratorTask, now: float) -> None:
        self.counters["tasks_received"] += 1
        if t.task_id in self._tasks or t.task_id in self._outbox:
            self._slots.poll_empty()
            log.warning(
                "task %s (job %s) was delivered again while still in progress; ignored",
                t.task_id,
                t.job_id,
            )
            return
        if self._state is WorkerState.CANCELLING or self._state is WorkerState.STOPPED:
            # A poll reply that won the race against its cancellation: too late to run.
            self._slots.poll_empty()
            if self._state is WorkerState.STOPPED:
                log.error(
                    "task %s (job %s) arrived after the worker stopped: not run, not answered",
                    t.task_id,
                    t.job_id,
                )
                return
            log.warning("task %s (job %s) arrived while shutting down", t.task_id, t.job_id)
            message = "the worker shut down before the task started"
            result = failure_result(TRANSIENT_ERROR, message)
            self._enqueue_result(t.task_id, t.job_id, link.index, result)
            return
        if self._precancelled.pop(t.task_id, None) is not None:
            self._slots.poll_empty()
            log.info("task %s (job %s) was cancelled before it arrived", t.task_id, t.job_id)
            self._enqueue_result(t.task_id, t.job_id, link.index, {"status": "cancelled"})
            return
        if t.type not in self.settings.tasks:
            self._slots.poll_empty()
            known = ", ".join(sorted(self.settings.tasks)) or "none"
            self._reject(
                t.job_id,
                t.task_id,
                link,
                f"this worker has no handler for task type {t.type!r} (handlers: {known})",
                now,
            )
            return
        self._slots.poll_got_task()
        task = Task(
            task_id=t.task_id,
            job_id=t.job_id,
            name=t.type,
            params=t.params,
            priority=t.priority,
            tracing_context=t.tracing_context,
            params_metadata=t.params_metadata,
            orchestrator_url=link.orch.url,
        )
        task_type = self.settings.tasks[t.type]
        running = _Running(task, task_type, link.index)
        self._tasks[t.task_id] = running
        if self._slots.type_full(task_type) or self._waiting:
            self._slots.wait(task_type)
            self._waiting.append(t.task_id)
            log.info("task %s (job %s) waits for a %r slot", t.task_id, t.job_id, task_type)
        else:
            self._start(running, now)
        self._state_changed(now)

    def _reject(
        self, job_id: str | None, task_id: str | None, link: _Link, reason: str, now: float
    ) -> None:
        """Answer a task that cannot run with a failure, if it can be identified at all."""
        self.counters["tasks_rejected"] += 1
        if job_id is None or task_id is None:
            log.error("%s; it cannot be identified, so no result can be sent", reason)
            return
        if task_id in self._tasks or task_id in self._outbox:
            # Its earlier delivery is still in progress here and will be answered.
            log.error("task %s (job %s): %s; already in progress here", task_id, job_id, reason)
            return
        log.error("task %s (job %s): %s; reporting %s", task_id, job_id, reason, PERMANENT_ERROR)
        self._enqueue_result(
            task_id,
            job_id,
            link.index,
            {"status": "failure", "error": {"code": PERMANENT_ERROR, "message": reason}},
        )

    def _on_result_reply(
        self, task_id: str, status: int | None, retry_after: str | None, body: bytes, now: float
    ) -> None:
        out = self._outbox[task_id]  # a result leaves the outbox only on its own reply
        out.request = None
        outcome = self._wire.parse_result(status, retry_after, body)
        if outcome.kind == ReplyKind.OK:
            del self._outbox[task_id]
            self.counters["results_acknowledged"] += 1
            self._effects.append(CleanupTask(task_id=task_id))
            self._state_changed(now)
            return
        url = self._links[out.link].orch.url
        if status is not None and status >= 500 and status not in (502, 503, 504):
            # The orchestrator is up and keeps failing on this result (1.0b10 turns
            # "unknown job" into a 500): retrying forever would wedge the outbox.
            out.server_errors += 1
        if outcome.kind == ReplyKind.FINAL or out.server_errors > self.settings.result_max_retries:
            del self._outbox[task_id]
            self.counters["results_dropped"] += 1
            log.error(
                "result of task %s (job %s) REJECTED by %s after %d attempt(s) (%s); "
                "it will not be sent again: %r",
                task_id,
                out.job_id,
                url,
                out.attempts,
                _detail(outcome.detail, body, status),
                out.result,
            )
            self._effects.append(CleanupTask(task_id=task_id))
            self._state_changed(now)
            return
        delay = out.retry.failed(now, self._rng, outcome.retry_after)
        level = (
            logging.ERROR if out.attempts == self.settings.result_max_retries else logging.WARNING
        )
        log.log(
            level,
            "result of task %s (job %s) not accepted by %s (%s, attempt %d); retrying in %.1fs%s",
            task_id,
            out.job_id,
            url,
            _detail(outcome.detail, body, status),
            out.attempts,
            delay,
            " and for as long as the worker runs" if level == logging.ERROR else "",
        )

    # -- handlers -----------------------------------------------------------------------

    def _on_handler_finished(self, event: HandlerFinished, now: float) -> None:
        running = self._tasks.pop(event.task_id, None)
        if running is None or not running.started:
            if running is not None:  # a waiting task has no handler to finish
                self._tasks[event.task_id] = running
            raise LocalProtocolError(
                f"HandlerFinished for task {event.task_id} that is not running"
            )
        self._slots.stop(running.task_type)
        self._slots.release()
        result = dict(event.result)
        reason = running.cancel_reason
        if result.get("status") == "cancelled" and reason in ("timeout", "shutdown"):
            if reason == "timeout":
                result = timeout_result(
                    self.settings.task_timeout or 0.0, handler_name=running.task.name
                )
            else:
                result = failure_result(
                    TRANSIENT_ERROR, "the worker shut down before the task finished"
                )
        task = running.task
        out = self._enqueue_result(task.task_id, task.job_id, running.link, result)
        self._state_changed(now)
        self._announce_before(out, now)

    def _heartbeat_settled(self, out: _Outgoing) -> bool:
        link = self._links[out.link]
        return out.after_heartbeat <= link.heartbeats_answered or link.state is not (
            LinkState.REGISTERED
        )

    def _announce_before(self, out: _Outgoing, now: float) -> None:
        """Hold a result until the orchestrator has heard that we are idle again.

        The orchestrator acts on a result at once: a TRANSIENT_ERROR is re-dispatched
        inside the result request, the job's next task right after it, and it
        dispatches only to workers whose last heartbeat said ``idle``. A worker that
        said ``busy`` and posts a result straight away makes it fail those jobs
        ("No suitable workers"), so the heartbeat that frees the slot goes first.
        """
        link = self._links[out.link]
        if link.state is LinkState.REGISTERED and link.reported_idle is False and self._accepting():
            out.after_heartbeat = link.heartbeats_sent + 1
            link.heartbeat_due = now

    def _enqueue_result(
        self, task_id: str, job_id: str, link: int, result: Mapping[str, Any]
    ) -> _Outgoing:
        retry = Backoff(base=self.settings.result_retry_base, cap=self.settings.result_retry_cap)
        out = self._outbox[task_id] = _Outgoing(task_id, job_id, link, result, retry)
        return out

    def _cancel_task(self, task_id: str, reason: str, now: float) -> None:
        running = self._tasks.get(task_id)
        if running is None:
            if reason == CANCELLED_BY_ORCHESTRATOR and task_id not in self._outbox:
                # 1.0b10 may send cancel_task while the task still waits in its
                # queue: remember it, so that the task is answered, not run.
                self._precancelled[task_id] = now
                while len(self._precancelled) > PRECANCELLED_LIMIT:
                    del self._precancelled[next(iter(self._precancelled))]
                log.info("cancel for task %s before it arrived: it will not run", task_id)
            else:
                log.info("cancel for task %s, which is not running here: ignored", task_id)
            return
        if running.cancel_reason is not None:
            return
        running.cancel_reason = reason
        if running.started:
            log.info("cancelling task %s (job %s): %s", task_id, running.task.job_id, reason)
            self._effects.append(CancelHandler(task_id=task_id, reason=reason))
            return
        # Never started: finish it here, with no handler to wait for.
        del self._tasks[task_id]
        self._slots.unwait(running.task_type)
        self._slots.release()
        if reason == "shutdown":
            result: dict[str, Any] = {
                "status": "failure",
                "error": {
                    "code": TRANSIENT_ERROR,
                    "message": "the worker shut down before the task started",
                },
            }
        else:
            result = {"status": "cancelled"}
        out = self._enqueue_result(task_id, running.task.job_id, running.link, result)
        self._state_changed(now)
        self._announce_before(out, now)

    # -- command channel ---------------------------------------------------------------

    def _on_command(self, event: CommandReceived, now: float) -> None:
        parsed = self._wire.parse_command(event.text)
        if isinstance(parsed, CancelCommand):
            self._cancel_task(parsed.task_id, CANCELLED_BY_ORCHESTRATOR, now)
        else:
            log.warning("command from %s ignored: %s", self._link_url(event.channel), parsed.reason)

    def _link_url(self, channel: int) -> str:
        if 0 <= channel < len(self._links):
            return self._links[channel].orch.url
        return f"channel {channel}"

    def _on_channel_opened(self, event: CommandChannelOpened) -> None:
        link = self._links[event.channel]
        link.channel_open = True
        link.ws_retry.succeeded()
        log.info("command channel to %s open", link.orch.url)

    def _on_channel_closed(self, event: CommandChannelClosed, now: float) -> None:
        link = self._links[event.channel]
        was_open = link.channel_open
        link.channel_open = False
        link.channel_wanted = False
        if self._state in (WorkerState.RUNNING, WorkerState.DRAINING):
            delay = link.ws_retry.failed(now, self._rng)
            log.warning(
                "command channel to %s %s (%s); reconnecting in %.1fs",
                link.orch.url,
                "closed" if was_open else "failed",
                event.reason,
                delay,
            )

    def _on_progress(self, event: ProgressReported) -> None:
        running = self._tasks.get(event.task_id)
        if running is None:
            return
        link = self._links[running.link]
        if not link.channel_open:
            log.debug("progress of task %s not sent: no command channel", event.task_id)
            return
        try:
            text = self._wire.progress(
                task_id=event.task_id,
                job_id=running.task.job_id,
                progress=event.progress,
                message=event.message,
            )
        except (TypeError, ValueError) as exc:  # NaN, infinity, not a number
            log.warning("progress of task %s not sent: %s", event.task_id, exc)
            return
        self._effects.append(SendCommandMessage(channel=link.index, text=text))

    def _on_hot_cache(self, event: HotCacheChanged, now: float) -> None:
        changed = False
        for name in event.added:
            if name not in self._hot_cache:
                self._hot_cache.append(name)
                changed = True
        for name in event.removed:
            if name in self._hot_cache:
                self._hot_cache.remove(name)
                changed = True
        if changed:
            self._state_changed(now)

    # -- stopping ----------------------------------------------------------------------

    def _on_drain(self, event: DrainRequested, now: float) -> None:
        before = self._state
        self._state = worker_transition(self._state, WorkerInput.DRAIN)
        if before is WorkerState.CREATED:
            self._stop()
        elif before is WorkerState.RUNNING:
            log.info(
                "draining (%s): no new tasks; %d running get %.0fs to finish",
                event.reason,
                len(self._tasks),
                self.settings.shutdown_timeout,
            )
            self._drain_deadline = now + self.settings.shutdown_timeout
            for link in self._links:
                if link.state is LinkState.REGISTERED:
                    link.abandon_polls = True
                    link.heartbeat_due = now
                else:
                    self._abandon_polls(link)
        elif before is WorkerState.DRAINING:
            self._begin_cancelling(now, event.reason)

    def _begin_cancelling(self, now: float, reason: str) -> None:
        if self._state is WorkerState.DRAINING:
            self._state = worker_transition(self._state, WorkerInput.DRAIN_DEADLINE)
        log.warning("%s: cancelling %d task(s) that are still running", reason, len(self._tasks))
        self._give_up_deadline = now + SHUTDOWN_GRACE
        for link in self._links:
            link.abandon_polls = False
            self._abandon_polls(link)
            if link.channel_wanted:
                link.channel_wanted = False
                link.channel_open = False
                self._effects.append(CloseCommandChannel(channel=link.index))
        for task_id in list(self._tasks):
            self._cancel_task(task_id, "shutdown", now)

    def _abandon_polls(self, link: _Link) -> None:
        for rid in link.polls:
            if rid not in self._cancelled_requests:
                self._cancelled_requests.add(rid)
                self._effects.append(CancelRequest(request_id=rid))

    def _maybe_settle(self) -> None:
        if self._tasks or self._outbox:
            return
        if any(link.polls for link in self._links):
            return
        self._state = worker_transition(self._state, WorkerInput.SETTLED)
        self._stop()

    def _give_up(self) -> None:
        for running in self._tasks.values():
            log.error(
                "task %s (job %s): the handler did not stop after cancellation; no result sent",
                running.task.task_id,
                running.task.job_id,
            )
        for out in self._outbox.values():
            log.error(
                "result of task %s (job %s) could not be delivered before shutdown and is lost: %r",
                out.task_id,
                out.job_id,
                out.result,
            )
        self._state = worker_transition(self._state, WorkerInput.GIVE_UP)
        self._stop()

    def _stop(self) -> None:
        """Emit the end: every path here leaves the machine STOPPED, so this runs once.

        No poll is left to cancel (draining settles only without polls, and
        cancelling abandoned them all), but a command channel may still be open.
        """
        for link in self._links:
            if link.channel_wanted:
                link.channel_wanted = False
                self._effects.append(CloseCommandChannel(channel=link.index))
        undelivered = len(self._outbox) + len(self._tasks)
        self._effects.append(WorkerStopped(undelivered=undelivered))


def _detail(detail: str, body: bytes, status: int | None) -> str:
    if status is None:
        return body.decode("utf-8", "replace") or "no reply"
    return detail

"""Test tools for the sans-IO core: a fake orchestrator and a driver with virtual time.

:class:`FakeOrchestrator` is the server-side twin of the worker machine: it
answers the same :class:`~rca_core.HttpRequest` objects the machine emits, as
the real orchestrator would (long polls are held, results are counted per
task). :class:`Simulation` connects a :class:`~rca_core.WorkerMachine` to one
or more fakes and to scripted handlers, and skips virtual time straight to the
next thing that happens, so a scenario of minutes runs in milliseconds and
reads like a timeline::

    fake = FakeOrchestrator(url="http://orch-a")
    sim = Simulation(machine, [fake], handler=lambda task: (1.0, {"status": "success"}))
    sim.run_until(lambda: fake.registered, timeout=5)
    fake.submit("echo", {"x": 1})
    sim.run_until(lambda: fake.results, timeout=5)
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._events import (
    CancelHandler,
    CancelRequest,
    CleanupTask,
    CloseCommandChannel,
    CommandChannelClosed,
    CommandChannelOpened,
    CommandReceived,
    Event,
    HandlerFinished,
    OpenCommandChannel,
    RequestFailed,
    ResponseReceived,
    SendCommandMessage,
    SendRequest,
    StartHandler,
    Task,
    WorkerStopped,
)
from ._machine import WorkerMachine
from ._wire import HttpRequest

__all__ = ["FakeOrchestrator", "HandlerScript", "Reply", "Simulation"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Reply:
    """What the fake answers: an HTTP reply, or ``status=None`` for no reply at all."""

    status: int | None
    body: bytes = b""
    retry_after: str | None = None


_NO_REPLY = Reply(status=None, body=b"connection refused")
_RESET = Reply(status=None, body=b"connection reset")


@dataclass(kw_only=True)
class FakeOrchestrator:
    """The orchestrator's side of the RCA wire, without I/O.

    Switches for fault injection: ``down`` (no reply to anything), ``script``
    (canned replies per route, consumed first), ``forget_with`` (answer the next
    heartbeat with ``404`` or ``200 null``).
    """

    url: str = "http://orchestrator.test"
    token: str = "worker-token"
    hold: float = 30.0
    down: bool = False
    forget_with: int | None = None  # 404 or 200 (meaning "200 null")
    script: dict[str, deque[Reply]] = field(default_factory=dict)
    queue: deque[dict[str, Any]] = field(default_factory=deque)
    registered: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[float, str]] = field(default_factory=list)
    commands_received: list[str] = field(default_factory=list)
    known: bool = False
    _ids: Iterable[int] = field(default_factory=lambda: itertools.count(1))

    def submit(self, task_type: str, params: Any = None, **extra: Any) -> str:
        """Queue a task; returns its task id."""
        n = next(iter(self._ids))
        task: dict[str, Any] = {
            "job_id": f"job-{n}",
            "task_id": f"task-{n}",
            "type": task_type,
            "params": {} if params is None else params,
            "tracing_context": {},
            "params_metadata": {},
        }
        task.update(extra)
        self.queue.append(task)
        return str(task["task_id"])

    def results_for(self, task_id: str) -> list[dict[str, Any]]:
        return [r["result"] for r in self.results if r.get("task_id") == task_id]

    @staticmethod
    def route(request: HttpRequest) -> str:
        path = request.url.split("/_worker/", 1)[-1]
        if request.method == "POST" and path == "workers/register":
            return "register"
        if request.method == "PATCH":
            return "heartbeat"
        if request.method == "GET" and path.endswith("/tasks/next"):
            return "poll"
        if request.method == "POST" and path == "tasks/result":
            return "result"
        return "unknown"

    def answer(self, request: HttpRequest, now: float) -> Reply | None:
        """The immediate reply, or None when a poll is parked (see :meth:`next_task`)."""
        route = self.route(request)
        self.requests.append((now, route))
        if self.down:
            return _NO_REPLY
        canned = self.script.get(route)
        if canned:
            return canned.popleft()
        if dict(request.headers).get("X-Worker-Token") != self.token:
            return Reply(status=401, body=b'{"error":"unauthorized"}')
        body: dict[str, Any] = json.loads(request.body) if request.body else {}
        if route == "register":
            self.registered.append(body)
            self.known = True
            return Reply(status=200, body=b'{"status":"registered"}')
        if route == "heartbeat":
            if self.forget_with is not None:
                self.known = False
                status, self.forget_with = self.forget_with, None
                return Reply(status=status, body=b"null" if status == 200 else b"")
            if not self.known:
                return Reply(status=200, body=b"null")
            self.heartbeats.append(body)
            return Reply(status=200, body=json.dumps(body).encode())
        if route == "poll":
            return self.next_task()
        if route == "result":
            self.results.append(body)
            return Reply(status=200, body=b'{"status":"ok"}')
        return Reply(status=404)

    def next_task(self) -> Reply | None:
        if self.queue:
            return Reply(status=200, body=json.dumps(self.queue.popleft()).encode())
        return None

    @property
    def last_heartbeat(self) -> dict[str, Any] | None:
        return self.heartbeats[-1] if self.heartbeats else None


#: A handler script: given a task, how long it runs and what it returns
#: (``None`` duration: it runs until cancelled).
HandlerScript = Callable[[Task], tuple[float | None, dict[str, Any]]]


class Simulation:
    """Drive a machine against fakes in virtual time; every loop is bounded."""

    def __init__(
        self,
        machine: WorkerMachine,
        orchestrators: Sequence[FakeOrchestrator],
        *,
        handler: HandlerScript,
        now: float = 0.0,
        latency: float = 0.001,
    ) -> None:
        self.machine = machine
        self.fakes = list(orchestrators)
        self.handler = handler
        self.now = now
        self.latency = latency
        self._seq = itertools.count()
        self._timeline: list[tuple[float, int, Callable[[], None]]] = []
        self._parked: dict[int, tuple[FakeOrchestrator, float]] = {}
        self._finishing: dict[str, int] = {}  # task id -> token of its scheduled finish
        self._cancelled_finishes: set[int] = set()
        self.running: dict[str, Task] = {}
        self.started: list[Task] = []
        self.cleaned: list[str] = []
        self.channels: dict[int, FakeOrchestrator] = {}
        self.stopped: WorkerStopped | None = None
        self.max_running = 0
        self.effects_seen: list[Any] = []
        machine.start(now)
        self._drain_effects()

    # -- scheduling --------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> int:
        token = next(self._seq)
        heapq.heappush(self._timeline, (when, token, action))
        return token

    def feed(self, event: Event) -> None:
        self.machine.handle(event, self.now)
        self._drain_effects()

    def _fake_for(self, url: str) -> FakeOrchestrator:
        for fake in self.fakes:
            if url.startswith(fake.url.rstrip("/") + "/"):
                return fake
        raise LookupError(f"no fake orchestrator serves {url}")

    def _deliver(self, rid: int, reply: Reply) -> None:
        if reply.status is None:
            self.feed(RequestFailed(request_id=rid, reason=reply.body.decode()))
        else:
            self.feed(
                ResponseReceived(
                    request_id=rid,
                    status=reply.status,
                    body=reply.body,
                    retry_after=reply.retry_after,
                )
            )

    def _drain_effects(self) -> None:
        for effect in self.machine.effects():
            self.effects_seen.append(effect)
            self._perform(effect)

    def _perform(self, effect: Any) -> None:
        if isinstance(effect, SendRequest):
            fake = self._fake_for(effect.request.url)
            reply = fake.answer(effect.request, self.now)
            rid = effect.request_id
            if reply is None:
                self._parked[rid] = (fake, self.now + fake.hold)
                self.at(self.now + fake.hold, lambda: self._expire(rid))
            else:
                self.at(self.now + self.latency, lambda: self._deliver(rid, reply))
        elif isinstance(effect, CancelRequest):
            if self._parked.pop(effect.request_id, None) is not None:
                rid = effect.request_id
                self.at(self.now, lambda: self._deliver(rid, Reply(status=None, body=b"cancelled")))
        elif isinstance(effect, StartHandler):
            task = effect.task
            self.running[task.task_id] = task
            self.started.append(task)
            self.max_running = max(self.max_running, len(self.running))
            duration, result = self.handler(task)
            if duration is not None:
                self._finishing[task.task_id] = self.at(
                    self.now + duration, lambda: self._finish(task.task_id, result)
                )
        elif isinstance(effect, CancelHandler):
            # The machine cancels a handler once, while it runs: it stops at once.
            token = self._finishing.pop(effect.task_id, None)
            if token is not None:
                self._cancelled_finishes.add(token)
            tid = effect.task_id
            self.at(self.now, lambda: self._finish(tid, {"status": "cancelled"}))
        elif isinstance(effect, OpenCommandChannel):
            fake = self._fake_for(
                effect.url.replace("ws://", "http://").replace("wss://", "https://")
            )
            channel = effect.channel
            if fake.down:
                self.at(
                    self.now + self.latency,
                    lambda: self.feed(CommandChannelClosed(channel=channel, reason="refused")),
                )
            else:
                self.channels[channel] = fake
                self.at(
                    self.now + self.latency,
                    lambda: self.feed(CommandChannelOpened(channel=channel)),
                )
        elif isinstance(effect, CloseCommandChannel):
            self.channels.pop(effect.channel, None)
        elif isinstance(effect, SendCommandMessage):
            owner = self.channels.get(effect.channel)
            if owner is not None:
                owner.commands_received.append(effect.text)
        elif isinstance(effect, CleanupTask):
            self.cleaned.append(effect.task_id)
        else:  # WorkerStopped, the last kind of effect
            self.stopped = effect

    def _finish(self, task_id: str, result: dict[str, Any]) -> None:
        del self.running[task_id]  # a handler finishes once: a cancelled finish never runs
        self._finishing.pop(task_id, None)
        self.feed(HandlerFinished(task_id=task_id, result=result))

    def _expire(self, rid: int) -> None:
        if self._parked.pop(rid, None) is not None:
            self._deliver(rid, Reply(status=204))

    def _wake_parked(self) -> None:
        """Hand queued tasks to parked polls, as the real server's blocking pop does.

        A fake that went down drops its parked polls: they end with no reply.
        """
        for rid, (fake, _) in list(self._parked.items()):
            reply = _RESET if fake.down else fake.next_task()
            if reply is not None:
                del self._parked[rid]
                self.at(self.now + self.latency, functools.partial(self._deliver, rid, reply))

    def send_command(self, fake: FakeOrchestrator, command: dict[str, Any] | str) -> None:
        text = command if isinstance(command, str) else json.dumps(command)
        for channel, owner in self.channels.items():
            if owner is fake:
                self.feed(CommandReceived(channel=channel, text=text))
                return
        raise LookupError("the worker has no command channel to that orchestrator")

    def drop_channel(self, fake: FakeOrchestrator) -> None:
        for channel, owner in list(self.channels.items()):
            if owner is fake:
                del self.channels[channel]
                self.feed(CommandChannelClosed(channel=channel, reason="dropped"))

    # -- running -----------------------------------------------------------------------

    def step(self) -> bool:
        """Advance to the next thing that happens; False when nothing ever will."""
        self._wake_parked()
        deadline = self.machine.next_deadline()
        when = self._timeline[0][0] if self._timeline else None
        if deadline is not None and (when is None or deadline < when):
            self.now = max(self.now, deadline)
            self.machine.handle_timer(self.now)
            self._drain_effects()
            return True
        if when is None:
            return False
        when, token, action = heapq.heappop(self._timeline)
        self.now = max(self.now, when)
        if token not in self._cancelled_finishes:
            action()
        else:
            self._cancelled_finishes.discard(token)
        return True

    def run_until(
        self, condition: Callable[[], object], *, timeout: float, max_steps: int = 100_000
    ) -> bool:
        """Step until ``condition()`` holds or ``timeout`` virtual seconds pass."""
        end = self.now + timeout
        for _ in range(max_steps):
            if condition():
                return True
            if not self.step() or self.now > end:
                return bool(condition())
        return bool(condition())

    def run_for(self, seconds: float, *, max_steps: int = 100_000) -> None:
        end = self.now + seconds
        self.run_until(
            lambda: self._next_time() is None or self._next_time() > end,  # type: ignore[operator]
            timeout=seconds,
            max_steps=max_steps,
        )
        self.now = max(self.now, end)

    def _next_time(self) -> float | None:
        self._wake_parked()  # a task queued since the last step is handed over now
        deadline = self.machine.next_deadline()
        when = self._timeline[0][0] if self._timeline else None
        candidates = [t for t in (deadline, when) if t is not None]
        return min(candidates) if candidates else None

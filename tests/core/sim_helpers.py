"""Builders shared by the core tests: settings, handler scripts, a manual driver.

Scenarios use :class:`rca_core.testing.Simulation`; the few races a simulation
cannot produce on purpose (a reply that wins against its cancellation, a
handler that ignores cancellation) use :class:`Manual`, which feeds the machine
by hand and keeps every effect it produced.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from rca_core import (
    Effect,
    Event,
    MachineSettings,
    Orchestrator,
    RequestFailed,
    ResponseReceived,
    SendRequest,
    Task,
    WorkerMachine,
)
from rca_core.testing import FakeOrchestrator, HandlerScript, Simulation

URL_A = "http://orch-a.test"
URL_B = "http://orch-b.test"
TOKEN = "worker-token"

HEARTBEAT_KEYS = frozenset(
    {"load", "status", "supported_tasks", "hot_cache", "skill_dependencies", "hot_skills"}
)


def make_settings(**overrides: Any) -> MachineSettings:
    values: dict[str, Any] = {
        "worker_id": "worker-1",
        "worker_type": "cpu",
        "orchestrators": (Orchestrator(url=URL_A, token=TOKEN),),
        "tasks": {"echo": None},
        "max_concurrent_tasks": 2,
    }
    values.update(overrides)
    return MachineSettings(**values)


def make_machine(*, seed: int = 0, **overrides: Any) -> WorkerMachine:
    return WorkerMachine(make_settings(**overrides), rng=random.Random(seed))


def succeed_after(seconds: float | None) -> HandlerScript:
    """Every task runs ``seconds`` (None: until cancelled) and succeeds with its params."""

    def script(task: Task) -> tuple[float | None, dict[str, Any]]:
        return seconds, {"status": "success", "data": {"task_id": task.task_id}}

    return script


def by_name(durations: dict[str, float | None]) -> HandlerScript:
    """Each task name runs for its own duration."""

    def script(task: Task) -> tuple[float | None, dict[str, Any]]:
        return durations[task.name], {"status": "success", "data": {"task_id": task.task_id}}

    return script


def simulate(
    *fakes: FakeOrchestrator,
    handler: HandlerScript | None = None,
    seed: int = 0,
    priorities: Iterable[int] | None = None,
    weights: Iterable[int] | None = None,
    **overrides: Any,
) -> Simulation:
    """A started simulation of a worker against ``fakes`` (default: one fake at URL_A)."""
    if not fakes:
        fakes = (FakeOrchestrator(url=URL_A),)
    prios = list(priorities) if priorities is not None else [10] * len(fakes)
    wts = list(weights) if weights is not None else [1] * len(fakes)
    orchestrators = tuple(
        Orchestrator(url=f.url, token=TOKEN, priority=p, weight=w)
        for f, p, w in zip(fakes, prios, wts, strict=True)
    )
    machine = make_machine(seed=seed, orchestrators=orchestrators, **overrides)
    return Simulation(machine, list(fakes), handler=handler or succeed_after(1.0))


def times(fake: FakeOrchestrator, route: str, since: float = float("-inf")) -> list[float]:
    """When the fake received requests on ``route``."""
    return [t for t, r in fake.requests if r == route and t >= since]


def gaps(values: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(values)]


def request_body(effect: Effect) -> dict[str, Any]:
    assert isinstance(effect, SendRequest)
    assert effect.request.body is not None
    body = json.loads(effect.request.body)
    assert isinstance(body, dict)
    return body


def sent(effects: Iterable[Effect], purpose: str) -> list[SendRequest]:
    return [e for e in effects if isinstance(e, SendRequest) and e.purpose == purpose]


def of_type(effects: Iterable[object], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def task_body(task_id: str, task_type: str = "echo", job_id: str | None = None) -> bytes:
    return json.dumps(
        {"job_id": job_id or f"job-of-{task_id}", "task_id": task_id, "type": task_type}
    ).encode()


class Manual:
    """Drive a machine by hand: every reply, failure and timer is explicit."""

    def __init__(self, machine: WorkerMachine, now: float = 0.0) -> None:
        self.machine = machine
        self.now = now
        self.log: list[Effect] = []
        self.open: dict[int, SendRequest] = {}
        machine.start(now)
        self.collect()

    def collect(self) -> list[Effect]:
        new = self.machine.effects()
        self.log.extend(new)
        for effect in new:
            if isinstance(effect, SendRequest):
                self.open[effect.request_id] = effect
        return new

    def pending(self, purpose: str) -> list[SendRequest]:
        return [e for e in self.open.values() if e.purpose == purpose]

    def one(self, purpose: str) -> SendRequest:
        found = self.pending(purpose)
        assert len(found) == 1, f"expected one {purpose} request, found {found}"
        return found[0]

    def at(self, now: float | None) -> float:
        if now is not None:
            self.now = now
        return self.now

    def feed(self, event: Event, now: float | None = None) -> list[Effect]:
        self.machine.handle(event, self.at(now))
        return self.collect()

    def reply(
        self,
        request: SendRequest,
        status: int,
        body: bytes | dict[str, Any] | None = b"",
        *,
        retry_after: str | None = None,
        now: float | None = None,
    ) -> list[Effect]:
        self.open.pop(request.request_id, None)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        event = ResponseReceived(
            request_id=request.request_id, status=status, body=raw, retry_after=retry_after
        )
        return self.feed(event, now)

    def fail(
        self, request: SendRequest, reason: str = "refused", now: float | None = None
    ) -> list[Effect]:
        self.open.pop(request.request_id, None)
        return self.feed(RequestFailed(request_id=request.request_id, reason=reason), now)

    def timer(self, now: float) -> list[Effect]:
        self.machine.handle_timer(self.at(now))
        return self.collect()

    def bring_up(self) -> list[SendRequest]:
        """Register and heartbeat successfully with every orchestrator; returns the polls."""
        for request in self.pending("register"):
            self.reply(request, 200, {"status": "registered"})
        for request in self.pending("heartbeat"):
            self.reply(request, 200, {"status": "idle"})
        return self.pending("poll")


def no_spin(sim: Simulation, seconds: float, *, repeats: int = 50) -> int:
    """``sim.run_for(seconds)``, failing if the machine keeps asking for the same instant.

    A machine whose ``next_deadline()`` stays at a time that ``handle_timer``
    does not move past would spin a real driver at 100 % CPU; in virtual time
    it shows as many timer calls at one instant. Returns the number of calls.
    """
    calls: list[float] = []
    handle_timer = sim.machine.handle_timer

    def spy(now: float) -> None:
        calls.append(now)
        handle_timer(now)

    sim.machine.handle_timer = spy  # type: ignore[method-assign]
    try:
        sim.run_for(seconds, max_steps=20 * repeats + 20_000)
    finally:
        del sim.machine.handle_timer
    worst = max(Counter(calls).values(), default=0)
    assert worst < repeats, f"the machine asked for t={Counter(calls).most_common(1)} repeatedly"
    return len(calls)


Condition = Callable[[], object]

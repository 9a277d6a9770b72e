"""HealthState: what ``/health`` and ``/ready`` answer in every state of the worker.

The worker's loop ticks with a machine snapshot; the health server, in its own
thread, answers from the last tick and the time it is asked at. The snapshots
here are real machines' snapshots, in each worker state.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from rca_core import DrainRequested, WorkerMachine
from rca_core._health import TICK_INTERVAL, HealthReply, HealthState
from rca_core.testing import FakeOrchestrator, Simulation

from .sim_helpers import TOKEN, URL_A, make_machine, succeed_after

THRESHOLD = 5.0


def body(reply: HealthReply) -> dict[str, Any]:
    assert reply.content_type == "application/json"
    decoded = json.loads(reply.body)
    assert isinstance(decoded, dict)
    return decoded


def tick(
    state: HealthState, machine: WorkerMachine, now: float, failure: str | None = None
) -> None:
    """What the adapters' 1 Hz tick does."""
    state.tick(now, machine.snapshot(), registered=machine.registered, failure=failure)


def running_worker(**overrides: Any) -> Simulation:
    """A started worker whose handlers run until cancelled; ``sim.fakes[0]`` is its orchestrator."""
    fake = FakeOrchestrator(url=URL_A, token=TOKEN, **overrides)
    return Simulation(make_machine(), [fake], handler=succeed_after(None))


def test_before_the_first_tick_the_worker_is_not_live() -> None:
    state = HealthState(blocked_threshold=THRESHOLD)
    live = state.liveness(100.0)
    assert live.status == 503
    assert body(live) == {
        "status": "failing",
        "state": "created",
        "loop_lag": None,
        "problems": ["the worker loop has not started"],
    }
    ready = state.readiness(100.0)
    assert ready.status == 503
    assert body(ready) == {
        "status": "not ready",
        "state": "created",
        "registered": False,
        "slots": None,
        "orchestrators": None,
    }
    assert state.latest_snapshot() == {"state": "created"}


def test_a_registered_running_worker_is_live_and_ready() -> None:
    sim = running_worker()
    assert sim.run_until(lambda: sim.machine.registered, timeout=5)
    state = HealthState(blocked_threshold=THRESHOLD)
    tick(state, sim.machine, 50.0)

    live = state.liveness(50.3)
    assert live.status == 200
    assert body(live) == {"status": "ok", "state": "running", "loop_lag": 0.0}
    ready = state.readiness(50.3)
    assert ready.status == 200
    answer = body(ready)
    assert answer["status"] == "ready" and answer["registered"] is True
    assert answer["slots"] == sim.machine.snapshot()["slots"]
    assert [o["url"] for o in answer["orchestrators"]] == [URL_A]
    assert state.latest_snapshot() == sim.machine.snapshot()


def test_running_but_not_registered_is_live_but_not_ready() -> None:
    sim = running_worker(down=True)
    sim.run_for(2.0)
    state = HealthState(blocked_threshold=THRESHOLD)
    tick(state, sim.machine, 10.0)
    assert state.liveness(10.0).status == 200
    ready = state.readiness(10.0)
    assert ready.status == 503
    assert body(ready)["status"] == "not ready"
    assert body(ready)["registered"] is False
    assert body(ready)["state"] == "running"


@pytest.mark.parametrize("second_signal", [False, True], ids=["draining", "cancelling"])
def test_a_draining_or_cancelling_worker_is_live_but_not_ready(second_signal: bool) -> None:
    sim = running_worker()
    assert sim.run_until(lambda: sim.machine.registered, timeout=5)
    sim.fakes[0].submit("echo")  # runs until cancelled: the worker cannot settle at once
    assert sim.run_until(lambda: sim.running, timeout=5)
    sim.feed(DrainRequested(reason="SIGTERM"))
    if second_signal:
        sim.feed(DrainRequested(reason="SIGINT"))
    state = HealthState(blocked_threshold=THRESHOLD)
    tick(state, sim.machine, 1.0)
    expected = "cancelling" if second_signal else "draining"
    live = state.liveness(1.0)
    assert live.status == 200 and body(live)["state"] == expected
    ready = state.readiness(1.0)
    assert ready.status == 503
    assert body(ready)["state"] == expected
    assert body(ready)["registered"] is True


def test_a_stopped_worker_is_neither_live_nor_ready() -> None:
    sim = running_worker()
    assert sim.run_until(lambda: sim.machine.registered, timeout=5)
    sim.feed(DrainRequested(reason="SIGTERM"))
    assert sim.run_until(lambda: sim.stopped, timeout=5)
    state = HealthState(blocked_threshold=THRESHOLD)
    tick(state, sim.machine, 3.0)
    live = state.liveness(3.0)
    assert live.status == 503
    assert body(live)["problems"] == ["the worker has stopped"]
    assert state.readiness(3.0).status == 503


def test_an_internal_error_fails_liveness() -> None:
    sim = running_worker()
    assert sim.run_until(lambda: sim.machine.registered, timeout=5)
    state = HealthState(blocked_threshold=THRESHOLD)
    tick(state, sim.machine, 3.0, failure="LocalProtocolError: HandlerFinished for task x")
    live = state.liveness(3.0)
    assert live.status == 503
    assert body(live)["problems"] == [
        "internal error: LocalProtocolError: HandlerFinished for task x"
    ]
    ready = state.readiness(3.0)
    assert ready.status == 503  # registered and running, but not live
    assert body(ready)["registered"] is True and body(ready)["state"] == "running"


def test_a_stale_tick_means_a_blocked_loop() -> None:
    sim = running_worker()
    assert sim.run_until(lambda: sim.machine.registered, timeout=5)
    state = HealthState(blocked_threshold=THRESHOLD)
    tick(state, sim.machine, 100.0)

    # a tick is due every TICK_INTERVAL: lag counts from the one that did not come
    just_in_time = 100.0 + TICK_INTERVAL + THRESHOLD
    assert state.liveness(just_in_time).status == 200
    assert body(state.liveness(just_in_time))["loop_lag"] == pytest.approx(THRESHOLD)
    assert body(state.liveness(100.0 + TICK_INTERVAL / 2))["loop_lag"] == 0.0

    blocked = state.liveness(100.0 + TICK_INTERVAL + THRESHOLD + 2.25)
    assert blocked.status == 503
    answer = body(blocked)
    assert answer["loop_lag"] == pytest.approx(THRESHOLD + 2.25)
    assert answer["problems"] == [
        f"the event loop has not run for {THRESHOLD + 2.25:.1f}s (blocked?)"
    ]
    assert state.readiness(100.0 + 60.0).status == 503

    tick(state, sim.machine, 160.0)  # the loop runs again
    assert state.liveness(160.5).status == 200
    assert state.readiness(160.5).status == 200


def test_every_problem_is_listed() -> None:
    sim = running_worker()
    assert sim.run_until(lambda: sim.machine.registered, timeout=5)
    sim.feed(DrainRequested(reason="SIGTERM"))
    assert sim.run_until(lambda: sim.stopped, timeout=5)
    state = HealthState(blocked_threshold=1.0)
    tick(state, sim.machine, 0.0, failure="RuntimeError: boom")
    answer = body(state.liveness(10.0))
    assert answer["problems"] == [
        "internal error: RuntimeError: boom",
        "the worker has stopped",
        "the event loop has not run for 9.0s (blocked?)",
    ]

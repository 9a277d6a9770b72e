"""rca_core.testing is public API: the fake orchestrator and the simulation driver themselves."""

from __future__ import annotations

import json
from collections import deque

import pytest

from rca_core import (
    CommandChannelOpened,
    DrainRequested,
    HttpRequest,
    Orchestrator,
    ProgressReported,
    SendCommandMessage,
    WireV1,
)
from rca_core.testing import FakeOrchestrator, Reply, Simulation

from .sim_helpers import TOKEN, URL_A, URL_B, make_machine, of_type, simulate, succeed_after

WIRE = WireV1(poll_timeout=45.0)


def request(method: str, path: str, body: object = None, token: str = TOKEN) -> HttpRequest:
    return HttpRequest(
        method=method,
        url=f"{URL_A}/_worker/{path}",
        headers=(("X-Worker-Token", token),),
        body=None if body is None else json.dumps(body).encode(),
        timeout=1.0,
    )


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("POST", "workers/register", "register"),
        ("PATCH", "workers/w", "heartbeat"),
        ("GET", "workers/w/tasks/next", "poll"),
        ("POST", "tasks/result", "result"),
        ("GET", "workers/w", "unknown"),
        ("DELETE", "tasks/result", "unknown"),
        ("POST", "elsewhere", "unknown"),
    ],
)
def test_routes(method: str, path: str, route: str) -> None:
    assert FakeOrchestrator.route(request(method, path)) == route


def test_the_fake_answers_like_the_orchestrator() -> None:
    fake = FakeOrchestrator(url=URL_A)
    assert fake.answer(request("GET", "nowhere"), 0.0) == Reply(status=404)
    assert fake.answer(request("POST", "workers/register", {"worker_id": "w"}, token="x"), 0.1) == (
        Reply(status=401, body=b'{"error":"unauthorized"}')
    )
    assert fake.answer(request("PATCH", "workers/w", {"load": 0}), 0.2) == Reply(
        status=200, body=b"null"
    )  # not registered yet
    assert fake.last_heartbeat is None
    assert fake.answer(request("POST", "workers/register", {"worker_id": "w"}), 0.3) == Reply(
        status=200, body=b'{"status":"registered"}'
    )
    assert fake.answer(request("PATCH", "workers/w", {"load": 1}), 0.4) == Reply(
        status=200, body=b'{"load": 1}'
    )
    assert fake.last_heartbeat == {"load": 1}
    assert fake.answer(request("GET", "workers/w/tasks/next"), 0.5) is None  # parked
    task_id = fake.submit("echo", {"x": 1}, priority=5)
    reply = fake.answer(request("GET", "workers/w/tasks/next"), 0.6)
    assert reply is not None and reply.status == 200
    assert json.loads(reply.body) == {
        "job_id": "job-1",
        "task_id": task_id,
        "type": "echo",
        "params": {"x": 1},
        "tracing_context": {},
        "params_metadata": {},
        "priority": 5,
    }
    result = {"job_id": "job-1", "task_id": task_id, "worker_id": "w", "result": {"status": "ok"}}
    assert fake.answer(request("POST", "tasks/result", result), 0.7) == Reply(
        status=200, body=b'{"status":"ok"}'
    )
    assert fake.results_for(task_id) == [{"status": "ok"}]
    assert fake.results_for("other") == []
    assert [r for _, r in fake.requests] == [
        "unknown",
        "register",
        "heartbeat",
        "register",
        "heartbeat",
        "poll",
        "poll",
        "result",
    ]


def test_fault_switches() -> None:
    fake = FakeOrchestrator(url=URL_A, known=True)
    fake.script["heartbeat"] = deque([Reply(status=503)])
    assert fake.answer(request("PATCH", "workers/w", {}), 0) == Reply(status=503)  # script first
    fake.forget_with = 404
    assert fake.answer(request("PATCH", "workers/w", {}), 0) == Reply(status=404, body=b"")
    assert not fake.known
    fake.known = True
    fake.forget_with = 200
    assert fake.answer(request("PATCH", "workers/w", {}), 0) == Reply(status=200, body=b"null")
    assert fake.forget_with is None
    fake.down = True
    fake.submit("echo")
    assert fake.answer(request("GET", "workers/w/tasks/next"), 0).status is None
    assert len(fake.queue) == 1


def test_submitted_tasks_get_fresh_ids() -> None:
    fake = FakeOrchestrator()
    assert [fake.submit("echo") for _ in range(3)] == ["task-1", "task-2", "task-3"]
    assert fake.submit("echo", task_id="mine") == "mine"


def test_a_request_to_an_unknown_orchestrator_is_a_test_bug() -> None:
    machine = make_machine(orchestrators=(Orchestrator(url="http://nobody", token=TOKEN),))
    with pytest.raises(LookupError, match="no fake orchestrator serves http://nobody"):
        Simulation(machine, [FakeOrchestrator(url=URL_A)], handler=succeed_after(1))


def test_commands_and_channels_are_routed_to_their_fake() -> None:
    a = FakeOrchestrator(url=URL_A)
    b = FakeOrchestrator(url=URL_B)
    sim = simulate(a, b, websockets=True)
    sim.run_until(lambda: len(sim.channels) == 2, timeout=1)
    sim.run_for(0.1)
    sim.send_command(b, {"command": "cancel_task", "task_id": "not-here"})
    sim.drop_channel(b)
    assert list(sim.channels.values()) == [a]
    with pytest.raises(LookupError, match="no command channel"):
        sim.send_command(b, "{}")


def test_a_message_for_a_channel_the_simulation_does_not_have_goes_nowhere() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(None))
    sim.run_until(lambda: fake.heartbeats, timeout=1)
    task_id = fake.submit("echo")
    sim.run_until(lambda: sim.running, timeout=1)
    sim.feed(CommandChannelOpened(channel=0))  # the machine believes it; the simulation does not
    sim.feed(ProgressReported(task_id=task_id, progress=0.5))
    assert len(of_type(sim.effects_seen, SendCommandMessage)) == 1
    assert fake.commands_received == []


def test_a_cancelled_handler_does_not_finish_twice() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(10.0), task_timeout=2.0)
    sim.run_until(lambda: fake.heartbeats, timeout=1)
    task_id = fake.submit("echo")
    sim.run_for(30)  # past the handler's own finish time
    assert len(fake.results_for(task_id)) == 1
    assert fake.results_for(task_id)[0]["status"] == "failure"


def test_step_says_when_nothing_will_ever_happen() -> None:
    sim = simulate()
    sim.feed(DrainRequested())
    assert sim.run_until(lambda: sim.stopped, timeout=60)
    while sim.step():
        pass
    assert not sim.step()
    assert sim.run_until(lambda: False, timeout=10) is False


def test_run_until_is_bounded_by_steps_and_time() -> None:
    fake = FakeOrchestrator(url=URL_A, hold=0.01)
    sim = simulate(fake, max_concurrent_tasks=1)
    start = sim.now
    assert sim.run_until(lambda: False, timeout=1e9, max_steps=10) is False
    assert sim.now < start + 1
    assert sim.run_until(lambda: False, timeout=1.0) is False
    assert sim.now > start + 1
    sim.run_for(5.0)
    assert sim.now >= start + 6.0


def test_a_fake_that_goes_down_drops_its_parked_polls() -> None:
    fake = FakeOrchestrator(url=URL_A, hold=30.0)
    sim = simulate(fake, max_concurrent_tasks=1)
    sim.run_until(lambda: fake.heartbeats, timeout=1)
    sim.run_for(1)
    assert sim.machine.snapshot()["orchestrators"][0]["polls"] == 1
    fake.down = True
    sim.run_for(0.1)  # long before the hold would end
    assert sim.machine.snapshot()["orchestrators"][0]["polls"] == 0
    assert sim.machine.counters["requests_failed"] == 1
    assert not sim.machine.snapshot()["orchestrators"][0]["healthy"]

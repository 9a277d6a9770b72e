"""The worker machine, scenario by scenario, against the sans-IO fake orchestrator.

Each test reads as a timeline: the orchestrator's state changes, virtual time
passes, and the test looks at what the orchestrator saw (``fake.requests``,
``fake.heartbeats``, ``fake.results``) and at what the machine asked its
adapter to do (``sim.effects_seen``).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter, deque

import pytest

from rca_core import (
    PERMANENT_ERROR,
    ROUND_ROBIN,
    TRANSIENT_ERROR,
    CancelHandler,
    CancelRequest,
    CancelRequested,
    CloseCommandChannel,
    CommandChannelClosed,
    CommandChannelOpened,
    CommandReceived,
    DrainRequested,
    HandlerFinished,
    HotCacheChanged,
    LocalProtocolError,
    OpenCommandChannel,
    Orchestrator,
    ProgressReported,
    ResponseReceived,
    SendCommandMessage,
    SendRequest,
    StartHandler,
    WorkerMachine,
    WorkerState,
    WorkerStopped,
)
from rca_core.testing import FakeOrchestrator, Reply

from .sim_helpers import (
    HEARTBEAT_KEYS,
    TOKEN,
    URL_A,
    URL_B,
    Manual,
    by_name,
    gaps,
    make_machine,
    make_settings,
    no_spin,
    of_type,
    request_body,
    sent,
    simulate,
    succeed_after,
    task_body,
    times,
)

LATENCY = 0.001  # Simulation's default reply latency
MACHINE_LOG = "rca_core.worker"


def up(sim_fake: FakeOrchestrator) -> bool:
    return bool(sim_fake.heartbeats)


def state_of(machine: WorkerMachine) -> WorkerState:
    return machine.state  # a call, so that type checkers do not narrow it between steps


# -- registration ---------------------------------------------------------------------


def test_registration_backs_off_with_jitter_while_down_then_tasks_flow() -> None:
    fake = FakeOrchestrator(url=URL_A, down=True)
    sim = simulate(fake, retry_base=0.5, retry_cap=5.0)

    no_spin(sim, 300)

    assert {route for _, route in fake.requests} == {"register"}  # no poll before registering
    registers = times(fake, "register")
    # Exponential growth, capped: retry k waits at most min(cap, base * 2**k).
    for k, gap in enumerate(gaps(registers)):
        assert gap <= min(5.0, 0.5 * 2**k) + 2 * LATENCY
    steady = [t for t in registers if t >= 60]
    per_second = Counter(int(t) for t in steady)
    assert max(per_second.values()) <= 2
    assert len(steady) <= 240  # at most ~1/s on average (full jitter below a 5 s cap: ~0.4/s)
    assert len(steady) >= 240 / 5  # and it keeps trying, at least once per cap
    assert statistics.pstdev(gaps(steady)) > 0.5  # jittered, not a fixed period

    fake.down = False
    assert sim.run_until(lambda: fake.registered, timeout=5.0 + 2 * LATENCY)
    task_id = fake.submit("echo", {"n": 1})
    assert sim.run_until(lambda: fake.results, timeout=5)
    assert fake.results_for(task_id) == [{"status": "success", "data": {"task_id": task_id}}]
    assert sim.machine.registered


def test_registration_body_describes_the_worker() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(
        fake,
        tasks={"echo": None, "render": "gpu"},
        max_concurrent_tasks=3,
        websockets=True,
        gpu_model="A100",
        gpu_vram_gb=40,
        cost_per_skill={"echo": 0.5},
        installed_models=[{"name": "whisper", "version": "3"}],
        installed_software={"ffmpeg": "6"},
        hostname="box",
        ip_address="10.0.0.7",
        cpu_cores=8,
    )
    sim.run_until(lambda: fake.registered, timeout=1)
    assert fake.registered == [
        {
            "worker_id": "worker-1",
            "worker_type": "cpu",
            "supported_tasks": ["echo", "render"],
            "max_concurrent_tasks": 3,
            "cost_per_skill": {"echo": 0.5},
            "installed_models": [{"name": "whisper", "version": "3"}],
            "installed_software": {"ffmpeg": "6"},
            "hostname": "box",
            "ip_address": "10.0.0.7",
            "resources": {"cpu_cores": 8, "gpu_info": {"model": "A100", "vram_gb": 40}},
            "capabilities": {"websockets": True},
        }
    ]


@pytest.mark.parametrize("forget_with", [200, 404], ids=["200-null", "404"])
def test_registers_again_when_a_heartbeat_says_the_worker_is_unknown(forget_with: int) -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, heartbeat_interval=15.0)
    sim.run_until(lambda: up(fake), timeout=1)

    fake.forget_with = forget_with  # the next heartbeat is answered "who are you?"
    sim.run_for(16)

    assert len(fake.registered) == 2
    assert fake.known
    beats = times(fake, "heartbeat")
    assert beats[-1] - fake.requests[-1][0] <= 1  # heartbeats resumed after registering
    task_id = fake.submit("echo")
    assert sim.run_until(lambda: fake.results_for(task_id), timeout=5)


def test_a_restarted_orchestrator_that_forgot_the_worker_gets_it_back() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, heartbeat_interval=15.0)
    sim.run_until(lambda: up(fake), timeout=1)
    fake.known = False  # restarted: "200 null" to every heartbeat until registered
    sim.run_for(16)
    assert len(fake.registered) == 2


def test_poll_404_means_forgotten_and_registers_again() -> None:
    fake = FakeOrchestrator(url=URL_A, script={"poll": deque([Reply(status=404)])})
    sim = simulate(fake, max_concurrent_tasks=1)
    sim.run_for(2)
    assert len(fake.registered) == 2
    assert sim.machine.snapshot()["orchestrators"][0]["state"] == "registered"


def test_a_rejected_token_is_retried_slowly_and_loudly(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeOrchestrator(url=URL_A, token="the-right-one")
    sim = simulate(fake, retry_base=0.5, retry_cap=5.0)
    with caplog.at_level(logging.ERROR, MACHINE_LOG):
        no_spin(sim, 600)
    assert "check WORKER_TOKEN" in caplog.text
    assert TOKEN not in caplog.text  # the token never reaches a log line
    registers = times(fake, "register")
    assert max(gaps(registers)) > 5.0 + 2 * LATENCY  # slower than the network-error cap
    assert max(gaps(registers)) <= 60.0 + 2 * LATENCY  # but still retried
    assert len(registers) < 600 / 5

    fake.token = TOKEN  # the operator fixed it
    assert sim.run_until(lambda: fake.registered, timeout=61)


def test_after_a_token_error_an_outage_is_retried_at_the_normal_cap() -> None:
    fake = FakeOrchestrator(url=URL_A, token="the-right-one")
    sim = simulate(fake, retry_base=0.5, retry_cap=5.0, heartbeat_interval=15.0)
    sim.run_for(3)  # 401: retried slowly, it is our fault
    fake.token = TOKEN
    assert sim.run_until(lambda: up(fake), timeout=61)

    fake.forget_with = 404  # forgotten, and then every registration meets a network error
    fake.script["register"] = deque([Reply(status=None)] * 1000)
    start = sim.now
    no_spin(sim, 300)
    registers = times(fake, "register", since=start)
    assert len(registers) > 300 / 5
    assert max(gaps(registers)) <= 5.0 + 2 * LATENCY


def test_a_register_reply_with_retry_after_is_honoured() -> None:
    fake = FakeOrchestrator(
        url=URL_A, script={"register": deque([Reply(status=429, retry_after="20")])}
    )
    sim = simulate(fake)
    sim.run_until(lambda: fake.registered, timeout=60)
    first, second = times(fake, "register")[:2]
    assert second - first >= 20


def test_register_refused_with_a_final_status_is_retried_slowly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeOrchestrator(
        url=URL_A, script={"register": deque([Reply(status=400, body=b'{"error":"bad"}')])}
    )
    sim = simulate(fake)
    with caplog.at_level(logging.ERROR, MACHINE_LOG):
        assert sim.run_until(lambda: fake.registered, timeout=61)
    assert "registration with http://orch-a.test refused (HTTP 400)" in caplog.text


# -- heartbeats -------------------------------------------------------------------------


def test_heartbeats_go_out_every_interval_while_idle() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, heartbeat_interval=15.0)
    no_spin(sim, 100)
    beats = times(fake, "heartbeat")
    assert len(beats) == 7  # t=0 (right after registering), then every 15 s
    assert all(15.0 <= g <= 15.0 + 2 * LATENCY for g in gaps(beats))


def test_state_changes_are_reported_by_one_debounced_heartbeat() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(
        fake,
        handler=succeed_after(10.0),
        max_concurrent_tasks=4,
        heartbeat_interval=15.0,
        heartbeat_debounce=0.5,
    )
    sim.run_until(lambda: up(fake), timeout=1)
    sim.run_for(1)
    start = sim.now
    for _ in range(3):
        fake.submit("echo")
    sim.run_for(0.3)
    fake.submit("echo")  # a fourth change, 0.3 s later, does not push the heartbeat back
    sim.run_for(2)

    beats = times(fake, "heartbeat", since=start)
    assert len(beats) == 1
    assert beats[0] == pytest.approx(start + LATENCY + 0.5, abs=3 * LATENCY)
    assert fake.last_heartbeat == {
        "load": 4,
        "status": "busy",
        "supported_tasks": [],
        "hot_cache": [],
        "skill_dependencies": {},
        "hot_skills": [],
    }


def test_heartbeat_bodies_always_carry_every_key() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(
        fake,
        handler=succeed_after(3.0),
        skill_dependencies={"asr": ["whisper"], "tts": ["piper", "vocoder"]},
        heartbeat_interval=5.0,
    )
    sim.run_until(lambda: up(fake), timeout=1)
    assert fake.heartbeats[0]["hot_skills"] == []
    assert fake.heartbeats[0]["hot_cache"] == []

    sim.feed(HotCacheChanged(added=("whisper", "piper")))
    sim.run_for(1)
    assert fake.last_heartbeat is not None
    assert fake.last_heartbeat["hot_cache"] == ["whisper", "piper"]
    assert fake.last_heartbeat["hot_skills"] == ["asr"]

    fake.submit("echo")
    sim.run_for(4)
    sim.feed(HotCacheChanged(removed=("whisper", "piper")))
    sim.run_for(6)
    sim.feed(DrainRequested())
    sim.run_until(lambda: sim.stopped, timeout=10)

    assert len(fake.heartbeats) >= 5
    for body in fake.heartbeats:
        assert set(body) == HEARTBEAT_KEYS
        assert body["skill_dependencies"] == {"asr": ["whisper"], "tts": ["piper", "vocoder"]}
    assert fake.heartbeats[-1]["hot_skills"] == []
    assert fake.heartbeats[-1]["hot_cache"] == []
    assert fake.heartbeats[-1]["status"] == "busy"  # draining: take nothing new


def test_a_hot_cache_event_that_changes_nothing_sends_no_heartbeat() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, heartbeat_interval=15.0)
    sim.run_until(lambda: up(fake), timeout=1)
    sim.feed(HotCacheChanged(added=("m",)))
    sim.run_for(1)
    count = len(fake.heartbeats)
    sim.feed(HotCacheChanged(added=("m",), removed=("not-there",)))
    sim.run_for(1)
    assert len(fake.heartbeats) == count
    assert sim.machine.snapshot()["hot_cache"] == ["m"]


def test_heartbeat_errors_back_off_and_429_keeps_the_link_healthy() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, heartbeat_interval=15.0)
    sim.run_until(lambda: up(fake), timeout=1)
    fake.script["heartbeat"] = deque([Reply(status=429, retry_after="2")])
    sim.run_for(15.5)
    assert sim.machine.snapshot()["orchestrators"][0]["healthy"]
    sim.run_for(3)
    beats = times(fake, "heartbeat")
    assert beats[-1] - beats[-2] >= 2

    for status in (500, 401):
        fake.script["heartbeat"] = deque([Reply(status=status)])
        sim.run_until(lambda: not fake.script["heartbeat"], timeout=16)
        sim.run_for(0.01)
        assert not sim.machine.snapshot()["orchestrators"][0]["healthy"]
        sim.run_for(16)
        assert sim.machine.snapshot()["orchestrators"][0]["healthy"]


# -- slots and per-type limits --------------------------------------------------------------


def test_status_and_supported_tasks_follow_the_slots() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(5.0), max_concurrent_tasks=1)
    sim.run_until(lambda: up(fake), timeout=1)
    assert fake.last_heartbeat is not None
    assert fake.last_heartbeat["status"] == "idle"
    assert fake.last_heartbeat["supported_tasks"] == ["echo"]
    assert fake.last_heartbeat["load"] == 0

    fake.submit("echo")
    sim.run_for(1)
    assert fake.last_heartbeat == {
        "load": 1,
        "status": "busy",
        "supported_tasks": [],
        "hot_cache": [],
        "skill_dependencies": {},
        "hot_skills": [],
    }
    sim.run_for(5)
    assert fake.last_heartbeat["status"] == "idle"
    assert fake.last_heartbeat["load"] == 0


def test_a_type_at_its_limit_is_never_run_beyond_it_and_its_tasks_wait() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(
        fake,
        handler=by_name({"render": 5.0, "upscale": 5.0, "echo": 1.0}),
        tasks={"render": "gpu", "upscale": "gpu", "echo": None},
        task_type_limits={"gpu": 1},
        max_concurrent_tasks=4,
    )
    sim.run_until(lambda: up(fake), timeout=1)
    render = fake.submit("render")
    upscale = fake.submit("upscale")
    echo = fake.submit("echo")

    started_at: dict[str, float] = {}
    gpu_types = {"render", "upscale"}
    end = sim.now + 20
    while sim.now < end and sim.step():
        gpu_running = [t for t in sim.running.values() if t.name in gpu_types]
        assert len(gpu_running) <= 1
        assert sim.machine.snapshot()["slots"]["running"]["gpu"] <= 1
        for task in sim.running.values():
            started_at.setdefault(task.task_id, sim.now)
        if upscale not in started_at and render in started_at:
            slots = sim.machine.snapshot()["slots"]
            if slots["held"] == 3:
                assert slots["waiting"] == {"gpu": 1}  # upscale holds a slot and waits
                assert fake.last_heartbeat is None or fake.last_heartbeat["supported_tasks"] in (
                    ["echo"],
                    ["render", "upscale", "echo"],
                )

    assert started_at[echo] < started_at[render] + 1  # not stuck behind the waiting gpu task
    assert started_at[upscale] >= started_at[render] + 5  # started when render finished
    assert all(fake.results_for(t) for t in (render, upscale, echo))
    assert {"echo"} == {
        name for body in fake.heartbeats if body["load"] == 3 for name in body["supported_tasks"]
    }


def test_a_waiting_task_leaves_the_queue_in_order() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(
        fake,
        handler=succeed_after(2.0),
        tasks={"render": "gpu"},
        task_type_limits={"gpu": 1},
        max_concurrent_tasks=3,
    )
    sim.run_until(lambda: up(fake), timeout=1)
    ids = [fake.submit("render") for _ in range(3)]
    sim.run_until(lambda: len(fake.results) == 3, timeout=10)
    assert [t.task_id for t in sim.started] == ids
    assert sim.max_running == 1


# -- malformed and unwanted tasks --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "answered_as"),
    [
        (b"this is not json", None),
        (b"[1, 2, 3]", None),
        (b'"a string"', None),
        (json.dumps({"task_id": "t-x", "type": "echo"}).encode(), None),  # no job_id
        (json.dumps({"job_id": "j-x", "type": "echo"}).encode(), None),  # no task_id
        (json.dumps({"job_id": "j-x", "task_id": "t-x", "params": {}}).encode(), "t-x"),
        (json.dumps({"job_id": "j-x", "task_id": "t-x", "type": 7}).encode(), "t-x"),
        (json.dumps({"job_id": "j-x", "task_id": "t-x", "type": ""}).encode(), "t-x"),
    ],
    ids=["not-json", "list", "string", "no-job", "no-task-id", "no-type", "int-type", "empty-type"],
)
def test_a_malformed_task_is_answered_when_identifiable_and_never_leaks_a_slot(
    body: bytes, answered_as: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeOrchestrator(url=URL_A, script={"poll": deque([Reply(status=200, body=body)])})
    sim = simulate(fake, max_concurrent_tasks=1)  # one slot: a leak would stop all work
    with caplog.at_level(logging.ERROR, MACHINE_LOG):
        sim.run_until(lambda: not fake.script["poll"], timeout=1)
        task_id = fake.submit("echo")
        assert sim.run_until(lambda: fake.results_for(task_id), timeout=5)
        sim.run_for(1)

    assert "malformed task" in caplog.text
    assert sim.machine.counters["tasks_rejected"] == 1
    if answered_as is None:
        assert [r["task_id"] for r in fake.results] == [task_id]
    else:
        [failure] = fake.results_for(answered_as)
        assert failure["status"] == "failure"
        assert failure["error"]["code"] == PERMANENT_ERROR
        assert "type" in failure["error"]["message"]
    assert [t.task_id for t in sim.started] == [task_id]
    slots = sim.machine.snapshot()["slots"]
    assert slots["held"] == 0
    assert slots["polling"] == 1  # the one slot is parked in a poll again


def test_an_empty_200_poll_reply_counts_as_no_task() -> None:
    fake = FakeOrchestrator(
        url=URL_A,
        script={"poll": deque([Reply(status=200, body=b"null"), Reply(status=200, body=b"{}")])},
    )
    sim = simulate(fake, max_concurrent_tasks=1)
    sim.run_for(1)
    assert sim.machine.counters["tasks_rejected"] == 0
    assert sim.machine.counters["tasks_received"] == 0
    assert len(times(fake, "poll")) == 3


def test_an_unknown_task_type_is_answered_with_a_permanent_error() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, tasks={"echo": None, "render": None})
    sim.run_until(lambda: up(fake), timeout=1)
    task_id = fake.submit("transcode")
    assert sim.run_until(lambda: fake.results_for(task_id), timeout=5)
    [result] = fake.results_for(task_id)
    assert result["error"]["code"] == PERMANENT_ERROR
    assert "'transcode'" in result["error"]["message"]
    assert "echo, render" in result["error"]["message"]
    assert sim.started == []
    assert sim.machine.snapshot()["slots"]["held"] == 0


def test_a_task_delivered_twice_runs_once() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(5.0), max_concurrent_tasks=3)
    sim.run_until(lambda: up(fake), timeout=1)
    task = {"job_id": "job-d", "task_id": "task-d", "type": "echo", "params": {}}
    fake.queue.extend([dict(task), dict(task)])
    sim.run_for(10)
    assert [t.task_id for t in sim.started] == ["task-d"]
    assert len(fake.results_for("task-d")) == 1
    assert sim.machine.counters["tasks_received"] == 2
    assert sim.machine.snapshot()["slots"]["held"] == 0


def test_a_task_delivered_again_while_its_result_is_pending_is_ignored() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(1.0), max_concurrent_tasks=2)
    sim.run_until(lambda: up(fake), timeout=1)
    fake.script["result"] = deque([Reply(status=503)] * 3)
    task = {"job_id": "job-d", "task_id": "task-d", "type": "echo"}
    fake.queue.append(dict(task))
    sim.run_for(1.5)
    assert sim.machine.snapshot()["outbox"] == 1
    fake.queue.append(dict(task))
    sim.run_for(60)
    assert len(sim.started) == 1
    assert len(fake.results_for("task-d")) == 1


def test_a_malformed_delivery_of_a_running_task_does_not_replace_its_result() -> None:
    manual = Manual(make_machine())
    first, second = manual.bring_up()
    manual.reply(first, 200, task_body("t1"))
    [start] = of_type(manual.log, StartHandler)
    # The same task id again, now without a type: it must not be answered a second time.
    manual.reply(second, 200, {"job_id": "job-of-t1", "task_id": "t1"})
    assert manual.pending("result") == []
    manual.feed(HandlerFinished(task_id="t1", result={"status": "success", "data": {}}))
    [result] = manual.pending("result")
    assert request_body(result)["result"] == {"status": "success", "data": {}}
    assert start.task.task_id == "t1"


def test_a_malformed_task_whose_result_is_pending_is_not_answered_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manual = Manual(make_machine())
    first, second = manual.bring_up()
    manual.reply(first, 200, {"job_id": "j", "task_id": "t1", "type": "nope"})
    [pending] = manual.pending("result")
    with caplog.at_level(logging.ERROR, MACHINE_LOG):
        manual.reply(second, 200, {"job_id": "j", "task_id": "t1"})
    assert manual.pending("result") == [pending]
    assert "t1" in caplog.text


# -- results --------------------------------------------------------------------------------


def test_results_are_retried_with_backoff_honouring_retry_after() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(1.0), result_retry_base=1.0, result_retry_cap=30.0)
    sim.run_until(lambda: up(fake), timeout=1)
    fake.script["result"] = deque(
        [
            Reply(status=None),
            Reply(status=429, retry_after="7"),
            Reply(status=503),
            Reply(status=401),
        ]
    )
    task_id = fake.submit("echo")
    assert sim.run_until(lambda: fake.results_for(task_id), timeout=120)

    attempts = times(fake, "result")
    assert len(attempts) == 5
    g = gaps(attempts)
    assert g[0] <= 1.0 + 2 * LATENCY  # network error, attempt 0: up to the base
    assert g[1] >= 7.0  # Retry-After: 7
    assert g[2] <= 4.0 + 2 * LATENCY  # 503, attempt 2: up to base * 4
    assert g[3] <= 8.0 + 2 * LATENCY  # 401 is retried too (an operator may fix the token)
    assert fake.results_for(task_id) == [{"status": "success", "data": {"task_id": task_id}}]
    sim.run_for(1)  # the fake's reply reaches the machine
    assert sim.machine.counters["results_acknowledged"] == 1
    assert sim.machine.counters["result_retries"] == 4
    assert sim.cleaned == [task_id]


def test_results_wait_out_a_long_outage_and_are_delivered_once() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(10.0), result_retry_cap=30.0)
    sim.run_until(lambda: up(fake), timeout=1)
    task_id = fake.submit("echo")
    sim.run_for(5)
    fake.down = True
    outage_start = sim.now
    no_spin(sim, 300)

    attempts = times(fake, "result")
    assert len(attempts) >= 300 / 30
    assert max(gaps(attempts)) <= 30.0 + 2 * LATENCY
    assert sim.machine.snapshot()["outbox"] == 1
    assert times(fake, "heartbeat", since=outage_start + 60)  # still trying
    assert sim.machine.counters["results_dropped"] == 0

    fake.down = False
    fake.known = False  # it restarted and forgot the worker
    assert sim.run_until(lambda: fake.results_for(task_id), timeout=31)
    sim.run_for(60)
    assert len(fake.results_for(task_id)) == 1
    assert len(fake.registered) == 2


def test_a_final_4xx_drops_the_result_loudly(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake)
    sim.run_until(lambda: up(fake), timeout=1)
    fake.script["result"] = deque([Reply(status=400, body=b'{"error":"no such job"}')])
    task_id = fake.submit("echo")
    with caplog.at_level(logging.ERROR, MACHINE_LOG):
        sim.run_for(30)
    assert len(times(fake, "result")) == 1
    assert "REJECTED" in caplog.text
    assert "no such job" in caplog.text
    assert task_id in caplog.text
    assert sim.machine.counters["results_dropped"] == 1
    assert sim.cleaned == [task_id]
    assert sim.machine.snapshot()["outbox"] == 0


def test_a_result_failing_with_500_gives_up_after_result_max_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, result_max_retries=3, result_retry_cap=2.0)
    sim.run_until(lambda: up(fake), timeout=1)
    fake.script["result"] = deque([Reply(status=500, body=b'{"error":"boom"}')] * 10)
    task_id = fake.submit("echo")
    with caplog.at_level(logging.WARNING, MACHINE_LOG):
        no_spin(sim, 60)
    assert len(times(fake, "result")) == 4  # the first attempt and 3 retries
    assert sim.machine.counters["results_dropped"] == 1
    assert "REJECTED" in caplog.text
    assert "for as long as the worker runs" in caplog.text  # the last retry warned loudly
    assert sim.cleaned == [task_id]


def test_gateway_errors_do_not_count_against_result_max_retries() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, result_max_retries=1, result_retry_cap=2.0)
    sim.run_until(lambda: up(fake), timeout=1)
    fake.script["result"] = deque([Reply(status=s) for s in (502, 503, 504, 502, 503, 504)])
    task_id = fake.submit("echo")
    assert sim.run_until(lambda: fake.results_for(task_id), timeout=60)
    assert len(times(fake, "result")) == 7


def test_a_full_outbox_pauses_polling_until_results_go_out() -> None:
    fake = FakeOrchestrator(url=URL_A, hold=5.0)
    sim = simulate(
        fake, handler=succeed_after(1.0), outbox_limit=1, max_concurrent_tasks=2, result_retry_cap=5
    )
    sim.run_until(lambda: up(fake), timeout=1)
    fake.script["result"] = deque([Reply(status=503)] * 1000)
    fake.submit("echo")
    sim.run_for(2)
    assert sim.machine.snapshot()["outbox"] == 1
    jammed = sim.now
    no_spin(sim, 60)
    assert times(fake, "poll", since=jammed + 5.0 + 1) == []  # parked polls ran out; no new ones
    assert fake.last_heartbeat is not None
    assert fake.last_heartbeat["status"] == "busy"
    assert fake.last_heartbeat["supported_tasks"] == []

    fake.script["result"].clear()
    resumed = sim.now
    sim.run_for(10)
    assert len(fake.results) == 1
    assert times(fake, "poll", since=resumed)
    assert fake.last_heartbeat["status"] == "idle"


def test_the_orchestrator_hears_idle_before_the_result_that_frees_a_busy_worker() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(3.0), max_concurrent_tasks=1)
    sim.run_until(lambda: up(fake), timeout=1)
    fake.submit("echo")
    sim.run_until(lambda: fake.results, timeout=10)
    routes = [route for _, route in fake.requests if route in ("heartbeat", "result")]
    assert routes[-2:] == ["heartbeat", "result"]
    assert fake.heartbeats[-1]["status"] == "idle"
    assert fake.heartbeats[-2]["status"] == "busy"


# -- polls ------------------------------------------------------------------------------------


def test_a_poll_error_backs_off_and_does_not_spin() -> None:
    fake = FakeOrchestrator(url=URL_A, script={"poll": deque([Reply(status=500)])})
    sim = simulate(fake, max_concurrent_tasks=1, heartbeat_interval=15.0)
    steps = no_spin(sim, 20)
    assert steps < 100
    polls = times(fake, "poll")
    # The 500, then the next poll once its backoff ends (capped at retry_cap = 5 s),
    # not at the next periodic heartbeat 15 s later: a lone orchestrator is probed.
    assert len(polls) >= 2
    assert polls[1] - polls[0] <= 5.0 + 0.1
    # ...and a heartbeat probes it no later than that poll.
    beats = times(fake, "heartbeat")
    assert any(polls[0] < t <= polls[1] + 0.01 for t in beats)


def test_a_rate_limited_poll_waits_for_retry_after() -> None:
    fake = FakeOrchestrator(
        url=URL_A, script={"poll": deque([Reply(status=429, retry_after="12")])}
    )
    sim = simulate(fake, max_concurrent_tasks=1)
    no_spin(sim, 20)
    first, second = times(fake, "poll")[:2]
    assert second - first >= 12
    assert sim.machine.snapshot()["orchestrators"][0]["healthy"]


def test_polls_never_exceed_max_parallel_polls() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, max_concurrent_tasks=5, max_parallel_polls=2)
    sim.run_for(5)
    assert sim.machine.snapshot()["orchestrators"][0]["polls"] == 2
    assert sim.machine.snapshot()["slots"]["polling"] == 2


def test_the_client_waits_longer_than_the_server_holds_a_poll() -> None:
    manual = Manual(make_machine(poll_timeout=10.0))
    [poll, *_] = manual.bring_up()
    assert poll.request.timeout > 30.0
    assert poll.request.method == "GET"
    assert poll.request.body is None


# -- several orchestrators ---------------------------------------------------------------


def test_failover_polls_the_secondary_while_the_primary_is_down_and_returns() -> None:
    primary = FakeOrchestrator(url=URL_A, hold=5.0)
    secondary = FakeOrchestrator(url=URL_B, hold=5.0)
    sim = simulate(
        primary,
        secondary,
        priorities=[1, 2],
        handler=succeed_after(30.0),
        max_concurrent_tasks=1,
        heartbeat_interval=10.0,
    )
    no_spin(sim, 20)
    assert times(primary, "poll") and not times(secondary, "poll")
    assert secondary.registered  # registered everywhere, polled only where it should be

    primary.down = True
    down_at = sim.now
    no_spin(sim, 20)
    assert times(secondary, "poll", since=down_at)
    task_id = secondary.submit("echo")
    assert sim.run_until(lambda: sim.running, timeout=10)

    primary.down = False
    primary.known = False  # back after a restart: it registers the worker again
    back_at = sim.now
    sim.run_until(lambda: secondary.results_for(task_id), timeout=40)
    no_spin(sim, 30)

    assert len(primary.registered) == 2
    assert primary.results == []  # the result went where the task came from
    assert len(secondary.results_for(task_id)) == 1
    settled = back_at + 10.0 + 5.0 + 1  # a heartbeat interval and one secondary hold
    assert times(primary, "poll", since=settled)
    assert times(secondary, "poll", since=settled + 30) == []


def test_round_robin_shares_polls_by_weight_interleaved() -> None:
    a = FakeOrchestrator(url=URL_A, hold=1.0)
    b = FakeOrchestrator(url=URL_B, hold=1.0)
    sim = simulate(a, b, weights=[2, 1], mode=ROUND_ROBIN, max_concurrent_tasks=1)
    no_spin(sim, 300)
    polls = sorted([(t, "a") for t in times(a, "poll")] + [(t, "b") for t in times(b, "poll")])
    sequence = "".join(name for _, name in polls)
    assert len(sequence) > 250
    assert abs(sequence.count("a") - 2 * sequence.count("b")) <= 2
    assert "aaa" not in sequence and "bb" not in sequence  # smooth: a b a a b a ...


def test_round_robin_skips_an_orchestrator_that_is_down() -> None:
    a = FakeOrchestrator(url=URL_A, hold=1.0)
    b = FakeOrchestrator(url=URL_B, hold=1.0, down=True)
    sim = simulate(a, b, mode=ROUND_ROBIN, max_concurrent_tasks=1)
    no_spin(sim, 60)
    assert len(times(a, "poll")) > 50
    assert times(b, "poll") == []


# -- the command channel --------------------------------------------------------------------


def channel_sim(**overrides: object) -> tuple[FakeOrchestrator, object]:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, websockets=True, **overrides)  # type: ignore[arg-type]
    sim.run_until(lambda: sim.machine.snapshot()["orchestrators"][0]["command_channel"], timeout=1)
    return fake, sim


def test_the_command_channel_uses_the_worker_route_and_token() -> None:
    manual = Manual(make_machine(websockets=True, worker_id="w/1"))
    manual.bring_up()
    [opened] = of_type(manual.log, OpenCommandChannel)
    assert opened.url == "ws://orch-a.test/_worker/ws/w%2F1"
    assert dict(opened.headers) == {"X-Worker-Token": TOKEN}
    assert TOKEN not in repr(opened)


def test_cancel_command_cancels_a_running_task_which_reports_cancelled() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, websockets=True, handler=succeed_after(None))
    sim.run_until(lambda: up(fake), timeout=1)
    task_id = fake.submit("echo")
    sim.run_until(lambda: sim.running, timeout=1)
    sim.send_command(fake, {"command": "cancel_task", "task_id": task_id, "job_id": "job-1"})
    [cancel] = of_type(sim.effects_seen, CancelHandler)
    assert cancel == CancelHandler(task_id=task_id, reason="cancelled by the orchestrator")
    assert sim.run_until(lambda: fake.results_for(task_id), timeout=1)
    assert fake.results_for(task_id) == [{"status": "cancelled"}]


def test_cancel_command_for_a_waiting_task_cancels_it_without_starting_it() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(
        fake,
        websockets=True,
        handler=succeed_after(None),
        tasks={"render": "gpu"},
        task_type_limits={"gpu": 1},
    )
    sim.run_until(lambda: up(fake), timeout=1)
    running = fake.submit("render")
    waiting = fake.submit("render")
    sim.run_for(1)
    assert sim.machine.snapshot()["slots"]["waiting"] == {"gpu": 1}
    sim.send_command(fake, {"command": "cancel_task", "task_id": waiting, "job_id": "job-2"})
    sim.run_for(1)
    assert fake.results_for(waiting) == [{"status": "cancelled"}]
    assert [t.task_id for t in sim.started] == [running]
    assert of_type(sim.effects_seen, CancelHandler) == []
    slots = sim.machine.snapshot()["slots"]
    assert slots["waiting"] == {"gpu": 0}
    assert slots["held"] == 1


def test_a_local_cancel_request_works_like_the_command(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(None))
    sim.run_until(lambda: up(fake), timeout=1)
    task_id = fake.submit("echo")
    sim.run_until(lambda: sim.running, timeout=1)
    sim.feed(CancelRequested(task_id=task_id))
    sim.feed(CancelRequested(task_id=task_id))  # a second request changes nothing
    with caplog.at_level(logging.INFO, MACHINE_LOG):
        sim.feed(CancelRequested(task_id="not-here"))
    assert "not-here" in caplog.text
    sim.run_for(1)
    assert len(of_type(sim.effects_seen, CancelHandler)) == 1
    assert fake.results_for(task_id) == [{"status": "cancelled"}]


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"command": "reboot"}',
        '{"command": "cancel_task"}',
        '{"command": "cancel_task", "task_id": ""}',
        b"\xff\xfe\x00",
    ],
    ids=["not-json", "list", "unsupported", "no-task-id", "empty-task-id", "bytes"],
)
def test_malformed_commands_are_ignored(
    text: str | bytes, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, websockets=True, handler=succeed_after(None))
    sim.run_until(lambda: up(fake), timeout=1)
    fake.submit("echo")
    sim.run_until(lambda: sim.running, timeout=1)
    before = len(sim.effects_seen)
    with caplog.at_level(logging.WARNING, MACHINE_LOG):
        sim.feed(CommandReceived(channel=0, text=text))
    assert sim.effects_seen[before:] == []
    assert "command from http://orch-a.test ignored" in caplog.text
    assert len(sim.running) == 1


def test_a_command_on_an_unknown_channel_is_logged_by_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manual = Manual(make_machine(websockets=True))
    manual.bring_up()
    with caplog.at_level(logging.WARNING, MACHINE_LOG):
        assert manual.feed(CommandReceived(channel=7, text="{}")) == []
    assert "command from channel 7 ignored" in caplog.text


def test_progress_goes_out_only_over_an_open_channel() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, websockets=True, handler=succeed_after(None))
    sim.run_until(lambda: up(fake), timeout=1)
    task_id = fake.submit("echo")
    sim.run_until(lambda: sim.running, timeout=1)
    sim.run_for(1)
    sim.feed(ProgressReported(task_id=task_id, progress=0.5, message="half"))
    assert [json.loads(c) for c in fake.commands_received] == [
        {
            "event": "progress_update",
            "task_id": task_id,
            "job_id": "job-1",
            "progress": 0.5,
            "message": "half",
        }
    ]

    sim.drop_channel(fake)
    sim.feed(ProgressReported(task_id=task_id, progress=0.6))
    sim.feed(ProgressReported(task_id="unknown", progress=0.7))
    sim.feed(ProgressReported(task_id=task_id, progress=float("nan")))
    assert len(of_type(sim.effects_seen, SendCommandMessage)) == 1

    sim.run_until(lambda: sim.machine.snapshot()["orchestrators"][0]["command_channel"], timeout=30)
    sim.feed(ProgressReported(task_id=task_id, progress=float("nan")))  # not JSON: dropped
    sim.feed(ProgressReported(task_id=task_id, progress=0.9))
    assert json.loads(fake.commands_received[-1])["progress"] == 0.9
    assert len(fake.commands_received) == 2


def test_no_command_channel_and_no_progress_without_websockets() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(None))
    sim.run_until(lambda: up(fake), timeout=1)
    task_id = fake.submit("echo")
    sim.run_until(lambda: sim.running, timeout=1)
    sim.feed(ProgressReported(task_id=task_id, progress=0.5))
    assert of_type(sim.effects_seen, OpenCommandChannel) == []
    assert of_type(sim.effects_seen, SendCommandMessage) == []


def test_the_command_channel_reconnects_with_backoff() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, websockets=True, retry_base=0.5, retry_cap=5.0, heartbeat_interval=15.0)
    sim.run_until(lambda: sim.machine.snapshot()["orchestrators"][0]["command_channel"], timeout=1)
    opened_before = len(of_type(sim.effects_seen, OpenCommandChannel))

    fake.down = True
    sim.drop_channel(fake)
    attempts: list[float] = []
    end = sim.now + 120
    while sim.now < end and sim.step():
        count = len(of_type(sim.effects_seen, OpenCommandChannel)) - opened_before
        if count > len(attempts):
            attempts.append(sim.now)
    assert len(attempts) >= 120 / 10
    assert len(attempts) <= 120
    for k, gap in enumerate(gaps(attempts)):
        assert gap <= min(10.0, 0.5 * 2 ** (k + 1)) + 2 * LATENCY  # the channel's cap is 10 s
    assert not sim.machine.snapshot()["orchestrators"][0]["command_channel"]

    fake.down = False
    assert sim.run_until(
        lambda: sim.machine.snapshot()["orchestrators"][0]["command_channel"], timeout=11
    )


# -- drain and stop --------------------------------------------------------------------------


def test_drain_says_busy_before_abandoning_parked_polls_then_finishes_and_stops() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(
        fake,
        handler=succeed_after(40.0),
        max_concurrent_tasks=2,
        heartbeat_interval=15,
        shutdown_timeout=60.0,
    )
    sim.run_until(lambda: up(fake), timeout=1)
    task_id = fake.submit("echo")
    sim.run_until(lambda: sim.running, timeout=1)
    sim.run_for(1)
    assert sim.machine.snapshot()["orchestrators"][0]["polls"] == 1  # one poll parked

    mark = len(sim.effects_seen)
    sim.feed(DrainRequested(reason="SIGTERM"))
    immediate = sim.effects_seen[mark:]
    assert [type(e) for e in immediate] == [SendRequest]  # the busy heartbeat, nothing else yet
    assert request_body(immediate[0])["status"] == "busy"
    assert request_body(immediate[0])["supported_tasks"] == []
    assert state_of(sim.machine) is WorkerState.DRAINING

    sim.run_until(lambda: sim.stopped, timeout=60)
    after = sim.effects_seen[mark:]
    cancel_at = next(i for i, e in enumerate(after) if isinstance(e, CancelRequest))
    assert cancel_at > 0  # the parked poll went only after "busy" was answered
    assert sent(after, "poll") == []  # no new polls while draining
    assert fake.results_for(task_id) == [{"status": "success", "data": {"task_id": task_id}}]
    assert isinstance(after[-1], WorkerStopped)
    assert after[-1] == WorkerStopped(undelivered=0)
    assert sent(after, "result")  # reported before stopping
    assert len(sent(after, "heartbeat")) >= 3  # heartbeats continued while draining
    assert state_of(sim.machine) is WorkerState.STOPPED
    assert sim.machine.next_deadline() is None
    assert sim.machine.snapshot()["slots"]["polling"] == 0


def test_a_second_drain_cancels_running_and_waiting_tasks_with_transient_errors() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(
        fake,
        websockets=True,
        handler=succeed_after(None),
        tasks={"render": "gpu"},
        task_type_limits={"gpu": 1},
    )
    sim.run_until(lambda: up(fake), timeout=1)
    running = fake.submit("render")
    waiting = fake.submit("render")
    sim.run_for(1)
    sim.feed(DrainRequested())
    sim.run_for(5)
    assert state_of(sim.machine) is WorkerState.DRAINING
    sim.feed(DrainRequested(reason="second SIGTERM"))
    assert state_of(sim.machine) is WorkerState.CANCELLING
    assert CancelHandler(task_id=running, reason="shutdown") in sim.effects_seen
    assert of_type(sim.effects_seen, CloseCommandChannel)
    sim.feed(DrainRequested())  # a third one changes nothing
    sim.run_until(lambda: sim.stopped, timeout=20)

    [finished] = fake.results_for(running)
    assert finished["error"]["code"] == TRANSIENT_ERROR
    assert "shut down before the task finished" in finished["error"]["message"]
    [never_started] = fake.results_for(waiting)
    assert never_started["error"]["code"] == TRANSIENT_ERROR
    assert "before the task started" in never_started["error"]["message"]
    assert sim.stopped == WorkerStopped(undelivered=0)


def test_the_drain_deadline_cancels_what_is_still_running() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(None), shutdown_timeout=5.0)
    sim.run_until(lambda: up(fake), timeout=1)
    task_id = fake.submit("echo")
    sim.run_until(lambda: sim.running, timeout=1)
    drained_at = sim.now
    sim.feed(DrainRequested())
    sim.run_until(lambda: sim.stopped, timeout=30)
    [cancel] = of_type(sim.effects_seen, CancelHandler)
    assert cancel.reason == "shutdown"
    assert sim.now == pytest.approx(drained_at + 5.0, abs=0.1)
    assert fake.results_for(task_id)[0]["error"]["code"] == TRANSIENT_ERROR


def test_give_up_after_the_grace_logs_undelivered_results(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, handler=succeed_after(None), shutdown_timeout=5.0)
    sim.run_until(lambda: up(fake), timeout=1)
    task_id = fake.submit("echo")
    sim.run_until(lambda: sim.running, timeout=1)
    fake.down = True
    drained_at = sim.now
    sim.feed(DrainRequested())
    with caplog.at_level(logging.ERROR, MACHINE_LOG):
        assert sim.run_until(lambda: sim.stopped, timeout=60)
    assert sim.stopped == WorkerStopped(undelivered=1)
    assert sim.now == pytest.approx(drained_at + 5.0 + 10.0, abs=0.1)
    assert f"result of task {task_id} (job job-1) could not be delivered" in caplog.text
    assert fake.results == []
    assert state_of(sim.machine) is WorkerState.STOPPED
    assert sim.machine.next_deadline() is None


def test_give_up_names_a_handler_that_ignored_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manual = Manual(make_machine(shutdown_timeout=1.0))
    [poll, *_] = manual.bring_up()
    manual.reply(poll, 200, task_body("stubborn"))
    manual.feed(DrainRequested())
    manual.timer(1.0)
    assert CancelHandler(task_id="stubborn", reason="shutdown") in manual.log
    assert manual.machine.next_deadline() == 11.0
    with caplog.at_level(logging.ERROR, MACHINE_LOG):
        manual.timer(11.0)
    assert "did not stop after cancellation" in caplog.text
    assert manual.log[-1] == WorkerStopped(undelivered=1)
    # A late finish after the machine stopped is still a misuse only if unknown: it was known.
    manual.feed(HandlerFinished(task_id="stubborn", result={"status": "cancelled"}))
    assert state_of(manual.machine) is WorkerState.STOPPED


def test_drain_before_start_stops_at_once() -> None:
    machine = make_machine()
    machine.handle(DrainRequested(), 0.0)
    assert machine.state is WorkerState.STOPPED
    assert machine.effects() == [WorkerStopped(undelivered=0)]
    assert machine.next_deadline() is None
    machine.handle(DrainRequested(), 1.0)
    assert machine.effects() == []


def test_drain_with_nothing_in_flight_stops_once_the_parked_polls_return() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, websockets=True)
    sim.run_until(lambda: up(fake), timeout=1)
    sim.run_for(1)
    sim.feed(DrainRequested())
    assert sim.run_until(lambda: sim.stopped, timeout=1)
    assert of_type(sim.effects_seen, CloseCommandChannel)
    assert sim.machine.snapshot()["slots"] == {
        "limit": 2,
        "polling": 0,
        "held": 0,
        "running": {},
        "waiting": {},
    }


def test_drain_while_unregistered_abandons_polls_at_once() -> None:
    manual = Manual(make_machine())
    polls = manual.bring_up()
    hb = manual.timer(15.0)
    [heartbeat] = sent(hb, "heartbeat")
    manual.reply(heartbeat, 404)  # forgotten; the parked polls are still out
    effects = manual.feed(DrainRequested())
    assert [e.request_id for e in of_type(effects, CancelRequest)] == [p.request_id for p in polls]
    for poll in polls:
        manual.fail(poll, "cancelled")
    manual.reply(manual.one("register"), 200)
    assert manual.log[-1] == WorkerStopped(undelivered=0)


def test_a_task_that_wins_the_race_against_drain_still_runs_and_reports() -> None:
    manual = Manual(make_machine(max_concurrent_tasks=1))
    [poll] = manual.bring_up()
    manual.feed(DrainRequested())
    manual.reply(manual.one("heartbeat"), 200)
    assert CancelRequest(request_id=poll.request_id) in manual.log
    manual.reply(poll, 200, task_body("late"))  # the reply beat the cancellation
    [start] = of_type(manual.log, StartHandler)
    manual.feed(HandlerFinished(task_id="late", result={"status": "success"}))
    manual.reply(manual.one("result"), 200)
    assert start.task.task_id == "late"
    assert manual.log[-1] == WorkerStopped(undelivered=0)


def test_a_task_that_arrives_while_cancelling_is_not_started() -> None:
    manual = Manual(make_machine(max_concurrent_tasks=1))
    [poll] = manual.bring_up()
    manual.feed(DrainRequested())
    manual.feed(DrainRequested())  # cancel: the parked poll is abandoned at once
    assert CancelRequest(request_id=poll.request_id) in manual.log
    manual.reply(poll, 200, task_body("too-late"))
    assert of_type(manual.log, StartHandler) == []
    [result] = manual.pending("result")
    answer = request_body(result)["result"]
    assert answer["error"]["code"] == TRANSIENT_ERROR
    manual.reply(result, 200)
    assert manual.log[-1] == WorkerStopped(undelivered=0)
    assert manual.machine.snapshot()["slots"]["held"] == 0


def test_a_task_that_arrives_after_the_worker_stopped_is_not_started(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manual = Manual(make_machine(max_concurrent_tasks=1, shutdown_timeout=0.0))
    [poll] = manual.bring_up()
    fake_down = manual.one("heartbeat") if manual.pending("heartbeat") else None
    assert fake_down is None
    manual.feed(DrainRequested())
    hb = manual.one("heartbeat")
    manual.timer(0.0)  # deadline 0: cancelling at once, the poll is abandoned
    manual.timer(10.0)  # the grace passes with the heartbeat still unanswered
    assert state_of(manual.machine) is WorkerState.STOPPED
    with caplog.at_level(logging.WARNING, MACHINE_LOG):
        late = manual.reply(poll, 200, task_body("after-stop"))
    assert late == []
    manual.reply(hb, 200)
    assert manual.machine.snapshot()["slots"]["polling"] == 0
    assert manual.machine.snapshot()["slots"]["held"] == 0
    assert "after-stop" in caplog.text


def test_replies_to_unknown_requests_are_ignored() -> None:
    manual = Manual(make_machine())
    manual.bring_up()
    assert manual.feed(ResponseReceived(request_id=9999, status=200)) == []


def test_a_heartbeat_reply_that_crosses_a_re_registration_is_ignored() -> None:
    manual = Manual(make_machine(max_concurrent_tasks=1))
    [poll] = manual.bring_up()
    [heartbeat] = sent(manual.timer(15.0), "heartbeat")
    manual.reply(poll, 404)  # forgotten: registering again
    register = manual.one("register")
    manual.reply(heartbeat, 200, {"status": "idle"})  # the old heartbeat's answer
    assert manual.machine.snapshot()["orchestrators"][0]["state"] == "registering"
    manual.reply(register, 200)
    assert manual.machine.registered


# -- task timeout ---------------------------------------------------------------------------


def test_a_task_over_its_timeout_is_cancelled_and_reported_transient() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(
        fake,
        handler=by_name({"slow": 10.0, "quick": 1.0}),
        tasks={"slow": None, "quick": None},
        task_timeout=2.0,
    )
    sim.run_until(lambda: up(fake), timeout=1)
    slow = fake.submit("slow")
    quick = fake.submit("quick")
    sim.run_for(5)
    starts = of_type(sim.effects_seen, StartHandler)
    assert {s.timeout for s in starts} == {2.0}
    assert of_type(sim.effects_seen, CancelHandler) == [
        CancelHandler(task_id=slow, reason="timeout")
    ]
    [failure] = fake.results_for(slow)
    assert failure["error"]["code"] == TRANSIENT_ERROR
    assert "TASK_TIMEOUT=2" in failure["error"]["message"]
    assert fake.results_for(quick)[0]["status"] == "success"


def test_a_handler_reporting_a_failure_after_cancellation_keeps_its_own_result() -> None:
    manual = Manual(make_machine(task_timeout=1.0))
    [poll, *_] = manual.bring_up()
    manual.reply(poll, 200, task_body("t"))
    manual.timer(1.0)
    own = {"status": "failure", "error": {"code": PERMANENT_ERROR, "message": "mine"}}
    manual.feed(HandlerFinished(task_id="t", result=own))
    assert request_body(manual.one("result"))["result"] == own


# -- misuse -----------------------------------------------------------------------------------


def test_machine_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one orchestrator"):
        make_machine(orchestrators=())
    with pytest.raises(ValueError, match="max_concurrent_tasks"):
        make_machine(max_concurrent_tasks=0)


def test_state_table_misuse_raises_local_protocol_error() -> None:
    machine = make_machine()
    machine.start(0.0)
    with pytest.raises(LocalProtocolError, match="no transition from running on start"):
        machine.start(1.0)
    with pytest.raises(LocalProtocolError, match="unknown event"):
        machine.handle(object(), 1.0)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="not running"):
        machine.handle(HandlerFinished(task_id="never-seen", result={}), 1.0)


def test_finishing_a_task_that_never_started_is_refused_and_changes_nothing() -> None:
    manual = Manual(make_machine(tasks={"render": "gpu"}, task_type_limits={"gpu": 1}))
    first, second = manual.bring_up()
    manual.reply(first, 200, task_body("a", "render"))
    manual.reply(second, 200, task_body("b", "render"))
    before = manual.machine.snapshot()
    with pytest.raises(LocalProtocolError):
        manual.feed(HandlerFinished(task_id="b", result={"status": "success"}))
    assert manual.machine.snapshot() == before
    manual.feed(HandlerFinished(task_id="a", result={"status": "success"}))
    assert [s.task.task_id for s in of_type(manual.log, StartHandler)] == ["a", "b"]


def test_a_result_that_is_not_json_becomes_a_permanent_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manual = Manual(make_machine())
    [poll, *_] = manual.bring_up()
    manual.reply(poll, 200, task_body("t"))
    with caplog.at_level(logging.ERROR, MACHINE_LOG):
        manual.feed(HandlerFinished(task_id="t", result={"status": "success", "data": {1, 2}}))
    body = request_body(manual.one("result"))
    assert body["result"]["status"] == "failure"
    assert body["result"]["error"]["code"] == PERMANENT_ERROR
    assert "cannot be sent as JSON" in body["result"]["error"]["message"]
    assert "cannot be sent as JSON" in caplog.text
    manual.timer(5.0)  # the machine still works


# -- introspection ---------------------------------------------------------------------------


def test_snapshot_describes_the_machine() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, websockets=True, handler=succeed_after(None), max_concurrent_tasks=3)
    sim.run_until(lambda: up(fake), timeout=1)
    fake.submit("echo")
    sim.feed(HotCacheChanged(added=("whisper",)))
    sim.run_for(1)
    assert sim.machine.snapshot() == {
        "state": "running",
        "slots": {"limit": 3, "polling": 2, "held": 1, "running": {}, "waiting": {}},
        "tasks": 1,
        "outbox": 0,
        "hot_cache": ["whisper"],
        "orchestrators": [
            {
                "url": URL_A,
                "state": "registered",
                "healthy": True,
                "announced": True,
                "polls": 2,
                "command_channel": True,
            }
        ],
        "counters": {
            "tasks_received": 1,
            "tasks_rejected": 0,
            "results_acknowledged": 0,
            "results_dropped": 0,
            "result_retries": 0,
            "requests_failed": 0,
        },
    }


def test_a_machine_that_was_never_started_has_no_deadline_and_no_effects() -> None:
    machine = WorkerMachine(make_settings(), rng=__import__("random").Random(0))
    assert machine.next_deadline() is None
    assert machine.effects() == []
    assert machine.state is WorkerState.CREATED
    assert not machine.registered
    machine.handle_timer(5.0)
    assert machine.effects() == []


def test_requests_carry_the_token_and_json_but_never_log_it() -> None:
    manual = Manual(make_machine(orchestrators=(Orchestrator(url=URL_A + "/", token="s3cret"),)))
    register = manual.one("register")
    assert register.request.url == URL_A + "/_worker/workers/register"
    assert dict(register.request.headers) == {
        "X-Worker-Token": "s3cret",
        "Content-Type": "application/json",
    }
    assert "s3cret" not in repr(register)
    manual.reply(register, 200)
    heartbeat = manual.one("heartbeat")
    assert heartbeat.request.method == "PATCH"
    assert heartbeat.request.url == URL_A + "/_worker/workers/worker-1"


def test_channel_closed_while_stopping_is_not_reopened() -> None:
    manual = Manual(make_machine(websockets=True))
    manual.bring_up()
    manual.feed(CommandChannelOpened(channel=0))
    manual.feed(DrainRequested())
    manual.feed(DrainRequested())
    assert CloseCommandChannel(channel=0) in manual.log
    manual.feed(CommandChannelClosed(channel=0, reason="closed by us"))
    opened = len(of_type(manual.log, OpenCommandChannel))
    manual.timer(30.0)
    assert len(of_type(manual.log, OpenCommandChannel)) == opened


def test_a_cancel_that_arrives_before_its_task_answers_the_task_without_running_it() -> None:
    fake = FakeOrchestrator(url=URL_A)
    sim = simulate(fake, websockets=True)
    sim.run_until(lambda: sim.machine.snapshot()["orchestrators"][0]["command_channel"], timeout=1)
    sim.send_command(fake, {"command": "cancel_task", "task_id": "task-1", "job_id": "job-1"})
    task_id = fake.submit("echo")
    assert task_id == "task-1"
    sim.run_until(lambda: fake.results_for(task_id), timeout=5)
    assert fake.results_for(task_id) == [{"status": "cancelled"}]
    assert sim.started == []
    again = fake.submit("echo", task_id="task-1")  # a redelivery later on runs normally
    sim.run_until(lambda: len(fake.results_for(again)) == 2, timeout=5)
    assert fake.results_for(again)[1]["status"] == "success"


def test_only_the_latest_early_cancels_are_remembered() -> None:
    manual = Manual(make_machine(max_concurrent_tasks=1))
    [poll] = manual.bring_up()
    for n in range(1001):
        manual.feed(
            CommandReceived(
                channel=0, text=json.dumps({"command": "cancel_task", "task_id": f"t{n}"})
            )
        )
    manual.reply(poll, 200, task_body("t0"))  # the oldest was forgotten: it runs
    assert [s.task.task_id for s in of_type(manual.log, StartHandler)] == ["t0"]


def test_a_cancel_for_a_task_whose_result_is_pending_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manual = Manual(make_machine(max_concurrent_tasks=1))
    [poll] = manual.bring_up()
    manual.reply(poll, 200, task_body("t"))
    manual.feed(HandlerFinished(task_id="t", result={"status": "success"}))
    with caplog.at_level(logging.INFO, MACHINE_LOG):
        manual.feed(CommandReceived(channel=0, text='{"command":"cancel_task","task_id":"t"}'))
    assert "not running here: ignored" in caplog.text
    [result] = manual.pending("result")
    manual.reply(result, 200)
    [next_poll] = manual.pending("poll")
    manual.reply(next_poll, 200, task_body("t"))  # delivered again later: it runs
    assert len(of_type(manual.log, StartHandler)) == 2


def test_a_parked_poll_is_cancelled_only_once() -> None:
    manual = Manual(make_machine(max_concurrent_tasks=1))
    [poll] = manual.bring_up()
    manual.feed(DrainRequested())
    manual.reply(manual.one("heartbeat"), 200)  # "busy" heard: the poll is abandoned
    manual.feed(DrainRequested())  # cancelling abandons polls again: not this one twice
    assert of_type(manual.log, CancelRequest) == [CancelRequest(request_id=poll.request_id)]
    manual.fail(poll, "cancelled")
    assert manual.log[-1] == WorkerStopped(undelivered=0)
    assert manual.machine.counters["requests_failed"] == 0  # an abandoned poll is no failure


@pytest.mark.parametrize("body", [b"[1]", b'{"hello": 1}', b"not json", b'{"task_id": "t", "job_id": "j"}'])
def test_garbage_poll_replies_back_off_instead_of_spinning(body: bytes) -> None:
    garbage = deque([Reply(status=200, body=body) for _ in range(1000)])
    fake = FakeOrchestrator(url=URL_A, script={"poll": garbage})
    sim = simulate(fake, max_concurrent_tasks=4)
    no_spin(sim, 30)
    polls = times(fake, "poll")
    # Exponential backoff capped at 5 s: a handful per 30 s, not thousands.
    assert 3 <= len(polls) <= 30
    assert sim.machine.snapshot()["slots"]["polling"] <= 1
    assert sim.machine.snapshot()["slots"]["held"] == 0

"""Reliability under orchestrator faults and bad input, on every adapter and backend.

Each test runs a real worker (``rca_aiohttp`` on asyncio, ``rca_httpx`` on
asyncio and trio; see ``tests/support/workers.py``) against the fault-injecting
fake orchestrator (``tests/support/fault_orchestrator.py``) over real HTTP and
WebSocket on 127.0.0.1, and checks what must hold by counting what the fake
recorded: requests per route and per window, results per task.

Timing bounds are generous (a loaded 2-core machine); counts are strict where
the count is the point (exactly one result per task, no request storm, no poll
while the outbox is full).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support.fault_orchestrator import (
    FaultOrchestrator,
    Hang,
    Normal,
    RawTask,
    RecordedRequest,
    Reply,
    Reset,
    huge_params_task,
    make_task,
    task_without,
)
from tests.support.workers import AdapterCase, RunningWorker, await_until, serving_worker

pytestmark = pytest.mark.anyio

#: The SDK's loggers (records from the worker's thread reach handlers attached here).
SDK_LOGGER_ROOTS = ("rca_core", "rca_aiohttp", "rca_httpx")
#: TASK_POLL_ERROR_DELAY in the rate tests: the cap of the register/heartbeat/poll backoff.
ERROR_DELAY_CAP = 3.0
#: How long a measured window lasts (the brief: "over a window of ~10 s").
RATE_WINDOW = 10.0
#: The steady-state rate a worker must stay under, per orchestrator (about 1/s, with margin).
MAX_RATE = 1.5


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class LogRecorder(logging.Handler):
    """Collects the SDK's log records, from whichever thread the worker logs in.

    Not ``caplog``: it works with ``-p no:logging`` too, and sees INFO lines
    without touching the root logger's level.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in list(self.records) if r.levelno >= level]

    def find(self, *parts: str, level: int = logging.DEBUG) -> list[str]:
        """Messages at ``level`` or above that contain every one of ``parts``."""
        return [m for m in self.messages(level) if all(p in m for p in parts)]


@pytest.fixture
def worker_logs() -> Iterator[LogRecorder]:
    recorder = LogRecorder()
    loggers = [logging.getLogger(name) for name in SDK_LOGGER_ROOTS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(recorder)
        logger.setLevel(logging.INFO)
    try:
        yield recorder
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(recorder)
            logger.setLevel(level)


def make_worker(
    case: AdapterCase,
    orch: FaultOrchestrator,
    tmp_path: Path,
    *,
    max_concurrent_tasks: int | None = None,
    gate: threading.Event | None = None,
    **settings: Any,
) -> Any:
    """A worker of ``case`` for ``orch`` with the handlers every test uses.

    ``echo`` answers with what it got (the size of a ``blob`` instead of the blob);
    ``sleep`` sleeps ``params["seconds"]``; ``gate`` waits for ``gate`` to be set,
    at most 30 s. The worker's id is ``worker.config.WORKER_ID``.
    """
    mod = case.module()
    env: dict[str, str] = {
        "WORKER_ID": f"rel-{case.id}-{uuid.uuid4().hex[:8]}",
        "ORCHESTRATOR_URL": orch.url,
        "WORKER_TOKEN": orch.token,
        "TASK_FILES_DIR": str(tmp_path / "files"),
        "HEARTBEAT_INTERVAL": "5",
        "TASK_POLL_ERROR_DELAY": str(ERROR_DELAY_CAP),
        "RESULT_RETRY_INITIAL_DELAY": "0.2",
        "SHUTDOWN_TIMEOUT": "5",
    }
    env.update({key: str(value) for key, value in settings.items()})
    worker = mod.Worker(
        worker_type="reliability",
        config=mod.WorkerConfig(env),
        max_concurrent_tasks=max_concurrent_tasks,
    )
    opened = gate if gate is not None else threading.Event()

    @worker.task("echo")
    async def echo(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data = {k: v for k, v in params.items() if k != "blob"}
        if "blob" in params:
            data["blob_size"] = len(params["blob"])
        return {"status": "success", "data": data}

    @worker.task("sleep")
    async def sleep(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        await anyio.sleep(float(params.get("seconds", 30)))
        return {"status": "success", "data": {}}

    @worker.task("gate")
    async def gate(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        await anyio.to_thread.run_sync(opened.wait, 30.0)
        return {"status": "success", "data": {"gated": True}}

    return worker


def snapshot(running: RunningWorker) -> dict[str, Any]:
    snap: dict[str, Any] = running.snapshot()
    return snap


def counter(running: RunningWorker, name: str) -> int:
    return int(snapshot(running).get("counters", {}).get(name, 0))


def assert_no_slot_leak(running: RunningWorker) -> None:
    slots = snapshot(running)["slots"]
    assert slots["held"] == 0, slots
    assert slots["polling"] <= slots["limit"], slots


async def settled(orch: FaultOrchestrator, running: RunningWorker, *, polls: int) -> None:
    """Wait until the worker is idle again: no task, no result pending, ``polls`` parked."""

    def idle() -> bool:
        snap = snapshot(running)
        return snap["tasks"] == 0 and snap["outbox"] == 0 and snap["slots"]["polling"] == polls

    await orch.wait_for(idle, 15)
    assert_no_slot_leak(running)


def times(requests: list[RecordedRequest]) -> list[float]:
    return sorted(r.time for r in requests)


async def one_result(
    orch: FaultOrchestrator, task: dict[str, Any], *, timeout: float = 20.0
) -> dict[str, Any]:
    """The single accepted result of ``task`` (waits for it; fails on a duplicate)."""
    records = await orch.wait_for_results(task["task_id"], timeout=timeout)
    assert len(orch.results_for(task["task_id"])) == 1, records
    record = records[0]
    assert record.job_id == task["job_id"]
    result: dict[str, Any] = record.result
    return result


def result_posts(orch: FaultOrchestrator, task_id: str) -> list[RecordedRequest]:
    """Every result POST the fake saw for ``task_id`` (scripted replies included)."""
    return [
        r
        for r in orch.requests_for("result")
        if isinstance(r.body, dict) and r.body.get("task_id") == task_id
    ]


# ---------------------------------------------------------------------------------------------
# 1. the orchestrator is down when the worker starts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["register-503", "refused"])
async def test_down_at_start_backs_off_then_registers_and_works(
    adapter_case: AdapterCase,
    fault_orchestrator: FaultOrchestrator,
    tmp_path: Path,
    outage: str,
) -> None:
    """No storm against an orchestrator that is not there yet, and no delay once it is.

    Registration answered 503, or connections refused (then nothing reaches the
    fake, and the worker's own ``requests_failed`` counter counts the attempts):
    after the backoff reached its cap, at most ~1 request a second and at least
    a few; once the fake is up, one registration within a capped delay, then work.
    """
    orch = fault_orchestrator
    if outage == "refused":
        await orch.refuse_connections()
    else:
        orch.set_fault("register", Reply.error(503, "starting up"))
    worker = make_worker(adapter_case, orch, tmp_path)

    async with serving_worker(worker, adapter_case, wait_ready=None) as running:

        def attempts() -> int:
            if outage == "refused":  # nothing reaches the fake: the worker counts them
                return counter(running, "requests_failed")
            return orch.count()

        # the backoff reaches its cap within a few failures (0.5, 1, 2, 3 s ceilings)
        await anyio.sleep(ERROR_DELAY_CAP + 1.0)
        before, start = attempts(), orch.now()
        await anyio.sleep(RATE_WINDOW)
        window = orch.now() - start
        made = attempts() - before
        assert made / window <= MAX_RATE, f"{made} requests in {window:.1f} s"
        assert made >= 2, f"only {made} request(s) in {window:.1f} s: it gave up?"
        if outage == "refused":
            assert orch.count() == 0
        else:
            assert orch.count("register") == orch.count() == orch.count(status=503)
        assert snapshot(running)["orchestrators"][0]["state"] != "registered"

        up = orch.now()
        if outage == "refused":
            await orch.accept_connections()
        else:
            orch.clear_faults()
        await orch.wait_for_count("register", since=up, status=200, timeout=ERROR_DELAY_CAP + 10)
        registered = orch.requests_for("register", since=up, status=200)[0].time
        # as soon as it can: within one capped backoff delay of the fake coming back
        assert registered - up <= ERROR_DELAY_CAP + 2.0
        assert len(orch.requests_for("register", since=up)) == 1

        task = orch.enqueue(make_task("echo", {"n": 1}))
        assert await one_result(orch, task) == {"status": "success", "data": {"n": 1}}
        assert orch.duplicate_results() == {}
        assert_no_slot_leak(running)


@pytest.mark.parametrize("route", ["register", "heartbeat"])
async def test_no_busy_loop_while_a_retried_request_hangs(
    adapter_case: AdapterCase,
    fault_orchestrator: FaultOrchestrator,
    tmp_path: Path,
    route: str,
) -> None:
    """A request that went out on a timer and hangs leaves the worker asleep, not spinning.

    (rca_httpx's timer used to fire its spent deadline again and again while such a
    request was out: a core at 100% and retries that skipped their backoff.)
    """
    orch = fault_orchestrator
    if route == "register":  # one refusal, so that the next registration is a timed retry
        orch.script("register", Reply.error(503), Hang(limit=60))
    else:  # the first heartbeat answers; the next one, sent by the timer, hangs
        orch.script("heartbeat", Normal(), Hang(limit=60))
    worker = make_worker(adapter_case, orch, tmp_path, HEARTBEAT_INTERVAL=1)
    async with serving_worker(worker, adapter_case, wait_ready=None):
        try:
            await orch.wait_for_hanging(route, timeout=15)
            cpu = time.process_time()
            await anyio.sleep(3.0)
            used = time.process_time() - cpu
            assert orch.hanging(route) == 1
            # this whole process (worker and fake), idle but for the hanging request
            assert used < 0.5, f"{used:.2f} s of CPU in 3 s while a {route} hung"
            assert orch.count(route) == 2
        finally:
            orch.clear_faults()
            orch.release_hangs()


# ---------------------------------------------------------------------------------------------
# 2. the orchestrator forgets the worker
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unknown_reply", ["null", "404"], ids=["1.0b10-200-null", "1.0b8-404"])
async def test_forgotten_worker_registers_again_within_a_heartbeat(
    adapter_case: AdapterCase,
    fault_orchestrator_factory: Callable[..., Awaitable[FaultOrchestrator]],
    tmp_path: Path,
    unknown_reply: str,
) -> None:
    """Both ways of saying "unknown worker" make it register again, at the next heartbeat.

    The fake dispatches only to a registered worker whose heartbeat said idle, so
    the task enqueued right after the fake forgot the worker proves the way back.
    """
    orch = await fault_orchestrator_factory(unknown_worker_reply=unknown_reply)
    orch.configure(strict_dispatch=True)  # tasks only for a known worker whose heartbeat said idle
    interval = 1.0
    worker = make_worker(adapter_case, orch, tmp_path, HEARTBEAT_INTERVAL=interval)
    worker_id = worker.config.WORKER_ID
    async with serving_worker(worker, adapter_case) as running:
        for n in range(2):  # forgotten twice: it is not a one-off
            forgotten = orch.now()
            orch.forget_worker(worker_id)
            task = orch.enqueue(make_task("echo", {"n": n}))
            await orch.wait_for_count("register", since=forgotten, status=200, timeout=10)
            again = orch.requests_for("register", since=forgotten)[0].time
            # the next heartbeat (due within one interval) hears "unknown" and registers
            assert again - forgotten <= interval + 2.0
            unknown = [hb for hb in orch.heartbeats if hb.time >= forgotten and not hb.known]
            assert len(unknown) == 1
            assert unknown[0].time <= again

            assert await one_result(orch, task) == {"status": "success", "data": {"n": n}}
            assert len(orch.requests_for("register", since=forgotten)) == 1  # once, no storm
            assert orch.worker_records[worker_id]["status"] == "idle"
        assert orch.duplicate_results() == {}
        assert_no_slot_leak(running)


# ---------------------------------------------------------------------------------------------
# 3. polls rate-limited or failing
# ---------------------------------------------------------------------------------------------

RETRY_AFTER = 2.0
POLL_FAULTS = {
    "429-retry-after": Reply.rate_limited(retry_after=RETRY_AFTER),
    "429": Reply.rate_limited(retry_after=None),
    "503": Reply.error(503),
}
#: Seconds between polls that tell two bursts apart (a burst leaves at one instant).
BURST_GAP = 0.5
#: How much earlier than Retry-After the next poll may arrive (clock reading, rounding).
CLOCK_SLACK = 0.05
POLL_HEARTBEAT_INTERVAL = 3.0


@pytest.mark.parametrize("fault", list(POLL_FAULTS))
async def test_poll_faults_back_off_and_work_resumes(
    adapter_case: AdapterCase,
    fault_orchestrator: FaultOrchestrator,
    tmp_path: Path,
    fault: str,
) -> None:
    """429 (with and without Retry-After) and 5xx on polls: no storm, Retry-After honoured.

    The polls out when the fault starts come back faulted together (the first
    burst, at most one per slot); from then on the worker knows and backs off:
    no poll sooner than Retry-After when it is given (a parked poll answering
    204 meanwhile does not cancel it), and no burst per retry either: over the
    window, at most one poll per Retry-After, or about one a second without it
    (TASK_POLL_ERROR_DELAY is 3 s here). A 5xx also marks the orchestrator
    unhealthy until a heartbeat succeeds.
    """
    orch = fault_orchestrator
    slots = 4  # several polls in parallel while all is well
    worker = make_worker(
        adapter_case,
        orch,
        tmp_path,
        max_concurrent_tasks=slots,
        HEARTBEAT_INTERVAL=POLL_HEARTBEAT_INTERVAL,
    )
    reply = POLL_FAULTS[fault]
    async with serving_worker(worker, adapter_case) as running:
        await orch.wait_for(lambda: snapshot(running)["orchestrators"][0]["polls"] == slots, 10)
        orch.set_fault("poll", reply)
        start = orch.now()
        await anyio.sleep(8.0)
        end = orch.now()
        polls = times(orch.requests_for("poll", since=start))
        faulted = orch.count("poll", since=start, status=reply.status)
        assert orch.count("poll", since=start) == faulted  # every poll in the window
        assert polls, "the fault never hit a poll"
        # the polls already out when the first fault came back left together
        first_burst = [t for t in polls if t - polls[0] < BURST_GAP][:slots]
        later = polls[len(first_burst) :]
        assert later, "it stopped polling"
        span = end - polls[0]
        if fault == "429-retry-after":
            gaps = [b - a for a, b in zip(first_burst[-1:] + later, later, strict=False)]
            assert min(gaps) >= RETRY_AFTER - CLOCK_SLACK, f"Retry-After not honoured: {gaps}"
            # one poll per Retry-After: a burst after the first would add polls
            assert len(polls) <= slots + span // (RETRY_AFTER - CLOCK_SLACK), polls
        else:
            assert len(polls) <= slots + MAX_RATE * span, f"{len(polls)} polls in {span:.1f} s"

        orch.clear_faults()
        cleared = orch.now()
        task = orch.enqueue(make_task("echo", {"after": fault}))
        assert await one_result(orch, task, timeout=30) == {
            "status": "success",
            "data": {"after": fault},
        }
        resumed = orch.dispatched[-1].time - cleared
        # within one backoff delay (5xx: and the heartbeat that finds the orchestrator well)
        expected = {
            "429-retry-after": RETRY_AFTER,
            "429": ERROR_DELAY_CAP,
            "503": POLL_HEARTBEAT_INTERVAL + ERROR_DELAY_CAP,
        }[fault]
        assert resumed <= expected + 3.0
        await orch.wait_for(lambda: snapshot(running)["orchestrators"][0]["polls"] == slots, 30)
        assert_no_slot_leak(running)


# ---------------------------------------------------------------------------------------------
# 4. malformed tasks and commands
# ---------------------------------------------------------------------------------------------

HUGE = 6 * 1024 * 1024  # characters of params


async def test_malformed_tasks_are_logged_answered_and_do_not_stop_the_worker(
    adapter_case: AdapterCase,
    fault_orchestrator: FaultOrchestrator,
    tmp_path: Path,
    worker_logs: LogRecorder,
) -> None:
    """Poll replies that are no usable task: each logged; answered with PERMANENT_ERROR
    when it names its job and task; the worker polls on, with every slot back.

    Sent: a 200 with cut-off JSON (scripted), a raw body that is not JSON, a JSON
    list, tasks without ``task_id``, ``job_id`` or ``type``, an unknown task type,
    and a valid task with 6 MB of params (which simply runs).
    """
    orch = fault_orchestrator
    worker = make_worker(adapter_case, orch, tmp_path, max_concurrent_tasks=2)
    no_type = task_without("type")
    unknown_type = make_task("no-such-type", {"x": 1})
    no_task_id = task_without("task_id")
    no_job_id = task_without("job_id")
    listed = make_task("echo")
    huge = huge_params_task(HUGE, type="echo")
    async with serving_worker(worker, adapter_case) as running:
        received = counter(running, "tasks_received")
        orch.script("poll", Reply.malformed_json())  # a 200 whose body is cut-off JSON
        orch.enqueue(RawTask('{"job_id": "job-raw", "task_id": "task-raw", "type": '))
        orch.enqueue([listed])  # a JSON list, not an object
        for task in (no_task_id, no_job_id, no_type, unknown_type, huge):
            orch.enqueue(task)
        await orch.wait_for(lambda: not orch.pending_tasks() and not orch.scripted("poll"), 20)

        # answered with PERMANENT_ERROR where the task can be identified
        for task, reason in ((no_type, "lacks a valid type"), (unknown_type, "no-such-type")):
            result = await one_result(orch, task)
            assert result["status"] == "failure"
            assert result["error"]["code"] == "PERMANENT_ERROR"
            assert reason in result["error"]["message"]
        # several MB of params are just a task
        assert await one_result(orch, huge) == {"status": "success", "data": {"blob_size": HUGE}}

        # the worker keeps polling: a good task afterwards succeeds
        good = orch.enqueue(make_task("echo", {"after": "garbage"}))
        assert await one_result(orch, good) == {"status": "success", "data": {"after": "garbage"}}

        # what cannot be identified gets no result (there is nobody to send it to)
        answered = {no_type["task_id"], unknown_type["task_id"], huge["task_id"], good["task_id"]}
        assert {r.task_id for r in orch.results} == answered
        assert len(orch.results) == len(answered)
        assert orch.duplicate_results() == {}
        assert orch.results_for(no_job_id["task_id"]) == []

        # each one logged, as an error
        errors = worker_logs.find("malformed task", level=logging.ERROR)
        for part in (
            "not JSON",
            "task-raw",  # the raw body is quoted
            "JSON list",
            "lacks a valid task_id",
            "lacks a valid job_id",
            f"task {no_type['task_id']}",
        ):
            assert any(part in m for m in errors), (part, errors)
        assert worker_logs.find(unknown_type["task_id"], "no handler", level=logging.ERROR)
        assert counter(running, "tasks_rejected") == 7
        assert counter(running, "tasks_received") - received == 3  # unknown type, huge, good

        # and no slot leaked: every slot is free or polling again, nothing left over
        await settled(orch, running, polls=2)


async def test_garbage_commands_are_ignored_and_the_channel_stays_up(
    adapter_case: AdapterCase,
    fault_orchestrator: FaultOrchestrator,
    tmp_path: Path,
    worker_logs: LogRecorder,
) -> None:
    """Not JSON (text and binary), a JSON list, an unknown command, a cancel without a
    task id and a cancel for a task the worker never saw: each logged and ignored,
    on the same connection, which then still carries a real cancel."""
    orch = fault_orchestrator
    worker = make_worker(adapter_case, orch, tmp_path, WORKER_ENABLE_WEBSOCKETS="true")
    worker_id = worker.config.WORKER_ID
    async with serving_worker(worker, adapter_case) as running:
        await orch.wait_for_ws(worker_id, timeout=10)
        await orch.wait_for(lambda: snapshot(running)["orchestrators"][0]["command_channel"], 10)
        unknown_task = f"task-unknown-{uuid.uuid4().hex[:8]}"
        garbage: list[str | bytes | dict[str, Any]] = [
            "this is not JSON",
            b"\x00\xff\xfe binary garbage",
            "[1, 2, 3]",
            {"command": "reboot", "task_id": "t", "job_id": "j"},
            {"command": "cancel_task"},  # no task_id
            {"command": "cancel_task", "task_id": unknown_task, "job_id": "job-unknown"},
        ]
        for command in garbage:
            await orch.send_command(worker_id, command)
        expected = {
            "command is not JSON": 2,  # the text and the binary frame
            "command is a JSON list": 1,
            "unsupported command 'reboot'": 1,
            "cancel_task without a task_id": 1,
        }

        def logged() -> bool:
            ignored = worker_logs.find("command from", "ignored", level=logging.WARNING)
            counts = {reason: sum(reason in m for m in ignored) for reason in expected}
            return counts == expected and bool(worker_logs.find("cancel for task", unknown_task))

        await await_until(logged, timeout=10)

        # the channel is the same one, and it still works: a real cancel goes through it
        assert orch.ws_connects[worker_id] == 1 and orch.ws_open(worker_id) == 1
        sleeper = orch.enqueue(make_task("sleep", {"seconds": 30}))
        await orch.wait_for(lambda: snapshot(running)["tasks"] == 1, 10)
        await orch.cancel_task(worker_id, sleeper["task_id"], sleeper["job_id"])
        assert await one_result(orch, sleeper) == {"status": "cancelled"}
        good = orch.enqueue(make_task("echo", {"ok": True}))
        assert await one_result(orch, good) == {"status": "success", "data": {"ok": True}}
        assert orch.ws_connects[worker_id] == 1
        assert snapshot(running)["orchestrators"][0]["command_channel"]
        assert orch.duplicate_results() == {}
        assert_no_slot_leak(running)


# ---------------------------------------------------------------------------------------------
# 5. results: retried until acknowledged, exactly once; a final 4xx is final
# ---------------------------------------------------------------------------------------------

RESULT_FAULTS: dict[str, tuple[Any, ...]] = {
    # scripted replies to the first tries (they are recorded, never accepted)
    "reset": (Reset.immediately(), Reset.mid_headers(), Reset.mid_body()),
    "429-retry-after": (Reply.rate_limited(retry_after=1), Reply.rate_limited(retry_after=1)),
    "429": (Reply.rate_limited(retry_after=None),) * 3,
    "502-503-504": (Reply.error(502), Reply.error(503), Reply.error(504)),
    "500": (Reply.error(500),) * 3,  # 1.0b10's "job not found": retried RESULT_MAX_RETRIES times
}


@pytest.mark.parametrize("fault", list(RESULT_FAULTS))
async def test_results_are_retried_until_acknowledged_exactly_once(
    adapter_case: AdapterCase,
    fault_orchestrator: FaultOrchestrator,
    tmp_path: Path,
    fault: str,
) -> None:
    """Connection resets, 429 (with Retry-After honoured) and 5xx on a result: it is
    retried until the fake accepts it, exactly one result is accepted, and the
    tries are exactly the faults plus the accepted one."""
    orch = fault_orchestrator
    worker = make_worker(adapter_case, orch, tmp_path, max_concurrent_tasks=2)
    faults = RESULT_FAULTS[fault]
    async with serving_worker(worker, adapter_case) as running:
        orch.script("result", *faults)
        task = orch.enqueue(make_task("echo", {"fault": fault}))
        result = await one_result(orch, task, timeout=30)
        assert result == {"status": "success", "data": {"fault": fault}}
        assert not orch.scripted("result")
        posts = result_posts(orch, task["task_id"])
        # every fault cost one try (a reset may be retried once more by the HTTP client itself)
        assert len(faults) + 1 <= len(posts) <= 2 * len(faults) + 1
        assert posts[-1].status == 200
        if fault == "429-retry-after":
            gaps = [b.time - a.time for a, b in itertools.pairwise(posts)]
            assert min(gaps) >= 1.0 - CLOCK_SLACK, gaps
        # the other tasks are not held up, and none is answered twice
        more = [orch.enqueue(make_task("echo", {"n": n})) for n in range(3)]
        for n, other in enumerate(more):
            assert await one_result(orch, other) == {"status": "success", "data": {"n": n}}
        assert orch.duplicate_results() == {}
        assert counter(running, "results_dropped") == 0
        await settled(orch, running, polls=2)


async def test_results_rejected_with_503_are_retried_past_result_max_retries(
    adapter_case: AdapterCase,
    fault_orchestrator: FaultOrchestrator,
    tmp_path: Path,
    worker_logs: LogRecorder,
) -> None:
    """``result_accept_on_try``: every result of a batch is accepted only on its 5th try.

    RESULT_MAX_RETRIES (3 here) only makes the worker log an error: a 503 is
    retried for as long as it takes, and nothing is sent after the acceptance.
    """
    orch = fault_orchestrator
    try_n = 5
    orch.configure(result_accept_on_try=try_n)  # earlier tries get 503
    worker = make_worker(adapter_case, orch, tmp_path, max_concurrent_tasks=3, RESULT_MAX_RETRIES=3)
    async with serving_worker(worker, adapter_case) as running:
        tasks = [orch.enqueue(make_task("echo", {"n": n})) for n in range(6)]
        for n, task in enumerate(tasks):
            result = await one_result(orch, task, timeout=30)
            assert result == {"status": "success", "data": {"n": n}}
        await settled(orch, running, polls=3)
        for task in tasks:
            assert orch.result_attempts[task["task_id"]] == try_n  # none after the acceptance
        assert len(orch.rejected_results) == len(tasks) * (try_n - 1)
        assert orch.duplicate_results() == {}
        assert counter(running, "result_retries") == len(tasks) * (try_n - 1)
        assert counter(running, "results_dropped") == 0
        assert len(worker_logs.find("for as long as the worker runs", level=logging.ERROR)) == 6


async def test_a_final_4xx_is_logged_loudly_and_not_retried(
    adapter_case: AdapterCase,
    fault_orchestrator: FaultOrchestrator,
    tmp_path: Path,
    worker_logs: LogRecorder,
) -> None:
    """A 400 on a result: one try, an ERROR naming the task and the reply, no retry."""
    orch = fault_orchestrator
    worker = make_worker(adapter_case, orch, tmp_path, RESULT_RETRY_INITIAL_DELAY=0.1)
    async with serving_worker(worker, adapter_case) as running:
        orch.script("result", Reply.error(400, "Invalid result body"))
        task = orch.enqueue(make_task("echo", {"doomed": True}))
        await orch.wait_for(lambda: result_posts(orch, task["task_id"]), 15)
        await await_until(lambda: counter(running, "results_dropped") == 1, timeout=10)
        await anyio.sleep(2.0)  # many retry delays of 0.1 s: a retry would be here by now
        assert len(result_posts(orch, task["task_id"])) == 1
        assert orch.results_for(task["task_id"]) == []
        loud = worker_logs.find(task["task_id"], "REJECTED", "400", level=logging.ERROR)
        assert loud and "Invalid result body" in loud[0], worker_logs.messages(logging.WARNING)
        # the worker goes on
        good = orch.enqueue(make_task("echo", {"after": 400}))
        assert await one_result(orch, good) == {"status": "success", "data": {"after": 400}}
        await settled(orch, running, polls=10)


async def test_a_result_survives_an_outage_longer_than_the_reference_retry_budget(
    adapter_case: AdapterCase,
    fault_orchestrator: FaultOrchestrator,
    tmp_path: Path,
) -> None:
    """The reference SDK gives up on a result after about 15 s: ours waits for the orchestrator."""
    orch = fault_orchestrator
    gate = threading.Event()
    worker = make_worker(adapter_case, orch, tmp_path, gate=gate, max_concurrent_tasks=1)
    try:
        async with serving_worker(worker, adapter_case) as running:
            task = orch.enqueue(make_task("gate"))
            await orch.wait_for(lambda: snapshot(running)["tasks"] == 1, 10)
            await orch.refuse_connections()
            gone = orch.now()
            gate.set()  # the handler finishes while the orchestrator is away
            await await_until(lambda: counter(running, "result_retries") >= 1, timeout=10)
            await anyio.sleep(17.0 - (orch.now() - gone))
            assert snapshot(running)["outbox"] == 1  # still there, after > 15 s
            assert orch.results_for(task["task_id"]) == []
            await orch.accept_connections()
            # the result backoff is capped at 30 s (full jitter): it goes out within that
            assert await one_result(orch, task, timeout=40) == {
                "status": "success",
                "data": {"gated": True},
            }
            assert orch.duplicate_results() == {}
            again = orch.enqueue(make_task("echo", {"after": "outage"}))
            assert await one_result(orch, again) == {
                "status": "success",
                "data": {"after": "outage"},
            }
            await settled(orch, running, polls=1)
    finally:
        gate.set()


async def test_polling_pauses_while_the_outbox_is_full(
    adapter_case: AdapterCase,
    fault_orchestrator: FaultOrchestrator,
    tmp_path: Path,
) -> None:
    """RESULT_OUTBOX_LIMIT=2 results undelivered: no poll at all (and "busy"), so a
    queued task waits at the orchestrator; once results go out, polling resumes."""
    orch = fault_orchestrator
    limit = 2
    worker = make_worker(
        adapter_case, orch, tmp_path, max_concurrent_tasks=1, RESULT_OUTBOX_LIMIT=limit
    )
    async with serving_worker(worker, adapter_case) as running:
        orch.set_fault("result", Reply.error(503, "results are not taken now"))
        held = [orch.enqueue(make_task("echo", {"n": n})) for n in range(limit)]
        await orch.wait_for(lambda: snapshot(running)["outbox"] == limit, 15)
        waiting = orch.enqueue(make_task("echo", {"n": "third"}))
        full = orch.now()
        await anyio.sleep(4.0)  # two poll holds: a poll would have come by now
        assert orch.count("poll", since=full) == 0
        assert orch.pending_tasks() == [waiting]
        assert snapshot(running)["slots"]["polling"] == 0
        assert orch.worker_records[worker.config.WORKER_ID]["status"] == "busy"
        assert all(r.status == 503 for r in orch.requests_for("result"))

        orch.clear_faults()
        for n, task in enumerate(held):
            assert await one_result(orch, task, timeout=40) == {
                "status": "success",
                "data": {"n": n},
            }
        assert await one_result(orch, waiting, timeout=20) == {
            "status": "success",
            "data": {"n": "third"},
        }
        assert orch.count("poll", since=full) >= 1
        assert orch.duplicate_results() == {}
        await settled(orch, running, polls=1)

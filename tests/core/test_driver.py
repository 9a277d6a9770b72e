"""The shared Driver: one real WorkerMachine, fed by a driver whose ``do_*`` only take notes.

:class:`Recorder` is what an adapter would be without its I/O: it writes down
every ``do_*`` call and every timer it is asked for, on a clock the test moves.
The requests it is asked to send are answered by a
:class:`~rca_core.testing.FakeOrchestrator`, as the orchestrator would answer
them, and fed back through :meth:`Driver.feed`.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from typing import Any

import pytest

from rca_core import (
    PERMANENT_ERROR,
    CommandChannelOpened,
    CommandReceived,
    HandlerFinished,
    LocalProtocolError,
    OpenCommandChannel,
    ProgressReported,
    RequestFailed,
    ResponseReceived,
    SendRequest,
    StartHandler,
    Task,
    WorkerMachine,
)
from rca_core._driver import Driver
from rca_core._metrics import WorkerMetrics
from rca_core.testing import FakeOrchestrator, Reply

from .sim_helpers import TOKEN, URL_A, make_machine

LATENCY = 0.25


class Recorder(Driver):
    """A driver whose effects are notes: ``calls`` in order, the timer it holds in ``armed``."""

    def __init__(self, machine: WorkerMachine, *, metrics: WorkerMetrics | None = None) -> None:
        super().__init__(machine, metrics=metrics)
        self.clock = 0.0
        self.calls: list[tuple[Any, ...]] = []
        self.armed: float | None = None
        self.set_timer_calls: list[float | None] = []
        self.redundant_timers = 0
        self.unsent: deque[SendRequest] = deque()
        self.parked: dict[int, SendRequest] = {}
        self.started: dict[str, Task] = {}
        self.stopped = 0

    # -- Driver's primitives ----------------------------------------------------------

    def now(self) -> float:
        return self.clock

    def set_timer(self, deadline: float | None) -> None:
        if deadline == self.armed:
            self.redundant_timers += 1
        self.armed = deadline
        self.set_timer_calls.append(deadline)

    def do_send_request(self, effect: SendRequest) -> None:
        self.calls.append(("send_request", effect.purpose))
        self.unsent.append(effect)

    def do_cancel_request(self, request_id: int) -> None:
        self.calls.append(("cancel_request", request_id))

    def do_start_handler(self, effect: StartHandler) -> None:
        self.calls.append(("start_handler", effect.task.task_id))
        self.started[effect.task.task_id] = effect.task

    def do_cancel_handler(self, task_id: str) -> None:
        self.calls.append(("cancel_handler", task_id))

    def do_cleanup(self, task_id: str) -> None:
        self.calls.append(("cleanup", task_id))

    def do_open_channel(self, effect: OpenCommandChannel) -> None:
        self.calls.append(("open_channel", effect.channel))

    def do_close_channel(self, channel: int) -> None:
        self.calls.append(("close_channel", channel))

    def do_send_message(self, channel: int, text: str) -> None:
        self.calls.append(("send_message", channel, json.loads(text)))

    def do_stopped(self) -> None:
        self.calls.append(("stopped",))
        self.stopped += 1

    # -- what the test's "event loop" does ----------------------------------------------

    def take(self) -> list[tuple[Any, ...]]:
        """The calls since the last take."""
        out, self.calls = self.calls, []
        return out

    def fire(self, at: float | None = None) -> None:
        """The timer goes off at ``at`` (default: exactly its deadline), as call_at would."""
        assert self.armed is not None, "no timer is armed"
        self.clock = self.armed if at is None else at
        self.armed = None
        self.on_timer()

    def deliver(self, effect: SendRequest, reply: Reply) -> None:
        self.clock += LATENCY
        if reply.status is None:
            self.feed(RequestFailed(request_id=effect.request_id, reason=reply.body.decode()))
        else:
            self.feed(
                ResponseReceived(
                    request_id=effect.request_id,
                    status=reply.status,
                    body=reply.body,
                    retry_after=reply.retry_after,
                )
            )

    def serve(self, fake: FakeOrchestrator) -> None:
        """Send every request the machine asked for; long polls with no task stay parked."""
        while self.unsent:
            effect = self.unsent.popleft()
            reply = fake.answer(effect.request, self.clock)
            if reply is None:
                self.parked[effect.request_id] = effect
            else:
                self.deliver(effect, reply)

    def hand_out(self, fake: FakeOrchestrator) -> None:
        """Answer one parked poll with the fake's next task."""
        rid = next(iter(self.parked))
        reply = fake.next_task()
        assert reply is not None, "the fake has no task queued"
        self.deliver(self.parked.pop(rid), reply)


def recorder(*, metrics: bool = False, **overrides: Any) -> Recorder:
    machine = make_machine(**overrides)
    driver = Recorder(machine)
    if metrics:
        driver.metrics = WorkerMetrics(machine.snapshot)
    return driver


def orchestrator(**script: list[Reply]) -> FakeOrchestrator:
    return FakeOrchestrator(
        url=URL_A, token=TOKEN, script={route: deque(replies) for route, replies in script.items()}
    )


def spy_timer(driver: Driver) -> list[float]:
    """The times the machine's handle_timer is called with."""
    seen: list[float] = []
    handle_timer = driver.machine.handle_timer

    def spy(now: float) -> None:
        seen.append(now)
        handle_timer(now)

    driver.machine.handle_timer = spy  # type: ignore[method-assign]
    return seen


def assert_timer_follows_machine(driver: Recorder) -> None:
    assert driver.armed == driver.machine.next_deadline()


# -- a worker's life through the driver -------------------------------------------------------


def test_a_task_from_the_first_request_to_the_stop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "rca_core.driver")
    fake = orchestrator()
    driver = recorder()

    driver.start()
    assert driver.take() == [("send_request", "register")]
    assert driver.set_timer_calls == []  # nothing to wait for while the registration is out

    driver.serve(fake)
    assert driver.take() == [
        ("send_request", "heartbeat"),
        ("send_request", "poll"),
        ("send_request", "poll"),
    ]
    assert [route for _, route in fake.requests] == ["register", "heartbeat", "poll", "poll"]
    assert len(driver.parked) == 2
    assert_timer_follows_machine(driver)
    heartbeat_due = driver.armed
    assert heartbeat_due == pytest.approx(2 * LATENCY + 15.0)

    driver.fire()  # the periodic heartbeat
    assert driver.take() == [("send_request", "heartbeat")]
    driver.serve(fake)
    assert driver.take() == []
    assert len(fake.heartbeats) == 2
    assert_timer_follows_machine(driver)

    task_id = fake.submit("echo", {"x": 1})
    driver.hand_out(fake)
    assert driver.take() == [("start_handler", task_id)]
    assert driver.started[task_id].params == {"x": 1}
    assert driver.started[task_id].job_id == "job-1"

    driver.clock += 2.0
    driver.feed(HandlerFinished(task_id=task_id, result={"status": "success", "data": {"y": 2}}))
    driver.serve(fake)
    calls = driver.take()
    # the heartbeat that frees the slot goes out before the result; the folder goes once acked
    assert calls[0] == ("send_request", "heartbeat")
    assert calls.index(("send_request", "result")) > 0
    assert ("send_request", "poll") in calls  # the freed slot polls again
    assert calls[-1] == ("cleanup", task_id)
    assert fake.results_for(task_id) == [{"status": "success", "data": {"y": 2}}]
    assert_timer_follows_machine(driver)

    driver.signal("SIGTERM")
    driver.serve(fake)
    calls = driver.take()
    cancelled = [c[1] for c in calls if c[0] == "cancel_request"]
    assert cancelled and set(cancelled) == set(driver.parked)
    assert driver.stopped == 0

    for rid in cancelled:  # the adapter ends each cancelled poll with no reply
        driver.feed(RequestFailed(request_id=rid, reason="cancelled"))
        del driver.parked[rid]
    assert driver.take() == [("stopped",)]
    assert driver.finished and driver.failure is None
    assert driver.set_timer_calls[-1] is None and driver.armed is None
    assert driver.redundant_timers == 0
    assert "worker stopped; every result was delivered" in caplog.messages
    assert "SIGTERM received: draining" in caplog.messages

    # the worker has ended: nothing reaches the machine any more
    ticks = spy_timer(driver)
    before = len(driver.set_timer_calls)
    driver.feed(HandlerFinished(task_id="task-late", result={"status": "success"}))
    driver.on_timer()
    driver.signal("SIGINT")
    assert driver.take() == [] and ticks == []
    assert len(driver.set_timer_calls) == before and driver.stopped == 1


def test_channel_progress_second_signal_and_a_handler_that_never_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "rca_core.driver")
    fake = orchestrator()
    driver = recorder(websockets=True, shutdown_timeout=5.0)
    driver.start()
    driver.serve(fake)
    assert ("open_channel", 0) in driver.take()
    driver.feed(CommandChannelOpened(channel=0))
    assert driver.take() == []

    task_id = fake.submit("echo")
    driver.hand_out(fake)
    assert driver.take() == [("start_handler", task_id)]

    driver.feed(ProgressReported(task_id=task_id, progress=0.5, message="half"))
    assert driver.take() == [
        (
            "send_message",
            0,
            {
                "event": "progress_update",
                "task_id": task_id,
                "job_id": "job-1",
                "progress": 0.5,
                "message": "half",
            },
        )
    ]

    driver.signal("SIGTERM")
    driver.serve(fake)
    calls = driver.take()
    assert ("cancel_request", next(iter(driver.parked))) in calls
    assert not any(c[0] in ("cancel_handler", "close_channel") for c in calls)

    driver.signal("SIGINT")  # the second signal cancels what is left
    assert driver.take() == [("close_channel", 0), ("cancel_handler", task_id)]
    assert caplog.messages.count("SIGTERM received: draining") == 1
    assert "SIGINT received: cancelling the tasks still running" in caplog.messages
    assert driver.signals == 2
    for rid in list(driver.parked):
        driver.feed(RequestFailed(request_id=rid, reason="cancelled"))
        del driver.parked[rid]
    assert driver.take() == []

    # the handler ignores its cancellation: the machine gives up on it when its timer says so
    for _ in range(5):
        if driver.finished:
            break
        driver.fire()
    assert driver.take() == [("stopped",)]
    assert driver.failure is None and driver.armed is None
    assert "worker stopped with 1 result(s) undelivered" in caplog.messages
    assert [r.levelname for r in caplog.records if "undelivered" in r.message] == ["ERROR"]


def test_a_cancel_command_reaches_do_cancel_handler() -> None:
    fake = orchestrator()
    driver = recorder(websockets=True)
    driver.start()
    driver.serve(fake)
    driver.feed(CommandChannelOpened(channel=0))
    task_id = fake.submit("echo")
    driver.hand_out(fake)
    driver.take()
    driver.feed(
        CommandReceived(channel=0, text=json.dumps({"command": "cancel_task", "task_id": task_id}))
    )
    assert driver.take() == [("cancel_handler", task_id)]


# -- the timer ------------------------------------------------------------------------------------


def test_set_timer_is_called_only_when_the_deadline_moves() -> None:
    fake = orchestrator()
    driver = recorder(websockets=True)
    driver.start()
    driver.serve(fake)
    driver.feed(CommandChannelOpened(channel=0))
    armed, count = driver.armed, len(driver.set_timer_calls)
    assert armed is not None

    # events that leave the machine's next deadline where it was do not touch the timer
    driver.feed(CommandReceived(channel=0, text="not json"))
    driver.feed(ProgressReported(task_id="nobody", progress=0.1, message=""))
    assert len(driver.set_timer_calls) == count and driver.armed == armed

    # one that moves it does
    task_id = fake.submit("echo")
    driver.hand_out(fake)
    assert len(driver.set_timer_calls) == count + 1
    assert driver.armed != armed
    assert_timer_follows_machine(driver)
    assert driver.redundant_timers == 0
    assert driver.take()[-1] == ("start_handler", task_id)


def test_a_timer_that_fires_early_still_hands_the_machine_its_deadline() -> None:
    fake = orchestrator()
    driver = recorder()
    driver.start()
    driver.serve(fake)
    driver.take()
    ticks = spy_timer(driver)
    deadline = driver.armed
    assert deadline is not None

    driver.fire(at=deadline - 0.004)  # loops may run a call_at callback a little early
    assert ticks == [deadline]
    assert driver.take() == [("send_request", "heartbeat")]  # it is due: it goes
    driver.serve(fake)

    late = driver.armed
    assert late is not None
    driver.fire(at=late + 3.0)  # a late timer: the machine gets the real time
    assert ticks == [deadline, late + 3.0]


def test_after_a_timer_fires_the_same_deadline_is_armed_again() -> None:
    fake = orchestrator()
    driver = recorder()
    driver.start()
    driver.serve(fake)
    deadline = driver.armed
    ticks: list[float] = []

    def idle(now: float) -> None:
        ticks.append(now)

    driver.machine.handle_timer = idle  # type: ignore[method-assign]

    driver.fire()  # the machine did nothing with it: its deadline stays
    assert ticks == [deadline]
    assert driver.set_timer_calls[-1] == deadline and driver.armed == deadline
    assert driver.redundant_timers == 0


def test_an_on_timer_with_no_timer_armed_uses_the_clock() -> None:
    driver = recorder()
    driver.start()  # the registration is out: the machine waits for nothing
    assert driver.armed is None
    ticks = spy_timer(driver)
    driver.clock = 7.5
    driver.on_timer()
    assert ticks == [7.5]
    assert driver.take() == [("send_request", "register")]


# -- a bug in the core ------------------------------------------------------------------------


def test_an_exception_in_start_stops_the_driver(caplog: pytest.LogCaptureFixture) -> None:
    machine = make_machine()
    machine.start(0.0)  # already started: a second start is a protocol error
    machine.effects()
    driver = Recorder(machine)
    driver.start()
    assert isinstance(driver.failure, LocalProtocolError)
    assert driver.finished
    assert driver.take() == [("stopped",)]
    assert driver.set_timer_calls == [None]
    [record] = [r for r in caplog.records if r.name == "rca_core.driver"]
    assert record.levelname == "CRITICAL"
    assert record.exc_info is not None and record.exc_info[1] is driver.failure


def test_an_exception_in_handle_stops_the_driver_and_later_events_are_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = orchestrator()
    driver = recorder()
    driver.start()
    driver.serve(fake)
    driver.take()
    assert driver.armed is not None

    # the adapter reports a handler the machine never started: a core/adapter mismatch
    driver.feed(HandlerFinished(task_id="ghost", result={"status": "success"}))
    assert isinstance(driver.failure, LocalProtocolError)
    assert "ghost" in str(driver.failure)
    assert driver.finished
    assert driver.take() == [("stopped",)]
    assert driver.armed is None and driver.set_timer_calls[-1] is None
    assert "internal error in the worker core; stopping" in caplog.messages

    handled: list[object] = []
    driver.machine.handle = lambda event, now: handled.append(event)
    ticks = spy_timer(driver)
    rid = next(iter(driver.parked))
    driver.feed(ResponseReceived(request_id=rid, status=204))
    driver.on_timer()
    assert handled == [] and ticks == []
    assert driver.take() == [] and driver.stopped == 1


def test_an_exception_in_handle_timer_stops_the_driver() -> None:
    fake = orchestrator()
    driver = recorder()
    driver.start()
    driver.serve(fake)
    driver.take()

    def broken(now: float) -> None:
        raise RuntimeError("bug in the core")

    driver.machine.handle_timer = broken  # type: ignore[method-assign]
    driver.fire()
    assert isinstance(driver.failure, RuntimeError)
    assert driver.take() == [("stopped",)]
    assert driver.armed is None


# -- metrics hooks ------------------------------------------------------------------------------


def sample(driver: Driver, name: str, **labels: str) -> float | None:
    assert driver.metrics is not None
    return driver.metrics.registry.get_sample_value(name, labels)


def test_metrics_time_each_request_by_kind_and_count_failed_ones() -> None:
    # the first registration gets a 503, the retry succeeds
    fake = orchestrator(register=[Reply(status=503, body=b"busy")])
    driver = recorder(metrics=True)
    driver.start()
    driver.serve(fake)
    assert sample(driver, "rca_requests_failed_total", kind="register") == 1.0
    assert sample(driver, "rca_request_duration_seconds_count", kind="register") == 1.0
    assert sample(driver, "rca_request_duration_seconds_sum", kind="register") == pytest.approx(
        LATENCY
    )

    driver.fire()  # the registration's backoff ends
    driver.serve(fake)
    assert sample(driver, "rca_request_duration_seconds_count", kind="register") == 2.0
    assert sample(driver, "rca_requests_failed_total", kind="register") == 1.0
    assert sample(driver, "rca_request_duration_seconds_count", kind="heartbeat") == 1.0
    assert sample(driver, "rca_requests_failed_total", kind="heartbeat") is None
    # the polls are parked: sent, not answered yet
    assert sample(driver, "rca_request_duration_seconds_count", kind="poll") is None

    rid = next(iter(driver.parked))
    driver.clock += 30.0
    driver.deliver(driver.parked.pop(rid), Reply(status=204))
    assert sample(driver, "rca_request_duration_seconds_count", kind="poll") == 1.0
    assert sample(driver, "rca_request_duration_seconds_sum", kind="poll") == pytest.approx(
        30.0 + LATENCY
    )

    rid = next(iter(driver.parked))
    driver.deliver(driver.parked.pop(rid), Reply(status=None, body=b"connection reset"))
    assert sample(driver, "rca_requests_failed_total", kind="poll") == 1.0
    assert sample(driver, "rca_request_duration_seconds_count", kind="poll") == 2.0
    assert driver.failure is None

    # events that are not replies or finished handlers leave the timings alone
    assert driver.metrics is not None
    timings = [s for m in driver.metrics.request_seconds.collect() for s in m.samples]
    driver.feed(ProgressReported(task_id="nobody", progress=0.5, message=""))
    driver.signal("SIGTERM")
    assert [s for m in driver.metrics.request_seconds.collect() for s in m.samples] == timings


def test_metrics_attached_after_start_ignore_the_replies_they_did_not_see_sent() -> None:
    fake = orchestrator()
    driver = recorder()
    driver.start()  # the registration goes out before the metrics exist
    driver.metrics = WorkerMetrics(driver.machine.snapshot)
    driver.serve(fake)
    assert sample(driver, "rca_request_duration_seconds_count", kind="register") is None
    assert sample(driver, "rca_request_duration_seconds_count", kind="heartbeat") == 1.0


def test_metrics_record_handler_outcomes_and_run_time() -> None:
    fake = orchestrator()
    driver = recorder(metrics=True, max_concurrent_tasks=3)
    driver.start()
    driver.serve(fake)
    ids = [fake.submit("echo") for _ in range(3)]
    for _ in ids:
        driver.hand_out(fake)
    assert sample(driver, "rca_tasks_started_total", task="echo") == 3.0

    results: list[dict[str, Any]] = [
        {"status": "success", "data": {}},
        {"status": "failure", "error": {"code": PERMANENT_ERROR, "message": "no"}},
        {"status": "cancelled"},
    ]
    for n, (task_id, result) in enumerate(zip(ids, results, strict=True)):
        driver.clock += 1.0 + n
        driver.feed(HandlerFinished(task_id=task_id, result=result))
    assert sample(driver, "rca_tasks_finished_total", task="echo", outcome="success") == 1.0
    assert sample(driver, "rca_tasks_finished_total", task="echo", outcome=PERMANENT_ERROR) == 1.0
    assert sample(driver, "rca_tasks_finished_total", task="echo", outcome="cancelled") == 1.0
    assert sample(driver, "rca_handler_duration_seconds_count", task="echo") == 3.0
    total = sample(driver, "rca_handler_duration_seconds_sum", task="echo")
    # each ran from its start (all three started at one instant, plus a reply's latency each)
    assert total is not None and total > 1.0 + 2.0 + 3.0

    # a finish for a handler the driver never saw started: no metric, and the core refuses it
    driver.feed(HandlerFinished(task_id="ghost", result={"status": "success"}))
    assert sample(driver, "rca_handler_duration_seconds_count", task="echo") == 3.0
    assert isinstance(driver.failure, LocalProtocolError)

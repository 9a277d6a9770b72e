"""Invariants over random timelines (Hypothesis), and parsers that never raise.

``WorkerTimeline`` drives a worker against one or two fake orchestrators with
random task submissions, handler durations, faults (down/up, scripted 429/500,
forgetting the worker), cancels, hot-cache changes and drains, checking the
slot invariants after every simulation step and, at the end, that every task
the worker took got exactly one acknowledged result (or that the loss was
logged, when the run ended in give-up).

``MachineFuzz`` feeds a bare machine arbitrary replies to any outstanding
request, in any order, with arbitrary handler results and local events.
"""

from __future__ import annotations

import json
import logging
import math
import random
import typing
from collections import Counter, deque
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from rca_core import (
    FAILOVER,
    ROUND_ROBIN,
    Backoff,
    CancelRequested,
    CommandChannelClosed,
    CommandChannelOpened,
    CommandReceived,
    DrainRequested,
    HandlerFinished,
    HotCacheChanged,
    OpenCommandChannel,
    Orchestrator,
    ProgressReported,
    SendRequest,
    StartHandler,
    Task,
    WireV1,
    WorkerMachine,
    WorkerState,
    WorkerStopped,
    backoff_delay,
)
from rca_core.testing import FakeOrchestrator, Reply, Simulation

from .sim_helpers import Manual, make_settings

RETRY_AFTER_LIMIT = 300.0  # documented bound on an honoured Retry-After
TASKS = {"render": "gpu", "echo": None, "encode": "cpu"}  # cpu has no limit of its own
ROUTES = ("register", "heartbeat", "poll", "result")


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_slots(machine: WorkerMachine, type_limits: dict[str, int]) -> None:
    slots = machine.snapshot()["slots"]
    assert slots["polling"] >= 0
    assert slots["held"] >= 0
    assert slots["polling"] + slots["held"] <= slots["limit"]
    for task_type, limit in type_limits.items():
        assert 0 <= slots["running"][task_type] <= limit
        assert slots["waiting"][task_type] >= 0


# -- random timelines against the fake orchestrators --------------------------------------------


class WorkerTimeline(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim: Simulation | None = None
        self.durations: dict[str, float | None] = {}
        self.submitted: dict[str, int] = {}  # task id -> fake index
        self.ids = 0
        self.recorder = Recorder()
        self.same_instant = 0

    # -- setup ---------------------------------------------------------------------------

    @initialize(
        two=st.booleans(),
        mode=st.sampled_from([FAILOVER, ROUND_ROBIN]),
        limit=st.integers(1, 4),
        gpu_limit=st.integers(1, 2),
        websockets=st.booleans(),
        task_timeout=st.sampled_from([None, 5.0, 30.0]),
        seed=st.integers(0, 2**32 - 1),
        batch=st.lists(
            st.tuples(
                st.integers(0, 1),
                st.sampled_from([*TASKS, "unknown-type"]),
                st.sampled_from([0.0, 0.5, 2.0, 12.0, 45.0, None]),
            ),
            max_size=8,
        ),
    )
    def setup(
        self,
        two: bool,
        mode: str,
        limit: int,
        gpu_limit: int,
        websockets: bool,
        task_timeout: float | None,
        seed: int,
        batch: list[tuple[int, str, float | None]],
    ) -> None:
        self.fakes = [FakeOrchestrator(url="http://a.test", hold=5.0)]
        if two:
            self.fakes.append(FakeOrchestrator(url="http://b.test", hold=5.0))
        orchestrators = tuple(
            Orchestrator(url=f.url, token=f.token, priority=i + 1, weight=2 - i)
            for i, f in enumerate(self.fakes)
        )
        self.type_limits = {"gpu": gpu_limit}
        settings_ = make_settings(
            orchestrators=orchestrators,
            tasks=TASKS,
            mode=mode,
            max_concurrent_tasks=limit,
            task_type_limits=self.type_limits,
            websockets=websockets,
            task_timeout=task_timeout,
            heartbeat_interval=10.0,
            shutdown_timeout=20.0,
            result_max_retries=1000,  # no scripted 500 may drop a result here
            result_retry_cap=15.0,
        )
        self.limit = limit
        machine = WorkerMachine(settings_, rng=random.Random(seed))
        logging.getLogger("rca_core.worker").addHandler(self.recorder)
        self.sim = Simulation(machine, self.fakes, handler=self.handler)
        for which, name, duration in batch:
            self.submit(which, name, duration)
        self.advance_by(0.5)  # registered, polls parked

    def handler(self, task: Task) -> tuple[float | None, dict[str, Any]]:
        return self.durations[task.task_id], {"status": "success", "data": {"id": task.task_id}}

    @property
    def machine(self) -> WorkerMachine:
        assert self.sim is not None
        return self.sim.machine

    # -- checks after every simulation step --------------------------------------------------

    def check(self) -> None:
        assert self.sim is not None
        check_slots(self.machine, self.type_limits)
        running = list(self.sim.running.values())
        assert len(running) <= self.limit
        gpu = sum(1 for t in running if TASKS[t.name] == "gpu")
        assert gpu <= self.type_limits["gpu"]

    def advance_by(self, seconds: float) -> None:
        assert self.sim is not None
        end = self.sim.now + seconds
        while self.sim.now < end:
            before = self.sim.now
            if not self.sim.step():
                break
            self.same_instant = self.same_instant + 1 if self.sim.now == before else 0
            assert self.same_instant < 500, f"the machine spins at t={self.sim.now}"
            self.check()

    # -- rules -------------------------------------------------------------------------------

    @rule(
        which=st.integers(0, 1),
        name=st.sampled_from([*TASKS, "unknown-type"]),
        duration=st.sampled_from([0.0, 0.5, 2.0, 12.0, 45.0, None]),
    )
    def submit(self, which: int, name: str, duration: float | None) -> None:
        index = which % len(self.fakes)
        self.ids += 1
        task_id = f"t{self.ids}"
        self.durations[task_id] = duration
        self.submitted[task_id] = index
        self.fakes[index].submit(name, {"n": self.ids}, task_id=task_id, job_id=f"j{self.ids}")

    @rule(seconds=st.sampled_from([0.001, 0.3, 2.0, 7.0, 25.0, 70.0]))
    def advance(self, seconds: float) -> None:
        self.advance_by(seconds)

    @rule(which=st.integers(0, 1), down=st.booleans())
    def set_down(self, which: int, down: bool) -> None:
        self.fakes[which % len(self.fakes)].down = down

    @rule(
        which=st.integers(0, 1),
        route=st.sampled_from(ROUTES),
        reply=st.sampled_from(
            [
                Reply(status=None),
                Reply(status=429, retry_after="2"),
                Reply(status=429, retry_after="garbage"),
                Reply(status=500, body=b'{"error":"boom"}'),
                Reply(status=503),
            ]
        ),
        count=st.integers(1, 3),
    )
    def script_fault(self, which: int, route: str, reply: Reply, count: int) -> None:
        fake = self.fakes[which % len(self.fakes)]
        fake.script.setdefault(route, deque()).extend([reply] * count)

    @rule(which=st.integers(0, 1), how=st.sampled_from([200, 404, None]))
    def forget(self, which: int, how: int | None) -> None:
        fake = self.fakes[which % len(self.fakes)]
        if how is None:
            fake.known = False  # a restart
        else:
            fake.forget_with = how

    @precondition(lambda self: self.submitted)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        assert self.sim is not None
        task_id = data.draw(st.sampled_from(sorted(self.submitted)))
        fake = self.fakes[self.submitted[task_id]]
        if fake in self.sim.channels.values():
            self.sim.send_command(fake, {"command": "cancel_task", "task_id": task_id})
        else:
            self.sim.feed(CancelRequested(task_id=task_id))
        self.check()

    @rule(data=st.data(), progress=st.floats(allow_nan=True, allow_infinity=True))
    def report_progress(self, data: st.DataObject, progress: float) -> None:
        assert self.sim is not None
        if self.sim.running:
            task_id = data.draw(st.sampled_from(sorted(self.sim.running)))
            self.sim.feed(ProgressReported(task_id=task_id, progress=progress, message="p"))

    @rule(added=st.lists(st.sampled_from(["m1", "m2"])), removed=st.lists(st.sampled_from(["m1"])))
    def hot_cache(self, added: list[str], removed: list[str]) -> None:
        assert self.sim is not None
        self.sim.feed(HotCacheChanged(added=tuple(added), removed=tuple(removed)))

    @rule()
    def drain(self) -> None:
        assert self.sim is not None
        self.sim.feed(DrainRequested(reason="property"))
        self.check()

    # -- the end of every timeline ---------------------------------------------------------

    def teardown(self) -> None:
        logger = logging.getLogger("rca_core.worker")
        try:
            if self.sim is not None:
                self.finish()
        finally:
            logger.removeHandler(self.recorder)

    def finish(self) -> None:
        assert self.sim is not None
        for fake in self.fakes:
            fake.down = False
            fake.script.clear()
        self.advance_by(15.0)  # a working spell with every orchestrator up
        self.sim.feed(DrainRequested(reason="end of the timeline"))
        self.advance_by(20.0 + 10.0 + 400.0)
        assert self.sim.stopped is not None
        assert self.machine.state is WorkerState.STOPPED
        while self.sim.step():  # let late replies land
            self.check()
        slots = self.machine.snapshot()["slots"]
        assert (slots["held"], slots["polling"]) == (0, 0)  # no slot held at the end
        assert self.sim.running == {}

        results = Counter(r["task_id"] for fake in self.fakes for r in fake.results)
        assert all(n == 1 for n in results.values()), results
        queued = {t["task_id"] for fake in self.fakes for t in fake.queue}
        taken = set(self.submitted) - queued
        lost = sorted(t for t in taken if results[t] == 0)
        if lost:  # only when the end was a give-up, and never silently
            log = "\n".join(self.recorder.messages)
            gave_up = self.sim.stopped.undelivered > 0 or "after the worker stopped" in log
            assert gave_up, (lost, self.sim.stopped)
            for task_id in lost:
                assert f"task {task_id} " in log, (task_id, log)


TestWorkerTimeline = WorkerTimeline.TestCase
TestWorkerTimeline.settings = settings(
    max_examples=120,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- arbitrary replies to a bare machine -------------------------------------------------------

STATUSES = st.sampled_from([None, 200, 200, 200, 204, 401, 404, 429, 500, 502, 503])


class MachineFuzz(RuleBasedStateMachine):
    @initialize(
        limit=st.integers(1, 3),
        websockets=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
        two=st.booleans(),
    )
    def setup(self, limit: int, websockets: bool, seed: int, two: bool) -> None:
        urls = ["http://a.test", "http://b.test"][: 2 if two else 1]
        self.type_limits = {"gpu": 1}
        machine = WorkerMachine(
            make_settings(
                orchestrators=tuple(Orchestrator(url=u, token="t") for u in urls),
                tasks=TASKS,
                max_concurrent_tasks=limit,
                task_type_limits=self.type_limits,
                websockets=websockets,
                task_timeout=3.0,
                shutdown_timeout=5.0,
            ),
            rng=random.Random(seed),
        )
        self.limit = limit
        self.manual = Manual(machine)
        self.started: set[str] = set()
        self.finished: set[str] = set()
        self.acked: Counter[str] = Counter()
        self.next_id = 0
        self.seen = 0
        self.manual.bring_up()  # polls are out from the first step; later replies are arbitrary

    def effects_since(self) -> list[object]:
        new = self.manual.log[self.seen :]
        self.seen = len(self.manual.log)
        return list(new)

    @invariant()
    def holds(self) -> None:
        if not hasattr(self, "manual"):
            return
        machine = self.manual.machine
        check_slots(machine, self.type_limits)
        stopped = False
        for effect in self.effects_since():
            if isinstance(effect, WorkerStopped):
                stopped = True
            if isinstance(effect, SendRequest) and effect.purpose == "result":
                task_id = json.loads(effect.request.body or b"{}")["task_id"]
                assert task_id not in self.started - self.finished  # never answered while running
            if isinstance(effect, StartHandler):
                assert not self.stopped_before(effect)
                task_id = effect.task.task_id
                assert task_id not in self.started - self.finished  # never two at once
                self.started.add(task_id)
                self.finished.discard(task_id)
        running = self.started - self.finished
        assert len(running) <= self.limit
        if stopped:
            assert machine.state is WorkerState.STOPPED
        deadline = machine.next_deadline()
        assert deadline is None or isinstance(deadline, float)
        assert all(n <= 1 for n in self.acked.values())

    def stopped_before(self, effect: object) -> bool:
        log = self.manual.log
        index = max(i for i, e in enumerate(log) if e is effect)
        return any(isinstance(e, WorkerStopped) for e in log[:index])

    def body_for(self, purpose: str, data: st.DataObject) -> bytes:
        if purpose == "poll":
            kinds = ["task", "task", "dup", "malformed", "malformed-dup", "empty"]
            kind = data.draw(st.sampled_from(kinds))
            if kind == "task" or (kind == "dup" and not (self.started - self.finished)):
                self.next_id += 1
                name = data.draw(st.sampled_from([*TASKS, "nope"]))
                return json.dumps(
                    {"job_id": f"j{self.next_id}", "task_id": f"t{self.next_id}", "type": name}
                ).encode()
            if kind in ("dup", "malformed-dup") and self.started - self.finished:
                task_id = data.draw(st.sampled_from(sorted(self.started - self.finished)))
                task: dict[str, Any] = {"job_id": "j", "task_id": task_id}
                if kind == "dup":
                    task["type"] = "echo"
                return json.dumps(task).encode()
            if kind == "malformed":
                self.next_id += 1  # an identifiable one is answered: give it an id of its own
                missing_type = json.dumps({"job_id": "j", "task_id": f"m{self.next_id}"}).encode()
                return data.draw(st.sampled_from([b"{", b"[]", missing_type]))
            return b""
        if purpose == "heartbeat":
            return data.draw(st.sampled_from([b"null", b"{}", b""]))
        return b'{"status":"ok"}'

    @precondition(lambda self: hasattr(self, "manual") and self.manual.open)
    @rule(data=st.data(), status=STATUSES, retry_after=st.sampled_from([None, "1", "x", "-3"]))
    def answer(self, data: st.DataObject, status: int | None, retry_after: str | None) -> None:
        request: SendRequest = data.draw(
            st.sampled_from(sorted(self.manual.open.values(), key=lambda r: r.request_id))
        )
        if status is None:
            self.manual.fail(request)
            return
        if request.purpose == "result" and 200 <= status < 300:
            body = json.loads(request.request.body or b"{}")
            self.acked[body["task_id"]] += 1
        self.manual.reply(
            request, status, self.body_for(request.purpose, data), retry_after=retry_after
        )

    @precondition(lambda self: hasattr(self, "manual") and self.manual.pending("poll"))
    @rule(data=st.data(), name=st.sampled_from([*TASKS, "nope"]))
    def deliver_task(self, data: st.DataObject, name: str) -> None:
        polls = sorted(self.manual.pending("poll"), key=lambda r: r.request_id)
        poll = data.draw(st.sampled_from(polls))
        self.next_id += 1
        task = {"job_id": f"j{self.next_id}", "task_id": f"t{self.next_id}", "type": name}
        self.manual.reply(poll, 200, task)

    @precondition(
        lambda self: (
            hasattr(self, "manual") and self.manual.pending("poll") and self.started - self.finished
        )
    )
    @rule(data=st.data(), with_type=st.booleans())
    def redeliver_running(self, data: st.DataObject, with_type: bool) -> None:
        """The same task again while it runs, well-formed or without its type."""
        polls = sorted(self.manual.pending("poll"), key=lambda r: r.request_id)
        poll = data.draw(st.sampled_from(polls))
        task_id = data.draw(st.sampled_from(sorted(self.started - self.finished)))
        task = {"job_id": "j", "task_id": task_id}
        if with_type:
            task["type"] = "echo"
        self.manual.reply(poll, 200, task)

    @precondition(lambda self: hasattr(self, "manual") and self.started - self.finished)
    @rule(
        data=st.data(),
        result=st.sampled_from(
            [
                {"status": "success", "data": {"x": 1}},
                {"status": "cancelled"},
                {"status": "failure", "error": {"code": "PERMANENT_ERROR", "message": "m"}},
                {"status": "success", "data": {"bad": float("nan")}},
            ]
        ),
    )
    def finish(self, data: st.DataObject, result: dict[str, Any]) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.started - self.finished)))
        self.finished.add(task_id)
        self.manual.feed(HandlerFinished(task_id=task_id, result=result))

    @precondition(lambda self: hasattr(self, "manual"))
    @rule(seconds=st.sampled_from([0.0, 0.2, 1.0, 4.0, 11.0, 40.0]))
    def time_passes(self, seconds: float) -> None:
        self.manual.timer(self.manual.now + seconds)

    @precondition(lambda self: hasattr(self, "manual"))
    @rule(
        event=st.one_of(
            st.builds(DrainRequested),
            st.builds(CancelRequested, task_id=st.sampled_from(["t1", "t2", "t3", "zz"])),
            st.builds(
                CommandReceived,
                channel=st.integers(0, 2),
                text=st.one_of(
                    st.text(max_size=20),
                    st.sampled_from(['{"command":"cancel_task","task_id":"t1"}']),
                ),
            ),
            st.builds(CommandChannelOpened, channel=st.integers(0, 1)),
            st.builds(CommandChannelClosed, channel=st.integers(0, 1), reason=st.just("x")),
            st.builds(
                ProgressReported,
                task_id=st.sampled_from(["t1", "t2"]),
                progress=st.floats(),
            ),
            st.builds(HotCacheChanged, added=st.just(("m",)), removed=st.just(("m",))),
        )
    )
    def local_event(self, event: Any) -> None:
        if isinstance(event, CommandChannelOpened | CommandChannelClosed):
            if event.channel >= len(self.manual.machine.settings.orchestrators):
                return  # channels the machine never opened: an adapter bug, not an input
            if not of_channel(self.manual.log, event.channel):
                return
        self.manual.feed(event)

    def teardown(self) -> None:
        if not hasattr(self, "manual"):
            return
        manual = self.manual
        manual.feed(DrainRequested())
        manual.feed(DrainRequested())  # cancel whatever runs
        for _ in range(200):
            for task_id in sorted(self.started - self.finished):
                self.finished.add(task_id)
                manual.feed(HandlerFinished(task_id=task_id, result={"status": "cancelled"}))
            for request in sorted(manual.open.values(), key=lambda r: r.request_id):
                if request.purpose == "result":
                    self.acked[json.loads(request.request.body or b"{}")["task_id"]] += 1
                manual.reply(request, 204 if request.purpose == "poll" else 200, b"{}")
            self.holds()
            if manual.machine.state is WorkerState.STOPPED and not manual.open:
                break
            manual.timer(manual.now + 1.0)
        assert manual.machine.state is WorkerState.STOPPED
        slots = manual.machine.snapshot()["slots"]
        assert (slots["held"], slots["polling"]) == (0, 0)


def of_channel(log: list[Any], channel: int) -> bool:
    return any(isinstance(e, OpenCommandChannel) and e.channel == channel for e in log)


TestMachineFuzz = MachineFuzz.TestCase
TestMachineFuzz.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- backoff ------------------------------------------------------------------------------------


@given(
    attempt=st.integers(-5, 10**6),
    base=st.floats(-1.0, 1e3),
    cap=st.floats(-1.0, 1e4),
    retry_after=st.none() | st.floats(0.0, 1e12) | st.just(math.inf),
    seed=st.integers(0, 2**32 - 1),
)
def test_backoff_delay_stays_within_its_bounds(
    attempt: int, base: float, cap: float, retry_after: float | None, seed: int
) -> None:
    delay = backoff_delay(
        attempt, base=base, cap=cap, rng=random.Random(seed), retry_after=retry_after
    )
    floor = 0.0 if retry_after is None else min(retry_after, RETRY_AFTER_LIMIT)
    ceiling = max(min(cap, base * 2.0 ** min(max(attempt, 0), 60)), 0.0)
    assert math.isfinite(delay)
    assert floor <= delay <= max(ceiling, floor)
    assert delay <= max(
        cap, min(retry_after or 0.0, RETRY_AFTER_LIMIT), 0.0
    )  # the documented bound


@given(
    steps=st.lists(
        st.tuples(st.booleans(), st.floats(0.0, 100.0), st.none() | st.floats(0.0, 1e6)),
        max_size=40,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_backoff_state_waits_between_its_bounds(
    steps: list[tuple[bool, float, float | None]], seed: int
) -> None:
    backoff = Backoff(base=0.5, cap=5.0)
    rng = random.Random(seed)
    now = 0.0
    failures = 0
    for failed, dt, retry_after in steps:
        now += dt
        if failed:
            delay = backoff.failed(now, rng, retry_after)
            failures += 1
            assert backoff.not_before == now + delay
            assert not backoff.ready(now) or delay == 0.0
            assert backoff.ready(now + delay)
            assert 0.0 <= delay <= max(5.0, min(retry_after or 0.0, RETRY_AFTER_LIMIT))
        else:
            backoff.succeeded()
            failures = 0
            assert backoff.ready(now)
        assert backoff.failures == failures


# -- the wire parsers never raise ---------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
IDS = st.text(min_size=1, max_size=6) | st.integers() | JSON
TASKISH = st.fixed_dictionaries(
    {},
    optional={
        "job_id": IDS,
        "task_id": IDS,
        "type": st.text(min_size=1, max_size=6) | JSON,
        "priority": JSON,
        "params": JSON,
        "tracing_context": JSON,
        "params_metadata": JSON,
        "command": st.sampled_from(["cancel_task", "other"]) | JSON,
    },
)
NESTED = st.builds(
    lambda depth, opener, closer: opener * depth + closer * depth,
    st.integers(1, 5000),
    st.sampled_from([b"[", b'{"a":']),
    st.sampled_from([b"]", b"}", b""]),
)
BODIES = (
    st.binary(max_size=200)
    | JSON.map(lambda v: json.dumps(v).encode())
    | TASKISH.map(lambda v: json.dumps(v).encode())
    | NESTED
)
STATUS = st.none() | st.sampled_from([200, 200, 201, 204, 404, 429, 500]) | st.integers(-1, 1000)
RETRY_AFTER = st.none() | st.text(max_size=12) | st.floats().map(str)


def documented(method: Any) -> tuple[type, ...]:
    hint = typing.get_type_hints(method)["return"]
    return typing.get_args(hint) or (hint,)


def check_outcome(outcome: Any) -> None:
    assert outcome.kind in ("ok", "retry", "auth", "final")
    assert outcome.retry_after is None or (
        outcome.retry_after >= 0 and not math.isnan(outcome.retry_after)
    )
    assert isinstance(outcome.detail, str)
    assert isinstance(outcome.unknown_worker, bool)


@settings(max_examples=400)
@given(status=STATUS, retry_after=RETRY_AFTER, body=BODIES)
def test_reply_parsers_never_raise_and_return_their_documented_types(
    status: int | None, retry_after: str | None, body: bytes
) -> None:
    for parser in (WireV1.parse_register, WireV1.parse_heartbeat, WireV1.parse_result):
        outcome = parser(status, retry_after, body)
        assert isinstance(outcome, documented(parser))
        check_outcome(outcome)

    parsed = WireV1.parse_poll(status, retry_after, body)
    assert isinstance(parsed, documented(WireV1.parse_poll))
    kind = type(parsed).__name__
    if kind == "NoTask":
        check_outcome(parsed.outcome)  # type: ignore[union-attr]
    elif kind == "MalformedTask":
        assert status is not None and 200 <= status < 300 and status != 204
        assert isinstance(parsed.reason, str)  # type: ignore[union-attr]
        for value in (parsed.job_id, parsed.task_id):  # type: ignore[union-attr]
            assert value is None or (isinstance(value, str) and value)
    else:
        assert status is not None and 200 <= status < 300 and status != 204
        for value in (parsed.job_id, parsed.task_id, parsed.type):  # type: ignore[union-attr]
            assert isinstance(value, str) and value
        assert type(parsed.priority) is int  # type: ignore[union-attr]


@settings(max_examples=400)
@given(text=st.text(max_size=200) | BODIES | TASKISH.map(json.dumps) | NESTED.map(bytes.decode))
def test_parse_command_never_raises(text: str | bytes) -> None:
    parsed = WireV1.parse_command(text)
    assert isinstance(parsed, documented(WireV1.parse_command))
    if type(parsed).__name__ == "CancelCommand":
        assert isinstance(parsed.task_id, str) and parsed.task_id  # type: ignore[union-attr]
        assert parsed.job_id is None or isinstance(parsed.job_id, str)  # type: ignore[union-attr]
    else:
        assert isinstance(parsed.reason, str)  # type: ignore[union-attr]

"""Soak: thousands of tasks through one worker while the orchestrator misbehaves at random.

One worker (``MAX_CONCURRENT_TASKS=8``; handlers of 0-5 ms, async, sync and instant; a few
failures) serves a :class:`~tests.support.fault_orchestrator.FaultOrchestrator` in this
process, on every adapter case, while faults drawn from a seeded ``random.Random`` hit it.
At the end:

* every enqueued task that carries ids got exactly one accepted result, with the right job
  and the right content (``success`` with its own number, or the expected failure); tasks
  without usable ids got none; nothing was left in the queue;
* every task the fake handed out reached the worker (``tasks_received`` matches), every
  accepted result was acknowledged by the worker and none was dropped;
* after the last task, ``worker.snapshot()`` shows ``held == 0``, ``tasks == 0``,
  ``outbox == 0`` and only the slots reserved by the polls that are out;
* open file descriptors (``/proc/self/fd``) at the end are within a small constant of those
  after warm-up, and back to the pre-start count once the worker stopped;
* RSS (``VmRSS`` after ``gc.collect()``) grew by at most a few MiB between the 10 % mark and
  the end.

How long: ``RCA_SOAK_TASKS`` tasks per adapter case. By default a short version (1,500
tasks, 6-13 s per case on a 2-core machine) that CI runs with the other tests;
``RCA_SOAK_TASKS=10000`` is the full soak of the reliability issue (30-50 s per case; its
pytest timeout grows with the count). ``RCA_SOAK_SEED`` replays a run's plan (the tasks and
the faults; the timing is the machine's): the seed is printed at the start and repeated in
every failure message. Select with ``-m soak``; the figures (time, tasks/s, fds, RSS) are
printed (``-s`` shows them), and ``RCA_SOAK_TRACE=1`` adds a line per wave (time, fds by
side of the connection, RSS, the faults of the wave).

``HEARTBEAT_INTERVAL`` is 1 s: after a failed poll (5xx, reset) the worker marks the
orchestrator unhealthy and polls it again only after its next successful heartbeat, so with
the default 15 s a single faulted poll can idle the worker for up to 15 s (a known
behaviour, asserted in tests/core/test_machine.py); here it costs up to 1 s.

The fault mix, and why no task can be lost by the orchestrator rather than the worker:

* poll replies (scripted one-shots, a few per wave of 100 tasks, and now and then a sticky
  ``503`` window of 50-200 ms): 500/502/503, 429 with and without ``Retry-After``,
  malformed JSON, ``null``, a JSON list, 204, a 20 ms delay, and resets before the headers,
  mid-headers and mid-body (sometimes twice in a row, since aiohttp's client silently
  retries an idempotent GET once). A fault action *replaces* the fake's poll handler, the
  only code that takes a task off the queue, so a faulted poll reply never carries a task:
  it cannot lose one;
* result replies: whole waves with ``result_accept_on_try = 2`` (every result is rejected
  with 503 on its first POST), plus scripted 502/503/504, 429, 20 ms delays and resets
  (before the headers, mid-headers, mid-body). No 500: the worker rightly drops a result
  after repeated 500s (1.0b10's "unknown job"), which is not what this test is about. A
  faulted result is never accepted (the action replaces the handler), so the worker must
  retry it;
* connection-level faults, each in its own wave between 15 % and 90 % of the run: two
  ``refuse_connections`` outages (0.2-0.8 s; open connections aborted), one ``restart``
  (0-0.4 s down, forgetting the worker or not) and one ``forget_worker``. An abort can
  destroy a reply the fake already produced: a poll reply carrying a task (the fake loses
  the task) or a result's ``200`` (the worker retries, a duplicate that is not the
  worker's fault). So before each of them the feeder stops enqueueing and results are
  answered ``503`` (never accepted), and the fault fires only once the queue is empty,
  every task handed out has been seen in a result POST (so it reached the worker), no
  result is half-handled (delayed) and the worker has acknowledged every accepted result
  (so every ``200`` reached it). In flight at that moment are parked polls (holding no
  task), heartbeats and results that will not be accepted: nothing an abort can lose or
  duplicate. The worker keeps results in its outbox across the outage.

A few malformed tasks ride along: an unknown type and a missing type (answered with a
failure result) and garbage/non-object bodies (no ids: no result possible).

The orchestrator's records (which grow with every request) are folded into fixed-size
counters and cleared at the end of every wave, when all of the wave's results are in, so
that the RSS figure is the worker's (and this test's steady state), not the fake's logs.
The SDK's log records go to a bounded tally instead of pytest's capture for the same
reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support.fault_orchestrator import (
    Action,
    Delay,
    FaultOrchestrator,
    RawTask,
    Reply,
    Reset,
    make_task,
)
from tests.support.workers import AdapterCase, RunningWorker, serving_worker

SHORT_TASKS = 1500
N_TASKS = int(os.environ.get("RCA_SOAK_TASKS", str(SHORT_TASKS)))
SEED_ENV = os.environ.get("RCA_SOAK_SEED")
TRACE = bool(os.environ.get("RCA_SOAK_TRACE"))
MAX_CONCURRENT = 8
WAVE = 100  # tasks between two harvests of the fake's records
POLL_HOLD = 1.0
# Slack on the open-fd count between two quiet moments of a running worker. Both ends of
# every keep-alive connection count (the fake is in this process), and a client pool keeps
# one connection per request that was out at once: the polls, the heartbeat, and a burst of
# result retries after an outage (the outbox reaches 30-70 results here). Observed: 38-66
# fds at the ends of the waves of a 10,000-task run, with no trend. A leak per task or per
# fault (thousands and hundreds of them) is far beyond.
FD_SLACK = 64
# After the worker stopped, its sockets, loop and pipes are gone: back to the start.
FD_SLACK_STOPPED = 2
RSS_SLACK_KIB = 4 * 1024
WAIT_LIMIT = 30.0  # any single wait of the test (a wave's results, a quiet moment)


pytestmark = [pytest.mark.soak, pytest.mark.anyio]
if N_TASKS > 2000:  # a long soak outlives the global 120 s (10,000 tasks: 30-50 s per case)
    pytestmark.append(pytest.mark.timeout(60.0 + N_TASKS * 0.03))


# -- the plan ---------------------------------------------------------------------------------


@dataclass
class Planned:
    index: int
    kind: str  # a handler name, or unknown_type / missing_type / garbage / not_object
    value: Any  # what is enqueued
    task_id: str | None  # None: no result can come back
    job_id: str | None
    n: int


HANDLER_KINDS = ("async_work", "sync_work", "instant", "failing", "raising")
MALFORMED_WITH_IDS = ("unknown_type", "missing_type")


def plan_tasks(rng: random.Random, count: int) -> list[Planned]:
    out: list[Planned] = []
    for i in range(count):
        roll = rng.random()
        task_id, job_id = f"soak-{i}", f"job-soak-{i}"
        if roll < 0.004:
            kind = "unknown_type"
        elif roll < 0.008:
            kind = "missing_type"
        elif roll < 0.011:
            kind = "garbage"
        elif roll < 0.014:
            kind = "not_object"
        elif roll < 0.024:
            kind = "instant"
        elif roll < 0.064:
            kind = "failing"
        elif roll < 0.069:
            kind = "raising"
        elif roll < 0.32:
            kind = "sync_work"
        else:
            kind = "async_work"
        params = {"n": i, "ms": round(rng.uniform(0.0, 5.0), 3)}
        value: Any
        if kind == "garbage":
            value, task_id, job_id = RawTask('{"job_id": "job-x", "task_id": "soak'), None, None
        elif kind == "not_object":
            value, task_id, job_id = ["soak", i], None, None
        elif kind == "unknown_type":
            value = make_task("no_such_handler", params, job_id=job_id, task_id=task_id)
        elif kind == "missing_type":
            value = make_task("async_work", params, job_id=job_id, task_id=task_id)
            del value["type"]
        else:
            value = make_task(kind, params, job_id=job_id, task_id=task_id)
        out.append(Planned(i, kind, value, task_id, job_id, i))
    return out


POLL_FAULTS: tuple[Callable[[], list[Action]], ...] = (
    lambda: [Reply.error(500)],
    lambda: [Reply.error(502)],
    lambda: [Reply.error(503)],
    lambda: [Reply.rate_limited(None)],
    lambda: [Reply.rate_limited(0.05)],
    lambda: [Reply.malformed_json()],
    lambda: [Reply.null()],
    lambda: [Reply.of_json(["not", "a", "task"])],
    lambda: [Reply.empty(204)],
    lambda: [Delay(0.02)],
    lambda: [Reset.immediately()],
    lambda: [Reset.mid_headers()],
    lambda: [Reset.mid_body()],
    lambda: [Reset.immediately(), Reset.immediately()],
    lambda: [Reset.mid_body(), Reset.mid_body()],
)

RESULT_FAULTS: tuple[Callable[[], list[Action]], ...] = (
    lambda: [Reply.error(502)],
    lambda: [Reply.error(503)],
    lambda: [Reply.error(504)],
    lambda: [Reply.rate_limited(None)],
    lambda: [Reply.rate_limited(0.05)],
    lambda: [Delay(0.02)],
    lambda: [Reset.immediately()],
    lambda: [Reset.mid_headers()],
    lambda: [Reset.mid_body()],
)


@dataclass
class Disruption:
    at: int  # task index before which it fires
    kind: str  # refuse / restart / forget
    seconds: float = 0.0
    forget_workers: bool = False


def plan_disruptions(rng: random.Random, count: int) -> list[Disruption]:
    """Each in its own wave between 15 % and 90 % of the run (or as close as a short run allows).

    A wave ends only once all of its results are in, so no result lives through two of them:
    its backoff (which grows with every failure, up to 30 s) stays short.
    """
    waves = -(-count // WAVE)
    first, last = max(warm_wave(waves), int(waves * 0.15)), max(int(waves * 0.9), 1)
    eligible = list(range(min(first, last - 1), last))
    kinds = ["refuse", "refuse", "restart", "forget"]
    if len(eligible) >= len(kinds):
        chosen = rng.sample(eligible, len(kinds))
    else:
        chosen = rng.choices(eligible, k=len(kinds))
    events = []
    for kind, wave in zip(kinds, chosen, strict=True):
        at = min(wave * WAVE + rng.randrange(WAVE), count - 1)
        if kind == "refuse":
            events.append(Disruption(at, kind, seconds=rng.uniform(0.2, 0.8)))
        elif kind == "restart":
            downtime = rng.uniform(0.0, 0.4)
            events.append(Disruption(at, kind, seconds=downtime, forget_workers=rng.random() < 0.5))
        else:
            events.append(Disruption(at, kind))
    return sorted(events, key=lambda d: d.at)


def warm_wave(waves: int) -> int:
    """The wave after which the warm-up figures are taken: the first to end at 10 % or later."""
    return max(1, -(-waves // 10))


# -- measurements --------------------------------------------------------------------------------


def fd_census() -> Counter[str]:
    """Open fds of this process by kind (socket, pipe, anon_inode, file)."""
    kinds: Counter[str] = Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd of the listing itself, closed meanwhile
            continue
        kinds[target.split(":", 1)[0] if ":" in target else "file"] += 1
    return kinds


def socket_census(port: int) -> Counter[str]:
    """This process's TCP sockets to/from ``port`` by side and state (diagnostics)."""
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    states = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}
    out: Counter[str] = Counter()
    with open("/proc/self/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
            if inode not in inodes:
                continue
            lport, rport = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
            side = "server" if lport == port else "client" if rport == port else "other"
            out[f"{side}:{states.get(state, state)}"] += 1
    return out


def rss_kib() -> int:
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


class LogTally(logging.Handler):
    """Counts the SDK's records by level and keeps the last few, in bounded memory.

    pytest's capture keeps every record until the test ends, which would show up as
    growth in the RSS figure.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.levels: Counter[str] = Counter()
        self.last: deque[str] = deque(maxlen=30)

    def emit(self, record: logging.LogRecord) -> None:
        self.levels[record.levelname] += 1
        with contextlib.suppress(Exception):
            self.last.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:300])


@contextlib.contextmanager
def tallied_sdk_logs() -> Iterator[LogTally]:
    tally = LogTally()
    loggers = [logging.getLogger(name) for name in ("rca_core", "rca_aiohttp", "rca_httpx")]
    saved = [(lg, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(tally)
        lg.propagate = False
    try:
        yield tally
    finally:
        for lg, propagate in saved:
            lg.removeHandler(tally)
            lg.propagate = propagate


# -- the worker ----------------------------------------------------------------------------------


def build_worker(case: AdapterCase, orch: FaultOrchestrator, files: Path, seed: int) -> Any:
    mod = case.module()
    config = mod.WorkerConfig(
        {
            "ORCHESTRATOR_URL": orch.url,
            "WORKER_TOKEN": orch.token,
            "WORKER_ID": f"soak-{case.package}-{case.backend}-{seed}",
            "TASK_FILES_DIR": str(files),
            "MAX_CONCURRENT_TASKS": str(MAX_CONCURRENT),
            "TASK_POLL_TIMEOUT": str(POLL_HOLD),
            "TASK_POLL_ERROR_DELAY": "0.05",
            "RESULT_RETRY_INITIAL_DELAY": "0.05",
            "HEARTBEAT_INTERVAL": "1",
            "SHUTDOWN_TIMEOUT": "10",
        }
    )
    worker = mod.Worker(worker_type="soak", config=config)

    @worker.task("async_work")
    async def async_work(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        await anyio.sleep(params["ms"] / 1000)
        return {"data": {"n": params["n"]}}

    @worker.task("sync_work")
    def sync_work(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        time.sleep(params["ms"] / 1000)
        return {"data": {"n": params["n"]}}

    @worker.task("instant")
    async def instant(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"data": {"n": params["n"]}}

    @worker.task("failing")
    async def failing(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        await anyio.sleep(params["ms"] / 1000)
        return {
            "status": "failure",
            "error": {"code": "PERMANENT_ERROR", "message": f"n={params['n']}"},
        }

    @worker.task("raising")
    def raising(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        raise ValueError(f"soak failure n={params['n']}")

    return worker


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Soak:
    orch: FaultOrchestrator
    rng: random.Random
    seed: int
    case: AdapterCase
    planned: list[Planned]
    tally: LogTally
    runner: RunningWorker | None = None
    # task_id -> accepted results (preallocated: no growth while counting)
    counts: dict[str, int] = field(default_factory=dict)
    by_id: dict[str, Planned] = field(default_factory=dict)
    unexpected: Counter[str] = field(default_factory=Counter)
    bad_content: list[str] = field(default_factory=list)
    accepted_total: int = 0
    dispatched: Counter[str] = field(default_factory=Counter)  # by plan kind
    routes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    rejected_results: int = 0
    unknown_heartbeats: int = 0  # heartbeats the fake answered "unknown worker" (null)
    seen: int = 0  # orch.results already counted
    poll_windows: list[asyncio.Task[None]] = field(default_factory=list)
    disruptions_done: list[str] = field(default_factory=list)
    wave_log: list[str] = field(default_factory=list)  # faults of the current wave (trace)
    peak_outbox: int = 0
    final_snapshot: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for p in self.planned:
            if p.task_id is not None:
                self.counts[p.task_id] = 0
                self.by_id[p.task_id] = p

    def msg(self, text: str) -> str:
        snap = self.final_snapshot or (self.runner.snapshot() if self.runner is not None else {})
        return (
            f"{text}\n  seed={self.seed} (replay: RCA_SOAK_SEED={self.seed} RCA_SOAK_TASKS={N_TASKS})"
            f" case={self.case.id}\n  worker={snap}\n  logs={dict(self.tally.levels)}"
            f" last={list(self.tally.last)[-8:]}"
        )

    # -- counting --------------------------------------------------------------------------------

    def count_new_results(self) -> None:
        results = self.orch.results
        for r in results[self.seen :]:
            planned = self.by_id.get(r.task_id)
            if planned is None:
                self.unexpected[r.task_id] += 1
                continue
            self.counts[r.task_id] += 1
            problem = check_result(planned, r.job_id, r.result)
            if problem and len(self.bad_content) < 20:
                self.bad_content.append(f"{r.task_id}: {problem}: {r.result!r}")
        self.seen = len(results)

    def accepted_so_far(self) -> int:
        return self.accepted_total + len(self.orch.results)

    def harvest(self) -> None:
        """Fold the fake's records into counters and clear them (see the module docstring)."""
        orch = self.orch
        self.count_new_results()
        self.accepted_total += len(orch.results)
        self.rejected_results += len(orch.rejected_results)
        for d in orch.dispatched:
            self.dispatched[self.kind_of(d.task)] += 1
        self.unknown_heartbeats += sum(1 for h in orch.heartbeats if not h.known)
        for rec in orch.requests:
            if rec.status is not None or rec.outcome not in ("pending", "normal"):
                self.routes[(rec.route, rec.action, rec.outcome)] += 1
        assert not orch.swallowed, self.msg(f"the fake swallowed tasks: {orch.swallowed!r}")
        orch.clear(workers=False, tasks=False, faults=False)
        self.seen = 0

    def kind_of(self, value: Any) -> str:
        if isinstance(value, dict) and isinstance(value.get("task_id"), str):
            planned = self.by_id.get(value["task_id"])
            return planned.kind if planned is not None else "unknown"
        if isinstance(value, list):
            return "not_object"
        if isinstance(value, str):
            return "garbage"
        return "unknown"

    # -- waiting ---------------------------------------------------------------------------------

    async def until(
        self, what: str, condition: Callable[[], bool], timeout: float = WAIT_LIMIT
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.runner is not None:
                snap = self.runner.snapshot()
                if snap:
                    self.peak_outbox = max(self.peak_outbox, snap["outbox"])
            if time.monotonic() > deadline:
                raise AssertionError(self.msg(f"timed out after {timeout} s waiting for {what}"))
            if self.runner is not None and self.runner.error is not None:
                raise AssertionError(self.msg(f"the worker died: {self.runner.error!r}"))
            await asyncio.sleep(0.005)

    # -- faults ----------------------------------------------------------------------------------

    def script_faults(self) -> None:
        """A random one-shot poll or result fault, now."""
        if self.rng.random() < 0.5:
            actions = self.rng.choice(POLL_FAULTS)()
            self.orch.script("poll", *actions)
            self.wave_log.append(f"poll:{actions[0]!r}"[:60])
        else:
            actions = self.rng.choice(RESULT_FAULTS)()
            self.orch.script("result", *actions)
            self.wave_log.append(f"result:{actions[0]!r}"[:60])

    async def poll_outage_window(self, seconds: float) -> None:
        self.orch.set_fault("poll", Reply.error(503, "sticky soak fault"))
        try:
            await asyncio.sleep(seconds)
        finally:
            self.orch.set_fault("poll", None)

    def quiet_for_disruption(self) -> bool:
        """Nothing in flight that an aborted connection could lose or duplicate."""
        orch = self.orch
        if orch.pending_tasks():
            return False
        attempted = {
            r.body["task_id"]
            for r in orch.requests
            if r.route == "result"
            and isinstance(r.body, dict)
            and isinstance(r.body.get("task_id"), str)
        }
        for d in orch.dispatched:  # every task handed out reached the worker
            task = d.task
            if isinstance(task, dict) and isinstance(task.get("task_id"), str):
                if task["task_id"] not in attempted:
                    return False
        for r in orch.requests:
            if r.route == "result" and r.status is None and r.outcome in ("pending", "normal"):
                return False  # a delayed result that may still be accepted
        assert self.runner is not None
        acked = self.runner.snapshot()["counters"]["results_acknowledged"]
        return bool(acked == self.accepted_so_far())

    async def disrupt(self, event: Disruption) -> None:
        orch = self.orch
        if event.kind == "forget":
            orch.forget_worker()
            self.disruptions_done.append("forget")
            return
        # From here on no result is accepted until the disruption is over.
        orch.clear_faults("result")
        orch.set_fault("result", Reply.error(503, "soak: disruption ahead"))
        await self.until("a quiet moment for a connection-level fault", self.quiet_for_disruption)
        if event.kind == "refuse":
            await orch.refuse_connections(drop_existing=True)
            await asyncio.sleep(event.seconds)
            await orch.accept_connections()
            self.disruptions_done.append(f"refuse {event.seconds:.2f}s")
        else:
            await orch.restart(downtime=event.seconds, forget_workers=event.forget_workers)
            self.disruptions_done.append(
                f"restart {event.seconds:.2f}s{' forgetting the worker' if event.forget_workers else ''}"
            )
        orch.set_fault("result", None)

    # -- one wave --------------------------------------------------------------------------------

    async def wave(self, tasks: list[Planned], disruptions: deque[Disruption]) -> None:
        orch, rng = self.orch, self.rng
        self.wave_log.clear()
        orch.result_accept_on_try = 2 if rng.random() < 0.15 else 1
        if orch.result_accept_on_try == 2:
            self.wave_log.append("result:accept_on_try=2")
        faults_at = {rng.randrange(len(tasks)) for _ in range(rng.randint(1, 6))}
        if rng.random() < 0.1:
            start = rng.randrange(len(tasks))
            faults_at.add(-1 - start)  # a sticky poll outage window starts there
        i = 0
        while i < len(tasks):
            burst = tasks[i : i + rng.randint(1, 2 * MAX_CONCURRENT)]
            for planned in burst:
                while disruptions and disruptions[0].at <= planned.index:
                    await self.disrupt(disruptions.popleft())
                    self.wave_log.append(self.disruptions_done[-1])
                if i in faults_at:
                    self.script_faults()
                if -1 - i in faults_at:
                    window = asyncio.create_task(self.poll_outage_window(rng.uniform(0.05, 0.2)))
                    self.wave_log.append("poll:sticky 503 window")
                    self.poll_windows.append(window)
                orch.enqueue(planned.value)
                i += 1
            # keep a short backlog, so that polls sometimes park on an empty queue
            await self.until(
                "the queue to shrink", lambda: len(orch.pending_tasks()) <= MAX_CONCURRENT
            )
            pause = rng.choice((0.0, 0.0, 0.0, 0.001, 0.004))
            await asyncio.sleep(pause)
        expecting = [p.task_id for p in tasks if p.task_id is not None]

        def all_in() -> bool:
            self.count_new_results()
            return all(self.counts[t] >= 1 for t in expecting)

        await self.until(f"the results of tasks {tasks[0].index}..{tasks[-1].index}", all_in)
        for window in self.poll_windows:
            await window
        self.poll_windows.clear()
        await self.until("an empty queue", lambda: not orch.pending_tasks())
        self.harvest()


def check_result(planned: Planned, job_id: Any, result: Any) -> str | None:
    if job_id != planned.job_id:
        return f"job_id {job_id!r} != {planned.job_id!r}"
    if not isinstance(result, dict):
        return "not an object"
    status = result.get("status")
    if planned.kind in ("async_work", "sync_work", "instant"):
        if status != "success" or result.get("data") != {"n": planned.n}:
            return "not this task's success"
    elif planned.kind == "failing":
        error = result.get("error") or {}
        if (
            status != "failure"
            or error.get("code") != "PERMANENT_ERROR"
            or f"n={planned.n}" not in str(error.get("message"))
        ):
            return "not this task's failure"
    elif planned.kind == "raising":
        if status != "failure" or (result.get("error") or {}).get("code") != "TRANSIENT_ERROR":
            return "not a TRANSIENT_ERROR"
    elif planned.kind in MALFORMED_WITH_IDS:
        if status != "failure" or (result.get("error") or {}).get("code") != "PERMANENT_ERROR":
            return "not a PERMANENT_ERROR"
    return None


@contextlib.contextmanager
def no_leftover_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep tracing off, as in a worker that did not configure it.

    tests/adapters/test_logs_tracing.py installs a global TracerProvider with in-memory
    exporters that stay attached (OpenTelemetry cannot uninstall a provider): every span
    of this run would pile up there and count as growth.
    """
    try:
        from opentelemetry import trace
    except ImportError:
        yield
        return
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        import rca_core._execution

        monkeypatch.setattr(rca_core._execution, "_tracer", lambda: None)
    yield


async def test_soak(
    adapter_case: AdapterCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip(adapter_case.package)
    if adapter_case.backend == "trio":
        pytest.importorskip("trio")
    seed = int(SEED_ENV) if SEED_ENV else random.SystemRandom().randrange(2**32)
    print(f"\nsoak {adapter_case.id}: seed={seed} tasks={N_TASKS}")
    rng = random.Random(seed)
    planned = plan_tasks(rng, N_TASKS)
    disruptions = deque(plan_disruptions(rng, N_TASKS))
    planned_disruptions = len(disruptions)
    waves = [planned[i : i + WAVE] for i in range(0, N_TASKS, WAVE)]
    warm_mark = warm_wave(len(waves))

    with tallied_sdk_logs() as tally, no_leftover_tracing(monkeypatch):
        async with FaultOrchestrator(poll_hold=POLL_HOLD) as orch:
            soak = Soak(orch, rng, seed, adapter_case, planned, tally)
            worker = build_worker(adapter_case, orch, tmp_path / "files", seed)
            fds_before = fd_census()
            started = time.monotonic()
            async with serving_worker(worker, adapter_case, stop_timeout=30.0) as runner:
                soak.runner = runner
                warm: tuple[float, Counter[str], Counter[str], int] | None = None
                for number, wave_tasks in enumerate(waves, 1):
                    await soak.wave(wave_tasks, disruptions)
                    if number == warm_mark:
                        warm = (time.monotonic(), fd_census(), socket_census(orch.port), rss_kib())
                    if TRACE:
                        print(
                            f"  wave {number}: {time.monotonic() - started:.1f} s"
                            f" fds={fd_census().total()} {dict(socket_census(orch.port))}"
                            f" rss={rss_kib()} KiB peak outbox={soak.peak_outbox} {soak.wave_log}"
                        )
                assert not disruptions, soak.msg(f"disruptions not done: {disruptions}")

                # Drained: nothing running, nothing to send; only the polls are out.
                def drained() -> bool:
                    snap = runner.snapshot()
                    return bool(
                        snap["tasks"] == 0 and snap["outbox"] == 0 and snap["slots"]["held"] == 0
                    )

                await soak.until("the worker to drain", drained)
                end = time.monotonic()
                await asyncio.sleep(0.2)  # a late duplicate would land now
                soak.harvest()
                snap = soak.final_snapshot = runner.snapshot()
                known_at_end = set(orch.worker_records)
                fds_end, sockets_end = fd_census(), socket_census(orch.port)
                rss_end = rss_kib()
            fds_after_stop = fd_census()
            for _ in range(100):  # the fake closes its end of the worker's connections
                if fds_after_stop.total() <= fds_before.total():
                    break
                await asyncio.sleep(0.05)
                fds_after_stop = fd_census()
            sockets_after_stop = socket_census(orch.port)
            soak.harvest()  # anything that arrived while the worker stopped

    assert warm is not None
    warm_time, fds_warm, sockets_warm, rss_warm = warm
    msg = soak.msg

    # -- every task: exactly one result, or provably none ---------------------------------------
    missing = [t for t, n in soak.counts.items() if n == 0]
    duplicates = {t: n for t, n in soak.counts.items() if n > 1}
    assert not missing, msg(f"{len(missing)} task(s) without a result: {missing[:20]}")
    assert not duplicates, msg(
        f"{len(duplicates)} task(s) with duplicate results: {list(duplicates.items())[:20]}"
    )
    assert not soak.unexpected, msg(f"results for tasks never enqueued: {dict(soak.unexpected)}")
    assert not soak.bad_content, msg(f"wrong results: {soak.bad_content}")
    assert soak.accepted_total == len(soak.counts)
    planned_kinds = Counter(p.kind for p in planned)
    assert soak.dispatched == planned_kinds, msg(
        f"handed out {soak.dispatched} != enqueued {planned_kinds}"
    )

    # -- the worker's own accounting ------------------------------------------------------------
    counters = snap["counters"]
    parsed = sum(n for kind, n in planned_kinds.items() if kind in (*HANDLER_KINDS, "unknown_type"))
    assert counters["tasks_received"] == parsed, msg(
        f"tasks handed out {parsed}, received {counters}"
    )
    assert counters["results_acknowledged"] == soak.accepted_total, msg(
        f"acknowledged != accepted {soak.accepted_total}"
    )
    assert counters["results_dropped"] == 0, msg("results dropped")
    slots = snap["slots"]
    polls_out = sum(o["polls"] for o in snap["orchestrators"])
    assert slots["held"] == 0 and snap["tasks"] == 0 and snap["outbox"] == 0, msg(
        "slots or results left over"
    )
    assert not any(slots["running"].values()) and not any(slots["waiting"].values()), msg(
        "type slots left over"
    )
    assert slots["polling"] == polls_out <= MAX_CONCURRENT, msg(
        "poll reservations do not match the polls out"
    )
    assert snap["state"] == "running", msg("not running at the end")
    assert len(soak.disruptions_done) == planned_disruptions, msg("disruptions missing")
    # Forgotten (and restarted) and back: noticed, registered again, known at the end. (A forget
    # right before a restart that forgets too is noticed once: count re-registrations, not forgets.)
    registers = sum(
        n
        for (route, _, outcome), n in soak.routes.items()
        if route == "register" and outcome == "normal"
    )
    assert soak.unknown_heartbeats >= 1 and registers >= 2, msg(
        f"{soak.unknown_heartbeats} unknown-worker heartbeat(s), {registers} registration(s)"
    )
    assert known_at_end == {worker.config.WORKER_ID}, msg(f"the fake knows {known_at_end}")

    # -- resources --------------------------------------------------------------------------------
    fd_growth = fds_end.total() - fds_warm.total()
    rss_growth = rss_end - rss_warm
    injected = Counter(
        f"{route}:{action}"
        for (route, action, _), n in soak.routes.items()
        for _ in range(n)
        if action != "normal"
    )
    after_warm = sum(len(w) for w in waves[warm_mark:])
    print(
        f"soak {adapter_case.id}: {N_TASKS} tasks in {end - started:.1f} s"
        f" ({N_TASKS / (end - started):.0f} tasks/s; {after_warm / (end - warm_time):.0f} after"
        f" warm-up), seed={seed}\n"
        f"  fds: before={fds_before.total()} warm={fds_warm.total()} end={fds_end.total()}"
        f" (growth {fd_growth}) after stop={fds_after_stop.total()}; at the end {dict(fds_end)}\n"
        f"  RSS: warm={rss_warm / 1024:.1f} MiB end={rss_end / 1024:.1f} MiB growth={rss_growth} KiB\n"
        f"  disruptions: {soak.disruptions_done}; registrations: {registers}; results rejected"
        f" by accept_on_try: {soak.rejected_results}\n"
        f"  faults applied: {dict(sorted(injected.items()))}\n"
        f"  worker counters: {counters}; SDK log records: {dict(tally.levels)}; peak outbox {soak.peak_outbox}"
    )
    assert fd_growth <= FD_SLACK, msg(
        f"open fds grew by {fd_growth}: {dict(fds_warm)} {dict(sockets_warm)}"
        f" -> {dict(fds_end)} {dict(sockets_end)}"
    )
    assert fds_after_stop.total() <= fds_before.total() + FD_SLACK_STOPPED, msg(
        f"fds after stop {dict(fds_after_stop)} {dict(sockets_after_stop)}"
        f" vs before start {dict(fds_before)}"
    )
    assert rss_growth <= RSS_SLACK_KIB, msg(f"RSS grew by {rss_growth} KiB after warm-up")

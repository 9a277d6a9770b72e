"""Handlers that misbehave cost their task one clear failure, never the worker; every adapter.

A real worker (``rca_aiohttp`` on asyncio, ``rca_httpx`` on asyncio and trio)
runs against the fault-injecting fake orchestrator over real HTTP on
127.0.0.1. Its handlers raise, hang past ``TASK_TIMEOUT``, return None or
values JSON cannot carry, block the event loop, or are plain functions that
run in threads (and may hang there too). Each such task must get exactly one
result with the right code and a message naming the problem, and the worker
must stay healthy: a normal task afterwards succeeds and no slot leaks.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support.fault_orchestrator import FaultOrchestrator, ResultRecord, make_task
from tests.support.workers import AdapterCase, RunningWorker, await_until, serving_worker

pytestmark = pytest.mark.anyio

TASK_TIMEOUT = 1.0
SOON = 20.0

Factory = Callable[..., Awaitable[FaultOrchestrator]]


class Opaque:
    """An object JSON cannot represent."""


@pytest.fixture
def case(adapter_case: AdapterCase) -> AdapterCase:
    pytest.importorskip(adapter_case.package)
    return adapter_case


def make_worker(case: AdapterCase, orch: FaultOrchestrator, tmp_path: Path, **extra: str) -> Any:
    mod = case.module()
    env = {
        "WORKER_ID": f"handlers-{case.id}",
        "WORKER_HOST": "127.0.0.1",
        "WORKER_PORT": "0",
        "ORCHESTRATOR_URL": orch.url,
        "WORKER_TOKEN": orch.token,
        "HEARTBEAT_INTERVAL": "1",
        "TASK_POLL_ERROR_DELAY": "1",
        "MAX_CONCURRENT_TASKS": "10",
        "SHUTDOWN_TIMEOUT": "10",
        "TASK_FILES_DIR": str(tmp_path / "files"),
        **extra,
    }
    worker = mod.Worker(worker_type="handlers", config=mod.WorkerConfig(env))

    @worker.task("echo")
    async def echo(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"data": {"echo": params}}

    @worker.task("sync_echo")
    def sync_echo(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"data": {"echo": params, "thread": threading.current_thread().name}}

    return worker


async def run_one(
    orch: FaultOrchestrator, task_type: str, params: dict[str, Any] | None = None
) -> ResultRecord:
    task = orch.enqueue(make_task(task_type, params or {}))
    results = await orch.wait_for_results(task["task_id"], timeout=SOON)
    assert len(results) == 1
    return results[0]


def idle(running: RunningWorker) -> bool:
    """No task held, running or waiting, no result pending: every slot is back."""
    snap = running.snapshot()
    slots = snap.get("slots", {})
    return (
        snap.get("tasks") == 0
        and snap.get("outbox") == 0
        and slots.get("held") == 0
        and not any(slots.get("running", {}).values())
        and not any(slots.get("waiting", {}).values())
    )


async def assert_healthy(orch: FaultOrchestrator, running: RunningWorker) -> None:
    """A normal task (async and sync) still succeeds, and every slot is free again."""
    for task_type in ("echo", "sync_echo"):
        record = await run_one(orch, task_type, {"after": True})
        assert record.result["status"] == "success", record.result
        assert record.result["data"]["echo"] == {"after": True}
    await await_until(lambda: idle(running), timeout=10)
    assert running.alive and running.error is None


def failure(record: ResultRecord) -> tuple[str, str]:
    result = record.result
    assert result["status"] == "failure", result
    return result["error"]["code"], result["error"]["message"]


async def test_misbehaving_handlers_get_one_clear_failure_each(
    case: AdapterCase, tmp_path: Path, fault_orchestrator_factory: Factory
) -> None:
    orch = await fault_orchestrator_factory(poll_hold=2.0)
    worker = make_worker(case, orch, tmp_path, TASK_TIMEOUT=str(TASK_TIMEOUT))
    released = threading.Event()
    hang_cancelled = threading.Event()

    @worker.task("raises")
    async def raises(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        raise ValueError("the input was odd: 42")

    @worker.task("hangs")
    async def hangs(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        try:
            await anyio.sleep(60)
        finally:
            hang_cancelled.set()
        return {"data": {}}

    @worker.task("returns_none")
    async def returns_none(params: dict[str, Any], **kwargs: Any) -> None:
        return None

    @worker.task("returns_list")
    async def returns_list(params: dict[str, Any], **kwargs: Any) -> list[int]:
        return [1, 2]

    @worker.task("returns_set")
    async def returns_set(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"data": {"tags": {"a", "b"}}}

    @worker.task("returns_bytes")
    async def returns_bytes(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"data": {"blob": b"\x00\x01"}}

    @worker.task("returns_object")
    async def returns_object(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"data": {"items": [1, Opaque()]}}

    @worker.task("sync_raises")
    def sync_raises(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        raise KeyError("missing-thing")

    @worker.task("sync_returns_set")
    def sync_returns_set(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"data": {"tags": frozenset({1})}}

    @worker.task("sync_hangs")
    def sync_hangs(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        released.wait(30)  # a plain function cannot be stopped; it outlives its timeout
        return {"data": {"late": True}}

    expected: dict[str, tuple[str, list[str]]] = {
        "raises": ("TRANSIENT_ERROR", ["'raises'", "ValueError", "the input was odd: 42"]),
        "hangs": ("TRANSIENT_ERROR", ["'hangs'", "TASK_TIMEOUT=1"]),
        "returns_none": ("PERMANENT_ERROR", ["'returns_none'", "returned None"]),
        "returns_list": ("PERMANENT_ERROR", ["'returns_list'", "list", "expected a dict"]),
        "returns_set": (
            "PERMANENT_ERROR",
            ["'returns_set'", "data['tags'] is a set", "use a list"],
        ),
        "returns_bytes": ("PERMANENT_ERROR", ["'returns_bytes'", "data['blob'] is a bytes"]),
        "returns_object": ("PERMANENT_ERROR", ["'returns_object'", "data['items'][1]", "Opaque"]),
        "sync_raises": ("TRANSIENT_ERROR", ["'sync_raises'", "KeyError", "missing-thing"]),
        "sync_returns_set": (
            "PERMANENT_ERROR",
            ["'sync_returns_set'", "data['tags'] is a frozenset"],
        ),
        "sync_hangs": ("TRANSIENT_ERROR", ["'sync_hangs'", "TASK_TIMEOUT=1"]),
    }
    async with serving_worker(worker, case) as running:
        try:
            tasks = {name: orch.enqueue(make_task(name)) for name in expected}
            for task in tasks.values():
                await orch.wait_for_results(task["task_id"], timeout=SOON)
            # Past the timeouts and then some: a late finish must not add a second result.
            await anyio.sleep(TASK_TIMEOUT + 1.0)
            assert hang_cancelled.is_set(), "the timed-out async handler was not cancelled"
            assert not released.is_set()
            for name, task in tasks.items():
                records = orch.results_for(task["task_id"])
                assert len(records) == 1, (name, records)
                code, message = failure(records[0])
                want_code, fragments = expected[name]
                assert code == want_code, (name, code, message)
                for fragment in fragments:
                    assert fragment in message, (name, fragment, message)
            # The timeouts fired on time, not when the handler happened to end.
            for name in ("hangs", "sync_hangs"):
                dispatched = next(
                    d.time for d in orch.dispatched if d.task["task_id"] == tasks[name]["task_id"]
                )
                took = orch.results_for(tasks[name]["task_id"])[0].time - dispatched
                assert TASK_TIMEOUT * 0.9 <= took < TASK_TIMEOUT + 8, (name, took)

            await assert_healthy(orch, running)
            released.set()  # the abandoned thread ends: still no second result
            await anyio.sleep(0.5)
            assert len(orch.results_for(tasks["sync_hangs"]["task_id"])) == 1
        finally:
            released.set()  # before the worker stops: its thread ends too
    assert not orch.duplicate_results()


async def test_a_handler_that_blocks_the_event_loop(
    case: AdapterCase, tmp_path: Path, fault_orchestrator_factory: Factory
) -> None:
    orch = await fault_orchestrator_factory(poll_hold=2.0)
    worker = make_worker(case, orch, tmp_path, TASK_TIMEOUT="10")
    ticks: list[float] = []

    @worker.task("blocker")
    async def blocker(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        time.sleep(1.0)  # noqa: ASYNC251 - blocks the worker's event loop on purpose
        return {"data": {"blocked": 1.0}}

    @worker.task("ticker")
    async def ticker(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        for _ in range(30):  # 3 s: the blocker surely lands while this runs
            ticks.append(time.monotonic())
            await anyio.sleep(0.1)
        return {"data": {"ticks": 30}}

    async with serving_worker(worker, case) as running:
        tick = orch.enqueue(make_task("ticker"))
        await await_until(lambda: len(ticks) >= 2, timeout=SOON)
        block = orch.enqueue(make_task("blocker"))
        for task in (tick, block):
            await orch.wait_for_results(task["task_id"], timeout=SOON)
        unblocked_at = orch.now()
        assert orch.results_for(block["task_id"])[0].result == {
            "status": "success",
            "data": {"blocked": 1.0},
        }
        assert orch.results_for(tick["task_id"])[0].result["status"] == "success"
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(gaps) >= 0.9, gaps  # the loop really was blocked for about a second
        # The worker carries on: heartbeats resume, tasks run, slots come back.
        await orch.wait_for(lambda: any(h.time > unblocked_at + 0.5 for h in orch.heartbeats), SOON)
        await assert_healthy(orch, running)
    assert not orch.duplicate_results()


async def test_a_sync_handler_runs_in_a_thread_and_the_loop_stays_responsive(
    case: AdapterCase, tmp_path: Path, fault_orchestrator_factory: Factory
) -> None:
    orch = await fault_orchestrator_factory(poll_hold=2.0)
    worker = make_worker(case, orch, tmp_path)
    go_on = threading.Event()
    started = threading.Event()
    seen: dict[str, Any] = {}
    main_threads: set[int] = set()

    @worker.task("sync_sleeper")
    def sync_sleeper(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        seen["thread"] = threading.get_ident()
        started.set()
        seen["released"] = go_on.wait(SOON)
        return {"data": {"slept": True}}

    @worker.task("where")
    async def where(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        main_threads.add(threading.get_ident())
        await anyio.sleep(0.2)
        return {"data": {}}

    async with serving_worker(worker, case) as running:
        try:
            sleeper = orch.enqueue(make_task("sync_sleeper"))
            await anyio.to_thread.run_sync(started.wait, SOON)
            assert started.is_set()
            # While the sync handler is blocked in its thread, async tasks still run.
            for _ in range(3):
                record = await run_one(orch, "where")
                assert record.result["status"] == "success"
            assert orch.results_for(sleeper["task_id"]) == []
            assert seen["thread"] not in main_threads, "the sync handler ran on the event loop"
            go_on.set()
            results = await orch.wait_for_results(sleeper["task_id"], timeout=SOON)
            assert results[0].result == {"status": "success", "data": {"slept": True}}
            assert seen["released"] is True
            await assert_healthy(orch, running)
        finally:
            go_on.set()


async def test_sync_handlers_hung_past_the_timeout_do_not_wedge_the_worker(
    case: AdapterCase, tmp_path: Path, fault_orchestrator_factory: Factory
) -> None:
    """More hung threads than any default thread pool holds (asyncio's: at most 32).

    A plain function cannot be stopped: after ``TASK_TIMEOUT`` its task is
    answered and its slot freed while the thread runs on. Those threads must
    not starve the sync handlers and file operations that come after them.
    """
    hung = 34
    orch = await fault_orchestrator_factory(poll_hold=2.0)
    worker = make_worker(
        case, orch, tmp_path, TASK_TIMEOUT=str(TASK_TIMEOUT), MAX_CONCURRENT_TASKS=str(hung)
    )
    released = threading.Event()
    inside = threading.Semaphore(0)

    @worker.task("sync_stuck")
    def sync_stuck(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        inside.release()
        released.wait(60)
        return {"data": {}}

    async with serving_worker(worker, case) as running:
        try:
            tasks = [orch.enqueue(make_task("sync_stuck")) for _ in range(hung)]
            for task in tasks:
                await orch.wait_for_results(task["task_id"], timeout=SOON)
            for task in tasks:
                code, message = failure(orch.results_for(task["task_id"])[0])
                assert code == "TRANSIENT_ERROR" and "TASK_TIMEOUT=1" in message, message
            # Every hung handler got a thread of its own at once (none queued behind another).
            entered = sum(1 for _ in range(hung) if inside.acquire(timeout=0.1))
            assert entered == hung, f"only {entered} of {hung} sync handlers ever started"
            await assert_healthy(orch, running)
        finally:
            released.set()  # before the worker stops: its threads end too
    assert not orch.duplicate_results()

"""Several orchestrators: FAILOVER and ROUND_ROBIN polling, results routed home; every adapter.

Two (or three) fault-injecting fake orchestrators run in the test's loop over
real HTTP on 127.0.0.1; the worker runs in its own thread and loop (see
``tests/support/workers.py``). What is checked is what the fakes recorded:
which orchestrator got which polls, in which window, and where each result
was accepted. Timing bounds are generous (a loaded 2-core machine); counts
are strict where the count is the point (no poll to the secondary while the
primary is healthy, each result exactly once and only where its task came
from).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support.fault_orchestrator import FaultOrchestrator, make_task
from tests.support.workers import AdapterCase, serving_worker

pytestmark = pytest.mark.anyio

#: How long the fakes park a long poll: short, so that polls return often.
POLL_HOLD = 2.0
#: A generous bound for "within a few seconds" on a loaded machine.
SOON = 15.0

Factory = Callable[..., Awaitable[FaultOrchestrator]]


@pytest.fixture
def case(adapter_case: AdapterCase) -> AdapterCase:
    pytest.importorskip(adapter_case.package)
    return adapter_case


def make_worker(
    case: AdapterCase,
    tmp_path: Path,
    orchestrators: list[dict[str, Any]],
    mode: str,
    **extra: str,
) -> Any:
    mod = case.module()
    env = {
        "WORKER_ID": f"failover-{case.id}",
        "WORKER_HOST": "127.0.0.1",
        "WORKER_PORT": "0",
        "WORKER_TOKEN": orchestrators[0].get("token", "unused"),
        "ORCHESTRATORS_CONFIG": json.dumps(orchestrators),
        "MULTI_ORCHESTRATOR_MODE": mode,
        "HEARTBEAT_INTERVAL": "1",
        "TASK_POLL_ERROR_DELAY": "1",
        "RESULT_RETRY_INITIAL_DELAY": "0.2",
        "MAX_CONCURRENT_TASKS": "2",
        "SHUTDOWN_TIMEOUT": "10",
        "TASK_FILES_DIR": str(tmp_path / "files"),
        **extra,
    }
    worker = mod.Worker(worker_type="failover", config=mod.WorkerConfig(env))

    @worker.task("echo")
    async def echo(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"data": {"echo": params}}

    @worker.task("slow")
    async def slow(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        await anyio.sleep(float(params["seconds"]))
        return {"data": {"slept": params["seconds"]}}

    return worker


def entry(orch: FaultOrchestrator, **fields: Any) -> dict[str, Any]:
    return {"url": orch.url, "token": orch.token, **fields}


def heartbeats(orch: FaultOrchestrator, worker_id: str) -> int:
    return sum(1 for h in orch.heartbeats if h.worker_id == worker_id and h.known)


def dispatched(orch: FaultOrchestrator, task_id: str) -> bool:
    return any(
        isinstance(d.task, dict) and d.task.get("task_id") == task_id for d in orch.dispatched
    )


def first_poll_since(orch: FaultOrchestrator, since: float) -> float:
    return min(r.time for r in orch.requests_for("poll", since=since))


async def test_failover_moves_polls_to_the_secondary_and_back(
    case: AdapterCase, tmp_path: Path, fault_orchestrator_factory: Factory
) -> None:
    primary = await fault_orchestrator_factory(poll_hold=POLL_HOLD, token="primary-token")
    secondary = await fault_orchestrator_factory(poll_hold=POLL_HOLD, token="secondary-token")
    worker = make_worker(
        case,
        tmp_path,
        [entry(primary, priority=1), entry(secondary, priority=2)],
        "FAILOVER",
    )
    wid = worker.config.WORKER_ID
    async with serving_worker(worker, case):
        # Registration and heartbeats go to both; polls only to the primary.
        for orch in (primary, secondary):
            await orch.wait_for(lambda o=orch: wid in o.workers and heartbeats(o, wid) >= 3, SOON)
        assert primary.count("poll") >= 1
        assert secondary.count("poll") == 0, "polled the secondary while the primary was healthy"
        first = primary.enqueue(make_task("echo", {"n": 1}))
        await primary.wait_for_results(first["task_id"], timeout=SOON)

        # The primary goes away: polls move to the secondary, and its tasks run.
        await primary.refuse_connections()
        down_at = primary.now()
        await secondary.wait_for_count("poll", 1, timeout=SOON)
        moved_after = first_poll_since(secondary, down_at) - down_at
        assert moved_after < 10, f"polls moved to the secondary only after {moved_after:.1f}s"
        second = secondary.enqueue(make_task("echo", {"n": 2}))
        await secondary.wait_for_results(second["task_id"], timeout=SOON)
        slow = secondary.enqueue(make_task("slow", {"seconds": 3}))
        await secondary.wait_for(lambda: dispatched(secondary, slow["task_id"]), SOON)

        # The primary is back: polls return to it within seconds, while the task the
        # secondary assigned still runs; its result goes to the secondary.
        await primary.accept_connections()
        up_at = primary.now()
        await primary.wait_for_count("poll", 1, since=up_at, timeout=SOON)
        back_after = first_poll_since(primary, up_at) - up_at
        assert back_after < POLL_HOLD + 8, f"polls came back only after {back_after:.1f}s"
        await secondary.wait_for_results(slow["task_id"], timeout=SOON)

        # Once the polls parked at the secondary have run out, none goes there any more.
        await anyio.sleep(POLL_HOLD + 1.5)
        settled_at = secondary.now()
        third = primary.enqueue(make_task("echo", {"n": 3}))
        await primary.wait_for_results(third["task_id"], timeout=SOON)
        await anyio.sleep(POLL_HOLD + 1.0)
        assert secondary.count("poll", since=settled_at) == 0, "still polling the secondary"
        assert primary.count("poll", since=settled_at) >= 1
        assert heartbeats(secondary, wid) >= 3  # the secondary still hears from the worker

    # Each result exactly once, and only at the orchestrator that assigned its task.
    for home, other, task in (
        (primary, secondary, first),
        (secondary, primary, second),
        (secondary, primary, slow),
        (primary, secondary, third),
    ):
        task_id = task["task_id"]
        assert len(home.results_for(task_id)) == 1, (task["type"], home.results)
        assert home.results_for(task_id)[0].result["status"] == "success"
        assert other.result_attempts[task_id] == 0, f"{task_id} was sent to the wrong orchestrator"
    assert not primary.duplicate_results() and not secondary.duplicate_results()


async def test_a_result_waits_for_the_orchestrator_that_assigned_its_task(
    case: AdapterCase, tmp_path: Path, fault_orchestrator_factory: Factory
) -> None:
    primary = await fault_orchestrator_factory(poll_hold=POLL_HOLD, token="primary-token")
    secondary = await fault_orchestrator_factory(poll_hold=POLL_HOLD, token="secondary-token")
    worker = make_worker(
        case,
        tmp_path,
        [entry(primary, priority=1), entry(secondary, priority=2)],
        "FAILOVER",
    )
    finished = threading.Event()

    @worker.task("tracked")
    async def tracked(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        await anyio.sleep(float(params["seconds"]))
        finished.set()
        return {"data": {"done": True}}

    async with serving_worker(worker, case):
        slow = primary.enqueue(make_task("tracked", {"seconds": 2}))
        await primary.wait_for(lambda: dispatched(primary, slow["task_id"]), SOON)
        # The primary disappears while its task runs; the worker fails over for polling...
        await primary.refuse_connections()
        await secondary.wait_for_count("poll", 1, timeout=SOON)
        other = secondary.enqueue(make_task("echo", {"n": 1}))
        await secondary.wait_for_results(other["task_id"], timeout=SOON)
        await anyio.to_thread.run_sync(finished.wait, SOON)
        assert finished.is_set()
        # ...but the finished task's result waits for the primary, not the secondary.
        await anyio.sleep(2.0)
        assert secondary.result_attempts[slow["task_id"]] == 0
        assert primary.results_for(slow["task_id"]) == []
        await primary.accept_connections()
        await primary.wait_for_results(slow["task_id"], timeout=30)

    assert len(primary.results_for(slow["task_id"])) == 1
    assert primary.results_for(slow["task_id"])[0].result == {
        "status": "success",
        "data": {"done": True},
    }
    assert secondary.result_attempts[slow["task_id"]] == 0
    assert len(secondary.results_for(other["task_id"])) == 1
    assert primary.result_attempts[other["task_id"]] == 0


async def test_failover_when_the_primary_is_down_at_startup(
    case: AdapterCase, tmp_path: Path, fault_orchestrator_factory: Factory
) -> None:
    primary = await fault_orchestrator_factory(poll_hold=POLL_HOLD, token="primary-token")
    secondary = await fault_orchestrator_factory(poll_hold=POLL_HOLD, token="secondary-token")
    await primary.refuse_connections()
    worker = make_worker(
        case,
        tmp_path,
        [entry(primary, priority=1), entry(secondary, priority=2)],
        "FAILOVER",
    )
    wid = worker.config.WORKER_ID
    async with serving_worker(worker, case, wait_ready=None):
        await secondary.wait_for(lambda: heartbeats(secondary, wid) >= 1, SOON)
        await secondary.wait_for_count("poll", 1, timeout=SOON)
        task = secondary.enqueue(make_task("echo", {"n": 1}))
        await secondary.wait_for_results(task["task_id"], timeout=SOON)

        await primary.accept_connections()
        up_at = primary.now()
        await primary.wait_for(lambda: wid in primary.workers, SOON)
        await primary.wait_for_count("poll", 1, since=up_at, timeout=SOON)
        await anyio.sleep(POLL_HOLD + 1.5)
        settled_at = secondary.now()
        await anyio.sleep(POLL_HOLD + 1.0)
        assert secondary.count("poll", since=settled_at) == 0, "still polling the secondary"
        assert primary.count("poll", since=settled_at) >= 1
    assert len(secondary.results_for(task["task_id"])) == 1
    assert primary.result_attempts[task["task_id"]] == 0


async def test_round_robin_shares_polls_by_weight(
    case: AdapterCase, tmp_path: Path, fault_orchestrator_factory: Factory
) -> None:
    hold = 0.4
    heavy = await fault_orchestrator_factory(poll_hold=hold, token="heavy-token")
    light = await fault_orchestrator_factory(poll_hold=hold, token="light-token")
    worker = make_worker(
        case,
        tmp_path,
        # Priorities differ on purpose: ROUND_ROBIN ignores them.
        [entry(heavy, weight=3, priority=1), entry(light, weight=1, priority=2)],
        "ROUND_ROBIN",
        MAX_CONCURRENT_TASKS="4",
    )
    wid = worker.config.WORKER_ID
    async with serving_worker(worker, case):
        for orch in (heavy, light):
            await orch.wait_for(lambda o=orch: heartbeats(o, wid) >= 1, SOON)
        await anyio.sleep(1.0)
        start = heavy.now()
        await anyio.sleep(6.0)
        end = heavy.now()
        tasks = [
            heavy.enqueue(make_task("echo", {"n": 1})),
            light.enqueue(make_task("echo", {"n": 2})),
        ]
        for orch, task in zip((heavy, light), tasks, strict=True):
            await orch.wait_for_results(task["task_id"], timeout=SOON)

    def polls(orch: FaultOrchestrator) -> int:
        return sum(1 for r in orch.requests_for("poll", since=start) if r.time < end)

    n_heavy, n_light = polls(heavy), polls(light)
    assert n_heavy + n_light >= 20, (n_heavy, n_light)  # enough polls to judge the split
    assert n_light >= 5, (n_heavy, n_light)
    ratio = n_heavy / n_light
    assert 2.2 <= ratio <= 4.0, f"polls split {n_heavy}:{n_light} ({ratio:.2f}), expected ~3:1"
    for orch, task in zip((heavy, light), tasks, strict=True):
        assert len(orch.results_for(task["task_id"])) == 1

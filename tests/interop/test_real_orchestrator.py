"""Interop: our workers against the real Avtomatika 1.0b10 orchestrator (Redis, 127.0.0.1).

Each outcome is checked through the orchestrator's own job state, on every
adapter and backend (see tests/support/workers.py).
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from tests.support.orchestrator import (
    CANCELLED_STATE,
    DONE_STATE,
    INTEROP_BLUEPRINT,
    REVIEWED_STATE,
    RealOrchestrator,
)
from tests.support.workers import AdapterCase, running_worker, wait_until

pytestmark = [pytest.mark.orchestrator, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_worker(case: AdapterCase, orch: RealOrchestrator, tmp_path: Any, **kwargs: Any) -> Any:
    mod = case.module()
    config = mod.WorkerConfig({})
    config.WORKER_ID = f"interop-{case.id}-{uuid.uuid4().hex[:8]}"
    config.ORCHESTRATOR_URL = orch.url
    config.WORKER_TOKEN = orch.worker_token
    config.WORKER_ENABLE_WEBSOCKETS = True
    config.TASK_FILES_DIR = str(tmp_path / "files")
    config.SHUTDOWN_TIMEOUT = 10
    return mod.Worker(worker_type="interop", config=config, **kwargs)


@pytest.fixture
def case(adapter_case: AdapterCase) -> AdapterCase:
    pytest.importorskip(adapter_case.package)
    return adapter_case


@dataclass
class Size:
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError("Width and height must be positive.")


async def run_job(
    orch: RealOrchestrator, task: str, params: dict[str, Any], **wait: Any
) -> dict[str, Any]:
    job_id = await orch.create_job(
        INTEROP_BLUEPRINT, {"task": task, "params": params, "timeout_seconds": 60}
    )
    return await orch.wait_for_job(job_id, timeout=wait.pop("timeout", 30), **wait)


async def test_success_and_custom_status(
    case: AdapterCase, real_orchestrator: RealOrchestrator, tmp_path: Any
) -> None:
    worker = make_worker(case, real_orchestrator, tmp_path)

    @worker.task("echo")
    async def echo(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        return {"status": "success", "data": {"echo": params, "job": kwargs["job_id"]}}

    @worker.task("review")
    async def review(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"status": "needs_review", "data": {"reason": "low confidence"}}

    with running_worker(worker, case):
        job = await run_job(real_orchestrator, "echo", {"x": 1}, states=[DONE_STATE])
        assert job["current_state"] == DONE_STATE
        assert job["state_history"]["echo"] == {"x": 1}
        assert job["state_history"]["job"] == job["id"]
        job = await run_job(real_orchestrator, "review", {}, states=[REVIEWED_STATE])
        assert job["state_history"] == {"reason": "low confidence"}


async def test_transient_retried_then_succeeds(
    case: AdapterCase, real_orchestrator: RealOrchestrator, tmp_path: Any
) -> None:
    worker = make_worker(case, real_orchestrator, tmp_path)
    attempts: list[str] = []

    @worker.task("flaky")
    async def flaky(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        attempts.append(kwargs["task_id"])
        if len(attempts) == 1:
            return {
                "status": "failure",
                "error": {"code": "TRANSIENT_ERROR", "message": "try again"},
            }
        return {"status": "success", "data": {"attempt": len(attempts)}}

    with running_worker(worker, case):
        job = await run_job(real_orchestrator, "flaky", {}, states=[DONE_STATE])
    assert job["retry_count"] == 1
    assert job["state_history"] == {"attempt": 2}
    assert len(set(attempts)) == 2  # the orchestrator gives each retry a new task id


async def test_unhandled_exception_is_transient_and_exhausts(
    case: AdapterCase, real_orchestrator: RealOrchestrator, tmp_path: Any
) -> None:
    worker = make_worker(case, real_orchestrator, tmp_path)
    calls = 0

    @worker.task("broken")
    async def broken(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise RuntimeError("database unreachable")

    with running_worker(worker, case):
        job = await run_job(real_orchestrator, "broken", {}, statuses=["quarantined"])
    assert calls == 3  # 1 + JOB_MAX_RETRIES (2)
    assert "database unreachable" in job["error_message"]
    assert "RuntimeError" in job["error_message"]


async def test_permanent_and_invalid_input(
    case: AdapterCase, real_orchestrator: RealOrchestrator, tmp_path: Any
) -> None:
    worker = make_worker(case, real_orchestrator, tmp_path)

    @worker.task("permanent")
    async def permanent(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {
            "status": "failure",
            "error": {"code": "PERMANENT_ERROR", "message": "corrupted file"},
        }

    @worker.task("resize")
    async def resize(params: Size, **kwargs: Any) -> dict[str, Any]:
        return {"data": {"area": params.width * params.height}}

    with running_worker(worker, case):
        job = await run_job(real_orchestrator, "permanent", {}, statuses=["quarantined"])
        assert "corrupted file" in job["error_message"]
        job = await run_job(
            real_orchestrator, "resize", {"width": -1, "height": 2}, statuses=["failed"]
        )
        assert "invalid input" in job["error_message"]
        assert "Width and height must be positive" in job["error_message"]
        job = await run_job(real_orchestrator, "resize", {"width": 3}, statuses=["failed"])
        assert "height" in job["error_message"]
        job = await run_job(
            real_orchestrator, "resize", {"width": 3, "height": 4}, states=[DONE_STATE]
        )
        assert job["state_history"] == {"area": 12}


async def test_cancel_running_task_over_websocket(
    case: AdapterCase, real_orchestrator: RealOrchestrator, tmp_path: Any
) -> None:
    worker = make_worker(case, real_orchestrator, tmp_path)
    started = threading.Event()
    cancelled = threading.Event()

    @worker.task("slow")
    async def slow(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        started.set()
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise
        return {"data": {"finished": True}}

    with running_worker(worker, case) as running:
        wait_until(
            lambda: any(o["command_channel"] for o in running.snapshot().get("orchestrators", [])),
            timeout=10,
        )
        job_id = await real_orchestrator.create_job(
            INTEROP_BLUEPRINT, {"task": "slow", "params": {}, "timeout_seconds": 60}
        )
        await anyio.to_thread.run_sync(lambda: started.wait(15))
        assert started.is_set()
        await real_orchestrator.cancel_job(job_id)
        job = await real_orchestrator.wait_for_job(job_id, states=[CANCELLED_STATE], timeout=15)
        assert cancelled.is_set()
        assert job["current_state"] == CANCELLED_STATE


async def test_one_slot_worker_runs_a_stream_of_jobs(
    case: AdapterCase, real_orchestrator: RealOrchestrator, tmp_path: Any
) -> None:
    """With one slot the worker flips busy/idle per task: no job may fail for it."""
    worker = make_worker(case, real_orchestrator, tmp_path, max_concurrent_tasks=1)
    seen: list[int] = []

    @worker.task("count")
    async def count(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        seen.append(params["n"])
        await anyio.sleep(0.01)
        if params["n"] % 3 == 0 and seen.count(params["n"]) == 1:
            return {"status": "failure", "error": {"code": "TRANSIENT_ERROR", "message": "once"}}
        return {"data": {"n": params["n"]}}

    with running_worker(worker, case):
        ids = []
        for n in range(6):
            ids.append(
                await real_orchestrator.create_job(
                    INTEROP_BLUEPRINT, {"task": "count", "params": {"n": n}, "timeout_seconds": 60}
                )
            )
            await anyio.sleep(0.3)  # a free worker must be idle when each job is dispatched
        jobs = [
            await real_orchestrator.wait_for_job(i, states=[DONE_STATE], timeout=30) for i in ids
        ]
    assert [j["state_history"]["n"] for j in jobs] == list(range(6))

"""The real-orchestrator harness, proven WITHOUT our SDK.

A bare wire worker (a few aiohttp calls, written here from PROTOCOL.md)
drives avtomatika 1.0b10 through every outcome the interop tests rely on,
and each outcome is checked through the orchestrator's own job state.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from tests.support.orchestrator import (
    CANCELLED_STATE,
    DONE_STATE,
    INSTANT_BLUEPRINT,
    INTEROP_BLUEPRINT,
    REVIEWED_STATE,
    START_STATE,
    OrchestratorAPIError,
    OrchestratorFactory,
    RealOrchestrator,
)

pytestmark = [pytest.mark.orchestrator, pytest.mark.anyio]

TASK_KEYS = {"job_id", "task_id", "type", "params", "tracing_context", "params_metadata"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class BareWorker:
    """The smallest worker that speaks the wire protocol: no SDK involved."""

    def __init__(
        self,
        orch: RealOrchestrator,
        session: aiohttp.ClientSession,
        tasks: list[str],
        *,
        websockets: bool = True,
    ) -> None:
        self.orch = orch
        self.session = session
        self.tasks = tasks
        self.websockets = websockets
        self.worker_id = "bare-" + uuid.uuid4().hex[:12]

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Worker-Token": self.orch.worker_token}

    def _url(self, path: str) -> str:
        return self.orch.url + path

    async def register(self) -> None:
        body: dict[str, Any] = {
            "worker_id": self.worker_id,
            "worker_type": "bare-test-worker",
            "supported_tasks": self.tasks,
            "max_concurrent_tasks": 1,
            "cost_per_skill": {},
            "installed_models": [],
            "hostname": socket.gethostname(),
            "ip_address": "127.0.0.1",
            "resources": {"cpu_cores": 1, "gpu_info": None},
            "capabilities": {"websockets": self.websockets},
        }
        async with self.session.post(
            self._url("/_worker/workers/register"), json=body, headers=self.headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"status": "registered"}

    async def heartbeat(self, status: str = "idle") -> Any:
        body: dict[str, Any] = {
            "load": 0 if status == "idle" else 1,
            "status": status,
            "supported_tasks": self.tasks,
            "hot_cache": [],
            "skill_dependencies": {},
            "hot_skills": [],
        }
        async with self.session.patch(
            self._url(f"/_worker/workers/{self.worker_id}"), json=body, headers=self.headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def next_task(self) -> dict[str, Any] | None:
        """One long poll; the client timeout exceeds the server's hold."""
        timeout = aiohttp.ClientTimeout(total=self.orch.settings.poll_timeout + 15)
        async with self.session.get(
            self._url(f"/_worker/workers/{self.worker_id}/tasks/next"),
            headers=self.headers,
            timeout=timeout,
        ) as resp:
            if resp.status == 204:
                return None
            assert resp.status == 200, f"{resp.status}: {await resp.text()}"
            task = await resp.json()
            assert isinstance(task, dict)
            return task

    async def send_result(self, task: dict[str, Any], result: dict[str, Any]) -> None:
        body = {
            "job_id": task["job_id"],
            "task_id": task["task_id"],
            "worker_id": self.worker_id,
            "result": result,
        }
        async with self.session.post(
            self._url("/_worker/tasks/result"), json=body, headers=self.headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"status": "ok"}


@asynccontextmanager
async def bare_worker(
    orch: RealOrchestrator, tasks: list[str], *, websockets: bool = True
) -> AsyncIterator[BareWorker]:
    async with aiohttp.ClientSession() as session:
        worker = BareWorker(orch, session, tasks, websockets=websockets)
        await worker.register()
        record = await worker.heartbeat("idle")
        assert isinstance(record, dict) and record["status"] == "idle"
        yield worker


def failure(code: str, message: str) -> dict[str, Any]:
    return {"status": "failure", "error": {"code": code, "message": message}}


async def test_success_job_ends_in_done_with_the_data(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    async with bare_worker(orch, ["echo"]) as worker:
        job_id = await orch.create_job(
            INTEROP_BLUEPRINT, {"task": "echo", "params": {"text": "hi", "n": 3}}
        )
        task = await worker.next_task()
        assert task is not None
        assert TASK_KEYS <= task.keys()
        assert task["job_id"] == job_id
        assert task["type"] == "echo"
        assert task["params"] == {"text": "hi", "n": 3}

        running = await orch.get_job(job_id)
        assert running["status"] == "waiting_for_worker"
        assert running["current_state"] == START_STATE
        assert running["current_task_id"] == task["task_id"]
        assert running["task_worker_id"] == worker.worker_id

        data = {"echo": {"text": "hi", "n": 3}, "length": 2}
        await worker.send_result(task, {"status": "success", "data": data})
        job = await orch.wait_for_job(job_id, states=[DONE_STATE], timeout=10)

    assert job["current_state"] == DONE_STATE
    assert job["status"] == "running"  # 1.0b10: a finished job keeps "running"
    assert job["state_history"] == data


async def test_custom_status_needs_review(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    async with bare_worker(orch, ["review_me"]) as worker:
        job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "review_me", "params": {}})
        task = await worker.next_task()
        assert task is not None and task["job_id"] == job_id
        await worker.send_result(task, {"status": "needs_review", "data": {"reason": "blurry"}})
        job = await orch.wait_for_job(job_id, timeout=10)
    assert job["current_state"] == REVIEWED_STATE
    assert job["state_history"] == {"reason": "blurry"}


async def test_transient_error_is_retried_then_succeeds(
    real_orchestrator: RealOrchestrator,
) -> None:
    orch = real_orchestrator
    async with bare_worker(orch, ["flaky"]) as worker:
        job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "flaky", "params": {"k": 1}})
        first = await worker.next_task()
        assert first is not None and first["job_id"] == job_id
        await worker.send_result(first, failure("TRANSIENT_ERROR", "try again"))

        second = await worker.next_task()
        assert second is not None and second["job_id"] == job_id
        assert second["type"] == "flaky" and second["params"] == {"k": 1}
        assert second["task_id"] != first["task_id"]  # every attempt gets a new task_id

        await worker.send_result(second, {"status": "success", "data": {"ok": True}})
        job = await orch.wait_for_job(job_id, timeout=10)
    assert job["current_state"] == DONE_STATE
    assert job["state_history"] == {"ok": True}
    assert job["retry_count"] == 1


async def test_transient_error_exhausted_quarantines(
    orchestrator_factory: OrchestratorFactory,
) -> None:
    # A short long-poll hold lets the test prove that no 4th attempt comes.
    orch = orchestrator_factory(poll_timeout=1)
    max_retries = orch.settings.job_max_retries
    async with bare_worker(orch, ["always_flaky"]) as worker:
        job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "always_flaky"})
        task_ids = []
        for _ in range(max_retries + 1):
            task = await worker.next_task()
            assert task is not None and task["job_id"] == job_id
            task_ids.append(task["task_id"])
            await worker.send_result(task, failure("TRANSIENT_ERROR", "still down"))
        job = await orch.wait_for_job(job_id, statuses=["quarantined"], timeout=10)
        assert await worker.next_task() is None  # nothing more is dispatched
    assert len(set(task_ids)) == max_retries + 1
    assert job["current_state"] == START_STATE
    assert job["retry_count"] == max_retries
    assert f"after {max_retries + 1} attempts" in job["error_message"]
    assert "still down" in job["error_message"]
    assert job_id in await orch.get_quarantined_job_ids()


async def test_permanent_error_quarantines(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    async with bare_worker(orch, ["doomed"]) as worker:
        job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "doomed"})
        task = await worker.next_task()
        assert task is not None
        await worker.send_result(task, failure("PERMANENT_ERROR", "never works"))
        job = await orch.wait_for_job(job_id, timeout=10)
    assert job["status"] == "quarantined"
    assert job["current_state"] == START_STATE
    assert "PERMANENT_ERROR" in job["error_message"]
    assert "never works" in job["error_message"]
    assert job_id in await orch.get_quarantined_job_ids()


async def test_invalid_input_error_fails(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    async with bare_worker(orch, ["picky"]) as worker:
        job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "picky", "params": {"x": -1}})
        task = await worker.next_task()
        assert task is not None
        await worker.send_result(task, failure("INVALID_INPUT_ERROR", "x must be >= 0"))
        job = await orch.wait_for_job(job_id, timeout=10)
    assert job["status"] == "failed"
    assert job["current_state"] == START_STATE
    assert "invalid input" in job["error_message"]
    assert "x must be >= 0" in job["error_message"]
    assert job_id not in await orch.get_quarantined_job_ids()


async def test_unhandled_custom_status_fails(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    async with bare_worker(orch, ["odd"]) as worker:
        job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "odd"})
        task = await worker.next_task()
        assert task is not None
        await worker.send_result(task, {"status": "something_else", "data": {"a": 1}})
        job = await orch.wait_for_job(job_id, timeout=10)
    assert job["status"] == "failed"
    assert "unhandled status: something_else" in job["error_message"]
    assert job["state_history"] == {}


async def test_cancel_reaches_worker_over_websocket(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    async with aiohttp.ClientSession() as session:
        worker = BareWorker(orch, session, ["slow"], websockets=True)
        async with session.ws_connect(
            orch.url + f"/_worker/ws/{worker.worker_id}", headers=worker.headers, heartbeat=5
        ) as ws:
            await worker.register()
            await worker.heartbeat("idle")
            job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "slow"})
            task = await worker.next_task()
            assert task is not None and task["job_id"] == job_id
            # The worker is now "running" the task.
            reply = await orch.cancel_job(job_id)
            assert reply == {"status": "cancellation_request_sent"}
            command = await ws.receive_json(timeout=10)
            assert command == {
                "command": "cancel_task",
                "task_id": task["task_id"],
                "job_id": job_id,
            }
            await worker.send_result(task, {"status": "cancelled"})
            job = await orch.wait_for_job(job_id, states=[CANCELLED_STATE], timeout=10)
    assert job["current_state"] == CANCELLED_STATE
    assert job["status"] == "running"


async def test_cancel_of_a_finished_job_is_409(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    job_id = await orch.create_job(INSTANT_BLUEPRINT, {})
    job = await orch.wait_for_job(job_id, timeout=10)
    assert job["current_state"] == DONE_STATE
    with pytest.raises(OrchestratorAPIError) as info:
        await orch.cancel_job(job_id)
    assert info.value.status == 409


async def test_job_without_any_worker_is_quarantined(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "nobody_serves_this"})
    job = await orch.wait_for_job(job_id, timeout=10)
    assert job["status"] == "quarantined"
    assert "No suitable workers" in job["error_message"]


async def test_worker_wire_basics(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    async with aiohttp.ClientSession() as session:
        async with session.post(
            orch.url + "/_worker/workers/register",
            json={"worker_id": "intruder", "supported_tasks": ["x"]},
            headers={"X-Worker-Token": "wrong"},
        ) as resp:
            assert resp.status == 401
        # An unknown worker's heartbeat: 200 with body null (=> register again).
        async with session.patch(
            orch.url + "/_worker/workers/never-registered",
            json={"status": "idle", "load": 0},
            headers={"X-Worker-Token": orch.worker_token},
        ) as resp:
            assert resp.status == 200
            assert await resp.json() is None
    async with bare_worker(orch, ["echo"]) as worker:
        workers = await orch.get_workers()
        assert worker.worker_id in {w["worker_id"] for w in workers}


async def test_restart_keeps_port_and_redis_state(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    async with bare_worker(orch, ["echo"]) as worker:
        job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "echo", "params": {"v": 1}})
        await orch.wait_for_job(job_id, statuses=["waiting_for_worker"], timeout=10)
        old_pid, old_url = orch.pid, orch.url

        await orch.arestart()  # SIGKILL, then start again on the same port

        assert orch.is_running() and orch.pid != old_pid and orch.url == old_url
        # The task queued before the crash is still in Redis for this worker.
        task = await worker.next_task()
        assert task is not None and task["job_id"] == job_id
        await worker.send_result(task, {"status": "success", "data": {"v": 1}})
        job = await orch.wait_for_job(job_id, timeout=10)
    assert job["current_state"] == DONE_STATE
    assert orch.unexpected_exit_code is None


async def test_task_timeout_fails_job(real_orchestrator: RealOrchestrator) -> None:
    orch = real_orchestrator
    async with bare_worker(orch, ["stuck"]) as worker:
        job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "stuck", "timeout_seconds": 1})
        task = await worker.next_task()
        assert task is not None and task["job_id"] == job_id
        # No result: the watcher (interval 1 s here) fails the job.
        job = await orch.wait_for_job(job_id, statuses=["failed"], timeout=10)
    assert job["error_message"] == "Worker task timed out."
    assert job["current_state"] == START_STATE


async def test_quirk_transient_result_needs_an_idle_worker(
    real_orchestrator: RealOrchestrator,
) -> None:
    """1.0b10 re-dispatches a TRANSIENT_ERROR inside the result request: with
    no idle worker for the type, the POST fails with 500 after spending a
    retry, and the job is left waiting with no task queued."""
    orch = real_orchestrator
    async with bare_worker(orch, ["retry_me"]) as worker:
        job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "retry_me"})
        task = await worker.next_task()
        assert task is not None
        await worker.heartbeat("busy")
        body = {
            "job_id": job_id,
            "task_id": task["task_id"],
            "worker_id": worker.worker_id,
            "result": failure("TRANSIENT_ERROR", "later"),
        }
        url = orch.url + "/_worker/tasks/result"
        async with worker.session.post(url, json=body, headers=worker.headers) as resp:
            assert resp.status == 500
            assert "No suitable workers" in (await resp.json())["error"]
        job = await orch.get_job(job_id)
        assert job["status"] == "waiting_for_worker" and job["retry_count"] == 1

        await worker.heartbeat("idle")
        async with worker.session.post(url, json=body, headers=worker.headers) as resp:
            assert resp.status == 200  # the retried POST re-dispatches...
        retry = await worker.next_task()
        assert retry is not None and retry["job_id"] == job_id
        job = await orch.get_job(job_id)
        assert job["retry_count"] == 2  # ...but one failure cost two retries
        await worker.send_result(retry, {"status": "success", "data": {}})
        await orch.wait_for_job(job_id, states=[DONE_STATE], timeout=10)


async def test_quirk_heartbeat_does_not_narrow_dispatch(
    real_orchestrator: RealOrchestrator,
) -> None:
    """Only registration indexes task types; a heartbeat's supported_tasks is
    stored but never consulted by the dispatcher."""
    orch = real_orchestrator
    async with bare_worker(orch, ["a", "b"]) as worker:
        worker.tasks = ["a"]
        record = await worker.heartbeat("idle")
        assert record["supported_tasks"] == ["a"]
        job_id = await orch.create_job(INTEROP_BLUEPRINT, {"task": "b"})
        task = await worker.next_task()
        assert task is not None and task["type"] == "b" and task["job_id"] == job_id
        await worker.send_result(task, {"status": "success", "data": {}})
        await orch.wait_for_job(job_id, states=[DONE_STATE], timeout=10)

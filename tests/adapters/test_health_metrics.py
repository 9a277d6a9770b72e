"""Health, readiness and metrics tell the truth, on every adapter.

The health server runs beside the worker; these tests read it over real HTTP
on 127.0.0.1 while the worker is idle, busy, blocked and draining.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from rca_aiohttp._embedded import EmbeddedOrchestrator
from rca_core.testing import FakeOrchestrator
from tests.support.workers import AdapterCase, await_until, serving_worker

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def case(adapter_case: AdapterCase) -> AdapterCase:
    pytest.importorskip(adapter_case.package)
    return adapter_case


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def make_worker(case: AdapterCase, url: str, token: str, tmp_path: Path) -> Any:
    mod = case.module()
    config = mod.WorkerConfig(
        {
            "WORKER_HOST": "127.0.0.1",
            "WORKER_PORT": "0",
            "HEALTH_BLOCKED_THRESHOLD": "1.0",
            "ORCHESTRATOR_URL": url,
            "WORKER_TOKEN": token,
            "TASK_FILES_DIR": str(tmp_path),
        }
    )
    return mod.Worker(worker_type="health", config=config)


async def test_health_ready_and_metrics(case: AdapterCase, tmp_path: Path) -> None:
    fake = FakeOrchestrator(hold=1.0)
    async with EmbeddedOrchestrator(fake) as orch:
        fake.down = True  # registration fails at first: not ready, but alive
        worker = make_worker(case, orch.url, fake.token, tmp_path)
        release = threading.Event()

        @worker.task("block")
        async def block(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            release.wait(10)  # blocks the worker's event loop on purpose
            return {"data": {}}

        @worker.task("slow")
        async def slow(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            await anyio.sleep(3)
            return {"data": {}}

        @worker.task("quick")
        async def quick(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            return {"status": "needs_review", "data": {}}

        async with serving_worker(worker, case, wait_ready=None, health=True) as running:
            await await_until(lambda: worker.health_port is not None, timeout=10)
            port = worker.health_port

            def fetch(path: str) -> tuple[int, str]:
                return get(port, path)

            await await_until(lambda: fetch("/health")[0] == 200, timeout=10)
            status, body = await anyio.to_thread.run_sync(fetch, "/ready")
            assert status == 503 and json.loads(body)["registered"] is False

            fake.down = False
            await await_until(lambda: fetch("/ready")[0] == 200, timeout=20)
            await orch.submit("quick")
            await orch.wait_for_results(1, within=10)

            await orch.submit("block")
            await await_until(lambda: fetch("/health")[0] == 503, timeout=10)
            status, body = await anyio.to_thread.run_sync(fetch, "/health")
            assert "blocked" in body
            release.set()
            await await_until(lambda: fetch("/health")[0] == 200, timeout=10)
            await orch.wait_for_results(2, within=10)

            await await_until(lambda: "rca_tasks_finished" in fetch("/metrics")[1], timeout=5)
            status, metrics = await anyio.to_thread.run_sync(fetch, "/metrics")
            assert status == 200
            assert 'rca_tasks_finished_total{outcome="needs_review",task="quick"} 1.0' in metrics
            assert 'rca_tasks_finished_total{outcome="success",task="block"} 1.0' in metrics
            assert "rca_handler_duration_seconds_bucket" in metrics
            assert f'rca_orchestrator_healthy{{url="{orch.url}"}} 1.0' in metrics
            assert 'rca_request_duration_seconds_count{kind="result"}' in metrics
            assert 'rca_slots_in_use{kind="limit"} 10.0' in metrics

            await orch.submit("slow")
            await await_until(lambda: json.loads(fetch("/ready")[1])["slots"]["held"] == 1, timeout=10)
            await anyio.to_thread.run_sync(running.request_stop)
            # Draining with a task running: alive, but not ready.
            await await_until(lambda: json.loads(fetch("/ready")[1])["state"] == "draining", timeout=5)
            assert (await anyio.to_thread.run_sync(fetch, "/ready"))[0] == 503
            assert (await anyio.to_thread.run_sync(fetch, "/health"))[0] == 200
            await orch.wait_for_results(3, within=10)

"""SIGTERM drains, a second signal cancels, the process exits 0: on every adapter.

The worker runs as a real process (tests/adapters/worker_app.py) against the
embedded orchestrator on 127.0.0.1; the test sends it real signals by PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rca_aiohttp._embedded import EmbeddedOrchestrator
from rca_core.testing import FakeOrchestrator
from tests.support.workers import AdapterCase

pytestmark = pytest.mark.anyio

APP = Path(__file__).with_name("worker_app.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def case(adapter_case: AdapterCase) -> AdapterCase:
    pytest.importorskip(adapter_case.package)
    return adapter_case


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def wait_for_line(self, prefix: str, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            while True:
                assert self.proc.stdout is not None
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"worker exited before printing {prefix!r}: {self.lines[-20:]}")
                line = raw.decode().rstrip()
                self.lines.append(line)
                if line.startswith(prefix):
                    return line

    async def drain_output(self) -> None:
        assert self.proc.stdout is not None
        rest = await self.proc.stdout.read()
        self.lines.extend(rest.decode().splitlines())

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            await self.drain_output()
            return await self.proc.wait()


async def start_worker(case: AdapterCase, orch: EmbeddedOrchestrator, files: Path, **env: str) -> WorkerProcess:
    environ = {
        **os.environ,
        "RCA_TEST_ADAPTER": case.package,
        "RCA_TEST_BACKEND": case.backend,
        "ORCHESTRATOR_URL": orch.url,
        "WORKER_TOKEN": orch.fake.token,
        "TASK_FILES_DIR": str(files),
        "WORKER_ENABLE_WEBSOCKETS": "true",
        "PYTHONPATH": str(REPO),
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(APP), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=environ
    )
    return WorkerProcess(proc)


async def wait_for(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


async def run_scenario(
    case: AdapterCase, tmp_path: Path, *, seconds: float, signals: int, **env: str
) -> tuple[int, float, dict[str, Any], FakeOrchestrator, WorkerProcess]:
    fake = FakeOrchestrator(hold=5.0)
    async with EmbeddedOrchestrator(fake) as orch:
        worker = await start_worker(case, orch, tmp_path / "files", **env)
        try:
            await wait_for(lambda: fake.heartbeats, timeout=20)
            task_id = await orch.submit("sleep", {"seconds": seconds})
            await worker.wait_for_line("STARTED", timeout=20)
            assert os.listdir(tmp_path / "files"), "the task folder exists while the task runs"
            started = time.monotonic()
            for _ in range(signals):
                worker.signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
            rc = await worker.wait(timeout=40)
            elapsed = time.monotonic() - started
        finally:
            if worker.proc.returncode is None:
                worker.proc.kill()
                await worker.proc.wait()
        results = fake.results_for(task_id)
        assert len(results) == 1, (results, worker.lines[-30:])
        return rc, elapsed, results[0], fake, worker


async def test_sigterm_drains_and_exits_zero(case: AdapterCase, tmp_path: Path) -> None:
    rc, elapsed, result, fake, worker = await run_scenario(
        case, tmp_path, seconds=2.0, signals=1, HEARTBEAT_INTERVAL="0.3"
    )
    assert rc == 0, worker.lines[-30:]
    assert result == {"status": "success", "data": {"slept": 2.0}}
    assert elapsed < 10
    assert os.listdir(tmp_path / "files") == []  # the task folder went with the result
    # Heartbeats went on while draining, saying "busy" (nothing new dispatched).
    busy = [h for h in fake.heartbeats if h["status"] == "busy" and h["supported_tasks"] == []]
    assert len(busy) >= 2, fake.heartbeats[-5:]


async def test_drain_deadline_cancels_and_reports(case: AdapterCase, tmp_path: Path) -> None:
    rc, elapsed, result, _, worker = await run_scenario(
        case, tmp_path, seconds=60.0, signals=1, SHUTDOWN_TIMEOUT="1"
    )
    assert rc == 0, worker.lines[-30:]
    assert result["status"] == "failure"
    assert result["error"]["code"] == "TRANSIENT_ERROR"
    assert "shut down" in result["error"]["message"]
    assert elapsed < 15


async def test_second_signal_cancels_at_once(case: AdapterCase, tmp_path: Path) -> None:
    rc, elapsed, result, _, worker = await run_scenario(
        case, tmp_path, seconds=60.0, signals=2, SHUTDOWN_TIMEOUT="30"
    )
    assert rc == 0, worker.lines[-30:]
    assert result["error"]["code"] == "TRANSIENT_ERROR"
    assert elapsed < 15  # far below the 30 s drain deadline
    assert os.listdir(tmp_path / "files") == []

"""Logs carry task ids and never a secret; handlers are traced; on every adapter."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from rca_aiohttp._embedded import EmbeddedOrchestrator
from rca_core.testing import FakeOrchestrator
from tests.adapters.test_signals import start_worker, wait_for
from tests.support.workers import AdapterCase, serving_worker

pytestmark = pytest.mark.anyio

SECRET = "tok-" + "s3cr3t-" * 4


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def case(adapter_case: AdapterCase) -> AdapterCase:
    pytest.importorskip(adapter_case.package)
    return adapter_case


async def test_json_logs_have_task_ids_and_no_token(case: AdapterCase, tmp_path: Path) -> None:
    fake = FakeOrchestrator(hold=2.0, token=SECRET)
    async with EmbeddedOrchestrator(fake) as orch:
        worker = await start_worker(case, orch, tmp_path / "files", LOG_FORMAT="json")
        try:
            await wait_for(lambda: fake.heartbeats, timeout=20)
            task_id = await orch.submit("leak", {})
            await orch.wait_for_results(1, within=20)
            worker.signal(signal.SIGTERM)
            rc = await worker.wait(timeout=30)
        finally:
            if worker.proc.returncode is None:
                worker.proc.kill()
                await worker.proc.wait()
    output = "\n".join(worker.lines)
    assert rc == 0, output[-3000:]
    assert SECRET not in output
    result = fake.results_for(task_id)[0]
    assert result["error"]["code"] == "TRANSIENT_ERROR"
    assert SECRET not in json.dumps(result) and "***" in result["error"]["message"]
    records = [json.loads(line) for line in worker.lines if line.startswith("{")]
    assert records, output[-2000:]
    mine = [r for r in records if r.get("task_id") == task_id]
    assert any(r["logger"] == "app" and r["message"] == "working on it" for r in mine), mine
    assert any(r["logger"] == "rca_core.worker" and "exception" in r for r in mine), mine
    assert all(r["job_id"] == f"job-{task_id.split('-')[1]}" for r in mine)


async def test_handler_span_continues_the_tasks_trace(case: AdapterCase, tmp_path: Path) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the first test installs the SDK once
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_span = "00f067aa0ba902b7"
    async with EmbeddedOrchestrator(FakeOrchestrator(hold=2.0)) as orch:
        mod = case.module()
        config = mod.WorkerConfig({"ORCHESTRATOR_URL": orch.url, "WORKER_TOKEN": orch.fake.token, "TASK_FILES_DIR": str(tmp_path)})
        worker = mod.Worker(worker_type="traced", config=config)

        @worker.task("traced")
        async def traced(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            return {"status": "failure", "error": {"code": "PERMANENT_ERROR", "message": "no"}}

        async with serving_worker(worker, case):
            await orch.submit("traced", {}, tracing_context={"traceparent": f"00-{trace_id}-{parent_span}-01"})
            await orch.wait_for_results(1, within=10)
    spans = [s for s in exporter.get_finished_spans() if s.name == "task traced"]
    assert len(spans) == 1
    span = spans[0]
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None and format(span.parent.span_id, "016x") == parent_span
    assert span.attributes["rca.error_code"] == "PERMANENT_ERROR"
    assert span.attributes["rca.task_id"] == "task-1"
    exporter.clear()

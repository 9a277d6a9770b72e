"""execute_task and standard_extras: one task, from accepted to its wire result.

``execute_task`` uses no event-loop library of its own, so every scenario that
awaits runs on asyncio and on trio, each with its own ``run_sync`` (a thread
per sync handler, as the adapters do). Handlers, S3 transfers and a tracer
provider are stand-ins that write down how they were called.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from rca_core import (
    INVALID_INPUT_ERROR,
    PERMANENT_ERROR,
    TRANSIENT_ERROR,
    HotCacheChanged,
    ProgressReported,
    Task,
    TaskFailure,
)
from rca_core._app import WorkerDefinition
from rca_core._execution import execute_task, standard_extras
from rca_core._logs import Redactor, TaskContext

SECRET = "tok-9f8e7d6c5b4a"
BACKENDS = ["asyncio", "trio"]


@dataclasses.dataclass
class Resize:
    width: int
    height: int


# -- running one coroutine on either loop -------------------------------------------------------


def run(backend: str, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if backend == "asyncio":
        return asyncio.run(fn())
    return trio.run(fn)


def to_thread(backend: str) -> Callable[[Callable[[], Any]], Awaitable[Any]]:
    if backend == "asyncio":
        return asyncio.to_thread
    return trio.to_thread.run_sync


async def forever(backend: str) -> None:
    if backend == "asyncio":
        await asyncio.Event().wait()
    else:
        await trio.sleep_forever()


def definition() -> WorkerDefinition:
    return WorkerDefinition(
        worker_type=None,
        max_concurrent_tasks=None,
        task_type_limits=None,
        skill_dependencies=None,
        files_types=(),
    )


def make_task(name: str = "echo", params: Any = None, **overrides: Any) -> Task:
    values: dict[str, Any] = {
        "task_id": "task-7",
        "job_id": "job-7",
        "name": name,
        "params": {"x": 1} if params is None else params,
        "priority": 4,
        "tracing_context": {},
        "params_metadata": {"x": {"source": "inline"}},
        "orchestrator_url": "http://orch",
    }
    values.update(overrides)
    return Task(**values)


def current_ids() -> tuple[str, str] | None:
    """The task ids a log line written here would carry."""
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "probe", (), None)
    TaskContext().filter(record)
    if not hasattr(record, "task_id"):
        return None
    return str(record.task_id), str(getattr(record, "job_id", ""))


async def never_called(fn: Callable[[], Any]) -> Any:
    raise AssertionError("run_sync was called for an async handler")


class Executor:
    """``execute_task`` with the adapters' arguments for one backend; ``run(task)`` runs it."""

    def __init__(self, backend: str, worker: WorkerDefinition, **kwargs: Any) -> None:
        self.backend = backend
        self.worker = worker
        self.extras: dict[str, object] = kwargs.pop("extras", {})
        self.kwargs: dict[str, Any] = {
            "task_dir": "/tmp/payloads/task-7",
            "run_sync": to_thread(backend),
            "transfers": None,
            **kwargs,
        }

    def run(self, task: Task) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            return await execute_task(self.worker, task, extras=self.extras, **self.kwargs)

        result = run(self.backend, go)
        assert current_ids() is None  # the task context does not outlive the task
        return result  # type: ignore[no-any-return]


# -- handlers, async and sync ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_handler_gets_its_arguments_and_its_result_is_normalised(backend: str) -> None:
    worker = definition()
    seen: dict[str, Any] = {}

    @worker.task("echo")
    async def echo(
        params: dict[str, Any],
        *,
        task_id: str,
        job_id: str,
        priority: int,
        tracing_context: Any,
        params_metadata: Any,
    ) -> Any:
        seen.update(
            params=params,
            ids=(task_id, job_id),
            priority=priority,
            metadata=params_metadata,
            context=current_ids(),
            thread=threading.get_ident(),
        )
        return {"data": {"echo": params, "tuple": (1, 2)}}

    result = Executor(backend, worker, run_sync=never_called).run(make_task())
    assert result == {"status": "success", "data": {"echo": {"x": 1}, "tuple": [1, 2]}}
    assert seen == {
        "params": {"x": 1},
        "ids": ("task-7", "job-7"),
        "priority": 4,
        "metadata": {"x": {"source": "inline"}},
        "context": ("task-7", "job-7"),
        "thread": threading.get_ident(),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_handler_runs_through_run_sync_with_the_task_context(backend: str) -> None:
    worker = definition()
    seen: dict[str, Any] = {}

    @worker.task("resize")
    def resize(params: Resize, task_id: str) -> dict[str, Any]:
        seen.update(thread=threading.get_ident(), context=current_ids(), task_id=task_id)
        return {"status": "success", "data": {"area": params.width * params.height}}

    calls: list[Callable[[], Any]] = []
    thread_run = to_thread(backend)

    async def run_sync(fn: Callable[[], Any]) -> Any:
        calls.append(fn)
        return await thread_run(fn)

    task = make_task("resize", {"width": 3, "height": 4})
    result = Executor(backend, worker, run_sync=run_sync).run(task)
    assert result == {"status": "success", "data": {"area": 12}}
    assert len(calls) == 1
    assert seen["thread"] != threading.get_ident()  # it ran in a worker thread
    assert seen["context"] == ("task-7", "job-7")  # whose log lines still name the task
    assert seen["task_id"] == "task-7"


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_failure_keeps_its_code_and_message(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    worker = definition()

    @worker.task("echo")
    async def echo(params: dict[str, Any]) -> Any:
        raise TaskFailure(PERMANENT_ERROR, f"cannot open {params['x']}")

    result = Executor(backend, worker).run(make_task())
    assert result == {
        "status": "failure",
        "error": {"code": PERMANENT_ERROR, "message": "cannot open 1"},
    }
    [record] = [r for r in caplog.records if r.name == "rca_core.worker"]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert record.getMessage() == "task task-7 (job job-7) failed: cannot open 1"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_an_unhandled_exception_is_a_transient_error_without_secrets(
    backend: str, sync: bool, caplog: pytest.LogCaptureFixture
) -> None:
    worker = definition()

    def fail(params: dict[str, Any]) -> Any:
        raise ConnectionError(f"POST https://api.example/?key={SECRET} reset")

    async def fail_async(params: dict[str, Any]) -> Any:
        return fail(params)

    worker.task("echo")(fail if sync else fail_async)
    result = Executor(backend, worker, redact=["", SECRET]).run(make_task())
    assert result == {
        "status": "failure",
        "error": {
            "code": TRANSIENT_ERROR,
            "message": "handler 'echo' raised ConnectionError: POST https://api.example/?key=*** reset",
        },
    }
    [record] = [r for r in caplog.records if r.name == "rca_core.worker"]
    assert record.levelname == "ERROR"
    assert record.getMessage() == "task task-7 (job job-7): handler 'echo' raised"
    assert record.exc_info is not None and isinstance(record.exc_info[1], ConnectionError)


def test_with_the_redactor_installed_the_log_line_hides_the_secret_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = definition()

    @worker.task("echo")
    async def echo(params: dict[str, Any]) -> Any:
        raise RuntimeError(f"token {SECRET} refused")

    redactor = Redactor([SECRET])
    redactor.install()  # as the adapters do while a worker runs
    try:
        result = Executor("asyncio", worker, redact=[SECRET]).run(make_task())
    finally:
        redactor.remove()
    assert SECRET not in json.dumps(result)
    assert SECRET not in caplog.text and "RuntimeError: token *** refused" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_that_do_not_bind_are_invalid_input_and_the_handler_never_runs(
    backend: str,
) -> None:
    worker = definition()
    ran: list[object] = []

    @worker.task("resize")
    def resize(params: Resize) -> dict[str, Any]:
        ran.append(params)
        return {}

    result = Executor(backend, worker).run(make_task("resize", {"width": 3, "depth": 1}))
    assert result["status"] == "failure"
    assert result["error"]["code"] == INVALID_INPUT_ERROR
    assert "'resize'" in result["error"]["message"]
    assert "height" in result["error"]["message"] and "depth" in result["error"]["message"]
    assert ran == []

    result = Executor(backend, worker).run(make_task("resize", ["not", "an", "object"]))
    assert result["error"]["code"] == INVALID_INPUT_ERROR


@pytest.mark.parametrize(
    ("returned", "fragment"),
    [
        (None, "returned None"),
        ({"data": {"ids": {1, 2}}}, "data['ids'] is a set"),
        ({"status": "failure"}, "without a valid error"),
    ],
)
def test_a_result_that_breaks_the_contract_is_a_permanent_error(
    returned: Any, fragment: str
) -> None:
    worker = definition()

    @worker.task("echo")
    async def echo(params: dict[str, Any]) -> Any:
        return returned

    result = Executor("asyncio", worker).run(make_task())
    assert result["error"]["code"] == PERMANENT_ERROR
    assert fragment in result["error"]["message"]


# -- S3 transfers -----------------------------------------------------------------------------


class FakeTransfers:
    """Downloads ``s3://`` inputs into the task folder and uploads ``*_file`` outputs."""

    def __init__(
        self,
        *,
        fail_download: BaseException | None = None,
        fail_upload: BaseException | None = None,
    ) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_download = fail_download
        self.fail_upload = fail_upload

    async def download_inputs(self, params: Any, task_dir: Any) -> Any:
        self.calls.append(("download", params, task_dir))
        if self.fail_download is not None:
            raise self.fail_download
        return {
            k: str(task_dir / v.rsplit("/", 1)[-1]) if str(v).startswith("s3://") else v
            for k, v in params.items()
        }

    async def upload_outputs(self, data: Any, task_dir: Any, *, job_id: str, task_id: str) -> Any:
        self.calls.append(("upload", data, task_dir, job_id, task_id))
        if self.fail_upload is not None:
            raise self.fail_upload
        return {
            k: f"s3://results/{job_id}/{task_id}/{Path(v).name}" if k.endswith("_file") else v
            for k, v in data.items()
        }


def s3_worker(returns: Any) -> tuple[WorkerDefinition, list[Any]]:
    worker = definition()
    seen: list[Any] = []

    @worker.task("convert")
    async def convert(params: dict[str, Any]) -> Any:
        seen.append(params)
        return returns

    return worker, seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_transfers_rewrite_the_params_and_the_data(backend: str) -> None:
    worker, seen = s3_worker({"data": {"out_file": "/tmp/payloads/task-7/out.png", "pages": 3}})
    transfers = FakeTransfers()
    task = make_task("convert", {"image": "s3://in/photo.jpg", "scale": 2})
    result = Executor(backend, worker, transfers=transfers, path_type=Path).run(task)

    folder = Path("/tmp/payloads/task-7")
    assert seen == [{"image": str(folder / "photo.jpg"), "scale": 2}]
    assert result == {
        "status": "success",
        "data": {"out_file": "s3://results/job-7/task-7/out.png", "pages": 3},
    }
    assert transfers.calls == [
        ("download", {"image": "s3://in/photo.jpg", "scale": 2}, folder),
        (
            "upload",
            {"out_file": "/tmp/payloads/task-7/out.png", "pages": 3},
            folder,
            "job-7",
            "task-7",
        ),
    ]


@pytest.mark.parametrize("returns", [{}, {"status": "success"}, {"data": None}, {"data": {}}])
def test_nothing_is_uploaded_when_there_is_no_data(returns: dict[str, Any]) -> None:
    worker, _ = s3_worker(returns)
    transfers = FakeTransfers()
    result = Executor("asyncio", worker, transfers=transfers).run(make_task("convert"))
    assert result["status"] == "success"
    assert [c[0] for c in transfers.calls] == ["download"]
    assert transfers.calls[0][2] == "/tmp/payloads/task-7"  # path_type defaults to str


def test_a_failed_download_fails_the_task_before_the_handler() -> None:
    worker, seen = s3_worker({"data": {"x": 1}})
    transfers = FakeTransfers(
        fail_download=TaskFailure(INVALID_INPUT_ERROR, "s3://in/x: no such key")
    )
    result = Executor("trio", worker, transfers=transfers).run(make_task("convert"))
    assert result == {
        "status": "failure",
        "error": {"code": INVALID_INPUT_ERROR, "message": "s3://in/x: no such key"},
    }
    assert seen == [] and [c[0] for c in transfers.calls] == ["download"]


def test_a_failed_upload_is_a_transient_error() -> None:
    worker, seen = s3_worker({"data": {"out_file": "/tmp/x"}})
    transfers = FakeTransfers(fail_upload=OSError(f"endpoint refused key {SECRET}"))
    result = Executor("asyncio", worker, transfers=transfers, redact=[SECRET]).run(
        make_task("convert")
    )
    assert result["error"]["code"] == TRANSIENT_ERROR
    assert (
        result["error"]["message"] == "handler 'convert' raised OSError: endpoint refused key ***"
    )
    assert len(seen) == 1


def test_a_failing_handler_uploads_nothing() -> None:
    worker = definition()

    @worker.task("convert")
    async def convert(params: dict[str, Any]) -> Any:
        raise ValueError("bad page")

    transfers = FakeTransfers()
    result = Executor("asyncio", worker, transfers=transfers).run(make_task("convert"))
    assert result["error"]["code"] == TRANSIENT_ERROR
    assert [c[0] for c in transfers.calls] == ["download"]


# -- cancellation -------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_asyncio_cancellation_propagates(sync: bool, caplog: pytest.LogCaptureFixture) -> None:
    worker = definition()
    outcome: list[object] = []

    async def main() -> None:
        started = asyncio.Event()

        @worker.task("echo")
        async def echo(params: dict[str, Any]) -> Any:
            started.set()
            await forever("asyncio")

        @worker.task("blocking")
        def blocking(params: dict[str, Any]) -> Any:
            return {}

        async def run_sync(fn: Callable[[], Any]) -> Any:  # a thread that never comes back
            started.set()
            await forever("asyncio")

        task = make_task("blocking" if sync else "echo")
        running = asyncio.create_task(
            execute_task(
                worker, task, task_dir="/tmp/t", extras={}, run_sync=run_sync, transfers=None
            )
        )
        await started.wait()
        running.cancel()
        try:
            outcome.append(await running)
        except asyncio.CancelledError:
            outcome.append("cancelled")

    asyncio.run(main())
    assert outcome == ["cancelled"]
    assert not [r for r in caplog.records if r.name == "rca_core.worker"]


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_trio_cancellation_propagates(sync: bool, caplog: pytest.LogCaptureFixture) -> None:
    worker = definition()
    results: list[object] = []

    @worker.task("echo")
    async def echo(params: dict[str, Any]) -> Any:
        await forever("trio")

    @worker.task("blocking")
    def blocking(params: dict[str, Any]) -> Any:
        return {}

    async def run_sync(fn: Callable[[], Any]) -> Any:
        await forever("trio")

    async def main() -> bool:
        task = make_task("blocking" if sync else "echo")
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def one() -> None:
                    results.append(
                        await execute_task(
                            worker,
                            task,
                            task_dir="/tmp/t",
                            extras={},
                            run_sync=run_sync,
                            transfers=None,
                        )
                    )

                nursery.start_soon(one)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        return scope.cancelled_caught

    assert trio.run(main) is True
    assert results == []  # no result was made up for the cancelled task
    assert not [r for r in caplog.records if r.name == "rca_core.worker"]


# -- standard_extras ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_extras_feed_progress_and_hot_cache_events(backend: str) -> None:
    fed: list[object] = []
    worker = definition()

    @worker.task("train")
    async def train(
        params: dict[str, Any],
        *,
        send_progress: Any,
        add_to_hot_cache: Any,
        remove_from_hot_cache: Any,
    ) -> Any:
        await send_progress(0.25, "loading")
        await send_progress("task-7", "job-7", 0.5, "reference SDK form")
        await send_progress(progress=1, message="done")
        add_to_hot_cache("llama-3")
        remove_from_hot_cache("mistral")
        return {"data": {}}

    extras = standard_extras(fed.append, "task-7")
    result = Executor(backend, worker, extras=extras).run(make_task("train"))
    assert result == {"status": "success", "data": {}}
    assert fed == [
        ProgressReported(task_id="task-7", progress=0.25, message="loading"),
        ProgressReported(task_id="task-7", progress=0.5, message="reference SDK form"),
        ProgressReported(task_id="task-7", progress=1.0, message="done"),
        HotCacheChanged(added=("llama-3",)),
        HotCacheChanged(removed=("mistral",)),
    ]


def test_a_bad_progress_call_fails_the_task_not_the_worker() -> None:
    fed: list[object] = []
    worker = definition()

    @worker.task("train")
    async def train(params: dict[str, Any], **kwargs: Any) -> Any:
        await kwargs["send_progress"]("half")
        return {}

    extras = standard_extras(fed.append, "task-7")
    result = Executor("asyncio", worker, extras=extras).run(make_task("train"))
    assert result["error"]["code"] == TRANSIENT_ERROR
    assert "progress must be a number" in result["error"]["message"]
    assert fed == []


# -- tracing ------------------------------------------------------------------------------------


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An SDK tracer provider for this test only, with an in-memory exporter."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    yield exporter
    provider.shutdown()


def traced_worker(result: Any) -> WorkerDefinition:
    worker = definition()

    @worker.task("echo")
    async def echo(params: dict[str, Any]) -> Any:
        return result

    return worker


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_span_continues_the_task_s_trace(backend: str, spans: Any) -> None:
    from opentelemetry.trace import SpanKind, StatusCode

    task = make_task(tracing_context={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"})
    Executor(backend, traced_worker({"data": {"ok": True}})).run(task)
    [span] = spans.get_finished_spans()
    assert span.name == "task echo"
    assert span.kind is SpanKind.CONSUMER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_SPAN
    assert dict(span.attributes) == {
        "rca.task_id": "task-7",
        "rca.job_id": "job-7",
        "rca.task": "echo",
        "rca.result_status": "success",
    }
    assert span.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    ("result", "code"),
    [
        (
            {"status": "failure", "error": {"code": PERMANENT_ERROR, "message": "no"}},
            PERMANENT_ERROR,
        ),
        (None, PERMANENT_ERROR),  # normalised into a failure before the span ends
    ],
)
def test_a_failed_task_marks_its_span_as_an_error(result: Any, code: str, spans: Any) -> None:
    from opentelemetry.trace import StatusCode

    Executor("asyncio", traced_worker(result)).run(make_task(tracing_context=None))
    [span] = spans.get_finished_spans()
    assert span.parent is None  # no tracing context: a trace of its own
    assert span.attributes["rca.result_status"] == "failure"
    assert span.attributes["rca.error_code"] == code
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == code


def test_a_custom_status_is_recorded_as_is(spans: Any) -> None:
    from opentelemetry.trace import StatusCode

    Executor("asyncio", traced_worker({"status": "needs_review"})).run(make_task())
    [span] = spans.get_finished_spans()
    assert span.attributes["rca.result_status"] == "needs_review"
    assert "rca.error_code" not in span.attributes
    assert span.status.status_code is StatusCode.UNSET


def test_no_span_without_a_configured_tracer_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import trace

    started: list[object] = []
    proxy = trace.ProxyTracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: proxy)
    monkeypatch.setattr(trace, "get_tracer", lambda *a, **k: started.append(a))
    result = Executor("asyncio", traced_worker({"data": {}})).run(make_task())
    assert result == {"status": "success", "data": {}}
    assert started == []  # it did not even ask for a tracer


def test_tasks_run_without_opentelemetry_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import opentelemetry fails
    with pytest.raises(ImportError):
        import opentelemetry  # noqa: F401
    for backend in BACKENDS:
        result = Executor(backend, traced_worker({"data": {"n": 1}})).run(make_task())
        assert result == {"status": "success", "data": {"n": 1}}


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def test_an_unprintable_failure_message_still_ends_in_a_result() -> None:
    """The log line about the failure cannot be formatted; the task must still get its result."""
    worker = definition()

    @worker.task("echo")
    async def echo(params: dict[str, Any]) -> Any:
        raise TaskFailure(PERMANENT_ERROR, Unprintable())  # type: ignore[arg-type]

    redactor = Redactor([SECRET])
    redactor.install()  # as it is while a worker runs
    try:
        result = Executor("asyncio", worker).run(make_task())
    finally:
        redactor.remove()
    assert result == {
        "status": "failure",
        "error": {"code": PERMANENT_ERROR, "message": "<unprintable Unprintable>"},
    }

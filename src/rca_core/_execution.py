"""One task, from accepted to its result object: the same steps on every adapter.

The coroutine below uses no event-loop library: everything that depends on
one (running a sync handler in a thread, moving files through S3) is passed
in, so the same code runs on asyncio and on trio. Cancellation is the
adapter's business (a cancelled ``await`` propagates through here untouched).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from ._app import WorkerDefinition, progress_arguments
from ._errors import TaskFailure
from ._events import HotCacheChanged, ProgressReported, Task
from ._logs import reset_current_task, set_current_task
from ._results import exception_result, normalize_result

__all__ = ["Transfers", "execute_task", "standard_extras"]

log = logging.getLogger("rca_core.worker")


class Transfers(Protocol):
    """What an adapter's S3 driver offers (see ``rca_core._s3plan``)."""

    async def download_inputs(self, params: Any, task_dir: Any) -> Any: ...

    async def upload_outputs(
        self, data: Any, task_dir: Any, *, job_id: str, task_id: str
    ) -> Any: ...


async def execute_task(
    definition: WorkerDefinition,
    task: Task,
    *,
    task_dir: str,
    extras: Mapping[str, object],
    run_sync: Callable[[Callable[[], Any]], Awaitable[Any]],
    transfers: Transfers | None,
    path_type: Callable[[str], Any] = str,
    redact: Iterable[str] = (),
) -> dict[str, Any]:
    """Run ``task``'s handler and return the wire result; never raises but for cancellation.

    While it runs, log records carry the task's ids (see ``_logs.TaskContext``),
    and, when an OpenTelemetry tracer provider is installed, a span continues
    the trace of the task's ``tracing_context``.
    """
    token = set_current_task(task.task_id, task.job_id)
    try:
        tracer = _tracer()
        if tracer is None:  # no tracing configured (the usual case): no span to manage
            return await _run(
                definition,
                task,
                task_dir=task_dir,
                extras=extras,
                run_sync=run_sync,
                transfers=transfers,
                path_type=path_type,
                redact=redact,
            )
        with _task_span(tracer, task) as span:
            result = await _run(
                definition,
                task,
                task_dir=task_dir,
                extras=extras,
                run_sync=run_sync,
                transfers=transfers,
                path_type=path_type,
                redact=redact,
            )
            _end_span(span, result)
            return result
    finally:
        reset_current_task(token)


async def _run(
    definition: WorkerDefinition,
    task: Task,
    *,
    task_dir: str,
    extras: Mapping[str, object],
    run_sync: Callable[[Callable[[], Any]], Awaitable[Any]],
    transfers: Transfers | None,
    path_type: Callable[[str], Any],
    redact: Iterable[str],
) -> dict[str, Any]:
    name = task.name
    try:
        params = task.params
        if transfers is not None:
            params = await transfers.download_inputs(params, path_type(task_dir))
        spec, bound, kwargs = definition.prepare(task, params, extras)
        if spec.is_async:
            value = await spec.func(bound, **kwargs)
        else:
            func = spec.func
            value = await run_sync(lambda: func(bound, **kwargs))
        result = normalize_result(value, handler_name=name)
        data = result.get("data")
        if transfers is not None and data:
            uploaded = await transfers.upload_outputs(
                data, path_type(task_dir), job_id=task.job_id, task_id=task.task_id
            )
            result = {**result, "data": uploaded}
        return result
    except TaskFailure as exc:
        log.warning("task %s (job %s) failed: %s", task.task_id, task.job_id, exc.message)
        return exception_result(exc, handler_name=name, redact=redact)
    except Exception as exc:
        log.exception("task %s (job %s): handler %r raised", task.task_id, task.job_id, name)
        return exception_result(exc, handler_name=name, redact=redact)


def standard_extras(feed: Callable[[Any], None], task_id: str) -> dict[str, object]:
    """``send_progress``, ``add_to_hot_cache`` and ``remove_from_hot_cache`` for one task.

    They only feed events to the machine, so they behave the same on every
    adapter; ``send_progress`` is a coroutine function, as in the reference SDK.
    """

    async def send_progress(*args: Any, **kwargs: Any) -> None:
        progress, message = progress_arguments(args, kwargs)
        feed(ProgressReported(task_id=task_id, progress=progress, message=message))

    def add_to_hot_cache(name: str) -> None:
        feed(HotCacheChanged(added=(name,)))

    def remove_from_hot_cache(name: str) -> None:
        feed(HotCacheChanged(removed=(name,)))

    return {
        "send_progress": send_progress,
        "add_to_hot_cache": add_to_hot_cache,
        "remove_from_hot_cache": remove_from_hot_cache,
    }


# -- tracing (optional: only with OpenTelemetry and a configured tracer provider) ----------


def _tracer() -> Any:
    """The tracer to use, or None: no opentelemetry, or no provider configured."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None  # nobody installed an SDK: spans would be dropped anyway
    return trace.get_tracer("rca_worker")


@contextlib.contextmanager
def _task_span(tracer: Any, task: Task) -> Iterator[Any]:
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    carrier = task.tracing_context if isinstance(task.tracing_context, dict) else {}
    parent = extract({str(k): str(v) for k, v in carrier.items()})
    with tracer.start_as_current_span(
        f"task {task.name}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={"rca.task_id": task.task_id, "rca.job_id": task.job_id, "rca.task": task.name},
    ) as span:
        yield span


def _end_span(span: Any, result: Mapping[str, Any]) -> None:
    from opentelemetry.trace import Status, StatusCode

    status = str(result.get("status", "success"))
    span.set_attribute("rca.result_status", status)
    if status == "failure":
        error = result.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        span.set_attribute("rca.error_code", str(code))
        span.set_status(Status(StatusCode.ERROR, str(code)))

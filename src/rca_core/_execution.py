"""One task, from accepted to its result object: the same steps on every adapter.

The coroutine below uses no event-loop library: everything that depends on
one (running a sync handler in a thread, moving files through S3) is passed
in, so the same code runs on asyncio and on trio. Cancellation is the
adapter's business (a cancelled ``await`` propagates through here untouched).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from ._app import WorkerDefinition
from ._errors import TaskFailure
from ._events import Task
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
    """Run ``task``'s handler and return the wire result; never raises but for cancellation."""
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
    from ._app import progress_arguments
    from ._events import HotCacheChanged, ProgressReported

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

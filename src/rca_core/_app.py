"""What a user declares about a worker, shared by every adapter.

``Worker(...)`` and ``@worker.task(...)`` look the same in ``rca_aiohttp`` and
``rca_httpx``; the bookkeeping behind them (handler registry, the mapping from
the validated config to the machine's settings, the handler's arguments) is
written once, here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ._config import ResolvedConfig, WorkerConfig
from ._driver import Driver
from ._events import DrainRequested, Task
from ._machine import MachineSettings, Orchestrator
from ._params import HandlerSpec, bind_params, handler_kwargs, inspect_handler
from ._s3plan import S3Settings

__all__ = ["WorkerDefinition", "WorkerFront", "progress_arguments", "s3_settings"]

log = logging.getLogger("rca_core.worker")

F = TypeVar("F", bound=Callable[..., Any])


class WorkerDefinition:
    """The handlers, limits and skills of one worker, validated when declared."""

    def __init__(
        self,
        *,
        worker_type: str | None,
        max_concurrent_tasks: int | None,
        task_type_limits: Mapping[str, int] | None,
        skill_dependencies: Mapping[str, Sequence[str]] | None,
        files_types: tuple[type, ...],
    ) -> None:
        limits = dict(task_type_limits or {})
        for key, value in limits.items():
            if (
                not isinstance(key, str)
                or isinstance(value, bool)
                or not isinstance(value, int)
                or value < 1
            ):
                raise ValueError(
                    f"task_type_limits[{key!r}]={value!r}: expected a positive integer"
                )
        if max_concurrent_tasks is not None and (
            isinstance(max_concurrent_tasks, bool)
            or not isinstance(max_concurrent_tasks, int)
            or max_concurrent_tasks < 1
        ):
            raise ValueError(
                f"max_concurrent_tasks={max_concurrent_tasks!r}: expected a positive integer"
            )
        deps: dict[str, tuple[str, ...]] = {}
        for skill, models in (skill_dependencies or {}).items():
            if isinstance(models, str) or not all(isinstance(m, str) for m in models):
                raise ValueError(f"skill_dependencies[{skill!r}]: expected a list of model names")
            deps[skill] = tuple(models)
        self.worker_type = worker_type
        self.max_concurrent_tasks = max_concurrent_tasks
        self.task_type_limits = limits
        self.skill_dependencies = deps
        self.files_types = files_types
        self.handlers: dict[str, HandlerSpec] = {}

    def task(self, name: str, task_type: str | None = None) -> Callable[[F], F]:
        """The ``@worker.task(name, task_type=...)`` decorator."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"task name must be a non-empty string, not {name!r}")

        def decorator(func: F) -> F:
            if name in self.handlers:
                raise ValueError(f"a handler for task {name!r} is already registered")
            if task_type is not None and task_type not in self.task_type_limits:
                log.warning(
                    "task %r has type %r, which is not in task_type_limits: only the global "
                    "limit applies to it",
                    name,
                    task_type,
                )
            self.handlers[name] = inspect_handler(
                func, name=name, task_type=task_type, files_types=self.files_types
            )
            return func

        return decorator

    def settings(
        self, config: ResolvedConfig, *, hostname: str, ip_address: str
    ) -> MachineSettings:
        """The machine's settings: the validated config plus what the code declared."""
        worker_type = self.worker_type or config.worker_type
        orchestrators = tuple(
            Orchestrator(
                url=o.url,
                token=o.token or config.worker_individual_token or config.worker_token,
                priority=o.priority,
                weight=o.weight,
            )
            for o in config.orchestrators
        )
        return MachineSettings(
            worker_id=config.worker_id,
            worker_type=worker_type,
            orchestrators=orchestrators,
            tasks={name: spec.task_type for name, spec in self.handlers.items()},
            mode=config.multi_orchestrator_mode,
            max_concurrent_tasks=self.max_concurrent_tasks or config.max_concurrent_tasks,
            task_type_limits=self.task_type_limits,
            skill_dependencies=self.skill_dependencies,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_debounce=config.worker_heartbeat_debounce_delay,
            poll_timeout=config.task_poll_timeout,
            retry_base=min(0.5, config.task_poll_error_delay),
            retry_cap=config.task_poll_error_delay,
            result_retry_base=config.result_retry_initial_delay,
            result_max_retries=config.result_max_retries,
            shutdown_timeout=config.shutdown_timeout,
            task_timeout=config.task_timeout,
            outbox_limit=config.result_outbox_limit,
            max_parallel_polls=config.max_parallel_polls,
            websockets=config.worker_enable_websockets,
            cost_per_skill=config.cost_per_skill,
            installed_models=config.installed_models,
            installed_software=config.installed_software,
            hostname=hostname,
            ip_address=ip_address,
            cpu_cores=config.cpu_cores,
            gpu_model=config.gpu_model,
            gpu_vram_gb=config.gpu_vram_gb,
        )

    def prepare(
        self, task: Task, params: Any, extras: Mapping[str, object]
    ) -> tuple[HandlerSpec, object, dict[str, object]]:
        """The handler, its bound params and its keyword arguments (TaskFailure if unbindable)."""
        spec = self.handlers[task.name]
        bound = bind_params(spec, params)
        available: dict[str, object] = {
            "task_id": task.task_id,
            "job_id": task.job_id,
            "priority": task.priority,
            "tracing_context": task.tracing_context,
            "params_metadata": task.params_metadata,
            **extras,
        }
        return spec, bound, handler_kwargs(spec, available)


def progress_arguments(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[float, str]:
    """``send_progress`` arguments, in our form or the reference SDK's.

    Ours: ``send_progress(0.5, "message")``. The reference SDK's handlers call
    ``send_progress(task_id, job_id, 0.5, "message")``; both are accepted so that
    migrated handlers keep working (the ids are the task's own either way).
    """
    if args and isinstance(args[0], str):
        args = args[2:]
    progress = kwargs.get("progress", args[0] if args else None)
    message = kwargs.get("message", args[1] if len(args) > 1 else "")
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        raise TypeError(f"send_progress: progress must be a number, not {progress!r}")
    return float(progress), str(message)


def s3_settings(config: ResolvedConfig) -> S3Settings | None:
    """The S3 settings, or None when S3 is not configured.

    S3 counts as configured when ``S3_ENDPOINT_URL`` or ``S3_ACCESS_KEY`` is
    set; without either, an ``s3://`` input fails its task clearly instead of
    reaching the handler as a string.
    """
    if not (config.s3_endpoint_url or config.s3_access_key):
        return None
    return S3Settings(
        endpoint_url=config.s3_endpoint_url,
        access_key=config.s3_access_key,
        secret_key=config.s3_secret_key,
        region=config.s3_region,
        default_bucket=config.s3_default_bucket,
        key_prefix=config.s3_key_prefix,
        max_concurrency=config.s3_max_concurrency,
    )


class WorkerFront:
    """The public face both adapters' ``Worker`` share: constructor, decorator, stop.

    Adapters subclass it, set :attr:`files_type` to their ``TaskFiles`` and add
    ``serve()``/``run()``; while serving they keep their driver in ``_driver``.
    """

    files_type: type

    def __init__(
        self,
        worker_type: str | None = None,
        max_concurrent_tasks: int | None = None,
        task_type_limits: Mapping[str, int] | None = None,
        skill_dependencies: Mapping[str, Sequence[str]] | None = None,
        config: WorkerConfig | None = None,
    ) -> None:
        self._config = config if config is not None else WorkerConfig()
        self._definition = WorkerDefinition(
            worker_type=worker_type,
            max_concurrent_tasks=max_concurrent_tasks,
            task_type_limits=task_type_limits,
            skill_dependencies=skill_dependencies,
            files_types=(self.files_type,),
        )
        self.health_port: int | None = None
        self._driver: Driver | None = None
        self._stop_early = False

    @property
    def config(self) -> WorkerConfig:
        return self._config

    def task(self, name: str, task_type: str | None = None) -> Callable[[F], F]:
        """Register the decorated function as the handler of task ``name``."""
        return self._definition.task(name, task_type)

    def snapshot(self) -> dict[str, Any]:
        """The machine's state (slots, orchestrators, counters); empty before start."""
        driver = self._driver
        return driver.machine.snapshot() if driver is not None else {}

    async def stop(self) -> None:
        """Drain: take no new tasks, let running ones finish (SHUTDOWN_TIMEOUT), report, stop.

        A second call cancels what is still running. Call it from the worker's
        own event loop (from another thread: the loop's thread-safe call).
        """
        if self._driver is None:
            self._stop_early = True
        else:
            self._driver.feed(DrainRequested(reason="stop() called"))

"""WorkerDefinition and progress_arguments: what every adapter's ``Worker`` is built on.

``rca_core._app`` is the adapters' shared layer (``rca_aiohttp.Worker`` and the
httpx adapter construct a ``WorkerDefinition``), so it is tested here directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pytest

from rca_core import FAILOVER, INVALID_INPUT_ERROR, Orchestrator, Task, TaskFailure
from rca_core._app import WorkerDefinition, progress_arguments, s3_settings
from rca_core._config import WorkerConfig


def definition(**overrides: Any) -> WorkerDefinition:
    values: dict[str, Any] = {
        "worker_type": None,
        "max_concurrent_tasks": None,
        "task_type_limits": None,
        "skill_dependencies": None,
        "files_types": (),
    }
    values.update(overrides)
    return WorkerDefinition(**values)


def task(name: str = "echo", params: Any = None) -> Task:
    return Task(
        task_id="t-1",
        job_id="j-1",
        name=name,
        params=params,
        priority=3,
        tracing_context={"trace": "x"},
        params_metadata={"m": 1},
        orchestrator_url="http://o",
    )


# -- declaration ------------------------------------------------------------------------------


@pytest.mark.parametrize("limits", [{1: 2}, {"gpu": True}, {"gpu": 0}, {"gpu": "2"}, {"gpu": 1.0}])
def test_task_type_limits_must_be_positive_integers(limits: dict[Any, Any]) -> None:
    with pytest.raises(ValueError, match="task_type_limits"):
        definition(task_type_limits=limits)


@pytest.mark.parametrize("value", [True, 0, -1, "3", 2.0])
def test_max_concurrent_tasks_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(ValueError, match="max_concurrent_tasks"):
        definition(max_concurrent_tasks=value)


@pytest.mark.parametrize("deps", [{"asr": "whisper"}, {"asr": ["whisper", 3]}])
def test_skill_dependencies_must_be_lists_of_names(deps: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"skill_dependencies\['asr'\]"):
        definition(skill_dependencies=deps)


def test_a_valid_declaration_is_kept() -> None:
    d = definition(
        worker_type="gpu",
        max_concurrent_tasks=4,
        task_type_limits={"gpu": 2},
        skill_dependencies={"asr": ["whisper", "vad"]},
    )
    assert d.worker_type == "gpu"
    assert d.max_concurrent_tasks == 4
    assert d.task_type_limits == {"gpu": 2}
    assert d.skill_dependencies == {"asr": ("whisper", "vad")}
    assert d.handlers == {}


@pytest.mark.parametrize("name", ["", 5, None])
def test_a_task_needs_a_name(name: object) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        definition().task(name)  # type: ignore[arg-type]


def test_the_decorator_registers_and_returns_the_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = definition(task_type_limits={"gpu": 1})

    async def render(params: dict[str, Any]) -> dict[str, Any]:
        return params

    async def echo(params: dict[str, Any]) -> dict[str, Any]:
        return params

    with caplog.at_level(logging.WARNING, "rca_core.worker"):
        assert d.task("render", task_type="gpu")(render) is render
        assert d.task("echo")(echo) is echo
    assert caplog.records == []
    assert d.handlers["render"].task_type == "gpu"
    assert d.handlers["echo"].task_type is None
    with pytest.raises(ValueError, match="already registered"):
        d.task("echo")(echo)


def test_a_type_without_a_limit_is_allowed_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = definition(task_type_limits={"gpu": 1})
    with caplog.at_level(logging.WARNING, "rca_core.worker"):
        d.task("encode", task_type="cpu")(lambda params: params)
    assert "task 'encode' has type 'cpu', which is not in task_type_limits" in caplog.text
    assert d.handlers["encode"].task_type == "cpu"


# -- settings -----------------------------------------------------------------------------------


ENV = {
    "WORKER_ID": "w-9",
    "WORKER_TYPE": "from-env",
    "WORKER_TOKEN": "tok",
    "ORCHESTRATORS_CONFIG": json.dumps(
        [
            {"url": "http://a", "priority": 1},
            {"url": "http://b", "priority": 2, "weight": 3, "token": "own"},
        ]
    ),
    "MAX_CONCURRENT_TASKS": "7",
    "TASK_TIMEOUT": "12",
    "TASK_POLL_ERROR_DELAY": "0.2",
    "WORKER_ENABLE_WEBSOCKETS": "true",
    "GPU_MODEL": "L4",
    "GPU_VRAM_GB": "24",
}


def test_settings_combine_the_config_and_the_declaration() -> None:
    d = definition(task_type_limits={"gpu": 1}, skill_dependencies={"asr": ["whisper"]})
    d.task("render", task_type="gpu")(lambda params: params)
    d.task("echo")(lambda params: params)
    config = WorkerConfig(environ=ENV).resolve()
    settings = d.settings(config, hostname="box", ip_address="10.0.0.1")

    assert settings.worker_id == "w-9"
    assert settings.worker_type == "from-env"
    assert settings.orchestrators == (
        Orchestrator(url="http://a", token="tok", priority=1, weight=1),
        Orchestrator(url="http://b", token="own", priority=2, weight=3),
    )
    assert settings.tasks == {"render": "gpu", "echo": None}
    assert settings.mode == FAILOVER
    assert settings.max_concurrent_tasks == 7
    assert settings.task_type_limits == {"gpu": 1}
    assert settings.skill_dependencies == {"asr": ("whisper",)}
    assert settings.task_timeout == 12.0
    assert settings.retry_base == 0.2  # never above the configured poll error delay
    assert settings.retry_cap == 0.2
    assert settings.websockets is True
    assert (settings.hostname, settings.ip_address) == ("box", "10.0.0.1")
    assert (settings.gpu_model, settings.gpu_vram_gb) == ("L4", 24)
    expected = {
        "heartbeat_interval": config.heartbeat_interval,
        "heartbeat_debounce": config.worker_heartbeat_debounce_delay,
        "poll_timeout": config.task_poll_timeout,
        "result_retry_base": config.result_retry_initial_delay,
        "result_max_retries": config.result_max_retries,
        "shutdown_timeout": config.shutdown_timeout,
        "outbox_limit": config.result_outbox_limit,
        "max_parallel_polls": config.max_parallel_polls,
        "cost_per_skill": config.cost_per_skill,
        "installed_models": config.installed_models,
        "installed_software": config.installed_software,
        "cpu_cores": config.cpu_cores,
    }
    assert {k: getattr(settings, k) for k in expected} == expected


def test_the_code_s_declaration_wins_over_the_environment() -> None:
    d = definition(worker_type="declared", max_concurrent_tasks=2)
    config = WorkerConfig(environ={**ENV, "TASK_POLL_ERROR_DELAY": "9"}).resolve()
    settings = d.settings(config, hostname="h", ip_address="i")
    assert settings.worker_type == "declared"
    assert settings.max_concurrent_tasks == 2
    assert settings.retry_base == 0.5
    assert settings.retry_cap == 9.0
    assert dataclasses.replace(settings, tasks={}) == settings  # a plain, valid settings object


# -- per task -----------------------------------------------------------------------------------


def test_prepare_binds_params_and_picks_the_declared_keywords() -> None:
    d = definition()

    async def echo(params: dict[str, Any], task_id: str, priority: int) -> None:
        return None

    d.task("echo")(echo)
    spec, bound, kwargs = d.prepare(task(params={"x": 1}), {"x": 1}, {"send_progress": print})
    assert spec.func is echo
    assert bound == {"x": 1}
    assert kwargs == {"task_id": "t-1", "priority": 3}


def test_prepare_gives_var_keyword_handlers_everything() -> None:
    d = definition()

    async def legacy(params: dict[str, Any], **kwargs: Any) -> None:
        return None

    d.task("legacy")(legacy)
    _, _, kwargs = d.prepare(task("legacy"), {}, {"send_progress": print})
    assert kwargs == {
        "task_id": "t-1",
        "job_id": "j-1",
        "priority": 3,
        "tracing_context": {"trace": "x"},
        "params_metadata": {"m": 1},
        "send_progress": print,
    }


@dataclasses.dataclass
class Size:
    width: int


def test_prepare_reports_unbindable_params_as_invalid_input() -> None:
    d = definition()

    async def resize(params: Size) -> None:
        return None

    d.task("resize")(resize)
    with pytest.raises(TaskFailure) as caught:
        d.prepare(task("resize"), {"height": 3}, {})
    assert caught.value.code == INVALID_INPUT_ERROR
    _, bound, _ = d.prepare(task("resize"), {"width": 3}, {})
    assert bound == Size(width=3)


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((0.5,), {}, (0.5, "")),
        ((1, "half"), {}, (1.0, "half")),
        (("task-1", "job-1", 0.25, "ref"), {}, (0.25, "ref")),  # the reference SDK's form
        (("task-1", "job-1"), {"progress": 0.75}, (0.75, "")),
        ((), {"progress": 0.1, "message": 42}, (0.1, "42")),
    ],
)
def test_progress_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], expected: tuple[float, str]
) -> None:
    assert progress_arguments(args, kwargs) == expected


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((True,), {}), (("task-1", "job-1"), {}), ((None,), {}), (("0.5",), {})],
)
def test_progress_must_be_a_number(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="progress must be a number"):
        progress_arguments(args, kwargs)


def test_s3_is_configured_by_an_endpoint_or_an_access_key() -> None:
    assert s3_settings(WorkerConfig(environ=ENV).resolve()) is None
    for extra in (
        {"S3_ENDPOINT_URL": "http://s3.local:8333"},
        {"S3_ACCESS_KEY": "ak", "S3_SECRET_KEY": "sk"},
    ):
        config = WorkerConfig(
            environ={**ENV, **extra, "S3_DEFAULT_BUCKET": "bucket", "S3_MAX_CONCURRENCY": "3"}
        ).resolve()
        s3 = s3_settings(config)
        assert s3 is not None
        assert s3.endpoint_url == config.s3_endpoint_url
        assert s3.access_key == config.s3_access_key
        assert s3.default_bucket == "bucket"
        assert s3.max_concurrency == 3
        assert s3.region == config.s3_region
        assert s3.key_prefix == config.s3_key_prefix


def test_worker_front_is_the_shared_public_face() -> None:
    import asyncio

    from rca_core import DrainRequested
    from rca_core._app import WorkerFront
    from rca_core._config import WorkerConfig

    class Files:
        pass

    class FrontWorker(WorkerFront):
        files_type = Files

    config = WorkerConfig({"WORKER_TOKEN": "t"})
    worker = FrontWorker("kind", 3, {"gpu": 1}, {"s": ["m"]}, config)
    assert worker.config is config
    assert worker.snapshot() == {}

    @worker.task("job", task_type="gpu")
    async def job(params: dict, files: Files, **kwargs: object) -> dict:
        return {}

    spec = worker._definition.handlers["job"]
    assert spec.task_type == "gpu" and spec.files_arg == "files"
    asyncio.run(worker.stop())  # before serving: remembered
    assert worker._stop_early

    fed: list[object] = []

    class Machine:
        def snapshot(self) -> dict:
            return {"state": "running"}

    class FakeDriver:
        machine = Machine()

        def feed(self, event: object) -> None:
            fed.append(event)

    worker._driver = FakeDriver()  # type: ignore[assignment]
    assert worker.snapshot() == {"state": "running"}
    asyncio.run(worker.stop())
    assert isinstance(fed[0], DrainRequested)
    assert FrontWorker().config.WORKER_TYPE  # defaults: config read from the environment

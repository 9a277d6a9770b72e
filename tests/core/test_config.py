"""WorkerConfig: the environment parsed and checked once; resolve() re-checks code edits."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rca_core._config import OrchestratorSpec, ResolvedConfig, WorkerConfig
from rca_core._errors import ConfigError

TOKEN = "tok-abc-123-secret"
LOGGER = "rca_core.config"


def cfg(**env: str) -> WorkerConfig:
    return WorkerConfig(env)


def resolved(**env: str) -> ResolvedConfig:
    return WorkerConfig({"WORKER_TOKEN": TOKEN, **env}).resolve()


# --------------------------------------------------------------------------- defaults


def test_defaults_are_the_reference_readme_table() -> None:
    r = resolved()
    assert re.fullmatch(r"worker-[0-9a-f]{32}", r.worker_id)
    assert r.worker_type == "generic-cpu-worker"
    assert r.worker_port == 8083
    assert r.worker_individual_token is None
    assert r.orchestrator_url == "http://localhost:8080"
    assert r.orchestrators == (OrchestratorSpec(url="http://localhost:8080", token=TOKEN),)
    assert r.multi_orchestrator_mode == "FAILOVER"
    assert r.max_concurrent_tasks == 10
    assert dict(r.cost_per_skill) == {}
    assert r.cpu_cores == 4
    assert r.gpu_model is None
    assert r.gpu_vram_gb == 0
    assert dict(r.installed_software) == {"python": "3.9"}
    assert r.installed_models == ()
    assert r.heartbeat_interval == 15.0
    assert r.worker_heartbeat_debounce_delay == 0.1
    assert r.worker_enable_websockets is False
    assert r.result_max_retries == 5
    assert r.result_retry_initial_delay == 1.0
    assert r.task_poll_timeout == 30.0
    assert r.task_poll_error_delay == 5.0
    assert r.idle_poll_delay == 0.01
    assert r.task_files_dir == "/tmp/payloads"
    assert r.s3_endpoint_url is None
    assert r.s3_access_key is None
    assert r.s3_secret_key is None
    assert r.s3_default_bucket == "avtomatika-payloads"
    assert r.s3_region == "us-east-1"


def test_defaults_of_our_own_variables() -> None:
    r = resolved()
    assert r.worker_host == "0.0.0.0"
    assert r.shutdown_timeout == 30.0
    assert r.task_timeout is None
    assert r.result_outbox_limit == 1000
    assert r.s3_key_prefix == "results"
    assert r.s3_max_concurrency == 8
    assert r.log_format == "text"
    assert r.health_blocked_threshold == 5.0
    assert r.rca_backend == "asyncio"
    assert r.max_parallel_polls == 0


def test_each_config_gets_its_own_random_worker_id() -> None:
    assert cfg().WORKER_ID != cfg().WORKER_ID


def test_reads_os_environ_when_no_mapping_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_ID", "from-env")
    monkeypatch.setenv("MAX_CONCURRENT_TASKS", "3")
    c = WorkerConfig()
    assert c.WORKER_ID == "from-env"
    assert c.MAX_CONCURRENT_TASKS == 3


def test_blank_values_count_as_unset_and_values_are_stripped() -> None:
    c = cfg(MAX_CONCURRENT_TASKS="   ", WORKER_TYPE="", WORKER_TOKEN=" t0k\n")
    assert c.MAX_CONCURRENT_TASKS == 10
    assert c.WORKER_TYPE == "generic-cpu-worker"
    assert c.WORKER_TOKEN == "t0k"


# --------------------------------------------------------------------------- parsing


def test_every_variable_is_parsed_to_its_type() -> None:
    r = resolved(
        WORKER_ID="gpu_box-7",
        WORKER_TYPE="image",
        WORKER_HOST="127.0.0.1",
        WORKER_PORT="0",
        WORKER_INDIVIDUAL_TOKEN="mine",
        ORCHESTRATOR_URL="https://orc.example:8443/base/",
        MULTI_ORCHESTRATOR_MODE="round-robin",
        MAX_CONCURRENT_TASKS="7",
        MAX_PARALLEL_POLLS="2",
        COST_PER_SKILL='{"resize": 0.5, "crop": 2}',
        CPU_CORES="16",
        GPU_MODEL="RTX 4090",
        GPU_VRAM_GB="24",
        INSTALLED_SOFTWARE='{"ffmpeg": "6.1"}',
        INSTALLED_MODELS='[{"name": "sd", "version": "1.5", "extra": [1, 2.5, null, true]}]',
        HEARTBEAT_INTERVAL="2.5",
        WORKER_HEARTBEAT_DEBOUNCE_DELAY="0",
        WORKER_ENABLE_WEBSOCKETS="YES",
        RESULT_MAX_RETRIES="0",
        RESULT_RETRY_INITIAL_DELAY="0.25",
        RESULT_OUTBOX_LIMIT="5",
        TASK_POLL_TIMEOUT="40",
        TASK_POLL_ERROR_DELAY="1e0",
        IDLE_POLL_DELAY="0",
        TASK_TIMEOUT="12.5",
        SHUTDOWN_TIMEOUT="0",
        TASK_FILES_DIR="/var/tmp/x",
        S3_ENDPOINT_URL="http://127.0.0.1:8333",
        S3_ACCESS_KEY="AK",
        S3_SECRET_KEY="SK-secret",
        S3_DEFAULT_BUCKET="bucket.one",
        S3_REGION="eu-west-1",
        S3_KEY_PREFIX="/out/v1/",
        S3_MAX_CONCURRENCY="3",
        LOG_FORMAT="JSON",
        HEALTH_BLOCKED_THRESHOLD="0.5",
        RCA_BACKEND="Trio",
    )
    assert r.worker_id == "gpu_box-7"
    assert r.worker_host == "127.0.0.1"
    assert r.worker_port == 0
    assert r.orchestrator_url == "https://orc.example:8443/base"
    assert r.orchestrators == (OrchestratorSpec(url="https://orc.example:8443/base", token="mine"),)
    assert r.multi_orchestrator_mode == "ROUND_ROBIN"
    assert (r.max_concurrent_tasks, r.max_parallel_polls) == (7, 2)
    assert dict(r.cost_per_skill) == {"resize": 0.5, "crop": 2}
    assert (r.cpu_cores, r.gpu_model, r.gpu_vram_gb) == (16, "RTX 4090", 24)
    assert dict(r.installed_software) == {"ffmpeg": "6.1"}
    assert r.installed_models == ({"name": "sd", "version": "1.5", "extra": [1, 2.5, None, True]},)
    assert r.heartbeat_interval == 2.5
    assert r.worker_heartbeat_debounce_delay == 0.0
    assert r.worker_enable_websockets is True
    assert (r.result_max_retries, r.result_retry_initial_delay) == (0, 0.25)
    assert r.result_outbox_limit == 5
    assert (r.task_poll_timeout, r.task_poll_error_delay, r.idle_poll_delay) == (40, 1, 0)
    assert (r.task_timeout, r.shutdown_timeout) == (12.5, 0)
    assert r.task_files_dir == "/var/tmp/x"
    assert r.s3_endpoint_url == "http://127.0.0.1:8333"
    assert (r.s3_access_key, r.s3_secret_key) == ("AK", "SK-secret")
    assert (r.s3_default_bucket, r.s3_region) == ("bucket.one", "eu-west-1")
    assert (r.s3_key_prefix, r.s3_max_concurrency) == ("out/v1", 3)
    assert (r.log_format, r.health_blocked_threshold, r.rca_backend) == ("json", 0.5, "trio")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("Yes", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
    ],
)
def test_booleans(text: str, value: bool) -> None:
    assert cfg(WORKER_ENABLE_WEBSOCKETS=text).WORKER_ENABLE_WEBSOCKETS is value


def test_task_timeout_zero_means_no_limit() -> None:
    assert cfg(TASK_TIMEOUT="0").TASK_TIMEOUT is None


def test_s3_key_prefix_slash_means_no_prefix() -> None:
    assert cfg(S3_KEY_PREFIX="/").S3_KEY_PREFIX == ""


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MAX_CONCURRENT_TASKS", "ten", "expected a positive integer"),
        ("MAX_CONCURRENT_TASKS", "0", "expected a positive integer"),
        ("MAX_CONCURRENT_TASKS", "2.5", "expected a positive integer"),
        ("MAX_CONCURRENT_TASKS", "9" * 5000, "expected a positive integer"),
        ("MAX_PARALLEL_POLLS", "-1", "expected an integer >= 0"),
        ("CPU_CORES", "0", "expected a positive integer"),
        ("GPU_VRAM_GB", "-2", "expected an integer >= 0"),
        ("WORKER_PORT", "65536", "expected a port number from 0 to 65535"),
        ("WORKER_PORT", "-1", "expected a port number"),
        ("WORKER_ID", "my worker", "letters, digits, '_' and '-' only"),
        ("WORKER_ID", "a/b", "letters, digits"),
        ("WORKER_HOST", "local host", "without blanks"),
        ("HEARTBEAT_INTERVAL", "0", "expected a number of seconds > 0"),
        ("HEARTBEAT_INTERVAL", "fast", "expected a number of seconds > 0"),
        ("HEARTBEAT_INTERVAL", "nan", "expected a number of seconds > 0"),
        ("HEARTBEAT_INTERVAL", "inf", "expected a number of seconds > 0"),
        ("IDLE_POLL_DELAY", "-0.5", "expected a number of seconds >= 0"),
        ("SHUTDOWN_TIMEOUT", "-1", "expected a number of seconds >= 0"),
        ("TASK_TIMEOUT", "-1", "0 or None: no limit"),
        ("TASK_TIMEOUT", "soon", "0 or None: no limit"),
        ("WORKER_ENABLE_WEBSOCKETS", "maybe", "expected a boolean: true/false, 1/0 or yes/no"),
        ("MULTI_ORCHESTRATOR_MODE", "RANDOM", "expected 'FAILOVER' or 'ROUND_ROBIN'"),
        ("LOG_FORMAT", "xml", "expected 'text' or 'json'"),
        ("RCA_BACKEND", "curio", "expected 'asyncio' or 'trio'"),
        ("ORCHESTRATOR_URL", "localhost:8080", "expected an http:// or https:// URL"),
        ("ORCHESTRATOR_URL", "ftp://host", "expected an http:// or https:// URL"),
        ("ORCHESTRATOR_URL", "http://", "expected an http:// or https:// URL with a host"),
        ("ORCHESTRATOR_URL", "http://h/a b", "expected an http:// or https:// URL"),
        ("ORCHESTRATOR_URL", "http://[::1", "expected an http:// or https:// URL"),
        ("ORCHESTRATOR_URL", "http://host:99999", "expected an http:// or https:// URL"),
        ("ORCHESTRATOR_URL", "http://host/?x=1", "without query or fragment"),
        ("S3_ENDPOINT_URL", "s3.local", "an http:// or https:// URL with a host, or None"),
        ("S3_DEFAULT_BUCKET", "a/b", "expected a bucket name"),
        ("S3_DEFAULT_BUCKET", "my bucket", "expected a bucket name"),
        ("S3_KEY_PREFIX", "a/../b", "no '.' or '..' segments"),
        ("S3_KEY_PREFIX", "a//b", "expected an S3 key prefix"),
        ("S3_KEY_PREFIX", "a/\x01b", "expected an S3 key prefix"),
        ("COST_PER_SKILL", "{oops", "not valid JSON: Expecting property name"),
        ("COST_PER_SKILL", "[1, 2]", "a JSON object mapping skill names to costs"),
        ("COST_PER_SKILL", '{"a": -1}', "numbers >= 0"),
        ("COST_PER_SKILL", '{"a": true}', "numbers >= 0"),
        ("COST_PER_SKILL", '{"a": "1"}', "numbers >= 0"),
        ("COST_PER_SKILL", '{"a": NaN}', "not valid JSON: NaN is not valid JSON"),
        ("COST_PER_SKILL", '{"a": 1e999}', "numbers >= 0"),
        ("COST_PER_SKILL", '{"a": ' + "1" * 5000 + "}", "not valid JSON: Exceeds the limit"),
        ("COST_PER_SKILL", "[" * 100_000, "nested too deeply"),
        ("INSTALLED_SOFTWARE", '["python"]', "mapping software names to version strings"),
        ("INSTALLED_SOFTWARE", '{"python": 3.11}', "to version strings"),
        ("INSTALLED_MODELS", '{"name": "x"}', "a JSON list of objects"),
        ("INSTALLED_MODELS", '["sd"]', "a JSON list of objects"),
        ("INSTALLED_MODELS", '[{"version": "1"}]', "a JSON list of objects"),
        ("INSTALLED_MODELS", '[{"name": " "}]', "a JSON list of objects"),
    ],
)
def test_a_bad_variable_names_itself_quotes_the_value_and_says_what_was_expected(
    name: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        WorkerConfig({name: value})
    message = str(info.value)
    assert message.startswith(f"{name}=")
    assert expected in message
    assert len(message) < 400  # a huge value is shortened


def test_the_error_format_is_the_documented_one() -> None:
    with pytest.raises(ConfigError, match=r"^MAX_CONCURRENT_TASKS='ten': expected a positive"):
        cfg(MAX_CONCURRENT_TASKS="ten")


def test_a_long_bad_value_is_shortened_in_the_message() -> None:
    with pytest.raises(ConfigError) as info:
        cfg(WORKER_TYPE="x", WORKER_ID="bad id " * 100)
    assert "..." in str(info.value)
    assert len(str(info.value)) < 300


def test_a_password_in_a_bad_url_is_masked() -> None:
    with pytest.raises(ConfigError) as info:
        cfg(ORCHESTRATOR_URL="http://user:hunter2@host/?x=1")
    assert "hunter2" not in str(info.value)
    assert "user:***@host" in str(info.value)


# --------------------------------------------------------------------------- orchestrators


def test_orchestrators_config_wins_over_orchestrator_url_and_is_sorted_by_priority() -> None:
    config = json.dumps(
        [
            {"url": "http://backup", "priority": 20, "weight": 10},
            {"url": "http://a/", "priority": 10, "weight": 100, "token": "token-a"},
            {"url": "http://b", "priority": 10, "weight": 50, "token": None},
        ]
    )
    r = resolved(ORCHESTRATORS_CONFIG=config, ORCHESTRATOR_URL="http://ignored")
    assert r.orchestrators == (
        OrchestratorSpec(url="http://a", priority=10, weight=100, token="token-a"),
        OrchestratorSpec(url="http://b", priority=10, weight=50, token=TOKEN),
        OrchestratorSpec(url="http://backup", priority=20, weight=10, token=TOKEN),
    )


def test_token_precedence_entry_then_individual_then_worker_token() -> None:
    config = '[{"url": "http://a", "token": " own "}, {"url": "http://b"}]'
    r = resolved(ORCHESTRATORS_CONFIG=config, WORKER_INDIVIDUAL_TOKEN="individual")
    assert [o.token for o in r.orchestrators] == ["own", "individual"]
    r = resolved(ORCHESTRATORS_CONFIG=config)
    assert [o.token for o in r.orchestrators] == ["own", TOKEN]


@pytest.mark.parametrize("value", ["[]", "", "  "])
def test_empty_orchestrators_config_falls_back_to_orchestrator_url(value: str) -> None:
    r = resolved(ORCHESTRATORS_CONFIG=value, ORCHESTRATOR_URL="http://single:9000")
    assert [o.url for o in r.orchestrators] == ["http://single:9000"]


@pytest.mark.parametrize(
    "value",
    ["[{url: 1}]", "not json", '[{"url": "http://a", "weight": NaN}]', "[" + "1" * 5000 + "]"],
)
def test_orchestrators_config_that_is_not_json_warns_and_falls_back(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    c = cfg(ORCHESTRATORS_CONFIG=value)
    assert c.ORCHESTRATORS_CONFIG == []
    assert [o.url for o in c.resolve().orchestrators] == ["http://localhost:8080"]
    warning = next(r for r in caplog.records if "ORCHESTRATORS_CONFIG" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "falling back to ORCHESTRATOR_URL" in warning.getMessage()


def test_orchestrators_config_too_deep_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^ORCHESTRATORS_CONFIG: .*nested too deeply"):
        cfg(ORCHESTRATORS_CONFIG="[" * 100_000)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('{"url": "http://a"}', r"^ORCHESTRATORS_CONFIG: expected a JSON list .* got dict"),
        ('["http://a"]', r"^ORCHESTRATORS_CONFIG\[0\]: expected an object with a 'url', got str"),
        ('[{"url": "http://a"}, {"priority": 1}]', r"^ORCHESTRATORS_CONFIG\[1\]: 'url' is missing"),
        ('[{"url": "ftp://a"}]', r"^ORCHESTRATORS_CONFIG\[0\]: url='ftp://a': expected an http"),
        ('[{"url": 5}]', r"^ORCHESTRATORS_CONFIG\[0\]: url=5: expected"),
        ('[{"url": "http://a", "weight": 0}]', r"\[0\]: weight=0: expected a positive integer"),
        ('[{"url": "http://a", "weight": -3}]', r"\[0\]: weight=-3: expected a positive integer"),
        ('[{"url": "http://a", "weight": 1.5}]', r"\[0\]: weight=1.5: expected a positive"),
        ('[{"url": "http://a", "weight": true}]', r"\[0\]: weight=True: expected a positive"),
        ('[{"url": "http://a", "priority": "high"}]', r"\[0\]: priority='high': expected an int"),
        ('[{"url": "http://a", "priority": 1.5}]', r"\[0\]: priority=1.5: expected an integer"),
        ('[{"url": "http://a", "priority": false}]', r"\[0\]: priority=False: expected an int"),
        ('[{"url": "http://a", "token": ""}]', r"\[0\]: token=<hidden>: expected a non-empty"),
        ('[{"url": "http://a", "token": 5}]', r"\[0\]: token=<hidden>: expected a non-empty"),
        (
            '[{"url": "http://a"}, {"url": "http://a/"}]',
            r"\[1\]: url='http://a' is already entry 0",
        ),
    ],
)
def test_valid_json_with_a_bad_orchestrator_is_an_error_naming_the_entry(
    value: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        cfg(ORCHESTRATORS_CONFIG=value)


def test_a_bad_orchestrator_url_with_a_password_is_masked() -> None:
    with pytest.raises(ConfigError) as info:
        cfg(ORCHESTRATORS_CONFIG='[{"url": "http://u:hunter2@a/?q", "token": "secret-t"}]')
    assert "hunter2" not in str(info.value)
    assert "secret-t" not in str(info.value)


def test_unknown_orchestrator_keys_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    c = cfg(ORCHESTRATORS_CONFIG='[{"url": "http://a", "tokne": "x", "name": "main"}]')
    assert c.ORCHESTRATORS_CONFIG == [
        {"url": "http://a", "priority": 10, "weight": 1, "token": None}
    ]
    assert any("name, tokne" in r.getMessage() for r in caplog.records)


def test_orchestrator_url_assigned_in_code_is_followed_when_the_config_is_empty() -> None:
    c = cfg(WORKER_TOKEN=TOKEN)
    c.ORCHESTRATOR_URL = "http://from-code:1234/"
    assert [o.url for o in c.resolve().orchestrators] == ["http://from-code:1234"]


def test_orchestrators_config_assigned_in_code() -> None:
    c = cfg(WORKER_TOKEN=TOKEN)
    c.ORCHESTRATORS_CONFIG = [
        {"url": "http://x", "weight": 3},
        OrchestratorSpec(url="http://y", priority=1, token="y-token"),
    ]
    assert c.resolve().orchestrators == (
        OrchestratorSpec(url="http://y", priority=1, token="y-token"),
        OrchestratorSpec(url="http://x", weight=3, token=TOKEN),
    )
    c.ORCHESTRATORS_CONFIG = '[{"url": "http://z"}]'  # type: ignore[assignment]
    assert [o.url for o in c.resolve().orchestrators] == ["http://z"]
    c.ORCHESTRATORS_CONFIG = None  # type: ignore[assignment]
    assert [o.url for o in c.resolve().orchestrators] == ["http://localhost:8080"]
    c.ORCHESTRATORS_CONFIG = " "  # type: ignore[assignment]
    assert [o.url for o in c.resolve().orchestrators] == ["http://localhost:8080"]
    c.ORCHESTRATORS_CONFIG = ({"url": "http://t"},)  # type: ignore[assignment]
    assert [o.url for o in c.resolve().orchestrators] == ["http://t"]
    c.ORCHESTRATORS_CONFIG = [{"url": "http://a", "weight": 0}]
    with pytest.raises(ConfigError, match=r"^WorkerConfig.ORCHESTRATORS_CONFIG\[0\]: weight=0"):
        c.resolve()


def test_orchestrator_spec_repr_masks_the_token() -> None:
    text = repr(OrchestratorSpec(url="http://u:pw@a", token="very-secret"))
    assert "very-secret" not in text and "pw" not in text
    assert "token='***'" in text
    assert "token=None" in repr(OrchestratorSpec(url="http://a"))


# --------------------------------------------------------------------------- resolve()


def test_resolve_rechecks_attributes_assigned_in_code_and_names_the_attribute() -> None:
    c = cfg(WORKER_TOKEN=TOKEN)
    c.MAX_CONCURRENT_TASKS = 0
    with pytest.raises(
        ConfigError, match=r"^WorkerConfig.MAX_CONCURRENT_TASKS=0: expected a positive integer$"
    ):
        c.resolve()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MAX_CONCURRENT_TASKS", True, "=True: expected a positive integer"),
        ("MAX_CONCURRENT_TASKS", 5.0, "=5.0: expected a positive integer"),
        ("MAX_CONCURRENT_TASKS", None, "=None: expected a positive integer"),
        ("HEARTBEAT_INTERVAL", 10**400, "expected a number of seconds > 0"),
        ("HEARTBEAT_INTERVAL", False, "=False: expected a number of seconds"),
        ("HEARTBEAT_INTERVAL", [1], "=[1]: expected a number of seconds"),
        ("HEARTBEAT_INTERVAL", float("inf"), "=inf: expected"),
        ("WORKER_TYPE", 5, "WorkerConfig.WORKER_TYPE=5: expected a non-empty string"),
        ("WORKER_TYPE", "  ", "expected a non-empty string"),
        ("WORKER_ID", "", "letters, digits"),
        ("GPU_MODEL", 3, "expected a string or None"),
        ("WORKER_ENABLE_WEBSOCKETS", 1, "expected a boolean"),
        ("LOG_FORMAT", 1, "expected 'text' or 'json'"),
        ("COST_PER_SKILL", {1: 2}, "mapping skill names to costs"),
        ("INSTALLED_SOFTWARE", {"python": 3}, "version strings"),
        ("INSTALLED_MODELS", [{"name": "m", "tags": {"a"}}], "a JSON list of objects"),
        ("INSTALLED_MODELS", [{"name": "m", "size": float("nan")}], "a JSON list of objects"),
        ("INSTALLED_MODELS", [{"name": "m", "x": {1: 2}}], "a JSON list of objects"),
        ("TASK_TIMEOUT", -1, "no limit"),
        ("TASK_TIMEOUT", "x", "no limit"),
    ],
)
def test_resolve_rejects_bad_attribute_values(name: str, value: object, expected: str) -> None:
    c = cfg(WORKER_TOKEN=TOKEN)
    setattr(c, name, value)
    with pytest.raises(ConfigError) as info:
        c.resolve()
    assert str(info.value).startswith(f"WorkerConfig.{name}=")
    assert expected in str(info.value)


def test_resolve_accepts_strings_as_the_environment_would() -> None:
    c = cfg(WORKER_TOKEN=TOKEN)
    c.MAX_CONCURRENT_TASKS = "5"  # type: ignore[assignment]
    c.WORKER_ENABLE_WEBSOCKETS = "yes"  # type: ignore[assignment]
    c.COST_PER_SKILL = '{"a": 1}'  # type: ignore[assignment]
    c.TASK_TIMEOUT = None
    c.GPU_MODEL = ""
    c.S3_ENDPOINT_URL = " "
    r = c.resolve()
    assert r.max_concurrent_tasks == 5
    assert r.worker_enable_websockets is True
    assert dict(r.cost_per_skill) == {"a": 1}
    assert r.task_timeout is None
    assert r.gpu_model is None
    assert r.s3_endpoint_url is None


def test_resolve_of_a_deleted_attribute_is_an_error() -> None:
    c = cfg(WORKER_TOKEN=TOKEN)
    del c.WORKER_TYPE
    with pytest.raises(ConfigError, match=r"^WorkerConfig.WORKER_TYPE=None"):
        c.resolve()


def test_a_value_with_a_broken_repr_still_gives_a_readable_error() -> None:
    class Weird:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    c = cfg(WORKER_TOKEN=TOKEN)
    c.CPU_CORES = Weird()  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"^WorkerConfig.CPU_CORES=<Weird>: expected"):
        c.resolve()


def test_a_bad_secret_is_never_quoted() -> None:
    c = cfg(WORKER_TOKEN=TOKEN)
    c.WORKER_TOKEN = ""
    with pytest.raises(ConfigError, match=r"^WorkerConfig.WORKER_TOKEN=<hidden>: expected"):
        c.resolve()
    c = cfg(WORKER_TOKEN=TOKEN)
    c.S3_SECRET_KEY = 1234  # type: ignore[assignment]
    with pytest.raises(ConfigError) as info:
        c.resolve()
    assert "1234" not in str(info.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"S3_ACCESS_KEY": "ak"}, "S3_ACCESS_KEY is set but S3_SECRET_KEY is not"),
        ({"S3_SECRET_KEY": "sk-hidden"}, "S3_SECRET_KEY is set but S3_ACCESS_KEY is not"),
    ],
)
def test_s3_credentials_come_in_pairs(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        WorkerConfig(env).resolve()
    assert "sk-hidden" not in str(info.value)


def test_resolved_config_is_frozen_and_detached_from_the_worker_config() -> None:
    c = cfg(WORKER_TOKEN=TOKEN, COST_PER_SKILL='{"a": 1}', INSTALLED_MODELS='[{"name": "m"}]')
    r = c.resolve()
    c.COST_PER_SKILL["b"] = 2
    c.INSTALLED_MODELS[0]["name"] = "changed"
    assert dict(r.cost_per_skill) == {"a": 1}
    assert r.installed_models == ({"name": "m"},)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.worker_id = "x"  # type: ignore[misc]


def test_reference_attribute_aliases() -> None:
    c = cfg(WORKER_TOKEN=TOKEN)
    c.HEARTBEAT_DEBOUNCE_DELAY = 0.5
    c.ENABLE_WEBSOCKETS = True
    assert c.WORKER_HEARTBEAT_DEBOUNCE_DELAY == 0.5 == c.HEARTBEAT_DEBOUNCE_DELAY
    assert c.WORKER_ENABLE_WEBSOCKETS is True is c.ENABLE_WEBSOCKETS
    r = c.resolve()
    assert (r.worker_heartbeat_debounce_delay, r.worker_enable_websockets) == (0.5, True)


def test_the_placeholder_token_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    cfg().resolve()
    assert any("WORKER_TOKEN is not set" in r.getMessage() for r in caplog.records)
    caplog.clear()
    resolved()
    assert not caplog.records


def test_unknown_uppercase_attributes_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    c = cfg(WORKER_TOKEN=TOKEN)
    c.MAX_CONCURENT_TASKS = 5  # type: ignore[attr-defined]
    c.ORCHESTRATORS = [{"url": "http://a"}]  # type: ignore[attr-defined]
    c.QWERTY_ZXCV = 1  # type: ignore[attr-defined]
    c.my_own_thing = 1  # type: ignore[attr-defined]
    c.resolve()
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "MAX_CONCURENT_TASKS" in m and "did you mean MAX_CONCURRENT_TASKS?" in m for m in messages
    )
    assert any(
        "ORCHESTRATORS is not a setting" in m and "ORCHESTRATORS_CONFIG" in m for m in messages
    )
    assert any("QWERTY_ZXCV" in m and "no setting has this name" in m for m in messages)
    assert not any("my_own_thing" in m for m in messages)


# --------------------------------------------------------------------------- secrets


SECRET_ENV = {
    "WORKER_TOKEN": "wt-HUSH-1",
    "WORKER_INDIVIDUAL_TOKEN": "wi-HUSH-2",
    "ORCHESTRATORS_CONFIG": json.dumps(
        [
            {"url": "http://a", "token": "ot-HUSH-3"},
            {"url": "http://user:pw-HUSH-4@b"},
        ]
    ),
    "ORCHESTRATOR_URL": "http://u:pw-HUSH-5@fallback",
    "S3_ENDPOINT_URL": "http://k:pw-HUSH-6@s3",
    "S3_ACCESS_KEY": "AKIA",
    "S3_SECRET_KEY": "s3-HUSH-7",
}


def test_describe_masks_every_secret_and_is_json() -> None:
    r = WorkerConfig(SECRET_ENV).resolve()
    described = r.describe()
    text = json.dumps(described)
    assert "HUSH" not in text
    assert described["worker_token"] == "***"
    assert described["s3_secret_key"] == "***"
    assert described["s3_access_key"] == "AKIA"
    assert described["orchestrators"] == [
        {"url": "http://a", "priority": 10, "weight": 1, "token": "***"},
        {"url": "http://user:***@b", "priority": 10, "weight": 1, "token": "***"},
    ]
    assert described["orchestrator_url"] == "http://u:***@fallback"
    assert described["s3_endpoint_url"] == "http://k:***@s3"
    assert set(described) == set(ResolvedConfig.__dataclass_fields__)


def test_describe_shows_unset_secrets_as_none() -> None:
    described = resolved().describe()
    assert described["worker_individual_token"] is None
    assert described["s3_secret_key"] is None
    assert described["s3_endpoint_url"] is None
    assert described["installed_software"] == {"python": "3.9"}


def test_reprs_never_show_a_secret() -> None:
    c = WorkerConfig(SECRET_ENV)
    assert "HUSH" not in repr(c)
    assert "HUSH" not in repr(c.resolve())
    assert "WORKER_TOKEN='***'" in repr(c)
    assert repr(c.resolve()).startswith("ResolvedConfig(worker_id=")
    c.ORCHESTRATORS_CONFIG = '[{"url": "http://a", "token": "str-HUSH"}]'  # type: ignore[assignment]
    assert "HUSH" not in repr(c)
    c.ORCHESTRATORS_CONFIG = [
        OrchestratorSpec(url="http://a", token="spec-HUSH"),
        5,  # type: ignore[list-item]
        {"url": "http://a", "token": None},
    ]
    text = repr(c)
    assert "HUSH" not in text and "<int>" in text and "'token': None" in text
    c.ORCHESTRATORS_CONFIG = None  # type: ignore[assignment]
    assert "ORCHESTRATORS_CONFIG=None" in repr(c)
    c.S3_ENDPOINT_URL = None
    assert "S3_ENDPOINT_URL=None" in repr(c)
    c.WORKER_INDIVIDUAL_TOKEN = None
    assert "WORKER_INDIVIDUAL_TOKEN=None" in repr(c)


def test_secret_values_lists_every_secret_longest_first() -> None:
    secrets = WorkerConfig(SECRET_ENV).resolve().secret_values()
    assert set(secrets) == {
        "wt-HUSH-1",
        "wi-HUSH-2",
        "ot-HUSH-3",
        "pw-HUSH-4",
        "pw-HUSH-5",
        "pw-HUSH-6",
        "s3-HUSH-7",
    }
    assert [len(s) for s in secrets] == sorted((len(s) for s in secrets), reverse=True)
    assert resolved().secret_values() == (TOKEN,)


def test_secret_values_ignore_a_url_that_does_not_parse() -> None:
    r = dataclasses.replace(resolved(), s3_endpoint_url="http://[::1")
    assert r.secret_values() == (TOKEN,)


# --------------------------------------------------------------------------- invariants

NAMES = sorted(ResolvedConfig.__dataclass_fields__.keys() - {"orchestrators"})
ENV_NAMES = [n.upper() for n in NAMES] + ["ORCHESTRATORS_CONFIG"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(ENV_NAMES), st.text(max_size=40), max_size=8))
def test_arbitrary_environments_raise_nothing_but_config_error(env: dict[str, str]) -> None:
    logging.getLogger(LOGGER).disabled = True
    try:
        try:
            config = WorkerConfig(env)
        except ConfigError:
            return
        try:
            result = config.resolve()
        except ConfigError:
            return
        assert result.orchestrators
        json.dumps(result.describe())
        repr(config)
    finally:
        logging.getLogger(LOGGER).disabled = False


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(
        ["ORCHESTRATORS_CONFIG", "COST_PER_SKILL", "INSTALLED_MODELS", "INSTALLED_SOFTWARE"]
    ),
    JSONISH,
)
def test_arbitrary_json_in_json_variables_raises_nothing_but_config_error(
    name: str, document: object
) -> None:
    logging.getLogger(LOGGER).disabled = True
    try:
        try:
            WorkerConfig({name: json.dumps(document)}).resolve()
        except ConfigError:
            pass
    finally:
        logging.getLogger(LOGGER).disabled = False

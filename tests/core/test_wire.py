"""WireV1: every request the worker sends and every reply it can get, byte for byte."""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest

from rca_core import HttpRequest, WireV1

WIRE = WireV1(poll_timeout=45.0, request_timeout=12.0)


def returns(method: Any) -> tuple[type, ...]:
    """The classes a parser documents (its return annotation)."""
    hint = typing.get_type_hints(method)["return"]
    return typing.get_args(hint) or (hint,)


def name(value: object) -> str:
    return type(value).__name__


def fields(value: object) -> dict[str, Any]:
    return {f: getattr(value, f) for f in value.__dataclass_fields__}  # type: ignore[attr-defined]


# -- requests ------------------------------------------------------------------------------


def test_register_request() -> None:
    req = WIRE.register(url="https://orch.example/base/", token="tok", info={"worker_id": "w"})
    assert req == HttpRequest(
        method="POST",
        url="https://orch.example/base/_worker/workers/register",
        headers=(("X-Worker-Token", "tok"), ("Content-Type", "application/json")),
        body=b'{"worker_id":"w"}',
        timeout=12.0,
    )


def test_heartbeat_request_quotes_the_worker_id() -> None:
    req = WIRE.heartbeat(url="http://o", token="tok", worker_id="a b/c", state={"load": 0})
    assert req.method == "PATCH"
    assert req.url == "http://o/_worker/workers/a%20b%2Fc"
    assert json.loads(req.body or b"") == {"load": 0}
    assert req.timeout == 12.0


def test_poll_request_has_no_body_and_the_long_timeout() -> None:
    req = WIRE.poll(url="http://o/", token="tok", worker_id="w")
    assert req == HttpRequest(
        method="GET",
        url="http://o/_worker/workers/w/tasks/next",
        headers=(("X-Worker-Token", "tok"),),
        body=None,
        timeout=45.0,
    )


def test_result_request() -> None:
    req = WIRE.result(
        url="http://o",
        token="tok",
        worker_id="w",
        job_id="j",
        task_id="t",
        result={"status": "success", "data": {"x": 1}},
    )
    assert req.url == "http://o/_worker/tasks/result"
    assert json.loads(req.body or b"") == {
        "job_id": "j",
        "task_id": "t",
        "worker_id": "w",
        "result": {"status": "success", "data": {"x": 1}},
    }


def test_bodies_refuse_values_that_are_not_json() -> None:
    with pytest.raises(ValueError):
        WIRE.result(
            url="http://o",
            token="t",
            worker_id="w",
            job_id="j",
            task_id="t",
            result={"data": float("nan")},
        )
    with pytest.raises(ValueError):
        WIRE.progress(task_id="t", job_id="j", progress=float("inf"), message="")


def test_the_token_never_shows_in_a_request_repr() -> None:
    req = WIRE.poll(url="http://o", token="very-secret", worker_id="w")
    assert "very-secret" not in repr(req)
    assert repr(req) == (
        "HttpRequest(method='GET', url='http://o/_worker/workers/w/tasks/next', timeout=45.0)"
    )


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://o:8080/", "ws://o:8080/_worker/ws/w%201"),
        ("https://o", "wss://o/_worker/ws/w%201"),
        ("ws://already", "ws://already/_worker/ws/w%201"),
    ],
)
def test_command_channel_url(base: str, expected: str) -> None:
    url, headers = WIRE.command_channel(url=base, token="tok", worker_id="w 1")
    assert url == expected
    assert headers == (("X-Worker-Token", "tok"),)


def test_progress_message() -> None:
    text = WireV1.progress(task_id="t", job_id="j", progress=0.25, message="a quarter")
    assert json.loads(text) == {
        "event": "progress_update",
        "task_id": "t",
        "job_id": "j",
        "progress": 0.25,
        "message": "a quarter",
    }


@pytest.mark.parametrize(
    ("gpu_model", "gpu_info"),
    [(None, None), ("", None), ("L4", {"model": "L4", "vram_gb": 24})],
)
def test_registration_info(gpu_model: str | None, gpu_info: object) -> None:
    info = WireV1.registration_info(
        worker_id="w",
        worker_type="gpu-worker",
        supported_tasks=("a", "b"),
        max_concurrent_tasks=4,
        cost_per_skill={"a": 1},
        installed_models=({"name": "m", "version": "1"},),
        installed_software={"cuda": "12"},
        hostname="h",
        ip_address="10.1.2.3",
        cpu_cores=16,
        gpu_model=gpu_model,
        gpu_vram_gb=24,
        websockets=False,
    )
    assert info == {
        "worker_id": "w",
        "worker_type": "gpu-worker",
        "supported_tasks": ["a", "b"],
        "max_concurrent_tasks": 4,
        "cost_per_skill": {"a": 1},
        "installed_models": [{"name": "m", "version": "1"}],
        "installed_software": {"cuda": "12"},
        "hostname": "h",
        "ip_address": "10.1.2.3",
        "resources": {"cpu_cores": 16, "gpu_info": gpu_info},
        "capabilities": {"websockets": False},
    }


def test_heartbeat_state_always_has_every_key() -> None:
    state = WireV1.heartbeat_state(
        load=0,
        idle=True,
        supported_tasks=(),
        hot_cache=(),
        skill_dependencies={},
        hot_skills=(),
    )
    assert state == {
        "load": 0,
        "status": "idle",
        "supported_tasks": [],
        "hot_cache": [],
        "skill_dependencies": {},
        "hot_skills": [],
    }
    busy = WireV1.heartbeat_state(
        load=2,
        idle=False,
        supported_tasks=["x"],
        hot_cache=["m"],
        skill_dependencies={"s": ("m",)},
        hot_skills=["s"],
    )
    assert busy["status"] == "busy"
    assert busy["skill_dependencies"] == {"s": ["m"]}


# -- replies: register, heartbeat, result ---------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_after", "kind", "seconds"),
    [
        (None, None, "retry", None),
        (200, None, "ok", None),
        (201, "5", "ok", None),
        (299, None, "ok", None),
        (429, "7", "retry", 7.0),
        (429, " 2.5 ", "retry", 2.5),
        (503, "Wed, 21 Oct 2015 07:28:00 GMT", "retry", None),
        (500, "-1", "retry", None),
        (500, "nan", "retry", None),
        (599, None, "retry", None),
        (401, None, "auth", None),
        (403, "9", "auth", None),
        (400, None, "final", None),
        (404, None, "final", None),
        (302, None, "final", None),
    ],
)
def test_register_reply_classification(
    status: int | None, retry_after: str | None, kind: str, seconds: float | None
) -> None:
    outcome = WireV1.parse_register(status, retry_after, b"")
    assert outcome.kind == kind
    assert outcome.retry_after == seconds
    assert not outcome.unknown_worker


def test_no_reply_says_so() -> None:
    assert WireV1.parse_register(None, None, b"").detail == "no reply"
    assert WireV1.parse_register(503, None, b"").detail == "HTTP 503"
    assert "token" in WireV1.parse_register(401, None, b"").detail


@pytest.mark.parametrize(
    ("status", "body", "kind", "unknown"),
    [
        (200, b'{"worker_id": "w"}', "ok", False),
        (200, b"null", "ok", True),  # 1.0b10: "who are you?"
        (200, b" null ", "ok", True),
        (200, b"", "ok", False),
        (200, b"not json", "ok", False),
        (404, b"", "ok", True),  # 1.0b8
        (429, b"null", "retry", False),
        (500, b"null", "retry", False),
        (None, b"", "retry", False),
        (401, b"", "auth", False),
    ],
)
def test_heartbeat_reply(status: int | None, body: bytes, kind: str, unknown: bool) -> None:
    outcome = WireV1.parse_heartbeat(status, None, body)
    assert (outcome.kind, outcome.unknown_worker) == (kind, unknown)


def test_result_reply_keeps_a_snippet_of_the_error_body() -> None:
    assert WireV1.parse_result(200, None, b'{"status":"ok"}').kind == "ok"
    assert WireV1.parse_result(200, None, b'{"status":"ok"}').detail == ""
    outcome = WireV1.parse_result(500, "3", b'{"error": "unknown job"}')
    assert (outcome.kind, outcome.retry_after) == ("retry", 3.0)
    assert outcome.detail == 'HTTP 500: {"error": "unknown job"}'
    long = WireV1.parse_result(400, None, b"x" * 1000)
    assert long.kind == "final"
    assert long.detail == "HTTP 400: " + "x" * 200 + "…"
    assert WireV1.parse_result(400, None, b"").detail == "HTTP 400"
    assert WireV1.parse_result(None, None, b"").kind == "retry"


# -- replies: poll -----------------------------------------------------------------------------


def test_poll_204_and_empty_200s_are_no_task() -> None:
    for status, body in [
        (204, b""),
        (204, b"garbage"),
        (200, b"null"),
        (200, b"{}"),
        (200, b""),
        (202, b" \r\n"),
    ]:
        parsed = WireV1.parse_poll(status, None, body)
        assert name(parsed) == "NoTask"
        assert parsed.outcome.kind == "ok"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("status", "retry_after", "kind", "seconds"),
    [
        (None, None, "retry", None),
        (429, "4", "retry", 4.0),
        (502, None, "retry", None),
        (404, None, "final", None),
        (401, None, "auth", None),
    ],
)
def test_poll_errors_are_no_task_with_an_outcome(
    status: int | None, retry_after: str | None, kind: str, seconds: float | None
) -> None:
    parsed = WireV1.parse_poll(status, retry_after, b"whatever")
    assert name(parsed) == "NoTask"
    assert parsed.outcome.kind == kind  # type: ignore[union-attr]
    assert parsed.outcome.retry_after == seconds  # type: ignore[union-attr]


def test_a_full_task() -> None:
    body = {
        "job_id": "j-1",
        "task_id": "t-1",
        "type": "echo",
        "params": {"a": [1, 2]},
        "priority": 7,
        "tracing_context": {"traceparent": "00-ab"},
        "params_metadata": {"a": {"s3": False}},
    }
    parsed = WireV1.parse_poll(200, None, json.dumps(body).encode())
    assert name(parsed) == "OrchestratorTask"
    assert fields(parsed) == {
        "job_id": "j-1",
        "task_id": "t-1",
        "type": "echo",
        "params": {"a": [1, 2]},
        "priority": 7,
        "tracing_context": {"traceparent": "00-ab"},
        "params_metadata": {"a": {"s3": False}},
    }


def test_a_minimal_task_gets_defaults_and_numeric_ids_become_strings() -> None:
    parsed = WireV1.parse_poll(200, None, b'{"job_id": 12, "task_id": 34, "type": "echo"}')
    assert fields(parsed) == {
        "job_id": "12",
        "task_id": "34",
        "type": "echo",
        "params": {},
        "priority": 0,
        "tracing_context": None,
        "params_metadata": None,
    }


@pytest.mark.parametrize(
    ("priority", "expected"),
    [("3", 0), (True, 0), (None, 0), (2.9, 2), (-4, -4), (10**30, 10**30), ([1], 0)],
)
def test_task_priority_must_be_a_number(priority: object, expected: int) -> None:
    body = json.dumps({"job_id": "j", "task_id": "t", "type": "x", "priority": priority})
    parsed = WireV1.parse_poll(200, None, body.encode())
    assert parsed.priority == expected  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", ["Infinity", "-Infinity", "NaN", "1e400"])
def test_a_non_finite_priority_reads_as_zero(raw: str) -> None:
    body = f'{{"job_id": "j", "task_id": "t", "type": "x", "priority": {raw}}}'
    parsed = WireV1.parse_poll(200, None, body.encode())
    assert name(parsed) == "OrchestratorTask"
    assert parsed.priority == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "job_id", "task_id", "reason"),
    [
        (b"{not json", None, None, "not JSON"),
        (b"\xff\xfe\xfd", None, None, "not JSON"),
        (b"[" * 100_000, None, None, "not JSON"),  # deeper than the JSON parser goes
        (b"[1]", None, None, "JSON list"),
        (b"3", None, None, "JSON int"),
        (b'"task"', None, None, "JSON str"),
        (b"true", None, None, "JSON bool"),
        (b'{"task_id": "t", "type": "x"}', None, "t", "job_id"),
        (b'{"job_id": "j", "type": "x"}', "j", None, "task_id"),
        (b'{"job_id": "j", "task_id": "t"}', "j", "t", "type"),
        (b'{"job_id": "", "task_id": true, "type": "x"}', None, None, "job_id, task_id"),
        (b'{"job_id": 1.5, "task_id": [], "type": {}}', None, None, "job_id, task_id, type"),
    ],
)
def test_malformed_tasks_say_what_is_wrong_and_who_they_are(
    body: bytes, job_id: str | None, task_id: str | None, reason: str
) -> None:
    parsed = WireV1.parse_poll(200, None, body)
    assert name(parsed) == "MalformedTask"
    assert (parsed.job_id, parsed.task_id) == (job_id, task_id)  # type: ignore[union-attr]
    assert reason in parsed.reason  # type: ignore[union-attr]


def test_a_long_garbage_body_is_quoted_short() -> None:
    parsed = WireV1.parse_poll(200, None, b"<html>" + b"x" * 5000)
    assert len(parsed.reason) < 300  # type: ignore[union-attr]


# -- commands ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"command":"cancel_task","task_id":"t","job_id":"j"}',
        b'{"command":"cancel_task","task_id":"t","job_id":"j"}',
    ],
)
def test_cancel_command(text: str | bytes) -> None:
    parsed = WireV1.parse_command(text)
    assert name(parsed) == "CancelCommand"
    assert fields(parsed) == {"task_id": "t", "job_id": "j"}


def test_cancel_command_with_numeric_ids_and_without_a_job() -> None:
    assert fields(WireV1.parse_command('{"command":"cancel_task","task_id":5}')) == {
        "task_id": "5",
        "job_id": None,
    }


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("nope", "not JSON"),
        ("\udcff", "not JSON"),  # a lone surrogate in a str
        ("[" * 100_000, "not JSON"),
        ("[]", "JSON list"),
        ("null", "JSON NoneType"),
        ('{"command":"cancel_task"}', "without a task_id"),
        ('{"command":"cancel_task","task_id":false}', "without a task_id"),
        ('{"command":"restart"}', "unsupported command 'restart'"),
        ('{"type":"cancel_task","task_id":"t"}', "unsupported command None"),
    ],
)
def test_commands_that_are_not_understood(text: str, reason: str) -> None:
    parsed = WireV1.parse_command(text)
    assert name(parsed) == "CommandProblem"
    assert reason in parsed.reason  # type: ignore[union-attr]


def test_parsers_document_their_return_types() -> None:
    assert {c.__name__ for c in returns(WireV1.parse_poll)} == {
        "OrchestratorTask",
        "NoTask",
        "MalformedTask",
    }
    assert {c.__name__ for c in returns(WireV1.parse_command)} == {
        "CancelCommand",
        "CommandProblem",
    }
    for parser in (WireV1.parse_register, WireV1.parse_heartbeat, WireV1.parse_result):
        assert [c.__name__ for c in returns(parser)] == ["Outcome"]
    assert WireV1.version == "rca-1.0b10"


def test_request_caches_stay_bounded_and_correct() -> None:
    """Polls and result routes are cached per orchestrator; the caches cannot grow forever."""
    from rca_core import _wire

    wire = WireV1(poll_timeout=45.0)
    first = wire.poll(url="http://o/", token="t", worker_id="w")
    assert wire.poll(url="http://o/", token="t", worker_id="w") is first  # built once
    for n in range(_wire._CACHE_LIMIT + 5):
        req = wire.poll(url=f"http://o{n}", token="t", worker_id="w")
        assert req.url == f"http://o{n}/_worker/workers/w/tasks/next"
        res = wire.result(url=f"http://o{n}", token=f"t{n}", worker_id="w", job_id="j", task_id="k", result={})
        assert res.url == f"http://o{n}/_worker/tasks/result"
        assert ("X-Worker-Token", f"t{n}") in res.headers
    assert len(wire._polls) <= _wire._CACHE_LIMIT
    assert len(wire._result_routes) <= _wire._CACHE_LIMIT

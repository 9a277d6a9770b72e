"""What a handler did, turned into the wire result: never raises, always JSON."""

from __future__ import annotations

import datetime
import decimal
import json
import pathlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rca_core._errors import (
    INVALID_INPUT_ERROR,
    PERMANENT_ERROR,
    TRANSIENT_ERROR,
    TaskFailure,
)
from rca_core._results import (
    MAX_MESSAGE_CHARS,
    cancelled_result,
    exception_result,
    failure_result,
    normalize_result,
    timeout_result,
)


def norm(value: object) -> dict[str, Any]:
    return normalize_result(value, handler_name="resize")


def failed(value: object) -> str:
    """The message of the PERMANENT_ERROR failure ``value`` turns into."""
    result = norm(value)
    assert result["status"] == "failure"
    assert result["error"]["code"] == PERMANENT_ERROR
    message = result["error"]["message"]
    assert isinstance(message, str)
    assert message.startswith("handler 'resize' ")
    return message


# --------------------------------------------------------------------------- good results


def test_success_is_kept() -> None:
    value = {"status": "success", "data": {"resized_path": "/x/y.png"}}
    assert norm(value) == value


def test_custom_status_is_kept() -> None:
    value = {"status": "needs_manual_review", "data": {"reason": "Low confidence score"}}
    assert norm(value) == value


def test_a_dict_without_status_is_a_success() -> None:
    assert norm({"data": {"report": "/tmp/r.pdf"}}) == {
        "status": "success",
        "data": {"report": "/tmp/r.pdf"},
    }
    assert norm({}) == {"status": "success"}


def test_null_data_is_dropped() -> None:
    assert norm({"status": "success", "data": None}) == {"status": "success"}


def test_a_failure_with_code_and_message_is_kept() -> None:
    value = {"status": "failure", "error": {"code": TRANSIENT_ERROR, "message": "API timeout"}}
    assert norm(value) == value
    custom = {"status": "failure", "error": {"code": "MY_CODE", "message": "m", "details": {}}}
    assert norm(custom) == custom


@pytest.mark.parametrize("message", [None, ""])
def test_a_failure_without_a_message_gets_one(message: object) -> None:
    error: dict[str, object] = {"code": PERMANENT_ERROR}
    if message is not None:
        error["message"] = message
    result = norm({"status": "failure", "error": error})
    assert result["error"] == {
        "code": PERMANENT_ERROR,
        "message": "handler 'resize' reported a PERMANENT_ERROR failure without a message",
    }


def test_a_non_string_failure_message_becomes_text() -> None:
    result = norm({"status": "failure", "error": {"code": TRANSIENT_ERROR, "message": {"a": 1}}})
    assert result["error"]["message"] == '{"a": 1}'


def test_cancelled_is_kept() -> None:
    assert norm({"status": "cancelled"}) == {"status": "cancelled"}


def test_the_result_is_a_fresh_json_copy() -> None:
    data = {"items": (1, 2), "nested": {"k": [True, None, 1.5]}}
    value = {"status": "success", "data": data}
    result = norm(value)
    assert result == {
        "status": "success",
        "data": {"items": [1, 2], "nested": {"k": [True, None, 1.5]}},
    }
    data["nested"]["k"].append("later")  # type: ignore[index]
    assert result["data"]["nested"]["k"] == [True, None, 1.5]


# --------------------------------------------------------------------------- bad results


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "returned None: expected a dict such as {'status': 'success', 'data': {...}}"),
        ("done", "returned a str ('done'): expected a dict"),
        ([1, 2], "returned a list ([1, 2]): expected a dict"),
        ("x" * 500, "returned a str ('xxxxx"),
        ({"status": 5}, "returned status=5: expected a non-empty string"),
        ({"status": " "}, "returned status=' ': expected a non-empty string"),
        ({"status": "success", "data": [1]}, "returned data=[1]: 'data' must be a dict"),
        ({"data": "text"}, "returned data='text': 'data' must be a dict"),
        ({"status": "failure"}, "returned status 'failure' without a valid error (got error=None)"),
        ({"status": "failure", "error": "boom"}, "without a valid error (got error='boom')"),
        ({"status": "failure", "error": {"message": "m"}}, "without a valid error"),
        ({"status": "failure", "error": {"code": 3}}, "without a valid error"),
        ({"status": "failure", "error": {"code": ""}}, "without a valid error"),
    ],
)
def test_contract_violations_become_permanent_failures(value: object, text: str) -> None:
    assert text in failed(value)


def test_the_failure_shape_is_explained() -> None:
    assert "expected 'error': {'code': 'TRANSIENT_ERROR' | 'PERMANENT_ERROR'" in failed(
        {"status": "failure", "error": {}}
    )


class Opaque:
    class Nested:
        pass


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ({"x": [1, 2, {3}]}, "data['x'][2] is a set, which JSON cannot represent (use a list)"),
        ({"x": frozenset()}, "data['x'] is a frozenset, which JSON cannot represent (use a list)"),
        ({"blob": b"\x00"}, "data['blob'] is a bytes, which JSON cannot represent (encode it"),
        (
            {"p": pathlib.PurePosixPath("/a")},
            "data['p'] is a PurePosixPath, which JSON cannot represent (use str(path))",
        ),
        (
            {"t": datetime.date(2024, 1, 1)},
            "data['t'] is a date, which JSON cannot represent (use an ISO 8601 string)",
        ),
        (
            {"d": decimal.Decimal("1.5")},
            "data['d'] is a Decimal, which JSON cannot represent (use a float or a string)",
        ),
        ({"o": Opaque()}, "data['o'] is a Opaque, which JSON cannot represent"),
        ({"o": Opaque.Nested()}, "data['o'] is a Opaque.Nested, which JSON"),
        ({"n": float("nan")}, "data['n'] is nan, which JSON cannot represent"),
        ({"n": [float("-inf")]}, "data['n'][0] is -inf, which JSON cannot represent"),
        ({1: "a"}, "data has the key 1 of type int: JSON object keys must be strings"),
    ],
)
def test_what_json_cannot_carry_is_named_with_its_path(data: dict[str, Any], text: str) -> None:
    message = failed({"status": "success", "data": data})
    assert message.startswith("handler 'resize' returned a result that is not JSON: ")
    assert text in message


def test_a_top_level_problem() -> None:
    assert "returned a result that is not JSON: the result has the key None" in failed({None: 1})
    assert "the result has the key" in failed({("a",): 1})
    assert "extra is a set" in failed({"extra": set()})


def test_circular_references_are_named() -> None:
    loop: dict[str, Any] = {"status": "success"}
    loop["data"] = {"self": loop}
    assert "data['self'] contains itself (a circular reference)" in failed(loop)
    items: list[Any] = []
    items.append(items)
    assert "data['l'][0] contains itself" in failed({"data": {"l": items}})


def test_shared_but_not_circular_references_are_fine() -> None:
    shared = {"a": 1}
    assert norm({"data": {"x": shared, "y": [shared, shared]}})["data"] == {
        "x": {"a": 1},
        "y": [{"a": 1}, {"a": 1}],
    }


def test_very_deep_nesting_is_refused() -> None:
    deep: Any = "leaf"
    for _ in range(300):
        deep = [deep]
    assert "is nested more than 200 levels deep" in failed({"data": {"deep": deep}})


def test_an_int_too_large_for_json_is_refused() -> None:
    message = failed({"data": {"n": 10**5000}})
    assert "returned a result that is not JSON: Exceeds the limit" in message


def test_a_hostile_dict_never_makes_it_raise() -> None:
    class Hostile(dict):  # type: ignore[type-arg]
        def items(self) -> Any:
            raise RuntimeError("no items for you")

    message = failed(Hostile(a=1))
    assert "returned a result that could not be read: RuntimeError: no items for you" in message


def test_an_unprintable_return_value() -> None:
    class NoRepr:
        def __repr__(self) -> str:
            raise RuntimeError("nope")

    assert "returned a NoRepr (<unprintable NoRepr>)" in failed(NoRepr())


# --------------------------------------------------------------------------- exceptions


def test_task_failure_keeps_its_code_and_message() -> None:
    exc = TaskFailure(INVALID_INPUT_ERROR, "width must be positive")
    assert exception_result(exc, handler_name="resize") == failure_result(
        INVALID_INPUT_ERROR, "width must be positive"
    )


def test_a_task_failure_with_a_bad_code_is_permanent() -> None:
    exc = TaskFailure(None, 42)  # type: ignore[arg-type]
    assert exception_result(exc, handler_name="resize") == {
        "status": "failure",
        "error": {"code": PERMANENT_ERROR, "message": "42"},
    }
    exc = TaskFailure(" ", "m")
    assert exception_result(exc, handler_name="resize")["error"] == {
        "code": PERMANENT_ERROR,
        "message": "m",
    }


def test_an_unhandled_exception_is_transient_and_names_type_and_text() -> None:
    result = exception_result(ConnectionResetError("peer went away"), handler_name="resize")
    assert result == {
        "status": "failure",
        "error": {
            "code": TRANSIENT_ERROR,
            "message": "handler 'resize' raised ConnectionResetError: peer went away",
        },
    }


def test_an_exception_without_text() -> None:
    message = exception_result(RuntimeError(), handler_name="h")["error"]["message"]  # type: ignore[index]
    assert message == "handler 'h' raised RuntimeError"


def test_an_exception_with_a_broken_str() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise ValueError("cannot print")

    message = exception_result(Broken(), handler_name="h")["error"]["message"]  # type: ignore[index]
    assert message == "handler 'h' raised Broken: <unprintable Broken>"


def test_secrets_are_redacted_from_messages() -> None:
    exc = PermissionError("401 with X-Worker-Token: tok-123 and again tok-123")
    result = exception_result(exc, handler_name="h", redact=["tok-123", ""])
    assert "tok-123" not in json.dumps(result)
    assert result["error"]["message"].endswith("X-Worker-Token: *** and again ***")  # type: ignore[index]
    failure = exception_result(
        TaskFailure(TRANSIENT_ERROR, "key=tok-123"), handler_name="h", redact=("tok-123",)
    )
    assert failure["error"]["message"] == "key=***"  # type: ignore[index]


def test_long_messages_are_cut() -> None:
    message = exception_result(ValueError("x" * 10_000), handler_name="h")["error"]["message"]  # type: ignore[index]
    assert len(message) == MAX_MESSAGE_CHARS
    assert message.endswith("... (truncated)")


def test_cancelled_and_timeout_results() -> None:
    assert cancelled_result() == {"status": "cancelled"}
    assert timeout_result(30) == failure_result(
        TRANSIENT_ERROR, "handler did not finish within TASK_TIMEOUT=30 s and was stopped"
    )
    assert timeout_result(2.5, handler_name="resize")["error"] == {
        "code": TRANSIENT_ERROR,
        "message": "handler 'resize' did not finish within TASK_TIMEOUT=2.5 s and was stopped",
    }


# --------------------------------------------------------------------------- invariants


ANYTHING = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=3)
    | st.builds(Opaque)
    | st.dates()
    | st.decimals(allow_nan=True),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.frozensets(st.integers(), max_size=2)
        | st.dictionaries(
            st.text(max_size=6)
            | st.integers()
            | st.none()
            | st.sampled_from(["status", "data", "error"]),
            inner,
            max_size=4,
        )
        | st.fixed_dictionaries(
            {"status": st.sampled_from(["success", "failure", "custom", "", 3])},
            optional={"data": inner, "error": inner},
        )
    ),
    max_leaves=15,
)


@settings(max_examples=500, deadline=None)
@given(ANYTHING)
def test_normalize_never_raises_and_always_yields_a_json_result(value: object) -> None:
    result = normalize_result(value, handler_name="h")
    assert isinstance(result, dict)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert isinstance(result["status"], str) and result["status"].strip()
    if "data" in result:
        assert isinstance(result["data"], dict)
    if result["status"] == "failure":
        error = result["error"]
        assert isinstance(error, dict)
        assert isinstance(error["code"], str) and error["code"]
        assert isinstance(error["message"], str) and error["message"]


@given(st.text(), st.text(), st.lists(st.text(min_size=1), max_size=3))
def test_exception_result_is_always_a_failure_without_the_redacted_strings(
    text: str, name: str, secrets: list[str]
) -> None:
    result = exception_result(RuntimeError(text), handler_name=name, redact=secrets)
    assert result["status"] == "failure"
    json.dumps(result)
    message = result["error"]["message"]  # type: ignore[index]
    assert isinstance(message, str)
    assert len(message) <= MAX_MESSAGE_CHARS

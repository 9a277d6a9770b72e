"""From what a handler did to the ``result`` object the orchestrator receives.

Every way a task can end — a return value, an exception, a cancellation, a
timeout — becomes one JSON object here, and none of these functions raises:
a handler that returns something odd must cost the job a clear failure
message, never the worker a slot or its poll loop (both happened with the
reference SDK).

Codes, and why:

- unhandled exception: ``TRANSIENT_ERROR``, as in the reference SDK. The
  worker cannot tell a flaky dependency (a reset connection, a full disk, a
  rate limit) from a bug, and the orchestrator's retries are bounded
  (``JOB_MAX_RETRIES``, then quarantine): a bug ends quarantined either way,
  only a few attempts later, while an outage gets the retry it needs. A
  handler that knows better raises ``TaskFailure(PERMANENT_ERROR, ...)``.
- a return value that breaks the result contract (None, not a dict, not
  JSON, a failure without a code): ``PERMANENT_ERROR``. That is the handler's
  code disagreeing with the protocol; rerunning it (possibly expensive work)
  returns the same thing again.
- a timeout (``TASK_TIMEOUT``): ``TRANSIENT_ERROR``. A slow run is often load
  or a slow dependency; another attempt, maybe on a less busy worker, can
  succeed, and a task that always times out is still quarantined after the
  orchestrator's bounded retries.
- a cancellation: ``{"status": "cancelled"}``, the orchestrator's own
  vocabulary for it.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import os
from collections.abc import Iterable

from ._errors import PERMANENT_ERROR, TRANSIENT_ERROR, TaskFailure

__all__ = [
    "MAX_MESSAGE_CHARS",
    "cancelled_result",
    "exception_result",
    "failure_result",
    "normalize_result",
    "timeout_result",
]

MAX_MESSAGE_CHARS = 2000
"""Longer error messages we build are cut: the orchestrator stores them in the job."""

_MAX_DEPTH = 200
_SHORT = 80
_CUT = "... (truncated)"
_EXAMPLE = "{'status': 'success', 'data': {...}}"
_ERROR_SHAPE = (
    "'error': {'code': 'TRANSIENT_ERROR' | 'PERMANENT_ERROR' | 'INVALID_INPUT_ERROR', "
    "'message': '...'}"
)
_HINTS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    ((set, frozenset), "use a list"),
    ((bytes, bytearray, memoryview), "encode it (e.g. base64) or return a file path"),
    (os.PathLike, "use str(path)"),
    ((datetime.datetime, datetime.date, datetime.time), "use an ISO 8601 string"),
    (decimal.Decimal, "use a float or a string"),
)


def _clip(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - len(_CUT)] + _CUT


def _type_name(value: object) -> str:
    """``Outer.Inner`` for a nested class, the bare name for one defined in a function."""
    qualname = type(value).__qualname__
    return type(value).__name__ if "<locals>" in qualname else qualname


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _short(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."


def failure_result(code: str, message: str) -> dict[str, object]:
    """``{"status": "failure", "error": {"code": code, "message": message}}``, message capped."""
    return {"status": "failure", "error": {"code": code, "message": _clip(message)}}


def cancelled_result() -> dict[str, object]:
    """The result of a task whose handler was cancelled (orchestrator command or shutdown)."""
    return {"status": "cancelled"}


def timeout_result(seconds: float, *, handler_name: str | None = None) -> dict[str, object]:
    """The result of a handler stopped by ``TASK_TIMEOUT``: TRANSIENT_ERROR (see the module doc)."""
    who = "handler" if handler_name is None else f"handler {handler_name!r}"
    return failure_result(
        TRANSIENT_ERROR, f"{who} did not finish within TASK_TIMEOUT={seconds:g} s and was stopped"
    )


def exception_result(
    exc: BaseException, *, handler_name: str, redact: Iterable[str] = ()
) -> dict[str, object]:
    """The result of a handler (or SDK step) that raised ``exc``.

    ``TaskFailure`` carries its own code and message. Anything else is
    ``TRANSIENT_ERROR`` (see the module doc for why) with a message naming the
    handler and the exception's type and text. Every string in ``redact`` (the
    worker passes ``ResolvedConfig.secret_values()``) is replaced by ``***``,
    so that an exception quoting a request header cannot leak a token.
    """
    if isinstance(exc, TaskFailure):
        code = exc.code if isinstance(exc.code, str) and exc.code.strip() else PERMANENT_ERROR
        message = exc.message if isinstance(exc.message, str) else _safe_str(exc.message)
    else:
        code = TRANSIENT_ERROR
        text = _safe_str(exc)
        kind = _type_name(exc)
        message = (
            f"handler {handler_name!r} raised {kind}: {text}"
            if text
            else (f"handler {handler_name!r} raised {kind}")
        )
    for secret in redact:
        if secret:
            message = message.replace(secret, "***")
    return failure_result(code, message)


def _child(path: str, key: object) -> str:
    """``data['x'][2]``: the top-level key bare, as a reader would name it."""
    if not path and isinstance(key, str):
        return key
    return f"{path}[{key!r}]"


def _unrepresentable(value: object, where: str) -> str:
    hint = next((h for types, h in _HINTS if isinstance(value, types)), None)
    what = f"{where} is a {_type_name(value)}, which JSON cannot represent"
    return f"{what} ({hint})" if hint else what


def _json_problem(value: object, path: str, depth: int, ancestors: set[int]) -> str | None:
    """Where and why ``value`` is not plain JSON, or None when it is."""
    where = path or "the result"
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return (
            None if math.isfinite(value) else f"{where} is {value!r}, which JSON cannot represent"
        )
    if not isinstance(value, dict | list | tuple):
        return _unrepresentable(value, where)
    if id(value) in ancestors:
        return f"{where} contains itself (a circular reference)"
    if depth >= _MAX_DEPTH:
        return f"{where} is nested more than {_MAX_DEPTH} levels deep"
    ancestors.add(id(value))
    try:
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return (
                        f"{where} has the key {_short(key)} of type {type(key).__name__}: "
                        f"JSON object keys must be strings"
                    )
                found = _json_problem(item, _child(path, key), depth + 1, ancestors)
                if found:
                    return found
        else:
            for index, item in enumerate(value):
                found = _json_problem(item, _child(path, index), depth + 1, ancestors)
                if found:
                    return found
    finally:
        ancestors.discard(id(value))
    return None


class _NotPlain(Exception):
    """The value holds something :func:`_plain_copy` leaves to the full check."""


#: Exact ints beyond this are left to the full check (json refuses ints of more
#: than ``sys.get_int_max_str_digits()`` digits, with a message worth keeping).
_PLAIN_INT = 2**63


def _plain_copy(value: object, depth: int) -> object:
    """``json.loads(json.dumps(value))`` for a value made only of exact JSON types.

    Exact ``dict`` (``str`` keys), ``list``, ``tuple``, ``str``, ``int``, finite
    ``float``, ``bool`` and ``None`` are copied (tuples become lists, as through
    JSON); anything else (a subclass, NaN, a huge int, nesting at the depth
    limit, hence also a cycle) raises ``_NotPlain`` and the caller takes the full
    path, which finds and names the problem.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if -_PLAIN_INT < value < _PLAIN_INT:  # type: ignore[operator]
            return value
        raise _NotPlain
    if kind is float:
        if math.isfinite(value):  # type: ignore[arg-type]
            return value
        raise _NotPlain
    if depth >= _MAX_DEPTH:
        raise _NotPlain
    if kind is dict:
        copy = {}
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise _NotPlain
            copy[key] = _plain_copy(item, depth + 1)
        return copy
    if kind is list or kind is tuple:
        return [_plain_copy(item, depth + 1) for item in value]  # type: ignore[attr-defined]
    raise _NotPlain


def _describe_return(value: object) -> str:
    if value is None:
        return "None"
    return f"a {_type_name(value)} ({_short(value)})"


def _normalize(value: object, handler_name: str) -> dict[str, object]:
    who = f"handler {handler_name!r}"
    if not isinstance(value, dict):
        return failure_result(
            PERMANENT_ERROR,
            f"{who} returned {_describe_return(value)}: expected a dict such as {_EXAMPLE}",
        )
    try:
        # The usual result is plain JSON already: copy it in one pass.
        result: dict[str, object] = _plain_copy(value, 0)  # type: ignore[assignment]
    except _NotPlain:
        problem = _json_problem(value, "", 0, set())
        if problem:
            return failure_result(
                PERMANENT_ERROR, f"{who} returned a result that is not JSON: {problem}"
            )
        try:
            result = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError) as exc:
            return failure_result(
                PERMANENT_ERROR, f"{who} returned a result that is not JSON: {_safe_str(exc)}"
            )

    status = result.setdefault("status", "success")
    if not isinstance(status, str) or not status.strip():
        return failure_result(
            PERMANENT_ERROR,
            f"{who} returned status={_short(status)}: expected a non-empty string "
            f"such as 'success', 'failure' or a custom status",
        )
    if "data" in result:
        if result["data"] is None:
            del result["data"]
        elif not isinstance(result["data"], dict):
            return failure_result(
                PERMANENT_ERROR,
                f"{who} returned data={_short(result['data'])}: 'data' must be a dict "
                f"(a JSON object), as in {_EXAMPLE}",
            )
    if status == "failure":
        error = result.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        if not isinstance(error, dict) or not isinstance(code, str) or not code.strip():
            return failure_result(
                PERMANENT_ERROR,
                f"{who} returned status 'failure' without a valid error "
                f"(got error={_short(error)}): expected {_ERROR_SHAPE}",
            )
        message = error.get("message")
        if message is None or message == "":
            error["message"] = f"{who} reported a {code} failure without a message"
        elif not isinstance(message, str):
            error["message"] = json.dumps(message)
    return dict(result)


def normalize_result(value: object, *, handler_name: str) -> dict[str, object]:
    """The wire ``result`` for what a handler returned. Never raises.

    - a dict with ``status``: kept, custom statuses included;
    - a dict without ``status``: ``status: "success"`` is added. The
      reference README's own TaskFiles example returns ``{"data": {...}}``,
      and the orchestrator reads a missing status as success too;
    - ``data``, when present, must be a dict (``None`` is dropped);
    - ``status: "failure"`` needs ``error.code`` (a string); a missing message
      is filled in, a non-string one is turned into text;
    - None, a non-dict, or anything JSON cannot carry (sets, bytes, NaN,
      non-string keys, objects, circular references) becomes a
      ``PERMANENT_ERROR`` failure saying what was wrong and where
      (``data['x'][2]``): see the module doc for why PERMANENT.

    The returned dict is a fresh copy made of JSON types only, so a handler
    that keeps a reference to what it returned cannot change the result
    afterwards.
    """
    try:
        return _normalize(value, handler_name)
    except Exception as exc:  # a dict subclass with hostile methods, say
        return failure_result(
            PERMANENT_ERROR,
            f"handler {handler_name!r} returned a result that could not be read: "
            f"{type(exc).__name__}: {_safe_str(exc)}",
        )

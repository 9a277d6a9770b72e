"""The RCA wire format spoken by Avtomatika 1.0b10 (RXON 1.0b2): one replaceable part.

Everything that knows a route, a header name, a JSON key or a status code of
the orchestrator lives here and nowhere else: the state machine asks this
module for a :class:`HttpRequest` and hands it the raw reply to classify. A
later wire (1.0b11+: flat results, skill registration, signed messages) is a
second class with the same methods, chosen when the machine is built.

Parsing never raises: every reply becomes one of the typed replies below,
malformed ones included, because a garbage answer from a peer must never
crash the worker's loop.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

__all__ = [
    "CancelCommand",
    "CommandProblem",
    "HttpRequest",
    "MalformedTask",
    "NoTask",
    "OrchestratorTask",
    "Outcome",
    "ReplyKind",
    "WireV1",
    "classify_status",
    "parse_retry_after",
]

JSON_HEADERS: Final = (("Content-Type", "application/json"),)
#: Per-orchestrator request parts kept by a WireV1 (there are only a few orchestrators).
_CACHE_LIMIT: Final = 64


@dataclass(frozen=True, kw_only=True, slots=True)
class HttpRequest:
    """A complete request for an adapter to perform: nothing left to compute.

    ``headers`` carries the token: adapters must not log a request's headers.
    """

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    timeout: float

    def __repr__(self) -> str:  # the token must never reach a log line
        return f"HttpRequest(method={self.method!r}, url={self.url!r}, timeout={self.timeout!r})"


class ReplyKind:
    """How a reply should be treated, whatever the route."""

    OK: Final = "ok"
    RETRY: Final = "retry"  # network trouble, 429, 5xx: back off and try again
    AUTH: Final = "auth"  # 401/403: the token is wrong; retry slowly, log loudly
    FINAL: Final = "final"  # any other 4xx: retrying will not help


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """The classification of a reply to register, heartbeat or result."""

    kind: str
    retry_after: float | None = None
    detail: str = ""
    unknown_worker: bool = False


#: The outcome of every 2xx reply (outcomes are immutable: one object serves them all).
_OK: Final = Outcome(kind=ReplyKind.OK)


@dataclass(frozen=True, kw_only=True, slots=True)
class OrchestratorTask:
    """A well-formed task handed out by a long poll."""

    job_id: str
    task_id: str
    type: str
    params: Any
    priority: int
    tracing_context: Any
    params_metadata: Any


@dataclass(frozen=True, kw_only=True, slots=True)
class NoTask:
    """The long poll ended without a task (204), or failed (``outcome`` says how)."""

    outcome: Outcome


@dataclass(frozen=True, kw_only=True, slots=True)
class MalformedTask:
    """A 200 reply to a poll that is not a usable task.

    ``job_id``/``task_id`` are set when they could be read, so that the task can
    still be answered with a failure instead of being silently lost.
    """

    reason: str
    job_id: str | None
    task_id: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class CancelCommand:
    """``cancel_task`` received on the command channel."""

    task_id: str
    job_id: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class CommandProblem:
    """A command message that could not be understood or is not supported."""

    reason: str


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header; HTTP dates and garbage count as absent."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return seconds


def classify_status(status: int | None, retry_after: str | None = None) -> Outcome:
    """Map a status code (``None`` = no reply at all) to what the worker should do."""
    if status is None:
        return Outcome(kind=ReplyKind.RETRY, detail="no reply")
    if 200 <= status < 300:
        return _OK
    if status == 429 or status >= 500:
        return Outcome(
            kind=ReplyKind.RETRY,
            retry_after=parse_retry_after(retry_after),
            detail=f"HTTP {status}",
        )
    if status in (401, 403):
        return Outcome(kind=ReplyKind.AUTH, detail=f"HTTP {status}: token rejected")
    return Outcome(kind=ReplyKind.FINAL, detail=f"HTTP {status}")


def _loads(body: bytes) -> tuple[bool, Any]:
    try:
        if body[:1] == b"{" and body[1:2] != b"\x00":
            # What json.loads(bytes) does for a body that starts with "{" (its
            # encoding sniffing can only answer UTF-8 here), without the sniffing.
            return True, json.loads(body.decode("utf-8", "surrogatepass"))
        return True, json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False, None


# json.dumps(obj, separators=(",", ":"), allow_nan=False), minus building an encoder per call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _dumps(obj: object) -> bytes:
    return _ENCODER.encode(obj).encode()


def _snippet(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", "replace")
    return text + ("…" if len(body) > limit else "")


def _id(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


class WireV1:
    """Requests and replies of the pre-1.0b11 wire (``/_worker/...`` routes)."""

    version: Final = "rca-1.0b10"

    def __init__(self, *, poll_timeout: float, request_timeout: float = 30.0) -> None:
        # The client must wait longer than the server holds a poll, or the
        # orchestrator may pop a task into a socket nobody reads any more.
        self._poll_timeout = poll_timeout
        self._request_timeout = request_timeout
        # Built once per orchestrator: a poll request is always the same (and
        # immutable), a result's URL and headers too.
        self._polls: dict[tuple[str, str, str], HttpRequest] = {}
        self._result_routes: dict[tuple[str, str], tuple[str, tuple[tuple[str, str], ...]]] = {}

    # -- requests -------------------------------------------------------------------

    @staticmethod
    def _headers(token: str, body: bool) -> tuple[tuple[str, str], ...]:
        auth = (("X-Worker-Token", token),)
        return auth + JSON_HEADERS if body else auth

    @staticmethod
    def _base(url: str) -> str:
        return url.rstrip("/")

    def register(self, *, url: str, token: str, info: Mapping[str, Any]) -> HttpRequest:
        return HttpRequest(
            method="POST",
            url=f"{self._base(url)}/_worker/workers/register",
            headers=self._headers(token, True),
            body=_dumps(dict(info)),
            timeout=self._request_timeout,
        )

    def heartbeat(
        self, *, url: str, token: str, worker_id: str, state: Mapping[str, Any]
    ) -> HttpRequest:
        return HttpRequest(
            method="PATCH",
            url=f"{self._base(url)}/_worker/workers/{quote(worker_id, safe='')}",
            headers=self._headers(token, True),
            body=_dumps(dict(state)),
            timeout=self._request_timeout,
        )

    def poll(self, *, url: str, token: str, worker_id: str) -> HttpRequest:
        key = (url, token, worker_id)
        request = self._polls.get(key)
        if request is None:
            if len(self._polls) >= _CACHE_LIMIT:
                self._polls.clear()
            request = self._polls[key] = HttpRequest(
                method="GET",
                url=f"{self._base(url)}/_worker/workers/{quote(worker_id, safe='')}/tasks/next",
                headers=self._headers(token, False),
                body=None,
                timeout=self._poll_timeout,
            )
        return request

    def result(
        self,
        *,
        url: str,
        token: str,
        worker_id: str,
        job_id: str,
        task_id: str,
        result: Mapping[str, Any],
    ) -> HttpRequest:
        body = {"job_id": job_id, "task_id": task_id, "worker_id": worker_id, "result": result}
        route = self._result_routes.get((url, token))
        if route is None:
            if len(self._result_routes) >= _CACHE_LIMIT:
                self._result_routes.clear()
            route = self._result_routes[(url, token)] = (
                f"{self._base(url)}/_worker/tasks/result",
                self._headers(token, True),
            )
        return HttpRequest(
            method="POST",
            url=route[0],
            headers=route[1],
            body=_dumps(body),
            timeout=self._request_timeout,
        )

    def command_channel(
        self, *, url: str, token: str, worker_id: str
    ) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The WebSocket URL (ws:// or wss://) and handshake headers."""
        base = self._base(url)
        if base.startswith("https://"):
            base = "wss://" + base[len("https://") :]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://") :]
        return f"{base}/_worker/ws/{quote(worker_id, safe='')}", self._headers(token, False)

    @staticmethod
    def progress(*, task_id: str, job_id: str, progress: float, message: str) -> str:
        return json.dumps(
            {
                "event": "progress_update",
                "task_id": task_id,
                "job_id": job_id,
                "progress": progress,
                "message": message,
            },
            allow_nan=False,
        )

    @staticmethod
    def registration_info(
        *,
        worker_id: str,
        worker_type: str,
        supported_tasks: Sequence[str],
        max_concurrent_tasks: int,
        cost_per_skill: Mapping[str, Any],
        installed_models: Sequence[Any],
        installed_software: Mapping[str, Any],
        hostname: str,
        ip_address: str,
        cpu_cores: int,
        gpu_model: str | None,
        gpu_vram_gb: float,
        websockets: bool,
    ) -> dict[str, Any]:
        gpu = {"model": gpu_model, "vram_gb": gpu_vram_gb} if gpu_model else None
        return {
            "worker_id": worker_id,
            "worker_type": worker_type,
            "supported_tasks": list(supported_tasks),
            "max_concurrent_tasks": max_concurrent_tasks,
            "cost_per_skill": dict(cost_per_skill),
            "installed_models": list(installed_models),
            "installed_software": dict(installed_software),
            "hostname": hostname,
            "ip_address": ip_address,
            "resources": {"cpu_cores": cpu_cores, "gpu_info": gpu},
            "capabilities": {"websockets": websockets},
        }

    @staticmethod
    def heartbeat_state(
        *,
        load: int,
        idle: bool,
        supported_tasks: Sequence[str],
        hot_cache: Sequence[str],
        skill_dependencies: Mapping[str, Sequence[str]],
        hot_skills: Sequence[str],
    ) -> dict[str, Any]:
        # The server shallow-merges this into its record: every key is always
        # sent, empty lists included, so no stale value survives.
        return {
            "load": load,
            "status": "idle" if idle else "busy",
            "supported_tasks": list(supported_tasks),
            "hot_cache": list(hot_cache),
            "skill_dependencies": {k: list(v) for k, v in skill_dependencies.items()},
            "hot_skills": list(hot_skills),
        }

    # -- replies --------------------------------------------------------------------

    @staticmethod
    def parse_register(status: int | None, retry_after: str | None, body: bytes) -> Outcome:
        return classify_status(status, retry_after)

    @staticmethod
    def parse_heartbeat(status: int | None, retry_after: str | None, body: bytes) -> Outcome:
        """1.0b8 says 404 for a worker it does not know; 1.0b10 says ``200 null``."""
        if status == 404:
            return Outcome(kind=ReplyKind.OK, unknown_worker=True, detail="HTTP 404")
        outcome = classify_status(status, retry_after)
        if outcome.kind == ReplyKind.OK:
            ok, value = _loads(body)
            if ok and value is None:
                return Outcome(kind=ReplyKind.OK, unknown_worker=True, detail="200 null")
        return outcome

    @staticmethod
    def parse_result(status: int | None, retry_after: str | None, body: bytes) -> Outcome:
        outcome = classify_status(status, retry_after)
        if outcome.kind != ReplyKind.OK and body:
            return Outcome(
                kind=outcome.kind,
                retry_after=outcome.retry_after,
                detail=f"{outcome.detail}: {_snippet(body)}",
            )
        return outcome

    @staticmethod
    def parse_poll(
        status: int | None, retry_after: str | None, body: bytes
    ) -> OrchestratorTask | NoTask | MalformedTask:
        if status == 204:
            return NoTask(outcome=_OK)
        outcome = classify_status(status, retry_after)
        if outcome.kind != ReplyKind.OK:
            return NoTask(outcome=outcome)
        if not body.strip():  # a 200 with an empty body carries no task either
            return NoTask(outcome=_OK)
        ok, value = _loads(body)
        if not ok:
            return MalformedTask(
                reason=f"task body is not JSON: {_snippet(body)!r}", job_id=None, task_id=None
            )
        if value is None or value == {}:
            # Some servers answer an empty poll with 200 and nothing in it.
            return NoTask(outcome=_OK)
        if not isinstance(value, dict):
            return MalformedTask(
                reason=f"task is a JSON {type(value).__name__}, not an object",
                job_id=None,
                task_id=None,
            )
        job_id = _id(value.get("job_id"))
        task_id = _id(value.get("task_id"))
        task_type = value.get("type")
        if job_id is None or task_id is None or not (isinstance(task_type, str) and task_type):
            missing = [
                name
                for name, present in (
                    ("job_id", job_id),
                    ("task_id", task_id),
                    ("type", isinstance(task_type, str) and task_type),
                )
                if not present
            ]
            return MalformedTask(
                reason=f"task lacks a valid {', '.join(missing)}", job_id=job_id, task_id=task_id
            )
        priority = value.get("priority", 0)
        if type(priority) is not int and (  # an exact int is the usual case, and valid
            isinstance(priority, bool)
            or not isinstance(priority, int | float)
            or (isinstance(priority, float) and not math.isfinite(priority))  # Infinity, NaN
        ):
            priority = 0
        assert job_id is not None and task_id is not None and isinstance(task_type, str)
        return OrchestratorTask(
            job_id=job_id,
            task_id=task_id,
            type=task_type,
            params=value.get("params", {}),
            priority=int(priority),
            tracing_context=value.get("tracing_context"),
            params_metadata=value.get("params_metadata"),
        )

    @staticmethod
    def parse_command(text: str | bytes) -> CancelCommand | CommandProblem:
        ok, value = _loads(text if isinstance(text, bytes) else text.encode("utf-8", "replace"))
        if not ok:
            return CommandProblem(reason="command is not JSON")
        if not isinstance(value, dict):
            return CommandProblem(reason=f"command is a JSON {type(value).__name__}")
        command = value.get("command")
        if command == "cancel_task":
            task_id = _id(value.get("task_id"))
            if task_id is None:
                return CommandProblem(reason="cancel_task without a task_id")
            return CancelCommand(task_id=task_id, job_id=_id(value.get("job_id")))
        return CommandProblem(reason=f"unsupported command {command!r}")

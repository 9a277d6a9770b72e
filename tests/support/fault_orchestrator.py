"""A fault-injecting fake Avtomatika orchestrator for the SDK's reliability tests.

It speaks the worker protocol of ``/work/shared/spec/PROTOCOL.md`` (avtomatika 1.0b10) over
real HTTP and WebSocket on 127.0.0.1 (aiohttp.web), records everything it sees and can be told,
at any moment, to misbehave.

Routes (all check ``X-Worker-Token``; a wrong or missing token gets ``401``):

============  ================================================  ==========================
route name    request                                           normal reply
============  ================================================  ==========================
register      ``POST  /_worker/workers/register``               ``200 {"status": "registered"}``
heartbeat     ``PATCH /_worker/workers/{worker_id}``            ``200 <merged record>``
poll          ``GET   /_worker/workers/{worker_id}/tasks/next`` ``200 <task>`` or ``204``
result        ``POST  /_worker/tasks/result``                   ``200 {"status": "ok"}``
ws            ``GET   /_worker/ws/{worker_id}`` (WebSocket)     upgrade
============  ================================================  ==========================

Fault actions (objects; give them to ``script()``/``set_fault()`` or, as JSON, to the control
endpoint; every action also exists as ``{"kind": ...}`` JSON, see ``action_from_json``):

* ``Reply(status, text, headers, content_type)`` - a canned response instead of the normal
  handler (the request is recorded, its effect is not: a scripted 200 on ``result`` does NOT
  accept the result). Shortcuts: ``Reply.of_json(value, status)``, ``Reply.error(status=500)``
  (5xx/4xx with ``{"error": ...}``), ``Reply.rate_limited(retry_after=1 | "date" | None)``
  (429 with or without ``Retry-After``), ``Reply.malformed_json()`` (200, broken JSON body),
  ``Reply.null()`` (``200 null``), ``Reply.not_found()``, ``Reply.empty(204)``.
* ``Hang(then=None, limit=300)`` - never answer until ``release_hangs()`` (then do ``then`` or
  the normal behaviour), the client gives up (recorded as ``client_gone``), ``stop()`` or
  ``refuse_connections()`` (connection aborted), or ``limit`` seconds (aborted).
* ``Reset(prefix, rst=True)`` - write ``prefix`` raw bytes (part of a response) and abort the
  TCP connection (RST). ``Reset.immediately()``, ``Reset.mid_headers()``, ``Reset.mid_body()``.
* ``Delay(seconds, then=None)`` - answer late (then ``then`` or the normal behaviour).
* ``Normal()`` / ``NORMAL`` - the normal behaviour (useful as a placeholder in a script).

Note: aiohttp's client silently retries an idempotent request (GET: poll, ws handshake) once
after a reset or disconnect, so one ``Reset`` on ``poll`` is invisible to an aiohttp worker;
script two (or use ``set_fault``) to make it see one.

How actions are chosen, per route: ``script(route, *actions)`` queues one-shot actions that
are consumed in order, one per request; when the script is empty the sticky
``set_fault(route, action)`` applies to every request; with neither, normal behaviour.
``clear_faults(route=None)`` empties both.

Switches (plain attributes, settable at any time; the control endpoint sets them too):

* ``poll_hold`` (s, default 30) - how long a long poll is parked before ``204``.
* ``unknown_worker_reply`` ``"null"`` (1.0b10: ``200 null``) or ``"404"`` (1.0b8) - the
  heartbeat reply for a worker that is not registered (never, or ``forget_worker()``).
* ``worker_ttl`` (s or None) - forget workers silent (no register/heartbeat) that long.
* ``result_accept_on_try`` (int, default 1) - a result for a task_id is accepted only on its
  N-th POST; earlier tries get ``result_reject_status`` (default 503).
* ``require_token`` (default True) - check ``X-Worker-Token`` against ``token``.
* ``strict_dispatch`` (default False) - hand a task only to a registered worker whose last
  heartbeat said ``idle`` and listed the task's type (like the real dispatcher).
* ``swallow_abandoned_polls`` (default False) - reproduce the 1.0b10 bug: a poll the client
  gave up on stays parked server-side until its hold ends and pops (loses) a task enqueued
  meanwhile unless the worker's last heartbeat said ``busy``. Lost tasks land in ``swallowed``.
* ``ws_answer_pings`` (default True) - False: the server ignores WebSocket pings (dead socket).
* ``ws_heartbeat`` (s or None) - the server pings new WebSockets at this interval.
* ``compress_responses`` (default False) - gzip/deflate JSON replies over 500 bytes.

Connection-level faults (methods): ``refuse_connections(drop_existing=True)`` stops listening
(and aborts open connections) while keeping all state, ``accept_connections()`` listens again on
the same port; ``restart(downtime=0, forget_workers=False)`` stops and starts on the same port;
``stop(graceful=False)`` aborts parked requests (``graceful=True``: parked polls get 204, sockets
a close frame 1001). WebSocket: ``send_command(worker_id, dict | str | bytes)``,
``cancel_task(...)``, ``drop_ws(worker_id, abort=False, code=1001)``.

Tasks: ``enqueue(task, worker_id=None)`` takes any JSON value (a dict, but also a list or a
string to hand out a task that is not an object) or ``RawTask(text)`` (sent verbatim, e.g.
malformed JSON). Builders: ``make_task(...)``, ``task_without(*keys)``, ``huge_params_task(size)``.

Records (for assertions): ``requests`` (``RecordedRequest``: route, method, path, worker_id,
headers with the token value redacted, token_ok, body, time, status, outcome), ``workers`` (last
registration body per worker), ``worker_records`` (merged), ``heartbeats``, ``results``
(accepted), ``rejected_results``, ``result_attempts``, ``dispatched``, ``swallowed``,
``ws_connects``, ``ws_messages``, ``ws_sent``, ``restarts``. Times are ``time.monotonic()`` (system-wide on
Linux, so comparable across processes). Helpers: ``count(route, since=, status=)``,
``results_for(task_id)``, ``result_counts()``, ``duplicate_results()``, ``wait_for(pred,
timeout)``, ``wait_for_count``, ``wait_for_results``, ``wait_for_ws``, ``wait_for_hanging``.

Pytest (registered in tests/conftest.py): fixtures ``anyio_backend`` ("asyncio"),
``fault_orchestrator`` (started, token ``DEFAULT_TOKEN``, ``poll_hold=FIXTURE_POLL_HOLD``),
``fault_orchestrator_factory`` (``await make(**kwargs)``) and ``fault_orchestrator_process``
(a ``FaultOrchestratorProcess``: the fake in a child process, driven by ``ControlClient``).

Standalone: ``python -m tests.support.fault_orchestrator --port P --token T [--poll-hold S]
[--control-port C] [--unknown-worker-reply null|404]`` prints one JSON line (url, control_url,
port, control_port, pid) when ready and serves until SIGTERM/SIGINT or ``POST
/_control/shutdown``. Control routes (JSON, no token, never recorded), on the main port and on
the control port when one is given (which stays up while the main port refuses connections):

``GET /_control/state``, ``GET /_control/requests?route=&since=``,
``GET /_control/results?task_id=``, ``POST /_control/enqueue`` ``{"task"|"raw"|"make"|"huge",
"worker_id"?}``, ``POST /_control/script`` ``{"route", "actions": [...]}``,
``POST /_control/fault`` ``{"route", "action": {...} | null}``, ``POST /_control/clear_faults``
``{"route"?}``, ``POST /_control/config`` ``{switch: value}``, ``POST /_control/release``
``{"route"?}``, ``POST /_control/forget`` ``{"worker_id"?}``, ``POST /_control/ws/send``
``{"worker_id", "command" | "raw"}``, ``POST /_control/ws/drop`` ``{"worker_id", "abort"?,
"code"?}``, ``POST /_control/refuse`` ``{"seconds"?}``, ``POST /_control/accept``,
``POST /_control/restart`` ``{"downtime"?, "forget_workers"?}``, ``POST /_control/wait``
``{"route"?, "count"?, "since"?, "task_id"?, "results"?, "ws_worker"?, "timeout"?}``,
``POST /_control/clear``, ``POST /_control/shutdown``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, NoReturn

import pytest
from aiohttp import WSCloseCode, WSMsgType, web

__all__ = [
    "DEFAULT_TOKEN",
    "FIXTURE_POLL_HOLD",
    "NORMAL",
    "ROUTES",
    "Action",
    "ControlClient",
    "Delay",
    "DispatchRecord",
    "FaultOrchestrator",
    "FaultOrchestratorProcess",
    "Hang",
    "HeartbeatRecord",
    "Normal",
    "RawTask",
    "RecordedRequest",
    "Reply",
    "Reset",
    "ResultRecord",
    "WsMessage",
    "action_from_json",
    "huge_params_task",
    "make_task",
    "task_without",
]

DEFAULT_TOKEN: Final = "fault-orchestrator-token"
FIXTURE_POLL_HOLD: Final = 2.0
HOST: Final = "127.0.0.1"
TOKEN_HEADER: Final = "X-Worker-Token"
ROUTES: Final[tuple[str, ...]] = ("register", "heartbeat", "poll", "result", "ws")
REDACTED: Final = "<redacted>"
REPO_ROOT: Final = Path(__file__).resolve().parents[2]

UnknownWorkerReply = Literal["null", "404"]

# --------------------------------------------------------------------------------------------
# Fault actions
# --------------------------------------------------------------------------------------------


class Action:
    """Base class of what the fake does with one request."""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class Normal(Action):
    """The normal protocol behaviour."""

    def to_json(self) -> dict[str, Any]:
        return {"kind": "normal"}


NORMAL: Final = Normal()


@dataclass(frozen=True)
class Reply(Action):
    """A canned HTTP response instead of the normal handler."""

    status: int = 200
    text: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = "application/json"

    @classmethod
    def of_json(
        cls, value: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Reply:
        return cls(status=status, text=json.dumps(value), headers=dict(headers or {}))

    @classmethod
    def error(cls, status: int = 500, message: str = "injected fault") -> Reply:
        return cls.of_json({"error": message}, status=status)

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = 1, status: int = 429) -> Reply:
        headers: dict[str, str] = {}
        if retry_after is not None:
            if isinstance(retry_after, float) and retry_after.is_integer():
                retry_after = int(retry_after)
            headers["Retry-After"] = str(retry_after)
        return cls.of_json({"error": "Too Many Requests"}, status=status, headers=headers)

    @classmethod
    def malformed_json(
        cls, status: int = 200, text: str = '{"job_id": "job-broken", "task_id": "tas'
    ) -> Reply:
        return cls(status=status, text=text)

    @classmethod
    def null(cls) -> Reply:
        return cls(status=200, text="null")

    @classmethod
    def not_found(cls, message: str = "Worker not found") -> Reply:
        return cls.error(404, message)

    @classmethod
    def empty(cls, status: int = 204) -> Reply:
        return cls(status=status, text="", content_type=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "reply",
            "status": self.status,
            "text": self.text,
            "headers": dict(self.headers),
            "content_type": self.content_type,
        }


@dataclass(frozen=True)
class Hang(Action):
    """Never answer until released (then ``then``), the client leaves, or the fake stops."""

    then: Action | None = None
    limit: float = 300.0

    def to_json(self) -> dict[str, Any]:
        return {"kind": "hang", "then": _then_json(self.then), "limit": self.limit}


@dataclass(frozen=True)
class Delay(Action):
    """Answer after ``seconds`` (with ``then``, or normally)."""

    seconds: float
    then: Action | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": "delay", "seconds": self.seconds, "then": _then_json(self.then)}


_PARTIAL_HEADERS: Final = b"HTTP/1.1 200 OK\r\nContent-Type: applic"
_PARTIAL_BODY: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    b'{"job_id": "job-reset", "task_id": "task-re'
)


@dataclass(frozen=True)
class Reset(Action):
    """Write ``prefix`` raw bytes, then abort the TCP connection (RST when ``rst``)."""

    prefix: bytes = _PARTIAL_BODY
    rst: bool = True

    @classmethod
    def immediately(cls) -> Reset:
        return cls(prefix=b"")

    @classmethod
    def mid_headers(cls) -> Reset:
        return cls(prefix=_PARTIAL_HEADERS)

    @classmethod
    def mid_body(cls) -> Reset:
        return cls(prefix=_PARTIAL_BODY)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "reset", "prefix": self.prefix.decode("latin-1"), "rst": self.rst}


def _then_json(action: Action | None) -> dict[str, Any] | None:
    return None if action is None else action.to_json()


def action_from_json(data: Mapping[str, Any] | Action | None) -> Action | None:
    """Build an action from its JSON form (``{"kind": ...}``); ``None`` stays ``None``.

    Kinds: ``normal``; ``reply`` (status, text | json, headers, content_type); ``error``
    (status, message); ``rate_limited`` (retry_after, status); ``malformed_json`` (status,
    text); ``null``; ``not_found``; ``empty`` (status); ``hang`` (then, limit); ``delay``
    (seconds, then); ``reset`` (prefix as latin-1 text | at: immediately/mid_headers/mid_body,
    rst).
    """
    if data is None or isinstance(data, Action):
        return data
    kind = data.get("kind")
    if kind == "normal":
        return NORMAL
    if kind == "reply":
        headers = dict(data.get("headers") or {})
        status = int(data.get("status", 200))
        if "json" in data:
            return Reply.of_json(data["json"], status=status, headers=headers)
        return Reply(
            status=status,
            text=str(data.get("text", "")),
            headers=headers,
            content_type=data.get("content_type", "application/json"),
        )
    if kind == "error":
        return Reply.error(int(data.get("status", 500)), str(data.get("message", "injected")))
    if kind == "rate_limited":
        return Reply.rate_limited(data.get("retry_after", 1), int(data.get("status", 429)))
    if kind == "malformed_json":
        text = data.get("text")
        status = int(data.get("status", 200))
        return Reply.malformed_json(status) if text is None else Reply.malformed_json(status, text)
    if kind == "null":
        return Reply.null()
    if kind == "not_found":
        return Reply.not_found()
    if kind == "empty":
        return Reply.empty(int(data.get("status", 204)))
    if kind == "hang":
        return Hang(then=action_from_json(data.get("then")), limit=float(data.get("limit", 300)))
    if kind == "delay":
        return Delay(float(data["seconds"]), then=action_from_json(data.get("then")))
    if kind == "reset":
        rst = bool(data.get("rst", True))
        at = data.get("at")
        if at is not None:
            presets = {
                "immediately": b"",
                "mid_headers": _PARTIAL_HEADERS,
                "mid_body": _PARTIAL_BODY,
            }
            return Reset(prefix=presets[str(at)], rst=rst)
        prefix = data.get("prefix")
        if prefix is None:
            return Reset(rst=rst)
        return Reset(prefix=str(prefix).encode("latin-1"), rst=rst)
    raise ValueError(f"unknown action kind: {kind!r}")


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawTask:
    """A poll reply body sent verbatim (e.g. malformed JSON) instead of a JSON-encoded task."""

    text: str


_ids = itertools.count(1)


def make_task(
    type: str = "echo",
    params: Mapping[str, Any] | None = None,
    *,
    job_id: str | None = None,
    task_id: str | None = None,
    tracing_context: Mapping[str, Any] | None = None,
    params_metadata: Mapping[str, Any] | None = None,
    priority: float | None = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A well-formed task as the orchestrator hands it out (``priority=None`` omits it)."""
    n = next(_ids)
    suffix = uuid.uuid4().hex[:8]
    task: dict[str, Any] = {
        "job_id": job_id if job_id is not None else f"job-{n}-{suffix}",
        "task_id": task_id if task_id is not None else f"task-{n}-{suffix}",
        "type": type,
        "params": dict(params) if params is not None else {},
        "tracing_context": dict(tracing_context) if tracing_context is not None else {},
        "params_metadata": dict(params_metadata) if params_metadata is not None else {},
    }
    if priority is not None:
        task["priority"] = priority
    task.update(extra)
    return task


def task_without(*keys: str, **kwargs: Any) -> dict[str, Any]:
    """A task from ``make_task(**kwargs)`` with ``keys`` removed (e.g. "task_id", "type")."""
    task = make_task(**kwargs)
    for key in keys:
        task.pop(key, None)
    return task


def huge_params_task(size: int = 4 * 1024 * 1024, **kwargs: Any) -> dict[str, Any]:
    """A task whose params hold a ``size``-character string under ``"blob"``."""
    params = dict(kwargs.pop("params", None) or {})
    params["blob"] = "x" * size
    return make_task(params=params, **kwargs)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request under /_worker/ (control requests are not recorded)."""

    route: str  # one of ROUTES, or "other"
    method: str
    path: str
    worker_id: str | None
    headers: dict[str, str]  # the token's value is replaced by REDACTED
    token_ok: bool
    body: Any  # parsed JSON, or None (empty or not JSON: see body_error)
    body_error: bool
    body_size: int
    time: float  # time.monotonic() on arrival
    status: int | None = None  # None: never answered (hang, reset, client gone, abort)
    outcome: str = "pending"  # normal|scripted|unauthorized|reset|aborted|client_gone
    action: str = "normal"  # the action kind applied first

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class HeartbeatRecord:
    worker_id: str
    body: Any
    known: bool
    time: float


@dataclass(frozen=True)
class ResultRecord:
    job_id: Any
    task_id: str
    worker_id: Any
    result: Any
    attempt: int
    time: float


@dataclass(frozen=True)
class DispatchRecord:
    worker_id: str
    task: Any  # the task value, or RawTask.text
    time: float


@dataclass(frozen=True)
class WsMessage:
    worker_id: str
    data: Any  # parsed JSON of a text frame, else None
    raw: str | bytes
    time: float


@dataclass
class _QueuedTask:
    value: Any
    raw: str | None
    worker_id: str | None

    @property
    def recorded(self) -> Any:
        return self.raw if self.raw is not None else self.value


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# The fake orchestrator
# --------------------------------------------------------------------------------------------

_SWITCHES: Final = (
    "poll_hold",
    "unknown_worker_reply",
    "worker_ttl",
    "result_accept_on_try",
    "result_reject_status",
    "require_token",
    "strict_dispatch",
    "swallow_abandoned_polls",
    "ws_answer_pings",
    "ws_heartbeat",
    "compress_responses",
)


class FaultOrchestrator:
    """The fake orchestrator; see the module docstring for routes, switches and records."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        port: int = 0,
        control_port: int | None = None,
        poll_hold: float = 30.0,
        unknown_worker_reply: UnknownWorkerReply = "null",
        shutdown_timeout: float = 2.0,
    ) -> None:
        self.token = token
        self.port = port
        self.control_port = control_port
        self.shutdown_timeout = shutdown_timeout
        # switches
        self.poll_hold = poll_hold
        self.unknown_worker_reply: UnknownWorkerReply = unknown_worker_reply
        self.worker_ttl: float | None = None
        self.result_accept_on_try = 1
        self.result_reject_status = 503
        self.require_token = True
        self.strict_dispatch = False
        self.swallow_abandoned_polls = False
        self.ws_answer_pings = True
        self.ws_heartbeat: float | None = None
        self.compress_responses = False
        # records
        self.requests: list[RecordedRequest] = []
        self.workers: dict[str, dict[str, Any]] = {}
        self.worker_records: dict[str, dict[str, Any]] = {}
        self.heartbeats: list[HeartbeatRecord] = []
        self.results: list[ResultRecord] = []
        self.rejected_results: list[ResultRecord] = []
        self.result_attempts: Counter[str] = Counter()
        self.dispatched: list[DispatchRecord] = []
        self.swallowed: list[DispatchRecord] = []
        self.ws_connects: Counter[str] = Counter()
        self.ws_messages: list[WsMessage] = []
        self.ws_sent: list[tuple[str, Any]] = []
        self.restarts = 0  # completed restart() calls
        # internals
        self._last_seen: dict[str, float] = {}
        self._inflight: dict[int, RecordedRequest] = {}  # id(request) -> its record
        self._queue: deque[_QueuedTask] = deque()
        self._scripts: dict[str, deque[Action]] = {route: deque() for route in ROUTES}
        self._sticky: dict[str, Action] = {}
        self._release_gen: Counter[str] = Counter()
        self._hanging: Counter[str] = Counter()
        self._sockets: dict[str, list[_WsConn]] = {}
        self._changed = asyncio.Event()
        self._stopping = False
        self._graceful = False
        self._listening = False
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._control_site: web.SockSite | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._control_tasks: set[asyncio.Task[None]] = set()
        self.on_shutdown_request: Callable[[], None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> FaultOrchestrator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def control_url(self) -> str:
        port = self.control_port if self.control_port else self.port
        return f"http://{HOST}:{port}"

    def ws_url(self, worker_id: str) -> str:
        return f"ws://{HOST}:{self.port}/_worker/ws/{worker_id}"

    @property
    def headers(self) -> dict[str, str]:
        """The auth header a well-behaved client sends."""
        return {TOKEN_HEADER: self.token}

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def listening(self) -> bool:
        return self._listening

    async def start(self) -> None:
        """Bind 127.0.0.1 (``port``, 0 = free port; kept for restarts) and serve."""
        if self._runner is not None:
            raise RuntimeError("already started")
        self._stopping = False
        self._graceful = False
        runner = web.AppRunner(
            self._build_app(),
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=self.shutdown_timeout,
        )
        await runner.setup()
        self._runner = runner
        try:
            self._site, self.port = await self._listen(self.port)
            self._listening = True
            if self.control_port is not None:
                self._control_site, self.control_port = await self._listen(self.control_port)
        except BaseException:
            await self._cleanup_runner()
            raise

    async def stop(self, *, graceful: bool = False) -> None:
        """Stop serving, keeping all recorded state (``start()`` again to resume)."""
        if self._runner is None:
            return
        self._stopping = True
        self._graceful = graceful
        self._notify()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for conns in list(self._sockets.values()):
            for conn in list(conns):
                if graceful:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(2.0):
                            await conn.ws.close(code=WSCloseCode.GOING_AWAY)
                else:
                    conn.abort(rst=False)
        if not graceful:
            self._abort_connections(only_main_port=False)
        # let aborted/released handlers finish, so that the runner's shutdown does not wait
        await self._wait_until(lambda: not self._inflight, self.shutdown_timeout)
        await self._cleanup_runner()

    async def close(self) -> None:
        """``stop()`` and also end background control jobs (e.g. a scheduled re-listen)."""
        for task in list(self._control_tasks):
            if task is not asyncio.current_task():
                task.cancel()
        others = [t for t in self._control_tasks if t is not asyncio.current_task()]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        await self.stop()

    async def restart(self, *, downtime: float = 0.0, forget_workers: bool = False) -> None:
        """Simulate an orchestrator restart on the same port (state kept unless told)."""
        await self.stop()
        if forget_workers:
            self.forget_worker()
        if downtime > 0:
            await asyncio.sleep(downtime)
        await self.start()
        self.restarts += 1
        self._notify()

    async def refuse_connections(self, *, drop_existing: bool = True) -> None:
        """Stop listening on the main port (connects are refused); state is kept."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._listening = False
        if drop_existing:
            for conns in list(self._sockets.values()):
                for conn in list(conns):
                    conn.abort(rst=False)
            self._abort_connections(only_main_port=True)
        self._notify()

    async def accept_connections(self) -> None:
        """Listen again on the same port after ``refuse_connections()``."""
        if self._runner is None:
            raise RuntimeError("not started")
        if self._site is None:
            self._site, _ = await self._listen(self.port)
            self._listening = True
            self._notify()

    async def _listen(self, port: int) -> tuple[web.SockSite, int]:
        assert self._runner is not None
        sock = _bind(port)
        bound = int(sock.getsockname()[1])
        site = web.SockSite(self._runner, sock)
        try:
            await site.start()
        except BaseException:
            sock.close()
            raise
        return site, bound

    async def _cleanup_runner(self) -> None:
        runner, self._runner = self._runner, None
        self._site = None
        self._control_site = None
        self._listening = False
        if runner is not None:
            await runner.cleanup()
        self._sockets.clear()
        self._notify()

    def _abort_connections(self, *, only_main_port: bool) -> None:
        if self._runner is None or self._runner.server is None:
            return
        for handler in self._runner.server.connections:
            transport = handler.transport
            if transport is None:
                continue
            if only_main_port:
                sockname = transport.get_extra_info("sockname")
                if not sockname or sockname[1] != self.port:
                    continue
            transport.abort()

    # ---------------------------------------------------------------- fault control

    def script(self, route: str, *actions: Action) -> None:
        """Queue one-shot actions for ``route``, consumed one per request, in order."""
        self._check_route(route)
        self._scripts[route].extend(actions)

    def scripted(self, route: str) -> int:
        """How many scripted actions are still waiting on ``route``."""
        self._check_route(route)
        return len(self._scripts[route])

    def set_fault(self, route: str, action: Action | None) -> None:
        """A sticky action for every request on ``route`` (after its script); None clears."""
        self._check_route(route)
        if action is None or isinstance(action, Normal):
            self._sticky.pop(route, None)
        else:
            self._sticky[route] = action

    def clear_faults(self, route: str | None = None) -> None:
        for name in ROUTES if route is None else (route,):
            self._check_route(name)
            self._scripts[name].clear()
            self._sticky.pop(name, None)

    def release_hangs(self, route: str | None = None) -> int:
        """Release the requests hanging on ``route`` (all routes if None); returns how many."""
        names = ROUTES if route is None else (route,)
        released = 0
        for name in names:
            self._check_route(name)
            self._release_gen[name] += 1
            released += self._hanging[name]
        self._notify()
        return released

    def hanging(self, route: str | None = None) -> int:
        """How many requests are hanging now (on ``route`` or all)."""
        if route is None:
            return sum(self._hanging.values())
        return self._hanging[route]

    def forget_worker(self, worker_id: str | None = None) -> None:
        """Forget one worker (or all): its next heartbeat gets the unknown-worker reply."""
        ids = list(self.worker_records) if worker_id is None else [worker_id]
        for wid in ids:
            self.workers.pop(wid, None)
            self.worker_records.pop(wid, None)
            self._last_seen.pop(wid, None)
        self._notify()

    def configure(self, **switches: Any) -> dict[str, Any]:
        """Set switches by name (see the module docstring); returns all of them."""
        for name, value in switches.items():
            if name not in _SWITCHES:
                raise ValueError(f"unknown switch {name!r}")
            if name == "unknown_worker_reply" and value not in ("null", "404"):
                raise ValueError("unknown_worker_reply must be 'null' or '404'")
            setattr(self, name, value)
        self._notify()
        return self.switches()

    def switches(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SWITCHES}

    @staticmethod
    def _check_route(route: str) -> None:
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")

    # ---------------------------------------------------------------- tasks

    def enqueue(self, task: Any, *, worker_id: str | None = None) -> Any:
        """Queue a task for the long poll (any worker, or only ``worker_id``)."""
        if isinstance(task, RawTask):
            self._queue.append(_QueuedTask(value=None, raw=task.text, worker_id=worker_id))
        else:
            json.dumps(task)  # fail early on values that cannot be sent
            self._queue.append(_QueuedTask(value=task, raw=None, worker_id=worker_id))
        self._notify()
        return task

    def pending_tasks(self) -> list[Any]:
        return [item.recorded for item in self._queue]

    def clear_tasks(self) -> None:
        self._queue.clear()

    def _take_task(self, worker_id: str, *, zombie: bool = False) -> _QueuedTask | None:
        if zombie or self.strict_dispatch:
            record = self._known_record(worker_id)
            if zombie and record is not None and record.get("status") == "busy":
                return None
            if self.strict_dispatch and (record is None or record.get("status") != "idle"):
                return None
        for item in self._queue:
            if item.worker_id not in (None, worker_id):
                continue
            if self.strict_dispatch and not self._accepts(worker_id, item):
                continue
            self._queue.remove(item)
            return item
        return None

    def _accepts(self, worker_id: str, item: _QueuedTask) -> bool:
        if not isinstance(item.value, dict) or "type" not in item.value:
            return True  # malformed tasks are not gated
        record = self.worker_records.get(worker_id) or {}
        supported = record.get("supported_tasks") or []
        return isinstance(supported, list) and item.value["type"] in supported

    # ---------------------------------------------------------------- websocket

    def ws_open(self, worker_id: str) -> int:
        return len(self._open_sockets(worker_id))

    def _open_sockets(self, worker_id: str) -> list[_WsConn]:
        return [c for c in self._sockets.get(worker_id, []) if not c.ws.closed]

    async def send_command(self, worker_id: str, command: Mapping[str, Any] | str | bytes) -> None:
        """Send to the newest open socket of ``worker_id``: a dict as JSON, str/bytes as is."""
        sockets = self._open_sockets(worker_id)
        if not sockets:
            raise LookupError(f"no open WebSocket for worker {worker_id!r}")
        ws = sockets[-1].ws
        if isinstance(command, bytes):
            await ws.send_bytes(command)
        elif isinstance(command, str):
            await ws.send_str(command)
        else:
            await ws.send_str(json.dumps(dict(command)))
        self.ws_sent.append((worker_id, command))
        self._notify()

    async def cancel_task(self, worker_id: str, task_id: str, job_id: str) -> None:
        await self.send_command(
            worker_id, {"command": "cancel_task", "task_id": task_id, "job_id": job_id}
        )

    async def drop_ws(
        self, worker_id: str, *, abort: bool = False, code: int = WSCloseCode.GOING_AWAY
    ) -> int:
        """Close (or, with ``abort``, kill the TCP connection of) the worker's sockets."""
        sockets = self._open_sockets(worker_id)
        for conn in sockets:
            if abort:
                conn.abort(rst=True)
            else:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await conn.ws.close(code=code)
        self._notify()
        return len(sockets)

    # ---------------------------------------------------------------- queries & waiting

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def requests_for(
        self, route: str | None = None, *, since: float | None = None, status: int | None = None
    ) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if (route is None or r.route == route)
            and (since is None or r.time >= since)
            and (status is None or r.status == status)
        ]

    def count(
        self, route: str | None = None, *, since: float | None = None, status: int | None = None
    ) -> int:
        """Requests recorded on ``route`` (all if None) since a ``now()`` time, by status."""
        return len(self.requests_for(route, since=since, status=status))

    def results_for(self, task_id: str) -> list[ResultRecord]:
        """Accepted results for ``task_id`` (exactly-once: ``len(...) == 1``)."""
        return [r for r in self.results if r.task_id == task_id]

    def result_counts(self) -> Counter[str]:
        return Counter(r.task_id for r in self.results)

    def duplicate_results(self) -> dict[str, int]:
        return {tid: n for tid, n in self.result_counts().items() if n > 1}

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked on every state change).

        Returns the truthy value; raises ``TimeoutError`` after ``timeout`` seconds.
        """
        value: Any = None

        def check() -> bool:
            nonlocal value
            value = predicate()
            return bool(value)

        if not await self._wait_until(check, timeout):
            raise TimeoutError(f"condition not met within {timeout} s: {predicate!r}")
        return value

    async def wait_for_count(
        self,
        route: str,
        n: int = 1,
        *,
        since: float | None = None,
        status: int | None = None,
        timeout: float = 10.0,
    ) -> int:
        await self.wait_for(lambda: self.count(route, since=since, status=status) >= n, timeout)
        return self.count(route, since=since, status=status)

    async def wait_for_results(
        self,
        task_id: str,
        n: int = 1,
        *,
        timeout: float = 10.0,
    ) -> list[ResultRecord]:
        await self.wait_for(lambda: len(self.results_for(task_id)) >= n, timeout)
        return self.results_for(task_id)

    async def wait_for_ws(self, worker_id: str, *, timeout: float = 10.0) -> None:
        await self.wait_for(lambda: self.ws_open(worker_id) > 0, timeout)

    async def wait_for_hanging(
        self,
        route: str | None = None,
        n: int = 1,
        *,
        timeout: float = 10.0,
    ) -> None:
        await self.wait_for(lambda: self.hanging(route) >= n, timeout)

    def clear(self, *, workers: bool = True, tasks: bool = True, faults: bool = True) -> None:
        """Forget the records (and by default workers, queued tasks and faults)."""
        self.requests.clear()
        self.heartbeats.clear()
        self.results.clear()
        self.rejected_results.clear()
        self.result_attempts.clear()
        self.dispatched.clear()
        self.swallowed.clear()
        self.ws_connects.clear()
        self.ws_messages.clear()
        self.ws_sent.clear()
        if workers:
            self.forget_worker()
        if tasks:
            self.clear_tasks()
        if faults:
            self.clear_faults()
        self._notify()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Bounded wait: re-check ``predicate`` on each state change until ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            event = self._changed
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await event.wait()
        return True

    # ---------------------------------------------------------------- HTTP plumbing

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024 * 1024)
        app.router.add_post("/_worker/workers/register", self._handle_register, name="register")
        app.router.add_patch(
            "/_worker/workers/{worker_id}", self._handle_heartbeat, name="heartbeat"
        )
        app.router.add_get(
            "/_worker/workers/{worker_id}/tasks/next", self._handle_poll, name="poll"
        )
        app.router.add_post("/_worker/tasks/result", self._handle_result, name="result")
        app.router.add_get("/_worker/ws/{worker_id}", self._handle_ws, name="ws")
        self._add_control_routes(app)
        return app

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if not request.path.startswith("/_worker/"):
            return await handler(request)
        name = request.match_info.route.name
        route = name if name in ROUTES else "other"
        rec = await self._record(request, route)
        response: web.StreamResponse
        try:
            if self.require_token and not rec.token_ok:
                rec.outcome = "unauthorized"
                response = self._reply(Reply.error(401, "Unauthorized"))
            elif route == "other":
                rec.outcome = "normal"
                response = await handler(request)
            else:
                action = self._next_action(route)
                rec.action = action.to_json()["kind"]
                response = await self._perform(action, route, request, handler, rec)
        except _Aborted:
            # the connection is gone: aiohttp fails to write this and ignores it silently
            return web.Response(status=500)
        except web.HTTPException as exc:
            rec.status = exc.status
            self._notify()
            raise
        except asyncio.CancelledError:
            if rec.outcome in ("pending", "normal"):
                rec.outcome = "client_gone"
            self._notify()
            raise
        finally:
            self._inflight.pop(id(request), None)
            self._notify()
        rec.status = response.status
        self._notify()
        return response

    async def _record(self, request: web.Request, route: str) -> RecordedRequest:
        arrived = time.monotonic()
        raw = await request.read() if request.can_read_body else b""
        body: Any = None
        body_error = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body_error = True
        headers = {
            k: (REDACTED if k.lower() == TOKEN_HEADER.lower() else v)
            for k, v in request.headers.items()
        }
        rec = RecordedRequest(
            route=route,
            method=request.method,
            path=request.path,
            worker_id=request.match_info.get("worker_id"),
            headers=headers,
            token_ok=request.headers.get(TOKEN_HEADER) == self.token,
            body=body,
            body_error=body_error,
            body_size=len(raw),
            time=arrived,
        )
        self._inflight[id(request)] = rec
        self.requests.append(rec)
        self._notify()
        return rec

    def _next_action(self, route: str) -> Action:
        script = self._scripts[route]
        if script:
            return script.popleft()
        return self._sticky.get(route, NORMAL)

    async def _perform(
        self,
        action: Action,
        route: str,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        rec: RecordedRequest,
    ) -> web.StreamResponse:
        for _ in range(64):  # an action chain (then=...) is finite; bound it anyway
            if isinstance(action, Normal):
                rec.outcome = "normal"
                return await handler(request)
            if isinstance(action, Reply):
                rec.outcome = "scripted"
                return self._reply(action, request)
            if isinstance(action, Reset):
                rec.outcome = "reset"
                await self._abort(request, action.prefix, rst=action.rst)
            if isinstance(action, Delay):
                if await self._wait_until(lambda: self._stopping, action.seconds):
                    await self._abort_on_stop(request, rec)
                action = action.then or NORMAL
                continue
            if isinstance(action, Hang):
                self._hanging[route] += 1
                self._notify()
                try:
                    released = await self._wait_until(
                        self._released_or_stopping(route), action.limit
                    )
                finally:
                    self._hanging[route] -= 1
                    self._notify()
                if not released or self._stopping:
                    await self._abort_on_stop(request, rec)
                action = action.then or NORMAL
                continue
            raise TypeError(f"not an action: {action!r}")
        raise RuntimeError("action chain too long")

    def _released_or_stopping(self, route: str) -> Callable[[], bool]:
        gen = self._release_gen[route]
        return lambda: self._stopping or self._release_gen[route] != gen

    def _reply(self, reply: Reply, request: web.Request | None = None) -> web.Response:
        body = reply.text.encode()
        response = web.Response(status=reply.status, body=body or None, headers=reply.headers)
        if reply.content_type is not None and body:
            response.content_type = reply.content_type
        if self.compress_responses and len(body) > 500:
            response.enable_compression()
        return response

    def _json(self, value: Any, status: int = 200) -> web.Response:
        return self._reply(Reply.of_json(value, status=status))

    async def _abort(self, request: web.Request, prefix: bytes = b"", *, rst: bool) -> NoReturn:
        """Write ``prefix`` raw, abort the TCP connection and unwind the handler."""
        transport = request.transport
        if transport is not None and not transport.is_closing():
            if prefix:
                transport.write(prefix)
                for _ in range(100):  # let the partial response leave before the reset
                    if transport.get_write_buffer_size() == 0:
                        break
                    await asyncio.sleep(0.01)
            _abort_transport(transport, rst=rst)
        raise _Aborted

    async def _abort_on_stop(self, request: web.Request, rec: RecordedRequest) -> NoReturn:
        rec.outcome = "aborted"
        await self._abort(request, rst=False)

    # ---------------------------------------------------------------- protocol handlers

    def _known_record(self, worker_id: str) -> dict[str, Any] | None:
        if (
            self.worker_ttl is not None
            and worker_id in self._last_seen
            and time.monotonic() - self._last_seen[worker_id] > self.worker_ttl
        ):
            self.forget_worker(worker_id)
        return self.worker_records.get(worker_id)

    async def _handle_register(self, request: web.Request) -> web.StreamResponse:
        rec = self._rec(request)
        body = rec.body
        if rec.body_error:
            return self._json({"error": "Invalid JSON body"}, 400)
        if not isinstance(body, dict) or not isinstance(body.get("worker_id"), str):
            return self._json({"error": "worker_id is required"}, 400)
        worker_id = body["worker_id"]
        self.workers[worker_id] = body
        self.worker_records[worker_id] = dict(body)
        self._last_seen[worker_id] = rec.time
        self._notify()
        return self._json({"status": "registered"})

    async def _handle_heartbeat(self, request: web.Request) -> web.StreamResponse:
        rec = self._rec(request)
        worker_id = request.match_info["worker_id"]
        if rec.body_error or not isinstance(rec.body, dict):
            return self._json({"error": "Invalid JSON body"}, 400)
        record = self._known_record(worker_id)
        self.heartbeats.append(HeartbeatRecord(worker_id, rec.body, record is not None, rec.time))
        self._notify()
        if record is None:
            if self.unknown_worker_reply == "404":
                return self._reply(Reply.not_found())
            return self._reply(Reply.null())
        record.update(rec.body)
        self._last_seen[worker_id] = rec.time
        return self._json(record)

    async def _handle_poll(self, request: web.Request) -> web.StreamResponse:
        worker_id = request.match_info["worker_id"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.poll_hold
        taken: _QueuedTask | None = None

        def ready() -> bool:
            nonlocal taken
            if self._stopping:
                return True
            taken = self._take_task(worker_id)
            return taken is not None

        try:
            await self._wait_until(ready, self.poll_hold)
        except asyncio.CancelledError:
            if self.swallow_abandoned_polls and not self._stopping and taken is None:
                self._spawn(self._zombie_poll(worker_id, deadline))
            raise
        if taken is not None:
            self.dispatched.append(DispatchRecord(worker_id, taken.recorded, time.monotonic()))
            self._notify()
            text = taken.raw if taken.raw is not None else json.dumps(taken.value)
            return self._reply(Reply(status=200, text=text), request)
        if self._stopping and not self._graceful:
            await self._abort_on_stop(request, self._rec(request))
        return web.Response(status=204)

    async def _zombie_poll(self, worker_id: str, deadline: float) -> None:
        taken: _QueuedTask | None = None

        def ready() -> bool:
            nonlocal taken
            if self._stopping:
                return True
            taken = self._take_task(worker_id, zombie=True)
            return taken is not None

        remaining = deadline - asyncio.get_running_loop().time()
        if remaining > 0:
            await self._wait_until(ready, remaining)
        if taken is not None:
            self.swallowed.append(DispatchRecord(worker_id, taken.recorded, time.monotonic()))
            self._notify()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _handle_result(self, request: web.Request) -> web.StreamResponse:
        rec = self._rec(request)
        body = rec.body
        if rec.body_error:
            return self._json({"error": "Invalid JSON body"}, 400)
        if not isinstance(body, dict) or not isinstance(body.get("task_id"), str):
            return self._json({"error": "task_id is required"}, 400)
        task_id = body["task_id"]
        self.result_attempts[task_id] += 1
        record = ResultRecord(
            job_id=body.get("job_id"),
            task_id=task_id,
            worker_id=body.get("worker_id"),
            result=body.get("result"),
            attempt=self.result_attempts[task_id],
            time=rec.time,
        )
        if record.attempt < self.result_accept_on_try:
            self.rejected_results.append(record)
            self._notify()
            return self._reply(Reply.error(self.result_reject_status, "try again later"))
        self.results.append(record)
        self._notify()
        return self._json({"status": "ok"})

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        worker_id = request.match_info["worker_id"]
        ws = web.WebSocketResponse(autoping=False, heartbeat=self.ws_heartbeat, timeout=2.0)
        await ws.prepare(request)
        self.ws_connects[worker_id] += 1
        conn = _WsConn(ws, request.transport)
        self._sockets.setdefault(worker_id, []).append(conn)
        self._notify()
        try:
            async for msg in ws:  # ends when the socket closes
                if msg.type == WSMsgType.TEXT:
                    data: Any = None
                    with contextlib.suppress(ValueError):
                        data = json.loads(msg.data)
                    self.ws_messages.append(WsMessage(worker_id, data, msg.data, time.monotonic()))
                    self._notify()
                elif msg.type == WSMsgType.BINARY:
                    self.ws_messages.append(WsMessage(worker_id, None, msg.data, time.monotonic()))
                    self._notify()
                elif msg.type == WSMsgType.PING and self.ws_answer_pings:
                    await ws.pong(msg.data)
        finally:
            conns = self._sockets.get(worker_id, [])
            if conn in conns:
                conns.remove(conn)
            self._notify()
        return ws

    def _rec(self, request: web.Request) -> RecordedRequest:
        return self._inflight[id(request)]

    # ---------------------------------------------------------------- control endpoint

    def _add_control_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/_control/state", self._c_state)
        r.add_get("/_control/requests", self._c_requests)
        r.add_get("/_control/results", self._c_results)
        r.add_post("/_control/enqueue", self._c_enqueue)
        r.add_post("/_control/script", self._c_script)
        r.add_post("/_control/fault", self._c_fault)
        r.add_post("/_control/clear_faults", self._c_clear_faults)
        r.add_post("/_control/config", self._c_config)
        r.add_post("/_control/release", self._c_release)
        r.add_post("/_control/forget", self._c_forget)
        r.add_post("/_control/ws/send", self._c_ws_send)
        r.add_post("/_control/ws/drop", self._c_ws_drop)
        r.add_post("/_control/refuse", self._c_refuse)
        r.add_post("/_control/accept", self._c_accept)
        r.add_post("/_control/restart", self._c_restart)
        r.add_post("/_control/wait", self._c_wait)
        r.add_post("/_control/clear", self._c_clear)
        r.add_post("/_control/shutdown", self._c_shutdown)

    @staticmethod
    async def _c_body(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"invalid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        return data

    @staticmethod
    def _c_ok(value: Any = None) -> web.Response:
        return web.json_response(_to_jsonable({"ok": True} if value is None else value))

    def state(self) -> dict[str, Any]:
        """A JSON-able summary (what ``GET /_control/state`` returns)."""
        summary: dict[str, Any] = _to_jsonable(
            {
                "now": time.monotonic(),
                "url": self.url,
                "port": self.port,
                "listening": self._listening,
                "restarts": self.restarts,
                "counts": dict(Counter(r.route for r in self.requests)),
                "statuses": {
                    route: dict(Counter(str(r.status) for r in self.requests_for(route)))
                    for route in {*ROUTES, *(r.route for r in self.requests)}
                },
                "workers": self.workers,
                "worker_records": self.worker_records,
                "heartbeats": len(self.heartbeats),
                "results": self.results,
                "rejected_results": len(self.rejected_results),
                "result_counts": dict(self.result_counts()),
                "result_attempts": dict(self.result_attempts),
                "pending_tasks": len(self._queue),
                "dispatched": [{"worker_id": d.worker_id, "time": d.time} for d in self.dispatched],
                "swallowed": self.swallowed,
                "hanging": dict(self._hanging),
                "scripted": {route: len(q) for route, q in self._scripts.items()},
                "faults": {route: a.to_json() for route, a in self._sticky.items()},
                "ws_open": {wid: self.ws_open(wid) for wid in self._sockets},
                "ws_connects": dict(self.ws_connects),
                "ws_messages": self.ws_messages,
                "ws_sent": [{"worker_id": w, "payload": p} for w, p in self.ws_sent],
                "switches": self.switches(),
            }
        )
        return summary

    async def _c_state(self, request: web.Request) -> web.Response:
        return self._c_ok(self.state())

    async def _c_requests(self, request: web.Request) -> web.Response:
        route = request.query.get("route") or None
        since = request.query.get("since")
        records = self.requests_for(route, since=float(since) if since else None)
        return self._c_ok([r.to_json() for r in records])

    async def _c_results(self, request: web.Request) -> web.Response:
        task_id = request.query.get("task_id")
        records = self.results if task_id is None else self.results_for(task_id)
        return self._c_ok(records)

    async def _c_enqueue(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        task: Any
        if "raw" in data:
            task = RawTask(str(data["raw"]))
        elif "make" in data:
            task = make_task(**dict(data["make"] or {}))
        elif "huge" in data:
            task = huge_params_task(**dict(data["huge"] or {}))
        elif "task" in data:
            task = data["task"]
        else:
            raise web.HTTPBadRequest(text="give one of task, raw, make, huge")
        self.enqueue(task, worker_id=data.get("worker_id"))
        return self._c_ok({"ok": True, "task": task.text if isinstance(task, RawTask) else task})

    async def _c_script(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        try:
            actions = [action_from_json(a) for a in data.get("actions", [])]
            self.script(str(data["route"]), *(a for a in actions if a is not None))
        except (KeyError, ValueError, TypeError) as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return self._c_ok()

    async def _c_fault(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        try:
            self.set_fault(str(data["route"]), action_from_json(data.get("action")))
        except (KeyError, ValueError, TypeError) as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return self._c_ok()

    async def _c_clear_faults(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        try:
            self.clear_faults(data.get("route"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return self._c_ok()

    async def _c_config(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        try:
            return self._c_ok(self.configure(**data))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc

    async def _c_release(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        return self._c_ok({"ok": True, "released": self.release_hangs(data.get("route"))})

    async def _c_forget(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        self.forget_worker(data.get("worker_id"))
        return self._c_ok()

    async def _c_ws_send(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        payload = data["raw"] if "raw" in data else data.get("command")
        if not isinstance(payload, dict | str):
            raise web.HTTPBadRequest(text="give command (object) or raw (text)")
        try:
            await self.send_command(str(data.get("worker_id")), payload)
        except LookupError as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=404)
        return self._c_ok()

    async def _c_ws_drop(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        dropped = await self.drop_ws(
            str(data.get("worker_id")),
            abort=bool(data.get("abort", False)),
            code=int(data.get("code", WSCloseCode.GOING_AWAY)),
        )
        return self._c_ok({"ok": True, "dropped": dropped})

    def _control_job(self, coro: Coroutine[Any, Any, None]) -> None:
        async def later() -> None:
            await asyncio.sleep(0.05)  # let the control reply leave first
            await coro

        task = asyncio.create_task(later())
        self._control_tasks.add(task)
        task.add_done_callback(self._control_tasks.discard)

    async def _c_refuse(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        seconds = data.get("seconds")

        async def job() -> None:
            await self.refuse_connections(drop_existing=bool(data.get("drop_existing", True)))
            if seconds is not None:
                await asyncio.sleep(float(seconds))
                await self.accept_connections()

        self._control_job(job())
        return self._c_ok()

    async def _c_accept(self, request: web.Request) -> web.Response:
        await self.accept_connections()
        return self._c_ok()

    async def _c_restart(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        self._control_job(
            self.restart(
                downtime=float(data.get("downtime", 0.0)),
                forget_workers=bool(data.get("forget_workers", False)),
            )
        )
        return self._c_ok()

    async def _c_wait(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        timeout = min(float(data.get("timeout", 10.0)), 110.0)
        since = data.get("since")
        route = data.get("route")
        task_id = data.get("task_id")
        ws_worker = data.get("ws_worker")

        def done() -> bool:
            ok = True
            if route is not None:
                ok &= self.count(route, since=since) >= int(data.get("count", 1))
            if task_id is not None:
                ok &= len(self.results_for(task_id)) >= int(data.get("results", 1))
            elif "results" in data:
                ok &= len(self.results) >= int(data["results"])
            if ws_worker is not None:
                ok &= self.ws_open(ws_worker) > 0
            return ok

        met = await self._wait_until(done, timeout)
        return self._c_ok({"ok": met, "state": self.state()})

    async def _c_clear(self, request: web.Request) -> web.Response:
        data = await self._c_body(request)
        self.clear(
            workers=bool(data.get("workers", True)),
            tasks=bool(data.get("tasks", True)),
            faults=bool(data.get("faults", True)),
        )
        return self._c_ok()

    async def _c_shutdown(self, request: web.Request) -> web.Response:
        if self.on_shutdown_request is None:
            return web.json_response({"ok": False, "error": "not standalone"}, status=409)
        self.on_shutdown_request()
        return self._c_ok()


class _Aborted(Exception):
    """The fake aborted the request's connection on purpose."""


def _bind(port: int) -> socket.socket:
    """A listening loopback socket; retries briefly when a just-closed port is still busy."""
    last: OSError | None = None
    for _ in range(50):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, port))
            sock.listen(128)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
            if port == 0:
                raise
            time.sleep(0.05)
    assert last is not None
    raise last


def _abort_transport(transport: asyncio.BaseTransport | None, *, rst: bool) -> None:
    """Close a TCP connection at once; with ``rst`` the peer gets a RST, not a FIN."""
    if transport is None or transport.is_closing():
        return
    if rst:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert isinstance(transport, asyncio.WriteTransport)
    transport.abort()


@dataclass(eq=False)
class _WsConn:
    ws: web.WebSocketResponse
    transport: asyncio.BaseTransport | None

    def abort(self, *, rst: bool) -> None:
        _abort_transport(self.transport, rst=rst)


# --------------------------------------------------------------------------------------------
# Out-of-process use: a control client and a child-process handle
# --------------------------------------------------------------------------------------------


class ControlClient:
    """Blocking JSON client of ``/_control/...`` (stdlib only, proxies ignored).

    Safe from any test; in an async test run long calls (``wait``) in a thread, e.g.
    ``await anyio.to_thread.run_sync(client.wait, ...)``.
    """

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        query: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        url = f"{self.base_url}/_control/{path.lstrip('/')}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(_to_jsonable(dict(body))).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"control {method} {path} -> {exc.code}: {detail}") from None

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "state")
        return result

    def requests(self, route: str | None = None, since: float | None = None) -> list[Any]:
        result: list[Any] = self.call("GET", "requests", query={"route": route, "since": since})
        return result

    def count(self, route: str, since: float | None = None) -> int:
        return len(self.requests(route, since))

    def results(self, task_id: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", "results", query={"task_id": task_id})
        return result

    def enqueue(
        self,
        task: Any = None,
        *,
        raw: str | None = None,
        make: Mapping[str, Any] | None = None,
        worker_id: str | None = None,
    ) -> Any:
        body: dict[str, Any] = {"worker_id": worker_id}
        if raw is not None:
            body["raw"] = raw
        elif make is not None:
            body["make"] = dict(make)
        else:
            body["task"] = task
        return self.call("POST", "enqueue", body)["task"]

    def script(self, route: str, *actions: Action | Mapping[str, Any]) -> None:
        self.call("POST", "script", {"route": route, "actions": [_action_json(a) for a in actions]})

    def set_fault(self, route: str, action: Action | Mapping[str, Any] | None) -> None:
        self.call("POST", "fault", {"route": route, "action": _action_json(action)})

    def clear_faults(self, route: str | None = None) -> None:
        self.call("POST", "clear_faults", {"route": route})

    def configure(self, **switches: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.call("POST", "config", switches)
        return result

    def release(self, route: str | None = None) -> int:
        return int(self.call("POST", "release", {"route": route})["released"])

    def forget(self, worker_id: str | None = None) -> None:
        self.call("POST", "forget", {"worker_id": worker_id})

    def ws_send(self, worker_id: str, command: Mapping[str, Any] | str) -> bool:
        body: dict[str, Any] = {"worker_id": worker_id}
        if isinstance(command, str):
            body["raw"] = command
        else:
            body["command"] = dict(command)
        try:
            self.call("POST", "ws/send", body)
        except RuntimeError:
            return False
        return True

    def ws_drop(self, worker_id: str, *, abort: bool = False, code: int = 1001) -> int:
        body = {"worker_id": worker_id, "abort": abort, "code": code}
        return int(self.call("POST", "ws/drop", body)["dropped"])

    def refuse(self, seconds: float | None = None) -> None:
        self.call("POST", "refuse", {"seconds": seconds})

    def accept(self) -> None:
        self.call("POST", "accept", {})

    def restart(self, downtime: float = 0.0, forget_workers: bool = False) -> None:
        self.call("POST", "restart", {"downtime": downtime, "forget_workers": forget_workers})

    def wait(self, *, timeout: float = 10.0, **conditions: Any) -> dict[str, Any]:
        """Server-side wait (route+count+since, task_id+results, results, ws_worker)."""
        body = {k: v for k, v in conditions.items() if v is not None}
        body["timeout"] = timeout
        result: dict[str, Any] = self.call("POST", "wait", body, timeout=timeout + 10.0)
        return result

    def clear(self, **what: bool) -> None:
        self.call("POST", "clear", what)

    def shutdown(self) -> None:
        self.call("POST", "shutdown", {})


def _action_json(action: Action | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if action is None:
        return None
    if isinstance(action, Action):
        return action.to_json()
    return dict(action)


class FaultOrchestratorProcess:
    """The fake in a child process (``python -m tests.support.fault_orchestrator``).

    ``start()`` waits for its ready line; ``stop()`` sends SIGTERM to that PID (SIGKILL after
    ``stop_timeout``); ``kill()`` is a crash; ``restart()`` starts again on the same port(s).
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        port: int = 0,
        control_port: int | None = None,
        poll_hold: float = FIXTURE_POLL_HOLD,
        unknown_worker_reply: UnknownWorkerReply = "null",
        startup_timeout: float = 20.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.token = token
        self.port = port
        self.control_port = control_port
        self.poll_hold = poll_hold
        self.unknown_worker_reply = unknown_worker_reply
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def control_url(self) -> str:
        return str(self.info.get("control_url", self.url))

    @property
    def control(self) -> ControlClient:
        return ControlClient(self.control_url)

    @property
    def headers(self) -> dict[str, str]:
        return {TOKEN_HEADER: self.token}

    def __enter__(self) -> FaultOrchestratorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "tests.support.fault_orchestrator",
            "--port",
            str(self.port),
            "--token",
            self.token,
            "--poll-hold",
            str(self.poll_hold),
            "--unknown-worker-reply",
            self.unknown_worker_reply,
        ]
        if self.control_port is not None:
            cmd += ["--control-port", str(self.control_port)]
        return cmd

    def start(self) -> FaultOrchestratorProcess:
        if self.proc is not None:
            raise RuntimeError("already started")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        try:
            self.info = self._read_ready_line()
        except BaseException:
            self.kill()
            raise
        self.port = int(self.info["port"])
        if self.info.get("control_port") is not None:
            self.control_port = int(self.info["control_port"])
        return self

    def _read_ready_line(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("fault orchestrator process did not become ready")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"fault orchestrator exited early: rc={self.proc.wait(5)}")
            buf += chunk
        info: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
        return info

    def stop(self) -> int | None:
        """SIGTERM the child (by PID), wait, SIGKILL if needed; returns its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(self.stop_timeout)
            return proc.returncode
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL the child (a crash: nothing answers, nothing is closed gracefully)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.kill()
            proc.wait(self.stop_timeout)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def restart(self) -> FaultOrchestratorProcess:
        """A fresh process on the same port(s) (state is NOT kept across processes)."""
        self.stop()
        return self.start()


# --------------------------------------------------------------------------------------------
# Pytest fixtures (this module is a plugin listed in tests/conftest.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def fault_orchestrator(anyio_backend: str) -> AsyncIterator[FaultOrchestrator]:
    """A started fake (token DEFAULT_TOKEN, poll_hold FIXTURE_POLL_HOLD)."""
    async with FaultOrchestrator(poll_hold=FIXTURE_POLL_HOLD) as orch:
        yield orch


@pytest.fixture
async def fault_orchestrator_factory(
    anyio_backend: str,
) -> AsyncIterator[Callable[..., Awaitable[FaultOrchestrator]]]:
    """``await make(**FaultOrchestrator kwargs)`` -> a started fake, stopped at teardown."""
    started: list[FaultOrchestrator] = []

    async def make(**kwargs: Any) -> FaultOrchestrator:
        kwargs.setdefault("poll_hold", FIXTURE_POLL_HOLD)
        orch = FaultOrchestrator(**kwargs)
        await orch.start()
        started.append(orch)
        return orch

    try:
        yield make
    finally:
        for orch in reversed(started):
            await orch.close()


@pytest.fixture
def fault_orchestrator_process() -> Iterator[FaultOrchestratorProcess]:
    """The fake in a child process; ``.url``, ``.pid``, ``.control`` (a ``ControlClient``)."""
    with FaultOrchestratorProcess() as proc:
        yield proc


# --------------------------------------------------------------------------------------------
# Standalone entry point
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fault_orchestrator",
        description="Fault-injecting fake Avtomatika orchestrator on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=0, help="0 = a free port (printed)")
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--poll-hold", type=float, default=30.0)
    parser.add_argument("--control-port", type=int, default=None)
    parser.add_argument("--unknown-worker-reply", choices=["null", "404"], default="null")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    orch = FaultOrchestrator(
        token=args.token,
        port=args.port,
        control_port=args.control_port,
        poll_hold=args.poll_hold,
        unknown_worker_reply=args.unknown_worker_reply,
    )
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    orch.on_shutdown_request = done.set
    await orch.start()
    try:
        ready = {
            "url": orch.url,
            "control_url": orch.control_url,
            "port": orch.port,
            "control_port": orch.control_port,
            "pid": os.getpid(),
        }
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await done.wait()  # until SIGTERM/SIGINT or POST /_control/shutdown
    finally:
        await orch.close()


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

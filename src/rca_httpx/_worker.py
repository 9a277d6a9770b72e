"""The worker on anyio + httpx, asyncio or trio: performs what the core's machine decides.

The driver is as dumb as ``rca_aiohttp``'s: every event goes into the
machine, every effect it returns becomes a task in one task group owned by
:meth:`Worker.serve` (an HTTP request, a handler, a WebSocket), each with its
own ``CancelScope`` so that the machine can cancel exactly that effect. One
timer task sleeps until the machine's next deadline; moving the deadline
moves that task's scope deadline, so nothing polls and an idle worker sleeps.

HTTP goes through one ``httpx.AsyncClient`` whose transport is
:class:`rca_httpx._transport.H11Transport` (h11 over pooled anyio streams):
stock httpx costs several times aiohttp's CPU per request, and the worker
makes two requests per task.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import httpx

from rca_core._app import WorkerDefinition, WorkerFront, s3_settings
from rca_core._config import ResolvedConfig, WorkerConfig
from rca_core._driver import Driver
from rca_core._events import (
    CommandChannelClosed,
    CommandChannelOpened,
    CommandReceived,
    DrainRequested,
    Event,
    HandlerFinished,
    OpenCommandChannel,
    RequestFailed,
    ResponseReceived,
    SendRequest,
    StartHandler,
    Task,
)
from rca_core._execution import execute_task, standard_extras
from rca_core._health import TICK_INTERVAL, HealthState
from rca_core._logs import Redactor, configure_logging
from rca_core._machine import MachineSettings, WorkerMachine
from rca_core._metrics import WorkerMetrics
from rca_core._paths import task_dir_name
from rca_core._results import cancelled_result
from rca_core._wire import HttpRequest

from ._files import TaskFiles
from ._health import HealthServer
from ._s3 import S3Transfers
from ._transport import H11Transport
from ._ws import WebSocket, WebSocketError, connect_websocket

__all__ = ["Backend", "Worker"]

log = logging.getLogger("rca_httpx")

F = TypeVar("F", bound=Callable[..., Any])
Backend = Literal["asyncio", "trio"]

_BACKENDS: Final = ("asyncio", "trio")
# How long shutdown waits for task folders to be removed (they go before the process does).
_CLEANUP_WAIT: Final = 30.0
# Bounds on the per-driver caches of parsed URLs and merged headers (a worker uses a handful).
_CACHE_LIMIT: Final = 256


class Worker(WorkerFront):
    """A worker: declare handlers with :meth:`task`, then :meth:`run`.

    The same constructor, decorator and behaviour as ``rca_aiohttp.Worker``;
    ``http_client`` replaces ``http_session``. :meth:`run` picks the event loop:
    ``backend="trio"``, else ``RCA_BACKEND``, else asyncio.
    """

    files_type = TaskFiles
    _driver: _Driver | None

    def __init__(
        self,
        worker_type: str | None = None,
        max_concurrent_tasks: int | None = None,
        task_type_limits: Mapping[str, int] | None = None,
        skill_dependencies: Mapping[str, Sequence[str]] | None = None,
        config: WorkerConfig | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            worker_type, max_concurrent_tasks, task_type_limits, skill_dependencies, config
        )
        self._http_client = http_client

    async def serve(self, *, health: bool = False, handle_signals: bool = False) -> None:
        """Run until stopped, inside an already running event loop (asyncio or trio)."""
        resolved = self._config.resolve()
        settings = self._definition.settings(
            resolved, hostname=socket.gethostname(), ip_address=_local_ip()
        )
        machine = WorkerMachine(settings, rng=random.Random())
        own_client = self._http_client is None
        transport: H11Transport | None = None
        if self._http_client is None:
            client, transport = _default_client(settings.max_concurrent_tasks)
        else:
            client = self._http_client
        s3 = _make_s3(resolved)
        redactor = Redactor(resolved.secret_values())
        redactor.install()
        quiet = _QuietOwnRequests()
        httpx_log = logging.getLogger("httpx")
        httpx_log.addFilter(quiet)
        driver: _Driver | None = None
        health_server: HealthServer | None = None
        try:
            async with anyio.create_task_group() as tg:
                driver = _Driver(machine, client, self._definition, resolved, settings, s3, tg)
                driver.url_texts = quiet.urls
                driver.own_transport = transport
                self._driver = driver
                if handle_signals:
                    await tg.start(_watch_signals, driver)
                if health:
                    health_server = self._start_health(driver, resolved)
                tg.start_soon(driver.run_timer)
                log.info(
                    "worker %s (%s) starting on %s: %d handler(s), %d orchestrator(s)",
                    settings.worker_id,
                    settings.worker_type,
                    _current_backend(),
                    len(settings.tasks),
                    len(settings.orchestrators),
                )
                driver.start()
                if self._stop_early:
                    self._stop_early = False
                    driver.feed(DrainRequested(reason="stop() called before start"))
                await driver.stopped.wait()
                await driver.wait_for_cleanups()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # One failure (a health port in use, a bug): raise it as itself, as rca_aiohttp would.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._driver = None
            with anyio.CancelScope(shield=True):
                if driver is not None:
                    driver.finished = True
                if health_server is not None:
                    await anyio.to_thread.run_sync(health_server.stop)
                await s3.close()
                if own_client:
                    await client.aclose()
            httpx_log.removeFilter(quiet)
            redactor.remove()
        if driver is not None and driver.failure is not None:
            raise driver.failure

    def _start_health(self, driver: _Driver, resolved: ResolvedConfig) -> HealthServer:
        """Metrics on, a 1 Hz tick in the worker's loop, and the server in its own thread."""
        state = HealthState(blocked_threshold=resolved.health_blocked_threshold)
        driver.metrics = WorkerMetrics(state.latest_snapshot)
        driver.tg.start_soon(driver.run_ticks, state)
        server = HealthServer(
            state,
            driver.metrics,
            host=resolved.worker_host,
            port=resolved.worker_port,
            backend=_current_backend(),
        )
        server.start()
        self.health_port = server.port
        log.info("health server on %s:%s", resolved.worker_host, server.port)
        return server

    def run(self, backend: Backend | None = None) -> None:
        """Run the worker until SIGTERM/SIGINT (the first drains, the second cancels).

        ``backend``: ``"asyncio"`` or ``"trio"``; by default ``RCA_BACKEND``
        from the configuration, which defaults to asyncio. Sets up logging for
        ``LOG_FORMAT`` unless the program already did.
        """
        configure_logging(str(self._config.LOG_FORMAT))
        anyio.run(
            functools.partial(self.serve, handle_signals=True), backend=self._backend(backend)
        )

    def run_with_health_check(self, backend: Backend | None = None) -> None:
        """:meth:`run`, plus the health server on WORKER_HOST:WORKER_PORT."""
        configure_logging(str(self._config.LOG_FORMAT))
        anyio.run(
            functools.partial(self.serve, health=True, handle_signals=True),
            backend=self._backend(backend),
        )

    def _backend(self, backend: str | None) -> str:
        if backend is None:
            return self._config.resolve().rca_backend
        if backend not in _BACKENDS:
            raise ValueError(f"backend={backend!r}: expected 'asyncio' or 'trio'")
        return backend


class _QuietOwnRequests(logging.Filter):
    """Drops httpx's INFO line per request, for the worker's own protocol requests only.

    ``httpx.AsyncClient`` logs every request at INFO; with the usual INFO
    logging that is a line per long poll and two per task, which
    ``rca_aiohttp`` does not write. A handler's own httpx requests (to other
    URLs) keep their lines.
    """

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            record.levelno == logging.INFO
            and isinstance(args, tuple)
            and len(args) > 1
            and str(args[1]) in self.urls
        )


def _default_client(max_concurrent_tasks: int) -> tuple[httpx.AsyncClient, H11Transport]:
    """One pooled client on the lean transport (and that transport); every request
    carries its own timeout.

    Enough idle connections are kept for every slot's long poll plus the
    heartbeats and results around them (as ``rca_aiohttp`` sizes its pool).

    ``trust_env=False``: no proxy or netrc from the environment, as with the
    aiohttp adapter (pass your own ``http_client`` to route through a proxy).
    """
    transport = H11Transport(max_idle_per_origin=max(64, 4 * max_concurrent_tasks))
    return httpx.AsyncClient(transport=transport, trust_env=False, timeout=60.0), transport


def _current_backend() -> str:
    try:
        import sniffio

        return sniffio.current_async_library()
    except Exception:  # pragma: no cover - sniffio ships with anyio
        return "?"


def _local_ip() -> str:
    """The address other hosts would reach us at; no packet is sent (UDP connect)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: routing lookup only, nothing is sent
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _make_s3(resolved: ResolvedConfig) -> S3Transfers:
    settings = s3_settings(resolved)
    return S3Transfers(settings) if settings is not None else S3Transfers.disabled()


async def _watch_signals(
    driver: _Driver, *, task_status: anyio.abc.TaskStatus[bool] = anyio.TASK_STATUS_IGNORED
) -> None:
    """SIGTERM/SIGINT to the driver: the first drains, the next cancels what is left."""
    with contextlib.ExitStack() as stack:
        try:
            received = stack.enter_context(
                anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT)
            )
        except (NotImplementedError, RuntimeError, ValueError) as exc:  # not the main thread
            log.debug("signals are not handled here: %s", exc)
            task_status.started(False)
            return
        task_status.started(True)
        async for signum in received:  # wakes only when a signal arrives
            driver.signal(signal.Signals(signum).name)


class _Driver(Driver):
    """The shared driver, with anyio tasks and cancel scopes for effects and one timer task."""

    def __init__(
        self,
        machine: WorkerMachine,
        client: httpx.AsyncClient,
        definition: WorkerDefinition,
        config: ResolvedConfig,
        settings: MachineSettings,
        s3: S3Transfers,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        super().__init__(machine)
        self.client = client
        self.definition = definition
        self.s3 = s3
        self.tg = tg
        self.stopped = anyio.Event()
        self._requests: dict[int, anyio.CancelScope] = {}
        self._handlers: dict[str, anyio.CancelScope] = {}
        self._channels: dict[int, anyio.CancelScope] = {}
        self._sockets: dict[int, WebSocket] = {}
        self._cleanups = 0
        self._cleanups_done = anyio.Event()
        self._deadline = math.inf
        self._timer_scope: anyio.CancelScope | None = None
        self._files_root = config.task_files_dir
        self._secrets = config.secret_values()
        self._limiters = _limiters(settings)
        # The threads themselves: unbounded, since the token that counts is the
        # type limiter's, held by the handler's task (see _run_handler).
        self._threads = anyio.CapacityLimiter(math.inf)
        self._urls: dict[str, httpx.URL] = {}
        self.url_texts: set[str] = set()  # shared with the log filter
        # The transport of the worker's own default client (None with a client passed in).
        self.own_transport: H11Transport | None = None
        self._headers: dict[tuple[tuple[str, str], ...], httpx.Headers] = {}
        self._timeouts: dict[float, dict[str, float | None]] = {}
        self._loop_thread = threading.get_ident()
        self._health: HealthState | None = None

    # -- Driver's primitives -----------------------------------------------------------

    def now(self) -> float:
        return anyio.current_time()

    def set_timer(self, deadline: float | None) -> None:
        self._deadline = math.inf if deadline is None else deadline
        scope = self._timer_scope
        if scope is not None:
            scope.deadline = self._deadline

    async def run_timer(self) -> None:
        """The one timer: sleeps in a scope whose deadline is the machine's next deadline.

        :meth:`set_timer` moves that deadline (no task is started or cancelled
        per change); when it passes, :meth:`on_timer` runs and the loop sleeps
        again on the next one. It wakes only at deadlines, never to poll.
        """
        while not self.finished:
            with anyio.CancelScope(deadline=self._deadline) as scope:
                self._timer_scope = scope
                await anyio.sleep_forever()
            self._timer_scope = None
            if scope.cancelled_caught and self.now() >= self._deadline:
                # The timer is used up (the Driver arms a new one only when the
                # machine asks). Left at its past deadline it would fire again at
                # once, in a busy loop while a request is out; and a deadline that
                # set_timer moved later while this one fired must not run now.
                self._deadline = math.inf
                self.on_timer()

    async def run_ticks(self, state: HealthState) -> None:
        """Refresh the health state once a second (only while a health server runs).

        The health server lives in another thread and reads only what the last
        tick stored: a tick that stops coming is how it sees a blocked loop.
        """
        self._health = state
        while not self.finished:  # one wake-up per TICK_INTERVAL, until the worker stops
            self._tick()
            await anyio.sleep(TICK_INTERVAL)

    def _tick(self) -> None:
        state = self._health
        if state is None:
            return
        failure = self.failure
        state.tick(
            time.monotonic(),
            self.machine.snapshot(),
            registered=self.machine.registered,
            failure=None if failure is None else f"{type(failure).__name__}: {failure}",
        )

    def do_stopped(self) -> None:
        self._tick()  # the health server sees the final state
        self.stopped.set()

    def do_send_request(self, effect: SendRequest) -> None:
        scope = anyio.CancelScope()
        self._requests[effect.request_id] = scope
        self.tg.start_soon(self._http, effect, scope)

    def do_cancel_request(self, request_id: int) -> None:
        scope = self._requests.get(request_id)
        if scope is not None:
            scope.cancel()

    def do_start_handler(self, effect: StartHandler) -> None:
        scope = anyio.CancelScope()
        self._handlers[effect.task.task_id] = scope
        self.tg.start_soon(self._run_handler, effect.task, scope)

    def do_cancel_handler(self, task_id: str) -> None:
        scope = self._handlers.get(task_id)
        if scope is not None:
            scope.cancel()

    def do_cleanup(self, task_id: str) -> None:
        task_dir = self._task_dir(task_id)
        if os.path.isdir(task_dir):
            self._cleanups += 1
            self.tg.start_soon(self._remove, task_dir)

    def do_open_channel(self, effect: OpenCommandChannel) -> None:
        scope = anyio.CancelScope()
        self._channels[effect.channel] = scope
        self.tg.start_soon(self._channel, effect, scope)

    def do_close_channel(self, channel: int) -> None:
        scope = self._channels.pop(channel, None)
        if scope is not None:
            scope.cancel()

    def do_send_message(self, channel: int, text: str) -> None:
        ws = self._sockets.get(channel)
        if ws is not None:
            self.tg.start_soon(self._send_ws, ws, text)

    # -- HTTP ---------------------------------------------------------------------------

    def _build(self, req: HttpRequest) -> httpx.Request:
        """The httpx request for ``req``, reusing parsed URLs, merged headers and timeouts.

        Equivalent to ``client.build_request`` for the worker's own requests
        (the client's default headers are merged in, the request's win) minus
        the re-parsing of the same few URLs and headers on every request.
        """
        url = self._urls.get(req.url)
        if url is None:
            if len(self._urls) >= _CACHE_LIMIT:
                self._urls.clear()
                self.url_texts.clear()
            url = self._urls[req.url] = httpx.URL(req.url)
            self.url_texts.add(str(url))
        headers = self._headers.get(req.headers)
        if headers is None:
            if len(self._headers) >= _CACHE_LIMIT:
                self._headers.clear()
            headers = httpx.Headers(self.client.headers)
            headers.update(req.headers)
            self._headers[req.headers] = headers
        timeouts = self._timeouts.get(req.timeout)
        if timeouts is None:
            if len(self._timeouts) >= _CACHE_LIMIT:
                self._timeouts.clear()
            timeouts = self._timeouts[req.timeout] = httpx.Timeout(req.timeout).as_dict()
        return httpx.Request(
            req.method, url, headers=headers, content=req.body, extensions={"timeout": timeouts}
        )

    async def _http(self, effect: SendRequest, scope: anyio.CancelScope) -> None:
        rid = effect.request_id
        event: Event | None = None
        with scope:
            try:
                request = self._build(effect.request)
                transport = self.own_transport
                if transport is None:
                    response = await self.client.send(request)
                else:
                    response = await _send_direct(transport, request)
                event = ResponseReceived(
                    request_id=rid,
                    status=response.status_code,
                    body=response.content,
                    retry_after=response.headers.get("Retry-After"),
                )
            except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
                event = RequestFailed(request_id=rid, reason=_describe(exc))
            except Exception as exc:  # a library bug must not kill the worker
                log.error("%s request failed unexpectedly", effect.purpose, exc_info=exc)
                event = RequestFailed(request_id=rid, reason=_describe(exc))
        self._requests.pop(rid, None)
        self.feed(event if event is not None else RequestFailed(request_id=rid, reason="abandoned"))

    # -- handlers -------------------------------------------------------------------------

    def _task_dir(self, task_id: str) -> str:
        return os.path.join(self._files_root, task_dir_name(task_id))

    async def _run_handler(self, task: Task, scope: anyio.CancelScope) -> None:
        task_id = task.task_id
        task_dir = self._task_dir(task_id)
        extras = standard_extras(self._feed_from_anywhere, task_id)
        spec = self.definition.handlers[task.name]
        if spec.files_arg is not None:
            extras[spec.files_arg] = TaskFiles(task_dir)
        limiter = self._limiters.get(spec.task_type) or self._limiters[None]

        async def run_sync(func: Callable[[], Any]) -> Any:
            # The task holds the token, not the thread: on trio a token lent to a
            # thread stays taken until the thread returns, even once abandoned, so
            # handlers hung past TASK_TIMEOUT would use the limiter up for good.
            try:
                async with limiter:
                    return await anyio.to_thread.run_sync(
                        func, limiter=self._threads, abandon_on_cancel=True
                    )
            except anyio.get_cancelled_exc_class():
                log.warning(
                    "task %s (job %s): sync handler %r cancelled; its thread runs on until the "
                    "function returns (Python cannot stop a thread)",
                    task_id,
                    task.job_id,
                    task.name,
                )
                raise

        result: Mapping[str, Any] | None = None
        with scope:
            result = await execute_task(
                self.definition,
                task,
                task_dir=task_dir,
                extras=extras,
                run_sync=run_sync,
                transfers=self.s3,
                path_type=Path,
                redact=self._secrets,
            )
        self._handlers.pop(task_id, None)
        if result is None:  # cancelled through its scope (the machine asked)
            result = cancelled_result()
        self.feed(HandlerFinished(task_id=task_id, result=result))

    def _feed_from_anywhere(self, event: Event) -> None:
        """``feed``, also from a sync handler's thread (``add_to_hot_cache`` is sync).

        The machine is not thread-safe: a call from a worker thread is handed to
        the event loop and waits there, on asyncio and trio alike.
        """
        if threading.get_ident() == self._loop_thread:
            self.feed(event)
        else:
            anyio.from_thread.run_sync(self.feed, event)

    async def _remove(self, task_dir: str) -> None:
        try:
            await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, task_dir, True))
        finally:
            self._cleanups -= 1
            if self._cleanups == 0:
                self._cleanups_done.set()
                self._cleanups_done = anyio.Event()

    async def wait_for_cleanups(self) -> None:
        """Task folders go before the process does (bounded)."""
        with anyio.move_on_after(_CLEANUP_WAIT):
            while self._cleanups > 0:  # each turn waits for the count to reach zero
                await self._cleanups_done.wait()

    # -- command channel -----------------------------------------------------------------

    async def _channel(self, effect: OpenCommandChannel, scope: anyio.CancelScope) -> None:
        channel = effect.channel
        reason = "closed by the orchestrator"
        with scope:
            try:
                ws = await connect_websocket(effect.url, effect.headers)
                try:
                    self._sockets[channel] = ws
                    self.feed(CommandChannelOpened(channel=channel))
                    async for message in ws:
                        self.feed(CommandReceived(channel=channel, text=message))
                    reason = ws.close_reason or reason
                finally:
                    self._sockets.pop(channel, None)
                    await ws.aclose()
            except WebSocketError as exc:
                reason = str(exc)
            except Exception as exc:  # never let the channel take the worker down
                log.error("command channel failed unexpectedly", exc_info=exc)
                reason = _describe(exc)
        if scope.cancel_called:  # closed on purpose: the machine knows
            return
        self._channels.pop(channel, None)
        self.feed(CommandChannelClosed(channel=channel, reason=reason))

    async def _send_ws(self, ws: WebSocket, text: str) -> None:
        try:
            await ws.send_text(text)
        except WebSocketError as exc:  # closing underneath us
            log.debug("progress update not sent: %s", exc)


async def _send_direct(transport: H11Transport, request: httpx.Request) -> httpx.Response:
    """``client.send(request)`` for the worker's own default client, minus what it adds.

    That client has no auth, event hooks, mounts, proxies or redirects to
    follow, and its cookie jar is never read (``_build`` makes requests
    without the client's cookies). What ``send`` does on top of the transport
    is then only work nobody sees, and it was most of rca_httpx's client cost
    per request: a cookie-jar update from every response, and an INFO log
    record that ``_QuietOwnRequests`` drops for these URLs. The response is
    read and closed as ``send`` does.
    """
    response = await transport.handle_async_request(request)
    response.request = request
    try:
        await response.aread()
    except BaseException:
        await response.aclose()
        raise
    return response


def _limiters(settings: MachineSettings) -> dict[str | None, anyio.CapacityLimiter]:
    """One thread limiter per task type, sized like its slots, and one for untyped tasks.

    anyio's default limiter (40 threads, shared with file I/O) would make sync
    handlers queue behind each other or behind ``TaskFiles`` calls; sized
    like the slots, every admitted sync handler gets a thread at once.
    """
    limit = settings.max_concurrent_tasks
    out: dict[str | None, anyio.CapacityLimiter] = {None: anyio.CapacityLimiter(limit)}
    for task_type, type_limit in settings.task_type_limits.items():
        out[task_type] = anyio.CapacityLimiter(min(type_limit, limit))
    return out


def _describe(exc: BaseException) -> str:
    """An error for a log line: the type and message (httpx never puts headers in them)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

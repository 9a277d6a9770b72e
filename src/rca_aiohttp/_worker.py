"""The worker on asyncio + aiohttp: performs what :class:`rca_core.WorkerMachine` decides.

The driver is deliberately dumb: every event goes into the machine, every
effect it returns becomes an asyncio task (an HTTP request, a handler, a
WebSocket), and one ``loop.call_at`` timer follows the machine's next
deadline. No loop polls anything: an idle worker sleeps until a reply, a
command or a deadline wakes it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import random
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

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
from rca_core._machine import WorkerMachine
from rca_core._metrics import WorkerMetrics
from rca_core._paths import task_dir_name
from rca_core._results import cancelled_result

from ._files import TaskFiles
from ._health import HealthServer
from ._s3 import S3Transfers

__all__ = ["Worker"]

log = logging.getLogger("rca_aiohttp")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class Worker(WorkerFront):
    """A worker: declare handlers with :meth:`task`, then :meth:`run`.

    Same constructor and decorator as the reference SDK's ``Worker``; the
    differences in behaviour are listed in the migration guide.
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
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        super().__init__(
            worker_type, max_concurrent_tasks, task_type_limits, skill_dependencies, config
        )
        self._http_session = http_session

    async def serve(self, *, health: bool = False, handle_signals: bool = False) -> None:
        """Run until stopped, inside an already running event loop."""
        resolved = self._config.resolve()
        settings = self._definition.settings(
            resolved, hostname=socket.gethostname(), ip_address=_local_ip()
        )
        machine = WorkerMachine(settings, rng=random.Random())
        own_session = self._http_session is None
        session = self._http_session or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(100, 4 * settings.max_concurrent_tasks)),
        )
        s3 = _make_s3(resolved)
        driver = _Driver(machine, session, self._definition, resolved, s3)
        self._driver = driver
        redactor = Redactor(resolved.secret_values())
        redactor.install()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        health_server: HealthServer | None = None
        try:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    try:
                        loop.add_signal_handler(sig, driver.signal, sig.name)
                        installed.append(sig)
                    except (
                        NotImplementedError,
                        RuntimeError,
                    ):  # pragma: no cover - non-main thread
                        pass
            if health:
                health_server = self._start_health(driver, resolved)
            log.info(
                "worker %s (%s) starting: %d handler(s), %d orchestrator(s)",
                settings.worker_id,
                settings.worker_type,
                len(settings.tasks),
                len(settings.orchestrators),
            )
            driver.start()
            if self._stop_early:
                driver.feed(DrainRequested(reason="stop() called before start"))
            await driver.stopped.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await driver.close()
            if health_server is not None:
                health_server.stop()
            if s3 is not None:
                await s3.close()
            if own_session:
                await session.close()
            redactor.remove()
            self._driver = None
        if driver.failure is not None:
            raise driver.failure

    def _start_health(self, driver: _Driver, resolved: ResolvedConfig) -> HealthServer:
        """Metrics on, a 1 Hz tick in the worker's loop, and the server in its own thread."""
        state = HealthState(blocked_threshold=resolved.health_blocked_threshold)
        driver.metrics = WorkerMetrics(state.latest_snapshot)
        driver.start_ticks(state)
        server = HealthServer(
            state, driver.metrics, host=resolved.worker_host, port=resolved.worker_port
        )
        server.start()
        self.health_port = server.port
        log.info("health server on %s:%s", resolved.worker_host, server.port)
        return server

    def run(self) -> None:
        """Run the worker until SIGTERM/SIGINT (the first drains, the second cancels).

        Sets up logging for ``LOG_FORMAT`` unless the program already did.
        """
        configure_logging(str(self._config.LOG_FORMAT))
        asyncio.run(self.serve(handle_signals=True))

    def run_with_health_check(self) -> None:
        """:meth:`run`, plus the health server on WORKER_HOST:WORKER_PORT."""
        configure_logging(str(self._config.LOG_FORMAT))
        asyncio.run(self.serve(health=True, handle_signals=True))


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


class _Driver(Driver):
    """The shared driver, with asyncio tasks for effects and ``call_at`` for the timer."""

    def __init__(
        self,
        machine: WorkerMachine,
        session: aiohttp.ClientSession,
        definition: WorkerDefinition,
        config: ResolvedConfig,
        s3: S3Transfers,
    ) -> None:
        super().__init__(machine)
        self.session = session
        self.definition = definition
        self.config = config
        self.s3 = s3
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.stopped = asyncio.Event()
        self._requests: dict[int, asyncio.Task[None]] = {}
        self._abandoned: set[int] = set()
        self._handlers: dict[str, asyncio.Task[None]] = {}
        self._cancelling: set[str] = set()
        self._channels: dict[int, asyncio.Task[None]] = {}
        self._sockets: dict[int, aiohttp.ClientWebSocketResponse] = {}
        self._closing: set[int] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._cleanups: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._health: HealthState | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._files_root = config.task_files_dir
        self._secrets = config.secret_values()

    # -- health ticks -----------------------------------------------------------------

    def start_ticks(self, state: HealthState) -> None:
        self._health = state
        self._tick()

    def _tick(self) -> None:
        state = self._health
        if state is None:
            return
        failure = None if self.failure is None else f"{type(self.failure).__name__}: {self.failure}"
        state.tick(
            time.monotonic(),
            self.machine.snapshot(),
            registered=self.machine.registered,
            failure=failure,
        )
        if not self.finished:
            self._ticker = self.loop.call_later(TICK_INTERVAL, self._tick)

    # -- Driver's primitives -----------------------------------------------------------

    def now(self) -> float:
        return self.loop.time()

    def set_timer(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self.on_timer)

    def do_stopped(self) -> None:
        self._tick()  # the health server sees the final state
        self.stopped.set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def do_send_request(self, effect: SendRequest) -> None:
        self._requests[effect.request_id] = self._spawn(self._http(effect))

    def do_cancel_request(self, request_id: int) -> None:
        request = self._requests.get(request_id)
        if request is not None:
            self._abandoned.add(request_id)
            request.cancel()

    def do_start_handler(self, effect: StartHandler) -> None:
        self._handlers[effect.task.task_id] = self._spawn(self._run_handler(effect.task))

    def do_cancel_handler(self, task_id: str) -> None:
        handler = self._handlers.get(task_id)
        if handler is not None:
            self._cancelling.add(task_id)
            handler.cancel()

    def do_cleanup(self, task_id: str) -> None:
        task_dir = self._task_dir(task_id)
        if os.path.isdir(task_dir):
            cleanup = self._spawn(asyncio.to_thread(shutil.rmtree, task_dir, True))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)

    def do_open_channel(self, effect: OpenCommandChannel) -> None:
        self._channels[effect.channel] = self._spawn(self._channel(effect))

    def do_close_channel(self, channel: int) -> None:
        task = self._channels.pop(channel, None)
        if task is not None:
            self._closing.add(channel)
            task.cancel()

    def do_send_message(self, channel: int, text: str) -> None:
        ws = self._sockets.get(channel)
        if ws is not None and not ws.closed:
            self._spawn(self._send_ws(ws, text))

    # -- HTTP ---------------------------------------------------------------------------

    async def _http(self, effect: SendRequest) -> None:
        rid = effect.request_id
        req = effect.request
        event: Event
        try:
            async with self.session.request(
                req.method,
                req.url,
                headers=req.headers,
                data=req.body,
                timeout=aiohttp.ClientTimeout(total=req.timeout),
            ) as resp:
                body = await resp.read()
                event = ResponseReceived(
                    request_id=rid,
                    status=resp.status,
                    body=body,
                    retry_after=resp.headers.get("Retry-After"),
                )
        except asyncio.CancelledError:
            if rid not in self._abandoned:
                raise
            event = RequestFailed(request_id=rid, reason="abandoned")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            event = RequestFailed(request_id=rid, reason=_describe(exc))
        finally:
            self._requests.pop(rid, None)
            self._abandoned.discard(rid)
        self.feed(event)

    # -- handlers -------------------------------------------------------------------------

    def _task_dir(self, task_id: str) -> str:
        return os.path.join(self._files_root, task_dir_name(task_id))

    async def _run_handler(self, task: Task) -> None:
        task_id = task.task_id
        task_dir = self._task_dir(task_id)
        extras = standard_extras(self._feed_from_anywhere, task_id)
        spec = self.definition.handlers[task.name]
        if spec.files_arg is not None:
            extras[spec.files_arg] = TaskFiles(task_dir)
        try:
            result = await execute_task(
                self.definition,
                task,
                task_dir=task_dir,
                extras=extras,
                run_sync=_in_own_thread,
                transfers=self.s3,
                path_type=Path,
                redact=self._secrets,
            )
        except asyncio.CancelledError:
            if task_id not in self._cancelling:
                raise
            result = cancelled_result()
        finally:
            self._handlers.pop(task_id, None)
            self._cancelling.discard(task_id)
        self.feed(HandlerFinished(task_id=task_id, result=result))

    def _feed_from_anywhere(self, event: Event) -> None:
        """``feed``, also from a sync handler's thread (``add_to_hot_cache`` is sync).

        The machine is not thread-safe: a call from another thread is handed to
        the event loop.
        """
        if threading.get_ident() == self._loop_thread:
            self.feed(event)
        else:
            self.loop.call_soon_threadsafe(self.feed, event)

    # -- command channel -----------------------------------------------------------------

    async def _channel(self, effect: OpenCommandChannel) -> None:
        channel = effect.channel
        reason = "closed by the orchestrator"
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            ws = await self.session.ws_connect(
                effect.url,
                headers=effect.headers,
                heartbeat=20.0,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            )
            self._sockets[channel] = ws
            self.feed(CommandChannelOpened(channel=channel))
            async for msg in ws:
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    self.feed(CommandReceived(channel=channel, text=msg.data))
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    reason = _describe(ws.exception() or Exception("websocket error"))
                    break
        except asyncio.CancelledError:
            if channel not in self._closing:
                raise
            self._closing.discard(channel)
            return
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            reason = _describe(exc)
        finally:
            self._sockets.pop(channel, None)
            if ws is not None:
                await ws.close()
        self._channels.pop(channel, None)
        self.feed(CommandChannelClosed(channel=channel, reason=reason))

    async def _send_ws(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        try:
            await ws.send_str(text)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:  # closing underneath us
            log.debug("progress update not sent: %s", _describe(exc))

    # -- shutdown -------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel whatever is still in flight once the machine has stopped."""
        self.finished = True
        self.stopped.set()
        self.set_timer(None)
        if self._ticker is not None:
            self._ticker.cancel()
        if self._cleanups:  # task folders go before the process does
            await asyncio.wait(list(self._cleanups), timeout=30.0)
        pending = [t for t in self._background if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)


async def _in_own_thread(func: Callable[[], T]) -> T:
    """Run a sync handler in a thread of its own, not in the loop's default executor.

    The default executor has at most ``min(32, CPUs + 4)`` threads, shared with
    ``TaskFiles`` calls and the task-folder cleanup. A handler stopped by
    ``TASK_TIMEOUT`` keeps its thread until it returns (Python cannot stop a
    thread), so a few hung handlers would starve every later sync handler and
    file operation, and sync handlers beyond that size would queue instead of
    running. A fresh daemon thread per call never queues; the machine's slots
    already bound how many handlers run at once.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()  # task ids on log lines, as asyncio.to_thread does

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled (timeout, shutdown): nobody waits any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            value = context.run(func)
        except BaseException as exc:  # handed to the awaiting task, as a thread pool would
            error = exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop is closed: the worker stopped long ago
            pass

    threading.Thread(target=work, name="rca-sync-handler", daemon=True).start()
    return await future


def _describe(exc: BaseException) -> str:
    """An error for a log line: the type and message (aiohttp never puts headers in them)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

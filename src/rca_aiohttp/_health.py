"""The health and metrics server, in a thread of its own.

It answers from :class:`rca_core._health.HealthState`, which the worker's
loop refreshes about once a second. Serving from another thread is what makes
``/health`` truthful: when the worker's loop is blocked, this server still
answers, and it answers 503.

Routes: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics``
(Prometheus text format).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from aiohttp import web

from rca_core._health import HealthReply, HealthState
from rca_core._metrics import CONTENT_TYPE, WorkerMetrics

__all__ = ["HealthServer", "bound_port"]


class HealthServer:
    def __init__(self, state: HealthState, metrics: WorkerMetrics, *, host: str, port: int) -> None:
        self._state = state
        self._metrics = metrics
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port: int | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="rca-health", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the health server did not start within 10 s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._readiness)
        app.router.add_get("/metrics", self._render_metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
            self.port = bound_port(site)
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    @staticmethod
    def _reply(reply: HealthReply) -> web.Response:
        return web.Response(status=reply.status, body=reply.body, content_type=reply.content_type)

    async def _health(self, request: web.Request) -> web.Response:
        return self._reply(self._state.liveness(time.monotonic()))

    async def _readiness(self, request: web.Request) -> web.Response:
        return self._reply(self._state.readiness(time.monotonic()))

    async def _render_metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def bound_port(site: web.TCPSite) -> int:
    """The port a site listens on (it may have been asked for port 0)."""
    server: Any = site._server
    return int(server.sockets[0].getsockname()[1])

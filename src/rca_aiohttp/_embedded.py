"""An orchestrator in a box: :class:`rca_core.testing.FakeOrchestrator` served over real HTTP.

For trying handlers without installing anything (``rca-worker try``) and for
tests: the worker under test speaks real HTTP and a real WebSocket to it on
127.0.0.1, and the fake decides every answer exactly as the sans-IO twin does.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import WSMsgType, web

from rca_core._wire import HttpRequest
from rca_core.testing import FakeOrchestrator

from ._health import bound_port

__all__ = ["EmbeddedOrchestrator"]


class EmbeddedOrchestrator:
    """Serve a FakeOrchestrator on 127.0.0.1; long polls really wait for tasks."""

    def __init__(
        self, fake: FakeOrchestrator | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.fake = fake or FakeOrchestrator(hold=30.0)
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()
        self._sockets: set[web.WebSocketResponse] = set()
        self.url = ""

    async def __aenter__(self) -> EmbeddedOrchestrator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/_worker/ws/{worker_id}", self._ws)
        app.router.add_route("*", "/_worker/{tail:.*}", self._http)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = bound_port(site)
        self.url = f"http://{self._host}:{port}"
        self.fake.url = self.url

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def submit(self, task_type: str, params: Any = None, **extra: Any) -> str:
        task_id = self.fake.submit(task_type, params, **extra)
        async with self._changed:
            self._changed.notify_all()
        return task_id

    async def wait_for_results(self, count: int, *, within: float) -> list[dict[str, Any]]:
        """Wait (bounded) until ``count`` results arrived; returns them all."""
        async with asyncio.timeout(within):
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.fake.results) >= count)
        return list(self.fake.results)

    async def cancel(self, task_id: str, job_id: str) -> None:
        message = json.dumps({"command": "cancel_task", "task_id": task_id, "job_id": job_id})
        for ws in list(self._sockets):
            await ws.send_str(message)

    async def _http(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        req = HttpRequest(
            method=request.method,
            url=str(request.url),
            headers=tuple(request.headers.items()),
            body=body or None,
            timeout=0.0,
        )
        loop = asyncio.get_running_loop()
        reply = self.fake.answer(req, loop.time())
        if reply is None:  # a parked poll: wait for a task or the hold to pass
            try:
                async with asyncio.timeout(self.fake.hold):
                    async with self._changed:
                        while (reply := self.fake.next_task()) is None:
                            await self._changed.wait()
            except TimeoutError:
                return web.Response(status=204)
        async with self._changed:
            self._changed.notify_all()
        if reply.status is None:
            raise web.HTTPServiceUnavailable()
        headers = {"Retry-After": reply.retry_after} if reply.retry_after else None
        return web.Response(
            status=reply.status,
            body=reply.body,
            headers=headers,
            content_type="application/json" if reply.body else None,
        )

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-Worker-Token") != self.fake.token:
            return web.Response(status=401)
        ws = web.WebSocketResponse(heartbeat=20.0)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self.fake.commands_received.append(msg.data)
        finally:
            self._sockets.discard(ws)
        return ws

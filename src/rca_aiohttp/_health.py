"""The health server: answers only what is true.

``/health`` (liveness) fails when the worker's machine has stopped or failed;
a blocked event loop cannot answer at all, which a probe reads as failure.
``/ready`` (readiness) fails until the worker is registered with an
orchestrator, and while it drains.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ._worker import _Driver

__all__ = ["start_health_server"]


async def start_health_server(driver: _Driver, *, host: str, port: int) -> web.AppRunner:
    async def health(request: web.Request) -> web.Response:
        snap = driver.machine.snapshot()
        alive = driver.failure is None and snap["state"] != "stopped"
        return _json(
            200 if alive else 503, {"status": "ok" if alive else "dead", "state": snap["state"]}
        )

    async def ready(request: web.Request) -> web.Response:
        snap = driver.machine.snapshot()
        ok = snap["state"] == "running" and driver.machine.registered
        return _json(
            200 if ok else 503,
            {
                "status": "ready" if ok else "not ready",
                "state": snap["state"],
                "registered": driver.machine.registered,
                "slots": snap["slots"],
                "orchestrators": snap["orchestrators"],
            },
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")

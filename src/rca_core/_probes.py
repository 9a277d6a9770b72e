"""What the health endpoints answer, decided once for every adapter.

``/health`` (liveness) fails when the machine has stopped or the driver
failed: a worker in that state will not recover and should be restarted.
``/ready`` (readiness) fails until the worker is registered with an
orchestrator and while it drains: it is alive but should get no new work.
Adapters only serve the bytes; a blocked event loop cannot answer at all,
which a probe reads as a failure too.
"""

from __future__ import annotations

import json
from typing import Final

from ._machine import WorkerMachine

__all__ = ["PROBE_PATHS", "probe_reply"]

PROBE_PATHS: Final = ("/health", "/ready")


def probe_reply(
    path: str, machine: WorkerMachine, failure: BaseException | None
) -> tuple[int, bytes] | None:
    """``(status, JSON body)`` for a probe path, or None for any other path."""
    if path not in PROBE_PATHS:
        return None
    snap = machine.snapshot()
    state = snap["state"]
    if path == "/health":
        alive = failure is None and state != "stopped"
        body: dict[str, object] = {"status": "ok" if alive else "dead", "state": state}
        return (200 if alive else 503), json.dumps(body).encode()
    registered = machine.registered
    ok = failure is None and state == "running" and registered
    body = {
        "status": "ready" if ok else "not ready",
        "state": state,
        "registered": registered,
        "slots": snap["slots"],
        "orchestrators": snap["orchestrators"],
    }
    return (200 if ok else 503), json.dumps(body).encode()

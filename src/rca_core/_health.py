"""What ``/health`` and ``/ready`` answer, decided in one place for every adapter.

The worker's event loop calls :meth:`HealthState.tick` about once a second
with a fresh snapshot of the machine; the health server runs in a thread of
its own and only reads what the last tick stored. So when the loop is blocked
(a handler calling ``time.sleep``, a CPU-bound computation) the health server
still answers, and it answers the truth: the last tick is too old.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["TICK_INTERVAL", "HealthReply", "HealthState"]

#: Seconds between ticks of the worker's loop while a health server runs.
TICK_INTERVAL = 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class HealthReply:
    status: int
    body: bytes
    content_type: str = "application/json"


class HealthState:
    """Shared between the worker's loop (writer) and the health server's thread (reader)."""

    def __init__(self, *, blocked_threshold: float) -> None:
        self.blocked_threshold = blocked_threshold
        self._lock = threading.Lock()
        self._tick: float | None = None
        self._snapshot: dict[str, Any] = {"state": "created"}
        self._registered = False
        self._failure: str | None = None

    def tick(
        self, now: float, snapshot: dict[str, Any], *, registered: bool, failure: str | None
    ) -> None:
        with self._lock:
            self._tick = now
            self._snapshot = snapshot
            self._registered = registered
            self._failure = failure

    def latest_snapshot(self) -> dict[str, Any]:
        """The snapshot stored by the last tick (safe to read from any thread)."""
        with self._lock:
            return self._snapshot

    def liveness(self, now: float) -> HealthReply:
        with self._lock:
            tick, snap, failure = self._tick, self._snapshot, self._failure
        state = snap.get("state", "created")
        lag = None if tick is None else max(0.0, now - tick - TICK_INTERVAL)
        problems = []
        if failure is not None:
            problems.append(f"internal error: {failure}")
        if state == "stopped":
            problems.append("the worker has stopped")
        if tick is None:
            problems.append("the worker loop has not started")
        elif lag is not None and lag > self.blocked_threshold:
            problems.append(f"the event loop has not run for {lag:.1f}s (blocked?)")
        body = {"status": "ok" if not problems else "failing", "state": state, "loop_lag": lag}
        if problems:
            body["problems"] = problems
        return HealthReply(status=503 if problems else 200, body=json.dumps(body).encode())

    def readiness(self, now: float) -> HealthReply:
        live = self.liveness(now)
        with self._lock:
            snap, registered = self._snapshot, self._registered
        state = snap.get("state", "created")
        ready = live.status == 200 and state == "running" and registered
        body = {
            "status": "ready" if ready else "not ready",
            "state": state,
            "registered": registered,
            "slots": snap.get("slots"),
            "orchestrators": snap.get("orchestrators"),
        }
        return HealthReply(status=200 if ready else 503, body=json.dumps(body).encode())

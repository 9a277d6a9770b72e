"""Prometheus metrics of a worker, fed by the shared driver.

The driver reports what passes through it (effects out, events in) and the
machine's snapshot fills the gauges at scrape time, so both adapters expose
the same metrics with no code of their own beyond serving ``render()``.
Each worker has its own registry: two workers in one process do not mix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "WorkerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, float("inf"))
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, float("inf"))


class _SnapshotCollector(Collector):
    """Gauges read from the machine's snapshot when Prometheus scrapes."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Any:
        snap = self._snapshot()
        slots = snap.get("slots") or {}
        in_use = GaugeMetricFamily(
            "rca_slots_in_use", "Tasks held (waiting or running)", labels=["kind"]
        )
        in_use.add_metric(["held"], slots.get("held", 0))
        in_use.add_metric(["polling"], slots.get("polling", 0))
        in_use.add_metric(["limit"], slots.get("limit", 0))
        yield in_use
        by_type = GaugeMetricFamily(
            "rca_slots_by_type",
            "Tasks running or waiting per task type",
            labels=["task_type", "kind"],
        )
        for task_type, count in (slots.get("running") or {}).items():
            by_type.add_metric([task_type, "running"], count)
        for task_type, count in (slots.get("waiting") or {}).items():
            by_type.add_metric([task_type, "waiting"], count)
        yield by_type
        healthy = GaugeMetricFamily(
            "rca_orchestrator_healthy",
            "1 when the orchestrator answered the last request",
            labels=["url"],
        )
        registered = GaugeMetricFamily(
            "rca_orchestrator_registered", "1 when registered with the orchestrator", labels=["url"]
        )
        for link in snap.get("orchestrators") or []:
            healthy.add_metric([link["url"]], 1.0 if link["healthy"] else 0.0)
            registered.add_metric([link["url"]], 1.0 if link["state"] == "registered" else 0.0)
        yield healthy
        yield registered
        outbox = GaugeMetricFamily("rca_results_undelivered", "Results waiting to be acknowledged")
        outbox.add_metric([], snap.get("outbox", 0))
        yield outbox
        events = CounterMetricFamily(
            "rca_worker_events", "Protocol events counted by the core", labels=["event"]
        )
        for name, value in sorted((snap.get("counters") or {}).items()):
            events.add_metric([name], value)
        yield events


class WorkerMetrics:
    """Counters and histograms of one worker, in a registry of its own."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks_started = Counter("rca_tasks_started", "Handlers started", ["task"], registry=r)
        self.tasks_finished = Counter(
            "rca_tasks_finished", "Handlers finished, by outcome", ["task", "outcome"], registry=r
        )
        self.handler_seconds = Histogram(
            "rca_handler_duration_seconds",
            "Handler run time",
            ["task"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "rca_request_duration_seconds",
            "Time to an orchestrator's reply, by request kind (poll includes the hold)",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_failed = Counter(
            "rca_requests_failed",
            "Requests that got no reply or a retryable error",
            ["kind"],
            registry=r,
        )
        r.register(_SnapshotCollector(snapshot))
        self._started: dict[str, tuple[str, float]] = {}
        self._sent: dict[int, tuple[str, float]] = {}

    # -- fed by the driver ---------------------------------------------------------

    def request_sent(self, request_id: int, kind: str, now: float) -> None:
        self._sent[request_id] = (kind, now)

    def request_done(self, request_id: int, status: int | None, now: float) -> None:
        sent = self._sent.pop(request_id, None)
        if sent is None:
            return
        kind, at = sent
        self.request_seconds.labels(kind).observe(now - at)
        if status is None or status == 429 or status >= 500:
            self.requests_failed.labels(kind).inc()

    def handler_started(self, task_id: str, task: str, now: float) -> None:
        self._started[task_id] = (task, now)
        self.tasks_started.labels(task).inc()

    def handler_finished(self, task_id: str, result: Any, now: float) -> None:
        started = self._started.pop(task_id, None)
        if started is None:
            return
        task, at = started
        self.handler_seconds.labels(task).observe(now - at)
        status = result.get("status") if isinstance(result, dict) else None
        if status == "failure":
            error = result.get("error") if isinstance(result.get("error"), dict) else {}
            outcome = str(error.get("code", "failure"))
        else:
            outcome = str(status or "success")
        self.tasks_finished.labels(task, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

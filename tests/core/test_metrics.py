"""WorkerMetrics: what a scrape of ``/metrics`` shows, parsed back as Prometheus would.

The counters and histograms are fed as the driver feeds them (see
test_driver.py for the hooks in place); the gauges come from the snapshot
callback at scrape time, here a real machine's snapshot in the middle of work.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rca_core import PERMANENT_ERROR, TRANSIENT_ERROR
from rca_core._health import HealthState
from rca_core._metrics import CONTENT_TYPE, WorkerMetrics
from rca_core.testing import FakeOrchestrator, Simulation

from .sim_helpers import TOKEN, URL_A, by_name, make_machine, succeed_after

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: WorkerMetrics) -> Samples:
    """Every sample of ``render()``, keyed by name and sorted labels."""
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def busy_worker() -> tuple[Simulation, FakeOrchestrator]:
    """Three tasks held: a 2 s ``gpu`` task running, one waiting for the gpu slot, one untyped."""
    machine = make_machine(
        tasks={"render": "gpu", "echo": None}, task_type_limits={"gpu": 1}, max_concurrent_tasks=3
    )
    fake = FakeOrchestrator(url=URL_A, token=TOKEN)
    sim = Simulation(machine, [fake], handler=by_name({"render": 2.0, "echo": None}))
    assert sim.run_until(lambda: fake.registered, timeout=5)
    fake.submit("render")
    fake.submit("render")
    fake.submit("echo")
    sim.run_for(1.0)
    return sim, fake


def test_gauges_show_the_snapshot_at_scrape_time() -> None:
    sim, _ = busy_worker()
    metrics = WorkerMetrics(sim.machine.snapshot)
    samples = scrape(metrics)
    assert value(samples, "rca_slots_in_use", kind="held") == 3.0
    assert value(samples, "rca_slots_in_use", kind="polling") == 0.0
    assert value(samples, "rca_slots_in_use", kind="limit") == 3.0
    assert value(samples, "rca_slots_by_type", task_type="gpu", kind="running") == 1.0
    assert value(samples, "rca_slots_by_type", task_type="gpu", kind="waiting") == 1.0
    assert value(samples, "rca_orchestrator_healthy", url=URL_A) == 1.0
    assert value(samples, "rca_orchestrator_registered", url=URL_A) == 1.0
    assert value(samples, "rca_results_undelivered") == 0.0
    assert value(samples, "rca_worker_events_total", event="tasks_received") == 3.0
    assert value(samples, "rca_worker_events_total", event="results_acknowledged") == 0.0

    # read again at the next scrape: the first gpu task finished, the second one runs
    sim.run_for(1.5)
    samples = scrape(metrics)
    assert value(samples, "rca_worker_events_total", event="results_acknowledged") == 1.0
    assert value(samples, "rca_slots_by_type", task_type="gpu", kind="waiting") == 0.0
    assert value(samples, "rca_slots_by_type", task_type="gpu", kind="running") == 1.0
    assert value(samples, "rca_slots_in_use", kind="held") == 2.0
    assert value(samples, "rca_slots_in_use", kind="polling") == 1.0


def test_an_orchestrator_that_is_down_shows_unhealthy_and_unregistered() -> None:
    fake = FakeOrchestrator(url=URL_A, token=TOKEN, down=True)
    sim = Simulation(make_machine(), [fake], handler=succeed_after(1.0))
    sim.run_for(3.0)
    samples = scrape(WorkerMetrics(sim.machine.snapshot))
    assert value(samples, "rca_orchestrator_healthy", url=URL_A) == 0.0
    assert value(samples, "rca_orchestrator_registered", url=URL_A) == 0.0
    failed = value(samples, "rca_worker_events_total", event="requests_failed")
    assert failed == sum(1 for _, route in fake.requests if route == "register") > 1


def test_before_the_first_health_tick_the_gauges_are_zero() -> None:
    # the adapters scrape HealthState.latest_snapshot: {"state": "created"} until the first tick
    metrics = WorkerMetrics(HealthState(blocked_threshold=5.0).latest_snapshot)
    samples = scrape(metrics)
    assert value(samples, "rca_slots_in_use", kind="held") == 0.0
    assert value(samples, "rca_slots_in_use", kind="limit") == 0.0
    assert value(samples, "rca_results_undelivered") == 0.0
    names = {name for name, _ in samples}
    assert not names & {
        "rca_slots_by_type",
        "rca_orchestrator_healthy",
        "rca_orchestrator_registered",
        "rca_worker_events_total",
    }
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_request_latency_by_kind_and_failures() -> None:
    metrics = WorkerMetrics(dict)
    metrics.request_sent(1, "register", 10.0)
    metrics.request_sent(2, "poll", 10.0)
    metrics.request_sent(3, "poll", 11.0)
    metrics.request_sent(4, "result", 11.0)
    metrics.request_sent(5, "heartbeat", 11.0)
    metrics.request_done(1, 200, 10.002)
    metrics.request_done(2, 204, 40.0)  # a long poll's hold counts
    metrics.request_done(3, None, 12.0)  # no reply
    metrics.request_done(4, 503, 11.5)
    metrics.request_done(5, 429, 11.1)
    metrics.request_done(6, 200, 12.0)  # never sent through these metrics: ignored
    metrics.request_done(1, 200, 13.0)  # a second reply to one request: ignored
    samples = scrape(metrics)
    assert value(samples, "rca_request_duration_seconds_count", kind="register") == 1.0
    assert value(samples, "rca_request_duration_seconds_sum", kind="register") == pytest.approx(
        0.002
    )
    assert value(samples, "rca_request_duration_seconds_bucket", kind="register", le="0.005") == 1.0
    assert value(samples, "rca_request_duration_seconds_bucket", kind="register", le="0.001") == 0.0
    assert value(samples, "rca_request_duration_seconds_count", kind="poll") == 2.0
    assert value(samples, "rca_request_duration_seconds_sum", kind="poll") == pytest.approx(31.0)
    assert value(samples, "rca_requests_failed_total", kind="poll") == 1.0
    assert value(samples, "rca_requests_failed_total", kind="result") == 1.0
    assert value(samples, "rca_requests_failed_total", kind="heartbeat") == 1.0
    assert value(samples, "rca_requests_failed_total", kind="register") is None


@pytest.mark.parametrize(
    ("result", "outcome"),
    [
        ({"status": "success", "data": {"x": 1}}, "success"),
        ({"data": {"x": 1}}, "success"),
        ({"status": "cancelled"}, "cancelled"),
        ({"status": "needs_review"}, "needs_review"),
        (
            {"status": "failure", "error": {"code": TRANSIENT_ERROR, "message": "m"}},
            TRANSIENT_ERROR,
        ),
        ({"status": "failure", "error": {"code": PERMANENT_ERROR}}, PERMANENT_ERROR),
        ({"status": "failure", "error": {"message": "no code"}}, "failure"),
        ({"status": "failure", "error": "not an object"}, "failure"),
        ({"status": "failure"}, "failure"),
    ],
)
def test_handler_outcome_labels(result: dict[str, Any], outcome: str) -> None:
    metrics = WorkerMetrics(dict)
    metrics.handler_started("t-1", "echo", 100.0)
    metrics.handler_finished("t-1", result, 102.5)
    samples = scrape(metrics)
    assert value(samples, "rca_tasks_started_total", task="echo") == 1.0
    assert value(samples, "rca_tasks_finished_total", task="echo", outcome=outcome) == 1.0
    assert value(samples, "rca_handler_duration_seconds_count", task="echo") == 1.0
    assert value(samples, "rca_handler_duration_seconds_sum", task="echo") == 2.5
    assert value(samples, "rca_handler_duration_seconds_bucket", task="echo", le="1.0") == 0.0
    assert value(samples, "rca_handler_duration_seconds_bucket", task="echo", le="5.0") == 1.0


def test_a_finish_without_a_start_is_not_counted() -> None:
    metrics = WorkerMetrics(dict)
    metrics.handler_started("t-1", "echo", 0.0)
    metrics.handler_finished("t-2", {"status": "success"}, 1.0)
    metrics.handler_finished("t-1", {"status": "success"}, 1.0)
    metrics.handler_finished("t-1", {"status": "success"}, 2.0)  # reported twice: counted once
    samples = scrape(metrics)
    assert value(samples, "rca_tasks_finished_total", task="echo", outcome="success") == 1.0
    assert value(samples, "rca_handler_duration_seconds_count", task="echo") == 1.0


def test_each_worker_has_its_own_registry() -> None:
    first, second = WorkerMetrics(dict), WorkerMetrics(dict)
    first.handler_started("t-1", "echo", 0.0)
    assert value(scrape(first), "rca_tasks_started_total", task="echo") == 1.0
    assert value(scrape(second), "rca_tasks_started_total", task="echo") is None
    text = first.render().decode()
    assert 'rca_tasks_started_total{task="echo"} 1.0' in text
    assert "# TYPE rca_handler_duration_seconds histogram" in text

"""The sans-IO core alone: how much CPU the worker's own logic costs per task.

No sockets and no event loop: a tiny in-process "orchestrator" answers every
request the machine emits at once (register, heartbeat, poll with a fresh
task, result) and every handler finishes as soon as it starts, so what is
timed is only the core's work per task, to set against the HTTP round trips
an adapter pays (``overhead.py``: ~0.35 ms of CPU per task for rca_aiohttp).

    .venv/bin/python benchmarks/core.py [--tasks 50000] [--rounds 5] [--concurrency 1 10]

Three layers, each timed on its own, the order rotating every round:

- ``machine``: ``WorkerMachine.handle`` + ``effects()`` + ``next_deadline()``
  per event, and ``handle_timer`` when a deadline passes (heartbeats): what
  any driver must call;
- ``driver``: the same through the shared ``rca_core._driver.Driver`` (event
  feeding, effect dispatch, timer bookkeeping), with ``do_*`` methods that only
  queue the effect, as an adapter's hand-off would;
- ``driver+execute``: plus ``execute_task`` for every task (handler lookup,
  params binding, handler keyword arguments, log context, result
  normalisation), with an ``async def noop(params, **kwargs)`` handler driven
  by hand (it never awaits, so one ``send(None)`` runs it).

Per task the machine sees 4 events (poll reply with the task, handler
finished, result reply, and the next poll is sent) plus a heartbeat now and
then: the virtual clock advances ``--tick`` seconds per event, so heartbeats
come at the rate they would at that speed (debounced to <= 10/s).
Reported: µs per task (wall time, ``time.perf_counter``), events per second,
and effects per task. Results go to ``benchmarks/results/core-<date>.json``.
``--profile LAYER`` prints a cProfile of one run instead; with
``RCA_BENCH_SRC=/path/to/other/src`` the script times another checkout's
core (run both in turn to compare two trees on the same machine state).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
# RCA_BENCH_SRC=/some/other/checkout/src times that tree's core instead (A/B comparisons).
sys.path.insert(0, os.environ.get("RCA_BENCH_SRC") or str(REPO_DIR / "src"))

import _harness as h  # noqa: E402

from rca_core._app import WorkerDefinition  # noqa: E402
from rca_core._config import WorkerConfig  # noqa: E402
from rca_core._driver import Driver  # noqa: E402
from rca_core._events import (  # noqa: E402
    HandlerFinished,
    OpenCommandChannel,
    ResponseReceived,
    SendRequest,
    StartHandler,
    Task,
)
from rca_core._execution import execute_task, standard_extras  # noqa: E402
from rca_core._machine import WorkerMachine  # noqa: E402

LAYERS = ("machine", "driver", "driver+execute")
URL = "http://127.0.0.1:9"
REGISTERED = b'{"status":"registered"}'
RESULT_OK = b'{"status":"ok"}'
SUCCESS: dict[str, Any] = {"status": "success", "data": {}}


def build(concurrency: int, files_dir: str) -> tuple[WorkerDefinition, WorkerMachine]:
    """A worker as ``rca_aiohttp_worker.py`` declares it, configured from a fixed environment."""
    definition = WorkerDefinition(
        worker_type="bench-core",
        max_concurrent_tasks=None,
        task_type_limits=None,
        skill_dependencies=None,
        files_types=(),
    )

    @definition.task("noop")
    async def noop(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"status": "success", "data": {}}

    config = WorkerConfig(
        {
            "ORCHESTRATOR_URL": URL,
            "WORKER_TOKEN": "bench-token",
            "WORKER_ID": "bench-core",
            "MAX_CONCURRENT_TASKS": str(concurrency),
            "TASK_FILES_DIR": files_dir,
        }
    )
    settings = definition.settings(config.resolve(), hostname="localhost", ip_address="127.0.0.1")
    return definition, WorkerMachine(settings, rng=random.Random(1))


def task_bodies(n: int) -> list[bytes]:
    """What the stub sends for a poll: a fresh no-op task each time (built before timing)."""
    return [
        b'{"job_id":"job-%d","task_id":"task-%d","type":"noop","params":{},'
        b'"tracing_context":{},"params_metadata":{}}' % (i, i)
        for i in range(n)
    ]


class Orchestrator:
    """Answers each request the moment it is its turn; hands out ``tasks`` tasks, then parks polls."""

    def __init__(self, tasks: int) -> None:
        self.bodies = task_bodies(tasks)
        self.issued = 0
        self.results = 0
        self.heartbeats = 0
        self.parked: list[int] = []

    def reply(self, effect: SendRequest) -> ResponseReceived | None:
        purpose = effect.purpose
        rid = effect.request_id
        if purpose == "poll":
            if self.issued >= len(self.bodies):
                self.parked.append(rid)
                return None
            body = self.bodies[self.issued]
            self.issued += 1
            return ResponseReceived(request_id=rid, status=200, body=body)
        if purpose == "result":
            self.results += 1
            return ResponseReceived(request_id=rid, status=200, body=RESULT_OK)
        if purpose == "heartbeat":
            self.heartbeats += 1
            return ResponseReceived(request_id=rid, status=200, body=effect.request.body or b"{}")
        return ResponseReceived(request_id=rid, status=200, body=REGISTERED)


class Counters:
    def __init__(self) -> None:
        self.events = 0
        self.timers = 0
        self.effects = 0


def run_machine(concurrency: int, tasks: int, tick: float, files_dir: str) -> dict[str, Any]:
    """Layer ``machine``: the calls every driver makes, and nothing else."""
    _, machine = build(concurrency, files_dir)
    orch = Orchestrator(tasks)
    pending: deque[Any] = deque()  # replies and handler completions, in order
    n = Counters()
    now = 0.0

    def collect() -> None:
        effects = machine.effects()
        n.effects += len(effects)
        for effect in effects:
            if isinstance(effect, SendRequest):
                reply = orch.reply(effect)
                if reply is not None:
                    pending.append(reply)
            elif isinstance(effect, StartHandler):
                pending.append(HandlerFinished(task_id=effect.task.task_id, result=SUCCESS))

    t0 = time.perf_counter()
    machine.start(now)
    collect()
    deadline = machine.next_deadline()
    limit = tasks * 8 + 1000
    for _ in range(limit):
        if orch.results >= tasks and not pending:
            break
        now += tick
        if deadline is not None and now >= deadline:
            machine.handle_timer(now)
            n.timers += 1
        elif pending:
            machine.handle(pending.popleft(), now)
            n.events += 1
        else:
            now = deadline if deadline is not None else now  # skip to the next deadline
            continue
        collect()
        deadline = machine.next_deadline()
    elapsed = time.perf_counter() - t0
    return finish(orch, n, elapsed, tasks, machine.counters)


class BenchDriver(Driver):
    """The shared Driver; each ``do_*`` queues what an adapter would start."""

    def __init__(
        self,
        machine: WorkerMachine,
        orch: Orchestrator,
        definition: WorkerDefinition,
        *,
        execute: bool,
        files_dir: str,
    ) -> None:
        super().__init__(machine)
        self.orch = orch
        self.definition = definition
        self.execute = execute
        self.files_dir = files_dir
        self.pending: deque[Any] = deque()
        self.clock = 0.0
        self.deadline: float | None = None
        self.cleaned = 0
        self.effects_seen = 0

    def now(self) -> float:
        return self.clock

    def set_timer(self, deadline: float | None) -> None:
        self.deadline = deadline

    def do_send_request(self, effect: SendRequest) -> None:
        self.effects_seen += 1
        reply = self.orch.reply(effect)
        if reply is not None:
            self.pending.append(reply)

    def do_cancel_request(self, request_id: int) -> None:  # pragma: no cover - never emitted
        raise AssertionError("no cancel expected")

    def do_start_handler(self, effect: StartHandler) -> None:
        self.effects_seen += 1
        if self.execute:
            self.pending.append(effect.task)  # run when its turn comes, like a spawned task
        else:
            self.pending.append(HandlerFinished(task_id=effect.task.task_id, result=SUCCESS))

    def do_cancel_handler(self, task_id: str) -> None:  # pragma: no cover
        raise AssertionError("no cancel expected")

    def do_cleanup(self, task_id: str) -> None:
        self.effects_seen += 1
        self.cleaned += 1

    def do_open_channel(self, effect: OpenCommandChannel) -> None:  # pragma: no cover
        raise AssertionError("no command channel expected")

    def do_close_channel(self, channel: int) -> None:  # pragma: no cover
        pass

    def do_send_message(self, channel: int, text: str) -> None:  # pragma: no cover
        pass

    def do_stopped(self) -> None:  # pragma: no cover
        pass

    def run_handler(self, task: Task) -> None:
        """What an adapter's handler task does for a task, minus the event loop."""
        extras = standard_extras(self.feed, task.task_id)
        coro = execute_task(
            self.definition,
            task,
            task_dir=self.files_dir,
            extras=extras,
            run_sync=_no_threads,
            transfers=None,
        )
        try:
            coro.send(None)
        except StopIteration as stop:
            result = stop.value
        else:  # pragma: no cover - the noop handler never awaits
            coro.close()
            raise AssertionError("the handler awaited something")
        self.feed(HandlerFinished(task_id=task.task_id, result=result))


async def _no_threads(func: Callable[[], Any]) -> Any:  # pragma: no cover - async handler only
    raise AssertionError("no sync handler here")


def run_driver(
    concurrency: int, tasks: int, tick: float, files_dir: str, *, execute: bool
) -> dict[str, Any]:
    definition, machine = build(concurrency, files_dir)
    orch = Orchestrator(tasks)
    driver = BenchDriver(machine, orch, definition, execute=execute, files_dir=files_dir)
    n = Counters()
    pending = driver.pending
    t0 = time.perf_counter()
    driver.start()
    limit = tasks * 8 + 1000
    for _ in range(limit):
        if orch.results >= tasks and not pending:
            break
        driver.clock += tick
        deadline = driver.deadline
        if deadline is not None and driver.clock >= deadline:
            driver.deadline = None  # a one-shot timer, as the adapters' are
            driver.on_timer()
            n.timers += 1
        elif pending:
            item = pending.popleft()
            if isinstance(item, Task):
                driver.run_handler(item)
            else:
                driver.feed(item)
            n.events += 1
        elif deadline is not None:
            driver.clock = deadline
    elapsed = time.perf_counter() - t0
    if driver.failure is not None:
        raise RuntimeError(f"the core failed: {driver.failure!r}")
    n.effects = driver.effects_seen
    return finish(orch, n, elapsed, tasks, machine.counters)


def finish(
    orch: Orchestrator, n: Counters, elapsed: float, tasks: int, counters: dict[str, int]
) -> dict[str, Any]:
    if orch.results != tasks or counters["results_acknowledged"] != tasks:
        raise RuntimeError(
            f"run incomplete: {orch.results} results, {counters['results_acknowledged']} "
            f"acknowledged, for {tasks} tasks"
        )
    return {
        "elapsed_s": elapsed,
        "us_per_task": elapsed / tasks * 1e6,
        "events": n.events,
        "timer_calls": n.timers,
        "events_per_s": (n.events + n.timers) / elapsed,
        "events_per_task": (n.events + n.timers) / tasks,
        "effects_per_task": n.effects / tasks,
        "heartbeats": orch.heartbeats,
    }


def run(layer: str, concurrency: int, tasks: int, tick: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rca-core-bench-") as files_dir:
        gc.collect()
        if layer == "machine":
            return run_machine(concurrency, tasks, tick, files_dir)
        return run_driver(concurrency, tasks, tick, files_dir, execute=layer == "driver+execute")


def profile(layer: str, concurrency: int, tasks: int, tick: float, top: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    run(layer, concurrency, tasks, tick)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=50_000, help="tasks per run (default 50000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument(
        "--tick",
        type=float,
        default=0.0001,
        help="virtual seconds per event (default 0.0001: ~2,500 tasks/s)",
    )
    parser.add_argument(
        "--profile",
        choices=LAYERS,
        default=None,
        help="instead of timing, run this layer once under cProfile and print the top functions",
    )
    parser.add_argument("--top", type=int, default=30, help="functions shown by --profile")
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON results")
    args = parser.parse_args(argv)
    if not (100 <= args.tasks <= 10_000_000) or not (1 <= args.rounds <= 100):
        parser.error("need 100 <= --tasks <= 10,000,000 and 1 <= --rounds <= 100")
    if min(args.concurrency) < 1 or args.tick <= 0:
        parser.error("need --concurrency >= 1 and --tick > 0")

    if args.profile is not None:
        profile(args.profile, args.concurrency[0], args.tasks, args.tick, args.top)
        return 0

    records: list[dict[str, Any]] = []
    started = time.time()
    layers = list(args.layers)
    for c in args.concurrency:
        for rnd in range(args.rounds):
            k = rnd % len(layers)
            for layer in layers[k:] + layers[:k]:
                rec = {"layer": layer, "concurrency": c, "round": rnd, "tasks": args.tasks}
                rec.update(run(layer, c, args.tasks, args.tick))
                records.append(rec)
                h.log(
                    f"c={c} round {rnd + 1}/{args.rounds} {layer:<15} "
                    f"{rec['us_per_task']:7.2f} µs/task  {rec['events_per_s']:10,.0f} events/s"
                )

    headers = ["c", "layer", "µs per task", "range", "events/s", "events/task", "effects/task"]
    rows = []
    summary: dict[str, Any] = {}
    for c in args.concurrency:
        for layer in layers:
            runs = [r for r in records if r["layer"] == layer and r["concurrency"] == c]
            us = [r["us_per_task"] for r in runs]
            med = {
                "us_per_task": statistics.median(us),
                "us_per_task_min": min(us),
                "us_per_task_max": max(us),
                "events_per_s": statistics.median(r["events_per_s"] for r in runs),
                "events_per_task": statistics.median(r["events_per_task"] for r in runs),
                "effects_per_task": statistics.median(r["effects_per_task"] for r in runs),
            }
            summary.setdefault(str(c), {})[layer] = med
            rows.append(
                [
                    str(c),
                    layer,
                    f"{med['us_per_task']:.1f}",
                    f"{med['us_per_task_min']:.1f}-{med['us_per_task_max']:.1f}",
                    f"{med['events_per_s']:,.0f}",
                    f"{med['events_per_task']:.2f}",
                    f"{med['effects_per_task']:.2f}",
                ]
            )
    print()
    print(f"Medians of {args.rounds} rounds of {args.tasks:,} tasks (wall time, one thread).")
    h.print_table(headers, rows)
    if not args.no_save:
        path = h.results_path("core")
        h.write_json(
            path,
            {
                "benchmark": "core",
                "args": vars(args),
                "environment": h.environment_info(),
                "duration_s": round(time.time() - started, 1),
                "summary": summary,
                "runs": records,
            },
        )
        print(f"\nresults: {path.relative_to(h.REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

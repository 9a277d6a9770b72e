"""End to end through the real orchestrator (avtomatika 1.0b10 + Redis): jobs/s and latency.

    .venv/bin/python benchmarks/real_orchestrator.py [--jobs 500] [--rounds 5] [--inflight 8]

One ``redis-server`` for the whole command, and for every (worker, round) a
fresh orchestrator (``tests.support.orchestrator.RealOrchestrator``, the same
launcher the interop tests use: its own free port, its own flushed Redis
database, default test settings) and one worker program from
``benchmarks/workers/`` (the same programs as ``overhead.py``; env:
``ORCHESTRATOR_URL``, ``WORKER_TOKEN``, ``WORKER_ID``, ``MAX_CONCURRENT_TASKS``).
Everything on 127.0.0.1, nothing pinned: the orchestrator, Redis, the worker
and this client share the machine, as they would on a small host.

Each run: wait until the orchestrator lists the worker, run ``--warmup`` jobs
(not counted), then ``--jobs`` jobs of the ``interop`` blueprint (one ``noop``
task each), ``--inflight`` at a time: a new job is created as soon as one
ends. **Latency** runs from just before the ``POST /api/jobs/interop`` to the
moment the orchestrator moved the job to its end state ``done``: the time
stamp of its own log line ``Job <id> transitioning based on worker status
'success' to state 'done'``, written as it applies the worker's result, just
before it stores the new state (millisecond resolution; read by tailing the
orchestrator's log, so no status polling loads the orchestrator). **jobs/s** is ``--jobs`` over the time from
the first creation to the last end. After the window every job is read back
once (``GET /api/jobs/<id>``) and must be in ``done``.

The workers run in turn within each round, the order rotating from round to
round (back-to-back runs vary by tens of percent here). Reported: medians
and min-max over rounds (jobs/s; each run's mean, p50 and p99 latency), ratios to the reference SDK's medians, and the CPU
per job of the worker, the orchestrator and Redis during the window.
Results go to ``benchmarks/results/real-orchestrator-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _harness as h

sys.path.insert(0, str(h.REPO_DIR))  # tests.support: the interop tests' launcher

DEFAULT_WORKERS = ("ref", "bare_aiohttp", "rca_aiohttp", "rca_httpx_asyncio", "rca_httpx_trio")
# What 1.0b10 logs when it applies a worker's result, just before it stores the new state:
# "2026-12-01T16:00:52.659+00:00 - avtomatika.services.worker_service - INFO - Job <id>
#  transitioning based on worker status 'success' to state 'done'" (one line)
_DONE_LINE = re.compile(
    rb"^(\S+) - \S+ - \w+ - Job (\S+) transitioning based on worker status '[^']*' "
    rb"to state '([^']*)'\s*$",
    re.MULTILINE,
)
TASK = "noop"


class RunError(RuntimeError):
    pass


@dataclass
class Orch:
    """What a run needs from the launcher, plus the Redis db it used."""

    handle: Any  # tests.support.orchestrator.RealOrchestrator
    db: int


class LogTail:
    """Follows the orchestrator's log and records when each job reached its end state."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self._file.seek(0, os.SEEK_END)
        self._partial = b""
        self.ended: dict[str, tuple[float, str]] = {}  # job id -> (epoch seconds, state)
        self._waiters: dict[str, asyncio.Future[tuple[float, str]]] = {}

    def close(self) -> None:
        self._file.close()

    def poll(self) -> None:
        data = self._file.read()
        if not data:
            return
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        for m in _DONE_LINE.finditer(data, 0, cut):
            stamp = dt.datetime.fromisoformat(m.group(1).decode()).timestamp()
            job_id, state = m.group(2).decode(), m.group(3).decode()
            self.ended[job_id] = (stamp, state)
            fut = self._waiters.pop(job_id, None)
            if fut is not None and not fut.done():
                fut.set_result((stamp, state))

    def wait(self, job_id: str) -> asyncio.Future[tuple[float, str]]:
        fut: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
        if job_id in self.ended:
            fut.set_result(self.ended[job_id])
        else:
            self._waiters[job_id] = fut
        return fut

    async def follow(self, stop: asyncio.Event, interval: float, limit: float) -> None:
        """Read new lines every ``interval`` s until ``stop`` is set (at most ``limit`` s)."""
        end = time.monotonic() + limit
        for _ in range(int(limit / interval) + 1):
            self.poll()
            if stop.is_set() or time.monotonic() > end:
                return
            await asyncio.sleep(interval)


class Client:
    """The client API calls of a run, on one keep-alive session."""

    def __init__(self, orch: Any) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self.url = orch.url
        self.headers = {"X-Client-Token": orch.client_token}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self.session.close()

    async def create(self) -> str:
        body = {"initial_data": {"task": TASK, "params": {}}}
        async with self.session.post(
            f"{self.url}/api/jobs/interop", json=body, headers=self.headers
        ) as resp:
            payload = await resp.json(content_type=None)
            if resp.status != 202 or not isinstance(payload, dict) or "job_id" not in payload:
                raise RunError(f"job creation: HTTP {resp.status}: {payload!r}")
            return str(payload["job_id"])

    async def job(self, job_id: str) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/api/jobs/{job_id}", headers=self.headers) as resp:
            payload = await resp.json(content_type=None)
            if resp.status != 200 or not isinstance(payload, dict):
                raise RunError(f"GET job {job_id}: HTTP {resp.status}: {payload!r}")
            return payload

    async def workers(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.url}/api/workers", headers=self.headers) as resp:
            payload = await resp.json(content_type=None)
            return payload if isinstance(payload, list) else []


async def run_jobs(
    client: Client, tail: LogTail, *, jobs: int, inflight: int, job_timeout: float
) -> list[dict[str, Any]]:
    """``jobs`` jobs, ``inflight`` at a time; one record per job."""
    counter = itertools.count()
    records: list[dict[str, Any]] = []

    async def slot() -> None:
        for _ in range(jobs):  # bounded: each turn takes one job number or returns
            if next(counter) >= jobs:
                return
            t0 = time.time()
            job_id = await client.create()
            t_created = time.time()
            try:
                stamp, state = await asyncio.wait_for(tail.wait(job_id), job_timeout)
            except TimeoutError:
                job = await client.job(job_id)
                summary = {k: job.get(k) for k in ("current_state", "status", "error_message")}
                raise RunError(
                    f"job {job_id} did not end within {job_timeout:.0f} s: {summary}"
                ) from None
            records.append(
                {
                    "job_id": job_id,
                    "t_create": t0,
                    "create_s": t_created - t0,
                    "t_end": stamp,
                    "t_seen": time.time(),
                    "state": state,
                    "latency_s": stamp - t0,
                }
            )

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(inflight):
                tg.create_task(slot())
    except ExceptionGroup as group:  # the first failure says what went wrong
        raise group.exceptions[0] from None
    return records


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def cpu_of(pid: int | None) -> float | None:
    return None if pid is None else h.proc_cpu_seconds(pid)


async def wait_for_worker(client: Client, worker_id: str, proc: h.WorkerProcess, timeout: float):
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if not proc.alive():
            raise RunError(
                f"worker exited (rc={proc.proc.returncode}) before registering:\n"
                + h.tail(proc.log_path)
            )
        if any(w.get("worker_id") == worker_id for w in await client.workers()):
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    raise RunError(f"worker did not register within {timeout:.0f} s:\n" + h.tail(proc.log_path))


async def measure_async(
    orch: Any,
    worker: h.WorkerProcess,
    worker_id: str,
    redis_pid: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    client = Client(orch)
    tail = LogTail(orch.log_path)
    stop = asyncio.Event()
    follower = asyncio.create_task(tail.follow(stop, interval=0.001, limit=args.timeout + 60))
    try:
        await wait_for_worker(client, worker_id, worker, timeout=60)
        if args.warmup:
            await run_jobs(
                client,
                tail,
                jobs=args.warmup,
                inflight=args.inflight,
                job_timeout=args.job_timeout,
            )
        cpu0 = {
            "worker": cpu_of(worker.pid),
            "orchestrator": cpu_of(orch.pid),
            "redis": cpu_of(redis_pid),
            "client": sum(os.times()[:2]),
        }
        records = await asyncio.wait_for(
            run_jobs(
                client, tail, jobs=args.jobs, inflight=args.inflight, job_timeout=args.job_timeout
            ),
            args.timeout,
        )
        cpu1 = {
            "worker": cpu_of(worker.pid),
            "orchestrator": cpu_of(orch.pid),
            "redis": cpu_of(redis_pid),
            "client": sum(os.times()[:2]),
        }
        not_done = []
        for rec in records:
            job = await client.job(rec["job_id"])
            if job.get("current_state") != "done":
                not_done.append((rec["job_id"], job.get("current_state"), job.get("status")))
    finally:
        stop.set()
        await follower
        tail.close()
        await client.close()
    start = min(r["t_create"] for r in records)
    end = max(r["t_end"] for r in records)
    lat = [r["latency_s"] for r in records]
    out: dict[str, Any] = {
        "jobs_done": len(records),
        "window_s": end - start,
        "jobs_per_s": len(records) / (end - start) if end > start else None,
        "mean_ms": sum(lat) / len(lat) * 1000,
        "p50_ms": percentile(lat, 50) * 1000,
        "p90_ms": percentile(lat, 90) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "max_ms": max(lat) * 1000,
        "create_p50_ms": percentile([r["create_s"] for r in records], 50) * 1000,
        "cpu_ms_per_job": {
            k: (cpu1[k] - cpu0[k]) / len(records) * 1000
            if cpu0[k] is not None and cpu1[k] is not None
            else None
            for k in cpu0
        },
        "not_done": not_done[:10],
    }
    if not_done or len(records) != args.jobs:
        out["check"] = f"{len(not_done)} of {len(records)} jobs not in 'done'"
    else:
        out["check"] = "ok"
    return out


@contextlib.contextmanager
def running_orchestrator(redis: Any, db: int, workdir: Path) -> Iterator[Any]:
    from tests.support.orchestrator import OrchestratorSettings, RealOrchestrator

    redis.flushdb(db)
    orch = RealOrchestrator(
        redis=redis, redis_db=db, workdir=workdir, settings=OrchestratorSettings()
    )
    try:
        orch.start()
        yield orch
    finally:
        orch.stop(graceful=False)  # SIGKILL our own process: a parked poll would stall a drain


class _Target:
    """What ``_harness.running_worker`` needs to know of the server: its URL."""

    def __init__(self, url: str) -> None:
        self.url = url


def measure(
    spec: h.WorkerSpec, *, redis: Any, db: int, args: argparse.Namespace, run_id: str
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "worker": spec.key,
        "label": spec.label,
        "jobs": args.jobs,
        "inflight": args.inflight,
        "concurrency": args.concurrency,
        "ok": False,
        "error": None,
    }
    worker_id = f"bench-{run_id}"
    try:
        with (
            h.scratch_dir() as workdir,
            running_orchestrator(redis, db, workdir) as orch,
        ):
            record["orchestrator_startup_s"] = orch.startup_seconds[-1]
            with h.running_worker(
                spec,
                stub=_Target(orch.url),  # type: ignore[arg-type]
                concurrency=args.concurrency,
                core=None,
                workdir=workdir,
                worker_id=worker_id,
                extra_env={"WORKER_TOKEN": orch.worker_token},
                max_seconds=args.timeout + 180,
            ) as worker:
                try:
                    record.update(
                        asyncio.run(measure_async(orch, worker, worker_id, redis.pid, args))
                    )
                except (RunError, TimeoutError, OSError) as exc:
                    record["error"] = f"{type(exc).__name__}: {exc}"
                    record["orchestrator_log_tail"] = orch.log_tail(20)
                    return record
            record["worker_peak_rss_mib"] = (worker.peak_rss_kib or 0) / 1024
    except Exception as exc:  # the launcher's errors: record them, go on with the next run
        record["error"] = f"{type(exc).__name__}: {exc}"
        return record
    if record.get("check") != "ok":
        record["error"] = f"check failed: {record.get('check')}"
    else:
        record["ok"] = True
    return record


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="timed jobs per run (default 500)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed jobs first (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--inflight", type=int, default=8, help="jobs in flight (default 8)")
    parser.add_argument(
        "--concurrency", type=int, default=10, help="the worker's MAX_CONCURRENT_TASKS (default 10)"
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        default=list(DEFAULT_WORKERS),
        choices=sorted(h.WORKERS),
        help="worker programs (default: the reference, bare aiohttp, ours)",
    )
    parser.add_argument(
        "--job-timeout", type=float, default=30.0, help="seconds one job may take (default 30)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one run may take (default 300)"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON results")
    args = parser.parse_args(argv)
    if not (10 <= args.jobs <= 100_000) or not (1 <= args.rounds <= 50):
        parser.error("need 10 <= --jobs <= 100000 and 1 <= --rounds <= 50")
    if not (1 <= args.inflight <= 256) or args.concurrency < 1 or args.warmup < 0:
        parser.error("need 1 <= --inflight <= 256, --concurrency >= 1, --warmup >= 0")

    from tests.support.orchestrator import missing_requirements
    from tests.support.redis_server import start_redis_server

    missing = missing_requirements()
    if missing:
        h.log("the real-orchestrator harness needs: " + ", ".join(missing))
        return 1
    specs = h.probe_all(args.workers)
    if not specs:
        h.log("no worker program is usable")
        return 1
    records: list[dict[str, Any]] = []
    started = time.time()
    with h.scratch_dir() as redis_dir:
        redis = start_redis_server(redis_dir)
        try:
            run_no = 0
            for rnd in range(args.rounds):
                k = rnd % len(specs)
                for spec in specs[k:] + specs[:k]:
                    run_no += 1
                    db = 1 + run_no % 63
                    rec = measure(spec, redis=redis, db=db, args=args, run_id=f"{spec.key}-r{rnd}")
                    rec["round"] = rnd
                    records.append(rec)
                    if rec["ok"]:
                        cpu = rec["cpu_ms_per_job"]
                        h.log(
                            f"round {rnd + 1}/{args.rounds} {spec.key:<20} "
                            f"{rec['jobs_per_s']:6.0f} jobs/s  mean {rec['mean_ms']:6.1f} ms  "
                            f"p50 {rec['p50_ms']:6.1f} ms  "
                            f"p99 {rec['p99_ms']:6.1f} ms  CPU ms/job: worker "
                            f"{cpu['worker'] or 0:.2f} orchestrator {cpu['orchestrator'] or 0:.2f}"
                            f" redis {cpu['redis'] or 0:.2f}"
                        )
                    else:
                        h.log(
                            f"round {rnd + 1}/{args.rounds} {spec.key:<20} FAILED: {rec['error']}"
                        )
        finally:
            redis.stop()

    summary: dict[str, Any] = {}
    for spec in specs:
        good = [r for r in records if r["worker"] == spec.key and r["ok"]]
        runs = [r for r in records if r["worker"] == spec.key]

        def med(key: str, rows: list[dict[str, Any]] = good) -> float | None:
            return h.median([r.get(key) for r in rows])

        def rng(key: str, rows: list[dict[str, Any]] = good) -> tuple[float, float] | None:
            vals = [r[key] for r in rows if r.get(key) is not None]
            return (min(vals), max(vals)) if vals else None

        summary[spec.key] = {
            "label": spec.label,
            "jobs_per_s": med("jobs_per_s"),
            "jobs_per_s_range": rng("jobs_per_s"),
            "mean_ms": med("mean_ms"),
            "p50_ms": med("p50_ms"),
            "p50_ms_range": rng("p50_ms"),
            "p99_ms": med("p99_ms"),
            "p99_ms_range": rng("p99_ms"),
            "cpu_ms_per_job": {
                k: h.median([r["cpu_ms_per_job"][k] for r in good])
                for k in ("worker", "orchestrator", "redis", "client")
            },
            "ok_runs": len(good),
            "runs": len(runs),
        }

    def span(r: tuple[float, float] | None, spec_: str) -> str:
        return "-" if r is None else f"{format(r[0], spec_)}-{format(r[1], spec_)}"

    ref = summary.get("ref", {})
    headers = [
        "worker",
        "jobs/s",
        "range",
        "p50 ms",
        "range",
        "p99 ms",
        "range",
        "mean ms",
        "jobs/s vs ref",
        "worker CPU ms/job",
        "orch. CPU ms/job",
        "redis CPU ms/job",
        "ok runs",
    ]
    rows = []
    for spec in specs:
        s = summary[spec.key]
        cpu = s["cpu_ms_per_job"]
        rows.append(
            [
                spec.label,
                h.fmt(s["jobs_per_s"]),
                span(s["jobs_per_s_range"], ".0f"),
                h.fmt(s["p50_ms"], ".1f"),
                span(s["p50_ms_range"], ".1f"),
                h.fmt(s["p99_ms"], ".1f"),
                span(s["p99_ms_range"], ".1f"),
                h.fmt(s["mean_ms"], ".1f"),
                ratio(s["jobs_per_s"], ref.get("jobs_per_s")),
                h.fmt(cpu["worker"], ".2f"),
                h.fmt(cpu["orchestrator"], ".2f"),
                h.fmt(cpu["redis"], ".2f"),
                f"{s['ok_runs']}/{s['runs']}",
            ]
        )
    print()
    print(
        f"Medians of {args.rounds} rounds; {args.jobs} jobs per run, {args.inflight} in flight, "
        f"worker MAX_CONCURRENT_TASKS={args.concurrency}."
    )
    h.print_table(headers, rows)
    if not args.no_save:
        path = h.results_path("real-orchestrator")
        env = h.environment_info()
        env["orchestrator_packages"] = h.package_versions(
            Path(sys.executable), ["avtomatika", "rxon", "redis"]
        )
        h.write_json(
            path,
            {
                "benchmark": "real_orchestrator",
                "args": vars(args),
                "environment": env,
                "duration_s": round(time.time() - started, 1),
                "summary": summary,
                "runs": records,
            },
        )
        print(f"\nresults: {path.relative_to(h.REPO_DIR)}")
    return 0 if all(r["ok"] for r in records) else 2


if __name__ == "__main__":
    sys.exit(main())

"""What a worker costs when it is not doing work: CPU, wake-ups and requests.

Two scenarios per worker, each for a window (default 60 s):

- ``idle``: nothing to do. The stub holds every poll ``--hold`` seconds (30,
  as the real orchestrator does) and answers 204. A good worker sleeps: one
  long poll per slot and hold, plus heartbeats.
- ``busy``: full capacity. The stub hands out tasks without limit and the
  ``noop`` handler sleeps longer than the window, so every slot is taken. A
  good worker sleeps too, and takes exactly ``MAX_CONCURRENT_TASKS`` tasks.

    .venv/bin/python benchmarks/idle.py --window 60

Reported per worker and scenario: CPU as % of one core, context switches per
second (wake-ups), and requests per route during the window, plus the tasks
the worker took in all. Results go to ``benchmarks/results/idle-<date>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import _harness as h

DEFAULT_WORKERS = ("ref", "bare_aiohttp", "rca_aiohttp", "rca_httpx_asyncio", "rca_httpx_trio")
ROUTES = ("poll", "poll_task", "poll_204", "result", "heartbeat", "register", "ws_refused")


def snapshot(stub: h.StubProcess, worker: h.WorkerProcess) -> dict[str, Any]:
    stats = stub.stats()
    return {
        "t": time.monotonic(),
        "cpu_s": h.proc_cpu_seconds(worker.pid),
        "ctx": h.proc_context_switches(worker.pid),
        "counts": stats["counts"],
        "issued": stats["issued"],
    }


def measure(
    spec: h.WorkerSpec,
    *,
    scenario: str,
    concurrency: int,
    window: float,
    settle: float,
    hold: float,
    cores: tuple[int | None, int | None],
    run_id: str,
) -> dict[str, Any]:
    stub_core, worker_core = cores
    record: dict[str, Any] = {
        "worker": spec.key,
        "label": spec.label,
        "scenario": scenario,
        "concurrency": concurrency,
        "window_s": window,
        "ok": False,
        "error": None,
    }
    budget = 0 if scenario == "idle" else -1
    extra_env = {}
    if scenario == "busy":
        extra_env["BENCH_NOOP_SLEEP"] = str(settle + window + 120)
    max_seconds = settle + window + 180
    with (
        h.scratch_dir() as workdir,
        h.running_stub(
            budget=budget, hold=hold, core=stub_core, max_seconds=max_seconds, workdir=workdir
        ) as stub,
    ):
        try:
            with h.running_worker(
                spec,
                stub=stub,
                concurrency=concurrency,
                core=worker_core,
                workdir=workdir,
                worker_id=f"bench-{run_id}",
                extra_env=extra_env,
                max_seconds=max_seconds,
            ) as worker:
                h.wait_until_polling(stub, worker)
                stub.start(worker.pid)
                time.sleep(settle)
                a = snapshot(stub, worker)
                deadline = a["t"] + window
                while (left := deadline - time.monotonic()) > 0 and worker.alive():
                    time.sleep(min(1.0, left))
                if not worker.alive():
                    record["error"] = f"worker exited (rc={worker.proc.returncode})"
                    return record
                b = snapshot(stub, worker)
            record["peak_rss_mib"] = (
                worker.peak_rss_kib / 1024 if worker.peak_rss_kib is not None else None
            )
        except (h.StubError, OSError) as exc:
            record["error"] = str(exc)
            return record
    wall = b["t"] - a["t"]
    record["measured_s"] = wall
    if a["cpu_s"] is not None and b["cpu_s"] is not None:
        record["cpu_pct"] = (b["cpu_s"] - a["cpu_s"]) / wall * 100
    if a["ctx"] is not None and b["ctx"] is not None:
        record["wakeups_per_s"] = (b["ctx"] - a["ctx"]) / wall
    record["requests"] = {k: b["counts"][k] - a["counts"][k] for k in ROUTES}
    record["tasks_taken"] = b["issued"]
    problems = [
        f"{k}={b['counts'][k]}"
        for k in ("unauthorized", "bad_request", "not_found", "result_unknown_task")
        if b["counts"][k]
    ]
    if scenario == "busy" and b["issued"] != concurrency:
        problems.append(f"took {b['issued']} tasks with {concurrency} slots")
    record["check"] = "ok" if not problems else ", ".join(problems)
    record["ok"] = True
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured (default 60)")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds after the start before measuring"
    )
    parser.add_argument(
        "--hold", type=float, default=30.0, help="seconds the stub holds an idle poll (default 30)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=10, help="MAX_CONCURRENT_TASKS (default 10)"
    )
    parser.add_argument(
        "--scenarios", nargs="+", default=["idle", "busy"], choices=["idle", "busy"]
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        default=list(DEFAULT_WORKERS),
        choices=sorted(h.WORKERS),
        help="worker programs (default: the reference, bare aiohttp, ours)",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON results")
    args = parser.parse_args(argv)
    if args.window <= 0 or args.window > 3600 or args.concurrency < 1:
        parser.error("need 0 < --window <= 3600 and --concurrency >= 1")

    specs = h.probe_all(args.workers)
    if not specs:
        h.log("no worker program is usable")
        return 1
    cores = h.pick_cores()
    runs = len(specs) * len(args.scenarios)
    h.log(
        f"workers: {', '.join(s.key for s in specs)}; {runs} runs of "
        f"~{args.window + args.settle + 2:.0f} s each"
    )
    records = []
    started = time.time()
    for scenario in args.scenarios:
        for spec in specs:
            rec = measure(
                spec,
                scenario=scenario,
                concurrency=args.concurrency,
                window=args.window,
                settle=args.settle,
                hold=args.hold,
                cores=cores,
                run_id=f"{spec.key}-{scenario}",
            )
            records.append(rec)
            if rec["ok"]:
                h.log(
                    f"{scenario:<5} {spec.key:<20} {rec.get('cpu_pct', 0):6.2f} % CPU  "
                    f"{rec.get('wakeups_per_s', 0):7.1f} wake-ups/s  {rec['requests']}"
                )
            else:
                h.log(f"{scenario:<5} {spec.key:<20} FAILED: {rec['error']}")

    headers = [
        "scenario",
        "worker",
        "CPU % of a core",
        "wake-ups/s",
        "polls",
        "heartbeats",
        "results",
        "tasks taken",
        "check",
    ]
    rows = []
    for rec in records:
        req = rec.get("requests", {})
        rows.append(
            [
                rec["scenario"],
                rec["label"],
                h.fmt(rec.get("cpu_pct"), ".2f"),
                h.fmt(rec.get("wakeups_per_s"), ".1f"),
                str(req.get("poll", "-")),
                str(req.get("heartbeat", "-")),
                str(req.get("result", "-")),
                str(rec.get("tasks_taken", "-")),
                rec.get("check", rec.get("error") or "-").split("\n")[0],
            ]
        )
    print()
    print(
        f"c={args.concurrency}; window {args.window:.0f} s; requests counted during the window; "
        f"idle polls held {args.hold:.0f} s."
    )
    h.print_table(headers, rows)
    if not args.no_save:
        path = h.results_path("idle")
        h.write_json(
            path,
            {
                "benchmark": "idle",
                "args": vars(args),
                "environment": h.environment_info(),
                "skipped": sorted(set(args.workers) - {s.key for s in specs}),
                "duration_s": round(time.time() - started, 1),
                "runs": records,
            },
        )
        print(f"\nresults: {path.relative_to(h.REPO_DIR)}")
    return 0 if all(r["ok"] and r.get("check") == "ok" for r in records) else 2


if __name__ == "__main__":
    sys.exit(main())

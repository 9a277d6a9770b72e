"""Memory over many tasks: does a worker's RSS grow with the number of tasks it ran?

    .venv/bin/python benchmarks/memory.py [--tasks 10000] [--rounds 3] [--concurrency 10]

For each run: the stub (``stub.py``) with a budget of ``--tasks`` no-op tasks
and one worker program, each pinned to its own core, as in ``overhead.py``.
The worker's resident set (``VmRSS`` from ``/proc/PID/status``) is read:

- ``before``: up and polling, no task run yet (the stub's start mark);
- at 10 %, 50 % and 100 % of the results (1k, 5k and 10k with the default
  budget), by the stub itself the moment that result arrives;
- ``after``: ``--settle`` seconds after the last result, the worker idle.

``growth`` is RSS at 100 % minus RSS at 10 %: the first thousand tasks warm
up allocator arenas, connection buffers and caches; what grows after that,
grows with the task count. ``after - before`` includes that warm-up. A worker
whose figures are within the spread of the bare aiohttp loop's (no SDK state
at all) shows no growth beyond noise. Results go to
``benchmarks/results/memory-<date>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import _harness as h

DEFAULT_WORKERS = ("ref", "bare_aiohttp", "rca_aiohttp", "rca_httpx_asyncio", "rca_httpx_trio")
POINTS = ("before", "10%", "50%", "100%", "after")


def measure(
    spec: h.WorkerSpec,
    *,
    tasks: int,
    concurrency: int,
    timeout: float,
    settle: float,
    cores: tuple[int | None, int | None],
    run_id: str,
) -> dict[str, Any]:
    stub_core, worker_core = cores
    record: dict[str, Any] = {
        "worker": spec.key,
        "label": spec.label,
        "concurrency": concurrency,
        "tasks": tasks,
        "ok": False,
        "error": None,
    }
    max_seconds = timeout + settle + 120
    with (
        h.scratch_dir() as workdir,
        h.running_stub(
            budget=tasks, hold=30.0, core=stub_core, max_seconds=max_seconds, workdir=workdir
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
                max_seconds=max_seconds,
            ) as worker:
                h.wait_until_polling(stub, worker)
                stub.start(worker.pid)
                deadline = time.monotonic() + timeout
                while True:
                    left = deadline - time.monotonic()
                    stats = stub.wait(max(0.0, min(2.0, left)))
                    if stats["done"] or left <= 0 or not worker.alive():
                        break
                if not worker.alive():
                    record["error"] = f"worker exited (rc={worker.proc.returncode})\n" + h.tail(
                        worker.log_path
                    )
                    return record
                if not stats["done"]:
                    record["error"] = (
                        f"timeout: {stats['unique_results']}/{tasks} results in {timeout:.0f} s"
                    )
                    return record
                time.sleep(settle)
                after = h.proc_status_kib(worker.pid, "VmRSS")
                record["peak_rss_kib"] = h.proc_status_kib(worker.pid, "VmHWM")
                final = stub.stats()
        except (h.StubError, OSError) as exc:
            record["error"] = str(exc)
            return record
    marks = {m["name"]: m for m in stats["marks"]}
    rss: dict[str, int | None] = {
        "before": marks.get("start", {}).get("worker_rss_kib"),
        "10%": marks.get("10%", {}).get("worker_rss_kib"),
        "50%": marks.get("50%", {}).get("worker_rss_kib"),
        "100%": marks.get("100%", {}).get("worker_rss_kib"),
        "after": after,
    }
    record["rss_kib"] = rss
    record["marks"] = stats["marks"]
    record["requests_total"] = final["counts"]
    if any(v is None for v in rss.values()):
        record["error"] = f"missing RSS samples: {rss}"
        return record
    problems = []
    if final["unique_results"] != tasks or final["issued"] != tasks:
        problems.append(f"{final['unique_results']} results for {final['issued']} issued")
    for key in ("result_duplicate", "result_unknown_task", "result_not_success", "bad_request"):
        if final["counts"].get(key):
            problems.append(f"{key}={final['counts'][key]}")
    if problems:
        record["error"] = "result check failed: " + ", ".join(problems)
        return record
    record["growth_kib"] = rss["100%"] - rss["10%"]  # type: ignore[operator]
    record["after_minus_before_kib"] = rss["after"] - rss["before"]  # type: ignore[operator]
    record["ok"] = True
    return record


def mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def signed_mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:+.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per run (default 10000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--concurrency", type=int, default=10, help="MAX_CONCURRENT_TASKS")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds idle before the 'after' sample"
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        default=list(DEFAULT_WORKERS),
        choices=sorted(h.WORKERS),
        help="worker programs (default: the reference, bare aiohttp, ours)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one run may take (default 300)"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON results")
    args = parser.parse_args(argv)
    if not (100 <= args.tasks <= 1_000_000) or not (1 <= args.rounds <= 50):
        parser.error("need 100 <= --tasks <= 1,000,000 and 1 <= --rounds <= 50")
    if args.concurrency < 1 or not (0 <= args.settle <= 60):
        parser.error("need --concurrency >= 1 and 0 <= --settle <= 60")

    specs = h.probe_all(args.workers)
    if not specs:
        h.log("no worker program is usable")
        return 1
    cores = h.pick_cores()
    records: list[dict[str, Any]] = []
    started = time.time()
    for rnd in range(args.rounds):
        k = rnd % len(specs)
        for spec in specs[k:] + specs[:k]:
            rec = measure(
                spec,
                tasks=args.tasks,
                concurrency=args.concurrency,
                timeout=args.timeout,
                settle=args.settle,
                cores=cores,
                run_id=f"{spec.key}-mem-r{rnd}",
            )
            rec["round"] = rnd
            records.append(rec)
            if rec["ok"]:
                r = rec["rss_kib"]
                h.log(
                    f"round {rnd + 1}/{args.rounds} {spec.key:<20} RSS MiB "
                    + " ".join(f"{p}={mib(r[p])}" for p in POINTS)
                    + f"  growth {signed_mib(rec['growth_kib'])}"
                )
            else:
                h.log(f"round {rnd + 1}/{args.rounds} {spec.key:<20} FAILED: {rec['error']}")

    n = args.tasks
    headers = [
        "worker",
        "before",
        f"{n // 10:,}",
        f"{n // 2:,}",
        f"{n:,}",
        "after",
        f"growth {n // 10:,}->{n:,}",
        "growth range",
        "after - before",
        "ok runs",
    ]
    rows = []
    summary: dict[str, Any] = {}
    for spec in specs:
        good = [r for r in records if r["worker"] == spec.key and r["ok"]]
        runs = [r for r in records if r["worker"] == spec.key]
        med = {p: h.median([r["rss_kib"][p] for r in good]) for p in POINTS}
        growth = [r["growth_kib"] for r in good]
        entry = {
            "rss_kib": med,
            "growth_kib": h.median(growth),
            "growth_kib_min": min(growth) if growth else None,
            "growth_kib_max": max(growth) if growth else None,
            "after_minus_before_kib": h.median([r["after_minus_before_kib"] for r in good]),
            "ok_runs": len(good),
            "runs": len(runs),
        }
        summary[spec.key] = entry
        rows.append(
            [
                spec.label,
                *(mib(med[p]) for p in POINTS),
                signed_mib(entry["growth_kib"]),
                f"{signed_mib(entry['growth_kib_min'])}..{signed_mib(entry['growth_kib_max'])}",
                signed_mib(entry["after_minus_before_kib"]),
                f"{len(good)}/{len(runs)}",
            ]
        )
    print()
    print(
        f"VmRSS in MiB, medians of {args.rounds} rounds, c={args.concurrency}, "
        f"{args.tasks:,} tasks per run."
    )
    h.print_table(headers, rows)
    if not args.no_save:
        path = h.results_path("memory")
        h.write_json(
            path,
            {
                "benchmark": "memory",
                "args": vars(args),
                "environment": h.environment_info(),
                "duration_s": round(time.time() - started, 1),
                "summary": summary,
                "runs": records,
            },
        )
        print(f"\nresults: {path.relative_to(h.REPO_DIR)}")
    return 0 if all(r["ok"] for r in records) else 2


if __name__ == "__main__":
    sys.exit(main())

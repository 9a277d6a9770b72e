"""Per-task overhead of a worker: tasks/s, worker CPU per 1,000 tasks, peak RSS.

One command runs every worker at every concurrency, alternating the workers
across rounds (back-to-back runs vary), and prints medians and ratios:

    .venv/bin/python benchmarks/overhead.py --tasks 3000 --rounds 3 --concurrency 1 10

For each run: the stub (``stub.py``) starts on a free 127.0.0.1 port, pinned
to one core, with a budget of ``--tasks`` no-op tasks; the worker program
starts pinned to the other core; once it polls, the stub opens the tap and
samples the worker's CPU time (``/proc/PID/stat``) at the 10 % and 100 %
result marks. tasks/s and CPU per 1,000 tasks are taken between those marks
(steady state, start-up excluded); peak RSS is ``VmHWM`` just before the
worker is stopped. A run is valid only if every task got exactly one
successful result. Results go to ``benchmarks/results/overhead-<date>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import _harness as h

DEFAULT_WORKERS = (
    "ref",
    "bare_aiohttp",
    "bare_httpx_asyncio",
    "bare_httpx_trio",
    "rca_aiohttp",
    "rca_httpx_asyncio",
    "rca_httpx_trio",
)
# Above this share of its core the stub, not the worker, may be the bottleneck.
STUB_BUSY_WARNING = 0.85


def measure(
    spec: h.WorkerSpec,
    *,
    tasks: int,
    concurrency: int,
    timeout: float,
    cores: tuple[int | None, int | None],
    run_id: str,
) -> dict[str, Any]:
    """One run of one worker; never raises for a worker's failure, records it."""
    stub_core, worker_core = cores
    record: dict[str, Any] = {
        "worker": spec.key,
        "label": spec.label,
        "concurrency": concurrency,
        "tasks": tasks,
        "ok": False,
        "error": None,
    }
    max_seconds = timeout + 120
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
                t0 = time.monotonic()
                h.wait_until_polling(stub, worker)
                record["startup_s"] = round(time.monotonic() - t0, 3)
                stub.start(worker.pid)
                deadline = time.monotonic() + timeout
                while True:
                    # Short waits, so that a worker that died ends the run at once.
                    left = deadline - time.monotonic()
                    stats = stub.wait(max(0.0, min(2.0, left)))
                    if stats["done"] or left <= 0 or not worker.alive():
                        break
                if not worker.alive():
                    record["error"] = f"worker exited (rc={worker.proc.returncode})"
            record["peak_rss_mib"] = (
                worker.peak_rss_kib / 1024 if worker.peak_rss_kib is not None else None
            )
            record["worker_cpu_total_s"] = worker.cpu_total_s
            final = stub.stats()  # after the worker stopped: everything it sent
        except (h.StubError, OSError) as exc:
            record["error"] = str(exc)
            return record
        if record["error"] is not None:
            record["error"] += "\n" + h.tail(worker.log_path)
    record.update(summarise(stats, final, tasks))
    if record["error"] is not None:
        pass  # the worker died: already said, with the tail of its log
    elif not stats["done"]:
        record["error"] = f"timeout: {stats['unique_results']}/{tasks} results in {timeout:.0f} s"
    elif record["check"] != "ok":
        record["error"] = f"result check failed: {record['check']}"
    else:
        record["ok"] = True
    return record


def summarise(stats: dict[str, Any], final: dict[str, Any], tasks: int) -> dict[str, Any]:
    marks = {m["name"]: m for m in stats["marks"]}
    out: dict[str, Any] = {"marks": stats["marks"]}
    lo, hi = marks.get("10%"), marks.get("100%")
    if lo and hi and hi["t"] > lo["t"]:
        n = hi["results"] - lo["results"]
        wall = hi["t"] - lo["t"]
        out["window_tasks"] = n
        out["window_s"] = wall
        out["tasks_per_s"] = n / wall
        if lo["worker_cpu_s"] is not None and hi["worker_cpu_s"] is not None:
            out["cpu_s_per_1000"] = (hi["worker_cpu_s"] - lo["worker_cpu_s"]) / n * 1000
        out["stub_core_share"] = (hi["stub_cpu_s"] - lo["stub_cpu_s"]) / wall
    counts = final["counts_since_start"] or {}
    out["requests_since_start"] = {
        k: counts.get(k, 0) for k in ("poll", "poll_task", "poll_204", "result", "heartbeat")
    }
    out["requests_total"] = final["counts"]
    # Every poll and result of the run (the first poll was parked before the
    # start): a worker doing 1 poll + 1 result per task reads 1.00x here.
    c = final["counts"]
    out["polls_per_task"] = c.get("poll", 0) / tasks
    out["results_per_task"] = c.get("result", 0) / tasks
    problems = []
    if final["unique_results"] != tasks or final["issued"] != tasks:
        problems.append(f"{final['unique_results']} results for {final['issued']} issued")
    for key in (
        "result_duplicate",
        "result_unknown_task",
        "result_job_mismatch",
        "result_not_success",
        "unauthorized",
        "bad_request",
        "not_found",
    ):
        if c.get(key):
            problems.append(f"{key}={c[key]}")
    out["check"] = "ok" if not problems else ", ".join(problems)
    return out


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def report(
    records: list[dict[str, Any]], specs: Sequence[h.WorkerSpec], concs: Sequence[int]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    headers = [
        "c",
        "worker",
        "tasks/s",
        "range",
        "CPU s/1k",
        "RSS MiB",
        "polls/task",
        "vs ref: tasks/s",
        "vs ref: CPU",
        "vs bare aiohttp: tasks/s",
        "vs bare aiohttp: CPU",
        "ok runs",
    ]
    rows = []
    for c in concs:
        meds: dict[str, dict[str, float | None]] = {}
        for spec in specs:
            runs = [r for r in records if r["worker"] == spec.key and r["concurrency"] == c]
            good = [r for r in runs if r["ok"]]
            rates = [r["tasks_per_s"] for r in good if r.get("tasks_per_s")]
            meds[spec.key] = {
                "tasks_per_s": h.median(rates),
                "tasks_per_s_min": min(rates) if rates else None,
                "tasks_per_s_max": max(rates) if rates else None,
                "cpu_s_per_1000": h.median([r.get("cpu_s_per_1000") for r in good]),
                "peak_rss_mib": h.median([r.get("peak_rss_mib") for r in good]),
                "polls_per_task": h.median([r.get("polls_per_task") for r in good]),
                "stub_core_share": h.median([r.get("stub_core_share") for r in good]),
                "ok_runs": len(good),
                "runs": len(runs),
            }
        summary[str(c)] = meds
        ref, bare = meds.get("ref", {}), meds.get("bare_aiohttp", {})
        for spec in specs:
            m = meds[spec.key]
            rows.append(
                [
                    str(c),
                    spec.label,
                    h.fmt(m["tasks_per_s"]),
                    f"{h.fmt(m['tasks_per_s_min'])}-{h.fmt(m['tasks_per_s_max'])}",
                    h.fmt(m["cpu_s_per_1000"], ".2f"),
                    h.fmt(m["peak_rss_mib"], ".0f"),
                    h.fmt(m["polls_per_task"], ".3f"),
                    ratio(m["tasks_per_s"], ref.get("tasks_per_s")),
                    ratio(m["cpu_s_per_1000"], ref.get("cpu_s_per_1000")),
                    ratio(m["tasks_per_s"], bare.get("tasks_per_s")),
                    ratio(m["cpu_s_per_1000"], bare.get("cpu_s_per_1000")),
                    f"{m['ok_runs']}/{m['runs']}",
                ]
            )
    print()
    print("Medians over rounds; tasks/s and CPU between the 10 % and 100 % result marks.")
    print("Ratios: tasks/s higher is better; CPU per task lower is better.")
    h.print_table(headers, rows)
    busy = [
        f"{key} c={c} ({share:.0%})"
        for c, meds in summary.items()
        for key, m in meds.items()
        if (share := m["stub_core_share"]) is not None and share > STUB_BUSY_WARNING
    ]
    if busy:
        print(
            f"\nwarning: the stub used > {STUB_BUSY_WARNING:.0%} of its core for: "
            + ", ".join(busy)
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per run (default 3000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 10], help="MAX_CONCURRENT_TASKS values"
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        default=list(DEFAULT_WORKERS),
        choices=sorted(h.WORKERS),
        help="worker programs to run (default: all; those that fail to import are skipped)",
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds one run may take (default 180)"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON results")
    args = parser.parse_args(argv)
    if args.tasks < 10 or args.rounds < 1 or min(args.concurrency) < 1:
        parser.error("need --tasks >= 10, --rounds >= 1, --concurrency >= 1")

    specs = h.probe_all(args.workers)
    if not specs:
        h.log("no worker program is usable")
        return 1
    cores = h.pick_cores()
    h.log(
        f"workers: {', '.join(s.key for s in specs)}; stub on core {cores[0]}, "
        f"worker on core {cores[1]}"
    )
    records: list[dict[str, Any]] = []
    started = time.time()
    run_no = 0
    for c in args.concurrency:
        for rnd in range(args.rounds):
            # Rotate the order every round so no worker always runs first or last.
            k = rnd % len(specs)
            order = specs[k:] + specs[:k]
            for spec in order:
                run_no += 1
                rec = measure(
                    spec,
                    tasks=args.tasks,
                    concurrency=c,
                    timeout=args.timeout,
                    cores=cores,
                    run_id=f"{spec.key}-c{c}-r{rnd}",
                )
                rec["round"] = rnd
                records.append(rec)
                if rec["ok"]:
                    h.log(
                        f"c={c} round {rnd + 1}/{args.rounds} {spec.key:<20} "
                        f"{rec['tasks_per_s']:8.0f} tasks/s  "
                        f"{rec.get('cpu_s_per_1000', float('nan')):.2f} CPU s/1k  "
                        f"{rec.get('peak_rss_mib') or 0:.0f} MiB  "
                        f"stub {rec.get('stub_core_share', 0):.0%}"
                    )
                else:
                    h.log(
                        f"c={c} round {rnd + 1}/{args.rounds} {spec.key:<20} FAILED: {rec['error']}"
                    )
    summary = report(records, specs, args.concurrency)
    if not args.no_save:
        path = h.results_path("overhead")
        h.write_json(
            path,
            {
                "benchmark": "overhead",
                "args": vars(args),
                "environment": h.environment_info(),
                "skipped": sorted(set(args.workers) - {s.key for s in specs}),
                "duration_s": round(time.time() - started, 1),
                "summary": summary,
                "runs": records,
            },
        )
        print(f"\nresults: {path.relative_to(h.REPO_DIR)}")
    return 0 if all(r["ok"] for r in records) else 2


if __name__ == "__main__":
    sys.exit(main())

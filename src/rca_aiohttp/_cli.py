"""``rca-worker``: run, check or try a worker from the command line.

* ``rca-worker run FILE_OR_MODULE:ATTR`` runs the worker with the environment's
  configuration (``--adapter aiohttp|httpx``, ``--backend asyncio|trio``).
* ``rca-worker check FILE_OR_MODULE:ATTR`` validates the configuration and the
  handlers and prints the effective settings, tokens masked; connects to nothing.
* ``rca-worker try FILE_OR_MODULE:ATTR --task NAME --params JSON`` starts an
  embedded orchestrator on 127.0.0.1, feeds the worker the given tasks (or a
  JSON-lines file of ``{"task": ..., "params": ...}``), prints each result and
  exits: handlers can be tried without installing an orchestrator.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from rca_core._logs import configure_logging

__all__ = ["load_worker", "main"]


def load_worker(target: str) -> Any:
    """``path/to/file.py:worker`` or ``package.module:worker`` -> the Worker object."""
    source, _, attr = target.partition(":")
    attr = attr or "worker"
    if source.endswith(".py") or os.path.sep in source:
        path = Path(source).resolve()
        if not path.is_file():
            raise SystemExit(f"rca-worker: no such file: {source}")
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        module = importlib.import_module(source)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"rca-worker: {source} has no attribute {attr!r}") from None


def _tasks_from(args: argparse.Namespace) -> list[tuple[str, Any]]:
    tasks: list[tuple[str, Any]] = []
    if args.file:
        for n, line in enumerate(Path(args.file).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                tasks.append((str(item["task"]), item.get("params", {})))
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(
                    f'rca-worker: {args.file}:{n}: expected {{"task": ..., "params": ...}}: {exc}'
                ) from None
    if args.task:
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            raise SystemExit(f"rca-worker: --params is not JSON: {exc}") from None
        tasks.extend([(args.task, params)] * args.count)
    if not tasks:
        raise SystemExit("rca-worker try: give --task NAME [--params JSON] or --file TASKS.jsonl")
    return tasks


async def _try(worker: Any, tasks: list[tuple[str, Any]], wait: float) -> int:
    from rca_core.testing import FakeOrchestrator

    from ._embedded import EmbeddedOrchestrator

    fake = FakeOrchestrator(hold=5.0)
    async with EmbeddedOrchestrator(fake) as orch:
        config = worker.config
        config.ORCHESTRATORS_CONFIG = []
        config.ORCHESTRATOR_URL = orch.url
        config.WORKER_TOKEN = fake.token
        config.WORKER_INDIVIDUAL_TOKEN = None
        config.WORKER_ENABLE_WEBSOCKETS = True
        print(f"embedded orchestrator on {orch.url}; sending {len(tasks)} task(s)", flush=True)
        running = asyncio.create_task(worker.serve())
        ids = [await orch.submit(name, params) for name, params in tasks]
        failed = 0
        try:
            results = await orch.wait_for_results(len(ids), within=wait)
        except TimeoutError:
            print(f"rca-worker try: not every result arrived within {wait}s", file=sys.stderr)
            results = list(fake.results)
            failed = 1
        by_task = {r["task_id"]: r["result"] for r in results}
        for task_id, (name, _) in zip(ids, tasks, strict=True):
            result = by_task.get(task_id, "<no result>")
            print(f"{task_id} {name}: {json.dumps(result)}", flush=True)
            if not isinstance(result, dict) or result.get("status") == "failure":
                failed = 1
        await worker.stop()
        await asyncio.wait_for(running, 60)
    return failed


def _check(worker: Any) -> int:
    resolved = worker.config.resolve()
    definition = worker._definition
    settings = definition.settings(resolved, hostname="-", ip_address="-")
    print(
        json.dumps(
            {
                "config": resolved.describe(),
                "worker_type": settings.worker_type,
                "max_concurrent_tasks": settings.max_concurrent_tasks,
                "task_type_limits": dict(settings.task_type_limits),
                "handlers": {name: spec.task_type for name, spec in definition.handlers.items()},
            },
            indent=2,
            default=str,
        )
    )
    if not definition.handlers:
        print("rca-worker check: the worker has no handlers", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rca-worker", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a worker with the environment's configuration")
    run.add_argument("target", help="FILE.py:ATTR or MODULE:ATTR")
    run.add_argument("--health", action="store_true", help="also serve /health and /ready")
    run.add_argument(
        "--backend",
        choices=["asyncio", "trio"],
        default=None,
        help="rca_httpx workers only (default: RCA_BACKEND or asyncio)",
    )
    check = sub.add_parser("check", help="validate configuration and handlers; connect to nothing")
    check.add_argument("target")
    trial = sub.add_parser("try", help="run the worker against an embedded orchestrator")
    trial.add_argument("target")
    trial.add_argument("--task", help="task name to send")
    trial.add_argument("--params", default="{}", help="task params as JSON (default {})")
    trial.add_argument("--count", type=int, default=1, help="how many such tasks (default 1)")
    trial.add_argument("--file", help='JSON lines: {"task": NAME, "params": {...}}')
    trial.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    log_format = os.environ.get("LOG_FORMAT", "").strip().lower()
    configure_logging("json" if log_format == "json" else "text")
    from rca_core._errors import ConfigError

    try:
        worker = load_worker(args.target)
        if args.command == "check":
            return _check(worker)
        if args.command == "try":
            return asyncio.run(_try(worker, _tasks_from(args), args.timeout))
        run = worker.run_with_health_check if args.health else worker.run
        if args.backend is not None:
            run(backend=args.backend)
        else:
            run()
        return 0
    except ConfigError as exc:
        print(f"rca-worker: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""What every benchmark worker program shares (stdlib only: it is imported from
the reference SDK's venv too).

The contract between the harness and a worker program:

- configuration comes from the environment, as the reference SDK reads it:
  ``ORCHESTRATOR_URL``, ``WORKER_TOKEN``, ``WORKER_ID``, ``MAX_CONCURRENT_TASKS``
  (and ``WORKER_PORT``, ``TASK_FILES_DIR`` for the reference SDK's sake);
- ``BENCH_NOOP_SLEEP`` (seconds, default 0): the ``noop`` handler sleeps this
  long before it returns; 0 means it returns at once without awaiting;
- ``--probe`` as an argument: build the worker (import the SDK, register the
  handler) and exit 0 without connecting; exit ``SKIP_EXIT_CODE`` (3) with a
  ``bench-skip: ...`` line on stderr when the SDK cannot be imported;
- ``--backend asyncio|trio`` for the programs that can run on either;
- SIGTERM may simply kill the program: the harness stops it once it has the
  figures it needs.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

SKIP_EXIT_CODE = 3
RESULT_SUCCESS: dict[str, object] = {"status": "success", "data": {}}


def probe_requested() -> bool:
    return "--probe" in sys.argv[1:]


def backend_requested(default: str = "asyncio") -> str:
    argv = sys.argv[1:]
    if "--backend" in argv:
        i = argv.index("--backend")
        if i + 1 < len(argv):
            return argv[i + 1]
    return default


def noop_sleep() -> float:
    return float(os.environ.get("BENCH_NOOP_SLEEP", "0") or 0)


def skip(reason: str) -> NoReturn:
    print(f"bench-skip: {reason}", file=sys.stderr, flush=True)
    sys.exit(SKIP_EXIT_CODE)


class BareConfig:
    """The few settings a bare loop needs, read from the same variables."""

    def __init__(self) -> None:
        self.url = os.environ.get("ORCHESTRATOR_URL", "http://127.0.0.1:8080").rstrip("/")
        self.token = os.environ.get("WORKER_TOKEN", "")
        self.worker_id = os.environ.get("WORKER_ID", f"bare-{os.getpid()}")
        self.concurrency = int(os.environ.get("MAX_CONCURRENT_TASKS", "10"))
        self.sleep = noop_sleep()
        self.headers = {"X-Worker-Token": self.token}
        self.register_url = f"{self.url}/_worker/workers/register"
        self.poll_url = f"{self.url}/_worker/workers/{self.worker_id}/tasks/next"
        self.result_url = f"{self.url}/_worker/tasks/result"
        # The client must wait longer than the server holds a poll (30 s).
        self.poll_timeout = float(os.environ.get("TASK_POLL_TIMEOUT", "30")) + 15.0
        # After an unexpected reply or a network error; never spin.
        self.error_delay = 1.0

    def register_body(self) -> dict[str, object]:
        return {
            "worker_id": self.worker_id,
            "worker_type": "bench-bare",
            "supported_tasks": ["noop"],
            "max_concurrent_tasks": self.concurrency,
            "cost_per_skill": {},
            "installed_models": [],
            "hostname": "localhost",
            "ip_address": "127.0.0.1",
            "resources": {"cpu_cores": 1, "gpu_info": None},
            "capabilities": {},
        }

    def result_body(self, task: dict[str, object]) -> dict[str, object]:
        return {
            "job_id": task["job_id"],
            "task_id": task["task_id"],
            "worker_id": self.worker_id,
            "result": RESULT_SUCCESS,
        }

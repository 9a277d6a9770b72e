"""The reference SDK (PyPI ``avtomatika-worker`` 1.0b3), written as its README
says, with one ``noop`` handler. Runs from ``benchmarks/.venv-ref``.

Env and arguments: see ``_common.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from _common import noop_sleep, probe_requested, skip

try:
    from avtomatika_worker import Worker
except ImportError as exc:
    skip(f"avtomatika_worker is not importable ({exc}); run benchmarks/refsdk.sh")

SLEEP = noop_sleep()

worker = Worker(worker_type="bench-noop")


@worker.task("noop")
async def noop(params: dict, **kwargs: Any) -> dict[str, Any]:
    if SLEEP > 0:
        await asyncio.sleep(SLEEP)
    return {"status": "success", "data": {}}


if __name__ == "__main__":
    if not probe_requested():
        worker.run()

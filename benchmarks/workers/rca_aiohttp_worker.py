"""Our aiohttp adapter, written exactly as a user of the reference README would
write a worker, but importing ``rca_aiohttp``. One ``noop`` handler.

Until ``rca_aiohttp`` exports ``Worker`` this exits with code 3 and the harness
skips it. Env and arguments: see ``_common.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from _common import noop_sleep, probe_requested, skip

try:
    from rca_aiohttp import Worker
except ImportError as exc:
    skip(f"rca_aiohttp is not usable yet: {exc}")

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

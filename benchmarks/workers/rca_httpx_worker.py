"""Our httpx/anyio adapter, written exactly as a user of the reference README
would write a worker, but importing ``rca_httpx``. One ``noop`` handler; runs on
asyncio, or on trio with ``--backend trio`` (``worker.run(backend="trio")``).

Until ``rca_httpx`` exports ``Worker`` this exits with code 3 and the harness
skips it. Env and arguments: see ``_common.py``.
"""

from __future__ import annotations

from typing import Any

from _common import backend_requested, noop_sleep, probe_requested, skip

BACKEND = backend_requested()

try:
    import anyio

    if BACKEND == "trio":
        import trio  # noqa: F401
    from rca_httpx import Worker
except ImportError as exc:
    skip(f"rca_httpx is not usable yet: {exc}")

SLEEP = noop_sleep()

worker = Worker(worker_type="bench-noop")


@worker.task("noop")
async def noop(params: dict, **kwargs: Any) -> dict[str, Any]:
    if SLEEP > 0:
        await anyio.sleep(SLEEP)
    return {"status": "success", "data": {}}


if __name__ == "__main__":
    if not probe_requested():
        if BACKEND == "trio":
            worker.run(backend="trio")
        else:
            worker.run()

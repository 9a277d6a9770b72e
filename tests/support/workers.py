"""Run an SDK worker under test in its own thread and event loop.

Every behaviour test is written once and runs against every adapter and
backend: ``rca_aiohttp`` on asyncio, ``rca_httpx`` on asyncio and on trio.
The test body itself stays on asyncio (it talks to the orchestrators), and the
worker runs in a thread with its own loop, exactly as it would in production;
handlers written with ``anyio`` primitives run on either backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = [
    "ADAPTERS",
    "AdapterCase",
    "RunningWorker",
    "adapter_case",
    "await_until",
    "running_worker",
    "serving_worker",
    "wait_until",
]


@dataclass(frozen=True)
class AdapterCase:
    package: str  # "rca_aiohttp" or "rca_httpx"
    backend: str  # "asyncio" or "trio"

    @property
    def id(self) -> str:
        return f"{self.package.removeprefix('rca_')}-{self.backend}"

    def module(self) -> Any:
        return importlib.import_module(self.package)


ADAPTERS = [
    AdapterCase("rca_aiohttp", "asyncio"),
    AdapterCase("rca_httpx", "asyncio"),
    AdapterCase("rca_httpx", "trio"),
]


@pytest.fixture(params=ADAPTERS, ids=[a.id for a in ADAPTERS])
def adapter_case(request: pytest.FixtureRequest) -> AdapterCase:
    return request.param  # type: ignore[no-any-return]


class RunningWorker:
    """A worker serving in a background thread; ``stop()`` drains it from outside."""

    def __init__(self, worker: Any, case: AdapterCase, **serve_kwargs: Any) -> None:
        self.worker = worker
        self.case = case
        self.serve_kwargs = serve_kwargs
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trio_token: Any = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._main, name=f"worker-{self.case.id}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the worker thread did not start within 10 s")

    def _main(self) -> None:
        try:
            if self.case.backend == "asyncio":
                asyncio.run(self._serve_asyncio())
            else:
                import trio

                trio.run(self._serve_trio)
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self._ready.set()

    async def _serve_asyncio(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self.worker.serve(**self.serve_kwargs)

    async def _serve_trio(self) -> None:
        import trio

        self._trio_token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await self.worker.serve(**self.serve_kwargs)

    def call(self, func: Callable[[], Any]) -> None:
        """Run the coroutine function ``func`` in the worker's loop (fire and forget)."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(func(), self._loop)
        elif self._trio_token is not None:
            import trio

            trio.from_thread.run(func, trio_token=self._trio_token)

    def snapshot(self) -> dict[str, Any]:
        return self.worker.snapshot()  # type: ignore[no-any-return]

    def request_stop(self) -> None:
        self.call(self.worker.stop)

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the worker did not stop within {timeout} s")
        if self.error is not None:
            raise self.error

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive:
            self.request_stop()
            self.join(timeout)
        elif self.error is not None:
            raise self.error


def announced(runner: RunningWorker) -> bool:
    """Registered with every orchestrator, and an ``idle`` heartbeat acknowledged by each."""
    links = runner.snapshot().get("orchestrators", [])
    return bool(links) and all(link["announced"] for link in links)


@contextmanager
def running_worker(
    worker: Any,
    case: AdapterCase,
    *,
    stop_timeout: float = 30.0,
    wait_ready: float | None = 15.0,
    **serve_kwargs: Any,
) -> Iterator[RunningWorker]:
    """Serve ``worker`` in a thread for the ``with`` block; drain and join on exit.

    By default the block starts once the worker is registered and has said
    ``idle`` (the orchestrator dispatches to no one else): ``wait_ready=None``
    starts it at once, for tests where the orchestrator is away.
    """
    runner = RunningWorker(worker, case, **serve_kwargs)
    runner.start()
    try:
        if wait_ready is not None:
            wait_until(lambda: runner.error is not None or announced(runner), timeout=wait_ready)
            if runner.error is not None:
                raise runner.error
        yield runner
    finally:
        runner.stop(stop_timeout)


def wait_until(condition: Callable[[], object], *, timeout: float, interval: float = 0.02) -> None:
    """Block until ``condition()`` is truthy (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if condition():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    if not condition():
        raise AssertionError(f"condition not met within {timeout} s")


async def await_until(condition: Callable[[], object], *, timeout: float, interval: float = 0.05) -> None:
    """Like :func:`wait_until`, for async tests whose loop must keep serving.

    ``condition`` may block (it runs in a worker thread), so it can make HTTP
    calls to a server that lives in the test's own event loop.
    """
    import anyio

    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if await anyio.to_thread.run_sync(condition):
            return
        if time.monotonic() > deadline:
            break
        await anyio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@contextlib.asynccontextmanager
async def serving_worker(
    worker: Any,
    case: AdapterCase,
    *,
    stop_timeout: float = 30.0,
    wait_ready: float | None = 15.0,
    **serve_kwargs: Any,
) -> AsyncIterator[RunningWorker]:
    """:func:`running_worker` for tests whose orchestrator runs in the test's own loop.

    Nothing here blocks the loop: waiting for readiness and joining the worker's
    thread happen in threads, so the embedded orchestrator keeps answering.
    """
    import anyio

    runner = RunningWorker(worker, case, **serve_kwargs)
    await anyio.to_thread.run_sync(runner.start)
    try:
        if wait_ready is not None:
            await await_until(lambda: runner.error is not None or announced(runner), timeout=wait_ready)
            if runner.error is not None:
                raise runner.error
        yield runner
    finally:
        await anyio.to_thread.run_sync(lambda: runner.stop(stop_timeout))

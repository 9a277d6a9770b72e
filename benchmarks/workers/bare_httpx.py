"""The wire limit for httpx: C independent loops (long poll, then post the
result) on one stock ``httpx.AsyncClient``, with no SDK logic at all, on
asyncio or trio (``--backend asyncio|trio``, through anyio).

Registers once, sends no heartbeats. Env and arguments: see ``_common.py``.
"""

from __future__ import annotations

import os

from _common import BareConfig, backend_requested, probe_requested, skip

try:
    import anyio
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the venv
    skip(f"httpx/anyio are not importable: {exc}")


async def register(client: httpx.AsyncClient, cfg: BareConfig) -> None:
    while True:
        try:
            resp = await client.post(cfg.register_url, json=cfg.register_body())
            if resp.status_code < 300:
                return
        except httpx.HTTPError:
            pass
        await anyio.sleep(cfg.error_delay)


async def loop(client: httpx.AsyncClient, cfg: BareConfig) -> None:
    while True:
        try:
            resp = await client.get(cfg.poll_url, timeout=cfg.poll_timeout)
            if resp.status_code == 204:
                continue
            if resp.status_code != 200:
                await anyio.sleep(cfg.error_delay)
                continue
            task = resp.json()
            if cfg.sleep > 0:
                await anyio.sleep(cfg.sleep)
            await client.post(cfg.result_url, json=cfg.result_body(task))
        except httpx.HTTPError:
            await anyio.sleep(cfg.error_delay)


async def main(cfg: BareConfig, deadline: float) -> None:
    # Stock client; only make sure every loop keeps its connection alive.
    limits = httpx.Limits(
        max_connections=max(100, cfg.concurrency + 1),
        max_keepalive_connections=max(20, cfg.concurrency + 1),
    )
    with anyio.move_on_after(deadline):
        async with httpx.AsyncClient(headers=cfg.headers, limits=limits) as client:
            await register(client, cfg)
            async with anyio.create_task_group() as tg:
                for _ in range(cfg.concurrency):
                    tg.start_soon(loop, client, cfg)


if __name__ == "__main__":
    backend = backend_requested()
    if backend not in ("asyncio", "trio"):
        raise SystemExit(f"unknown backend {backend!r}")
    if backend == "trio":
        try:
            import trio  # noqa: F401
        except ImportError as exc:
            skip(f"trio is not importable: {exc}")
    config = BareConfig()
    if not probe_requested():
        anyio.run(main, config, float(os.environ.get("BENCH_MAX_SECONDS", "3600")), backend=backend)

"""The wire limit for aiohttp: C independent loops (long poll, then post the
result) on one ``aiohttp.ClientSession``, with no SDK logic at all.

Registers once, sends no heartbeats. Env and arguments: see ``_common.py``.
"""

from __future__ import annotations

import asyncio
import os

from _common import BareConfig, probe_requested, skip

try:
    import aiohttp
except ImportError as exc:  # pragma: no cover - depends on the venv
    skip(f"aiohttp is not importable: {exc}")


async def register(session: aiohttp.ClientSession, cfg: BareConfig) -> None:
    while True:
        try:
            async with session.post(
                cfg.register_url, json=cfg.register_body(), headers=cfg.headers
            ) as resp:
                await resp.read()
                if resp.status < 300:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(cfg.error_delay)


async def loop(session: aiohttp.ClientSession, cfg: BareConfig) -> None:
    poll_timeout = aiohttp.ClientTimeout(total=cfg.poll_timeout)
    while True:
        try:
            async with session.get(cfg.poll_url, headers=cfg.headers, timeout=poll_timeout) as resp:
                if resp.status == 204:
                    continue
                if resp.status != 200:
                    await asyncio.sleep(cfg.error_delay)
                    continue
                task = await resp.json()
            if cfg.sleep > 0:
                await asyncio.sleep(cfg.sleep)
            async with session.post(
                cfg.result_url, json=cfg.result_body(task), headers=cfg.headers
            ) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            await asyncio.sleep(cfg.error_delay)


async def main(cfg: BareConfig) -> None:
    connector = aiohttp.TCPConnector(limit=max(100, cfg.concurrency + 1))
    async with aiohttp.ClientSession(connector=connector) as session:
        await register(session, cfg)
        async with asyncio.TaskGroup() as tg:
            for _ in range(cfg.concurrency):
                tg.create_task(loop(session, cfg))


if __name__ == "__main__":
    config = BareConfig()
    if not probe_requested():
        deadline = float(os.environ.get("BENCH_MAX_SECONDS", "3600"))
        try:
            asyncio.run(asyncio.wait_for(main(config), deadline))
        except TimeoutError:
            pass

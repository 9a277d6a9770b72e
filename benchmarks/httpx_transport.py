"""CPU per request of the HTTP paths a worker can take, on asyncio and trio.

    .venv/bin/python benchmarks/httpx_transport.py --requests 3000 --rounds 5

A minimal keep-alive HTTP/1.1 server (raw asyncio, its own process, pinned to
the other core) answers every GET with a task-sized JSON body and every POST
with ``{"status":"ok"}``. Each client variant, in its own process pinned to
one core, repeats "GET the poll route, POST a result" on one connection, as a
worker at concurrency 1 does, and reports the process CPU time per request
(``time.process_time``, warm-up excluded). Variants alternate across rounds
(back-to-back runs vary); the medians are printed.

Variants: ``aiohttp`` (the reference point), ``stock`` (``httpx.AsyncClient()``
as shipped), ``h11`` (``httpx.AsyncClient(transport=H11Transport())`` with
``client.request``), ``worker`` (what ``rca_httpx`` does per request: a prebuilt
``httpx.Request`` through ``client.send`` on the H11 transport), and
``transport`` (the transport called directly: the floor of the h11 path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

GET_BODY = (
    b'{"job_id":"j1","task_id":"t1","type":"noop","params":{},'
    b'"tracing_context":{},"params_metadata":null}'
)
POST_BODY = b'{"status":"ok"}'
VARIANTS = {
    "asyncio": ("aiohttp", "stock", "h11", "worker", "transport"),
    "trio": ("stock", "h11", "worker", "transport"),
}


# -- the server ----------------------------------------------------------------------


class _Server(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        for _ in range(1000):  # bounded: each turn answers one request or waits
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[: end + 4 + length]
            body = GET_BODY if head.startswith("GET") else POST_BODY
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Server, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)


# -- the clients ---------------------------------------------------------------------

TIMEOUT = 45.0


async def _client_httpx(variant: str, base: str, n: int) -> float:
    import httpx

    from rca_httpx._transport import H11Transport

    poll, result = f"{base}/_worker/workers/w/tasks/next", f"{base}/_worker/tasks/result"
    token = (("X-Worker-Token", "t"),)
    json_headers = (("X-Worker-Token", "t"), ("Content-Type", "application/json"))
    payload = b'{"job_id":"j1","task_id":"t1","worker_id":"w","result":{"status":"success"}}'
    if variant == "stock":
        client = httpx.AsyncClient(timeout=TIMEOUT)
    else:
        client = httpx.AsyncClient(transport=H11Transport(), trust_env=False, timeout=TIMEOUT)
    timeouts = httpx.Timeout(TIMEOUT).as_dict()
    urls = {poll: httpx.URL(poll), result: httpx.URL(result)}

    async def one_request() -> None:
        await client.request("GET", poll, headers=token)
        await client.request("POST", result, headers=json_headers, content=payload)

    async def one_worker() -> None:
        for method, url, headers, body in (
            ("GET", poll, token, None),
            ("POST", result, json_headers, payload),
        ):
            req = httpx.Request(
                method, urls[url], headers=headers, content=body, extensions={"timeout": timeouts}
            )
            resp = await client.send(req)
            resp.content  # noqa: B018

    async def one_transport() -> None:
        transport = client._transport
        for method, url, headers, body in (
            ("GET", poll, token, None),
            ("POST", result, json_headers, payload),
        ):
            req = httpx.Request(
                method, urls[url], headers=headers, content=body, extensions={"timeout": timeouts}
            )
            resp = await transport.handle_async_request(req)
            await resp.aread()

    one = {"stock": one_request, "h11": one_request, "worker": one_worker}.get(
        variant, one_transport
    )
    async with client:
        for _ in range(100):
            await one()
        start = time.process_time()
        for _ in range(n):
            await one()
        spent = time.process_time() - start
    return spent / (2 * n)


async def _client_aiohttp(base: str, n: int) -> float:
    import aiohttp

    poll, result = f"{base}/_worker/workers/w/tasks/next", f"{base}/_worker/tasks/result"
    payload = b'{"job_id":"j1","task_id":"t1","worker_id":"w","result":{"status":"success"}}'
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            async with session.get(poll, headers={"X-Worker-Token": "t"}, timeout=timeout) as r:
                await r.read()
            async with session.post(
                result,
                headers={"X-Worker-Token": "t", "Content-Type": "application/json"},
                data=payload,
                timeout=timeout,
            ) as r:
                await r.read()

        for _ in range(100):
            await one()
        start = time.process_time()
        for _ in range(n):
            await one()
        return (time.process_time() - start) / (2 * n)


def _client_main(backend: str, variant: str, base: str, n: int) -> None:
    if variant == "aiohttp":
        per = asyncio.run(_client_aiohttp(base, n))
    else:
        import anyio

        per = anyio.run(_client_httpx, variant, base, n, backend=backend)
    print(json.dumps({"us_per_request": per * 1e6}))


# -- the runner ----------------------------------------------------------------------


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {core})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="GET+POST pairs per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        _pin(1)
        asyncio.run(_serve(args.serve))
        return
    if args.client is not None:
        _pin(0)
        backend, variant, base = args.client
        _client_main(backend, variant, base, args.requests)
        return
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        samples: dict[tuple[str, str], list[float]] = {}
        for round_no in range(args.rounds):
            for backend, variants in VARIANTS.items():
                for variant in variants:
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--requests",
                            str(args.requests),
                            "--client",
                            backend,
                            variant,
                            base,
                        ],
                        capture_output=True,
                        text=True,
                        timeout=600,
                        check=True,
                    )
                    value = json.loads(out.stdout.strip().splitlines()[-1])["us_per_request"]
                    samples.setdefault((backend, variant), []).append(value)
            print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        reference = statistics.median(samples[("asyncio", "aiohttp")])
        print(f"{'backend':8} {'variant':10} {'us/request':>10} {'x aiohttp':>9}  (median)")
        for (backend, variant), values in samples.items():
            med = statistics.median(values)
            print(f"{backend:8} {variant:10} {med:10.0f} {med / reference:9.2f}")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()

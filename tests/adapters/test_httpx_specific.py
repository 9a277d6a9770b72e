"""What only rca_httpx has: its h11 transport, its wsproto channel, its h11 health server.

Every test runs on asyncio and on trio, against small servers written here on
anyio listeners (127.0.0.1, ephemeral ports) whose misbehaviour is scripted:
keep-alive and closes, chunked and gzip bodies, silence, garbage. The shared
behaviour suite covers the worker itself.
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

import rca_aiohttp.typing as rca_aiohttp_typing
import rca_httpx
import rca_httpx.config as httpx_config
import rca_httpx.typing as httpx_typing
from rca_core._config import WorkerConfig
from rca_core._health import HealthState
from rca_core._metrics import WorkerMetrics
from rca_httpx import _worker
from rca_httpx._health import HealthServer
from rca_httpx._transport import H11Transport
from rca_httpx._ws import WebSocketError, connect_websocket

pytestmark = pytest.mark.anyio

# Bounds for every loop in the scripted servers.
MAX_READS = 1000
MAX_REQUESTS = 200


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def listening(
    handle: Callable[[anyio.abc.SocketStream], Awaitable[None]],
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handle`` on 127.0.0.1 until cancelled; reports the port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(handle)


# -- a scripted HTTP/1.1 server ----------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int


@dataclass
class HttpScript:
    """Per request, ``respond`` returns raw bytes to send, then what to do with the connection.

    ``respond(seen, index)`` -> ``(bytes, action)``; action is ``"keep"``,
    ``"close"`` (after sending), or ``"hang"`` (send nothing, keep the
    connection open until the test ends).
    """

    respond: Callable[[Seen, int], Awaitable[tuple[bytes, str]]]
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0


async def _read_request(
    stream: anyio.abc.SocketStream, buf: bytearray, conn_no: int
) -> Seen | None:
    for _ in range(MAX_READS):
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        try:
            data = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return None
        buf += data
    else:  # pragma: no cover - a test bug
        raise AssertionError("request head too long")
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    method, target, _ = head[0].split(" ", 2)
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        length = int(headers["content-length"])
        for _ in range(MAX_READS):
            if len(buf) >= length:
                break
            buf += await stream.receive()
        body, buf[:] = bytes(buf[:length]), buf[length:]
    elif headers.get("transfer-encoding") == "chunked":
        for _ in range(MAX_READS):
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                buf += await stream.receive()
                continue
            size = int(bytes(buf[:line_end]).split(b";")[0], 16)
            if len(buf) < line_end + 2 + size + 2:
                buf += await stream.receive()
                continue
            body += bytes(buf[line_end + 2 : line_end + 2 + size])
            del buf[: line_end + 2 + size + 2]
            if size == 0:
                break
    return Seen(method, target, headers, body, conn_no)


@asynccontextmanager
async def http_server(script: HttpScript) -> AsyncIterator[str]:
    async def handle(stream: anyio.abc.SocketStream) -> None:
        script.connections += 1
        conn_no = script.connections
        buf = bytearray()
        async with stream:
            for _ in range(MAX_REQUESTS):
                seen = await _read_request(stream, buf, conn_no)
                if seen is None:
                    return
                script.requests.append(seen)
                data, action = await script.respond(seen, len(script.requests) - 1)
                if action == "hang":
                    await anyio.sleep_forever()
                try:
                    if data:
                        await stream.send(data)
                except (anyio.BrokenResourceError, OSError):
                    return
                if action == "close":
                    return

    async with anyio.create_task_group() as tg:
        port = await tg.start(listening, handle)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


def reply(status: int, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def ok_json(seen: Seen, index: int) -> tuple[bytes, str]:
    body = json.dumps({"n": index, "method": seen.method, "got": seen.body.decode()}).encode()
    return reply(200, body, "Content-Type: application/json"), "keep"


def client(**kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=H11Transport(**kwargs), trust_env=False, timeout=5.0)


# -- the transport ------------------------------------------------------------------------


async def test_keep_alive_one_connection_for_many_requests() -> None:
    script = HttpScript(ok_json)
    async with http_server(script) as base, client() as c:
        for i in range(20):
            if i % 2:
                r = await c.post(f"{base}/r", content=b'{"x":1}', headers={"X-T": "t"})
            else:
                r = await c.get(f"{base}/p?a=1")
            assert r.status_code == 200
            assert r.json()["n"] == i
    assert script.connections == 1
    assert script.requests[0].target == "/p?a=1"
    assert script.requests[1].body == b'{"x":1}'
    assert script.requests[1].headers["content-length"] == "7"
    assert script.requests[1].headers["x-t"] == "t"


async def test_chunked_response_in_pieces_then_reuse() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        if index == 0:
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
            ), "keep"
        return reply(200, b"again"), "keep"

    script = HttpScript(respond)
    async with http_server(script) as base, client() as c:
        r = await c.get(f"{base}/")
        assert r.content == b"hello world"
        r = await c.get(f"{base}/")
        assert r.content == b"again"
    assert script.connections == 1


async def test_large_body_streams_and_releases_the_connection() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: more than one read

    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        return reply(200, big if index == 0 else b"small"), "keep"

    script = HttpScript(respond)
    async with http_server(script) as base, client() as c:
        async with c.stream("GET", f"{base}/") as r:
            chunks = [chunk async for chunk in r.aiter_raw()]
        assert b"".join(chunks) == big
        assert len(chunks) > 1
        assert (await c.get(f"{base}/")).content == b"small"
    assert script.connections == 1


async def test_a_body_closed_early_closes_its_connection() -> None:
    big = b"x" * (2 * 1024 * 1024)

    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        return reply(200, big if index == 0 else b"ok"), "keep"

    script = HttpScript(respond)
    async with http_server(script) as base, client() as c:
        async with c.stream("GET", f"{base}/") as r:
            assert r.status_code == 200  # the body is left unread
        assert (await c.get(f"{base}/")).content == b"ok"
    assert script.connections == 2


async def test_gzip_body_is_decoded_by_httpx() -> None:
    payload = json.dumps({"job_id": "j", "params": list(range(300))}).encode()

    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        return reply(200, gzip.compress(payload), "Content-Encoding: gzip"), "keep"

    async with http_server(HttpScript(respond)) as base, client() as c:
        r = await c.get(f"{base}/")
        assert r.content == payload


async def test_streaming_request_body_goes_chunked() -> None:
    async def parts() -> AsyncIterator[bytes]:
        for piece in (b"ab", b"", b"cd", b"ef"):
            yield piece

    script = HttpScript(ok_json)
    async with http_server(script) as base, client() as c:
        r = await c.post(f"{base}/", content=parts())
        assert r.json()["got"] == "abcdef"
    assert script.requests[0].headers["transfer-encoding"] == "chunked"


async def test_informational_response_is_skipped_and_no_body_statuses_work() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        if index == 0:
            return b"HTTP/1.1 100 Continue\r\n\r\n" + reply(200, b"after"), "keep"
        if index == 1:
            return b"HTTP/1.1 204 No Content\r\n\r\n", "keep"
        return reply(200, b"12345"), "keep"  # answering HEAD: h11 sends no body

    script = HttpScript(respond)
    async with http_server(script) as base, client() as c:
        assert (await c.get(f"{base}/")).content == b"after"
        assert (await c.get(f"{base}/")).status_code == 204
        r = await c.head(f"{base}/")
        assert r.status_code == 200
        assert r.content == b""
        assert r.headers["content-length"] == "5"


async def test_connection_close_is_not_reused() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        return reply(200, b"bye", "Connection: close"), "close"

    script = HttpScript(respond)
    async with http_server(script) as base, client() as c:
        for _ in range(3):
            assert (await c.get(f"{base}/")).content == b"bye"
    assert script.connections == 3


async def test_a_connection_the_server_closed_while_idle_is_not_used() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        return reply(200, b"ok"), "close"  # closes without saying so

    script = HttpScript(respond)
    async with http_server(script) as base, client() as c:
        for _ in range(3):
            assert (await c.get(f"{base}/")).content == b"ok"
            await anyio.sleep(0.05)  # the close reaches us before the next request
    assert script.connections == 3


async def test_keep_alive_race_is_retried_once_on_a_new_connection() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        if index == 1:
            return b"", "close"  # read the request on the reused connection, answer nothing
        return reply(200, b"ok"), "keep"

    script = HttpScript(respond)
    async with http_server(script) as base, client() as c:
        assert (await c.get(f"{base}/")).content == b"ok"
        r = await c.post(f"{base}/", content=b"once")
        assert r.content == b"ok"
    assert script.connections == 2
    assert [s.connection for s in script.requests] == [1, 1, 2]


async def test_a_streamed_body_is_not_sent_twice() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        if index == 1:
            return b"", "close"
        return reply(200, b"ok"), "keep"

    async def parts() -> AsyncIterator[bytes]:
        yield b"only once"

    script = HttpScript(respond)
    async with http_server(script) as base, client() as c:
        assert (await c.get(f"{base}/")).content == b"ok"
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post(f"{base}/", content=parts())
    assert len(script.requests) == 2


async def test_a_new_connection_closed_without_reply_is_an_error() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        return b"", "close"

    async with http_server(HttpScript(respond)) as base, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(f"{base}/")


async def test_garbage_reply_is_a_protocol_error() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        return b"SMTP ready\r\n\r\n", "keep"

    async with http_server(HttpScript(respond)) as base, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(f"{base}/")


async def test_body_cut_short_is_an_error() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "close"

    async with http_server(HttpScript(respond)) as base, client() as c:
        with pytest.raises(httpx.TransportError):
            await c.get(f"{base}/")


async def test_read_timeout_then_a_fresh_connection_works() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        return (b"", "hang") if index == 0 else (reply(200, b"ok"), "keep")

    script = HttpScript(respond)
    async with http_server(script) as base, client() as c:
        with anyio.fail_after(5):
            with pytest.raises(httpx.ReadTimeout):
                await c.get(f"{base}/", timeout=0.2)
        assert (await c.get(f"{base}/")).content == b"ok"
    assert script.connections == 2


async def test_cancelled_request_closes_its_connection() -> None:
    async def respond(seen: Seen, index: int) -> tuple[bytes, str]:
        return (b"", "hang") if index == 0 else (reply(200, b"ok"), "keep")

    script = HttpScript(respond)
    async with http_server(script) as base, client() as c:
        with anyio.move_on_after(0.2) as scope:
            await c.get(f"{base}/")
        assert scope.cancelled_caught
        assert (await c.get(f"{base}/")).content == b"ok"
    assert script.connections == 2


async def test_connect_refused_is_a_connect_error() -> None:
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{free_port()}/")


async def test_unsupported_scheme_and_closed_transport() -> None:
    transport = H11Transport()
    with pytest.raises(httpx.UnsupportedProtocol):
        await transport.handle_async_request(httpx.Request("GET", "ftp://127.0.0.1/"))
    async with http_server(HttpScript(ok_json)) as base:
        async with httpx.AsyncClient(transport=transport) as c:
            await c.get(f"{base}/")
        with pytest.raises(RuntimeError):
            await transport.handle_async_request(httpx.Request("GET", f"{base}/"))
    with pytest.raises(ValueError):
        H11Transport(max_idle_per_origin=-1)


async def test_idle_connections_are_capped_and_expire() -> None:
    script = HttpScript(ok_json)
    async with http_server(script) as base:
        async with client(max_idle_per_origin=1) as c:
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(c.get, f"{base}/")
            await c.get(f"{base}/")
        assert script.connections == 3  # three at once; only one kept afterwards
        async with client(keepalive_expiry=0.0) as c:
            await c.get(f"{base}/")
            await anyio.sleep(0.01)
            await c.get(f"{base}/")
        assert script.connections == 5  # an expired idle connection is not reused


# -- the WebSocket channel ------------------------------------------------------------------


@dataclass
class WsPeer:
    stream: anyio.abc.SocketStream
    conn: WSConnection
    received: list[Any] = field(default_factory=list)

    async def send(self, event: Any) -> None:
        await self.stream.send(self.conn.send(event))

    async def events(self) -> list[Any]:
        """The next batch of events (empty list at EOF)."""
        try:
            data = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return []
        self.conn.receive_data(data)
        out = list(self.conn.events())
        self.received.extend(out)
        return out


@asynccontextmanager
async def ws_server(
    behaviour: Callable[[WsPeer], Awaitable[None]], *, token: str = "tok"
) -> AsyncIterator[str]:
    async def handle(stream: anyio.abc.SocketStream) -> None:
        conn = WSConnection(ConnectionType.SERVER)
        peer = WsPeer(stream, conn)
        async with stream:
            for _ in range(MAX_READS):
                events = await peer.events()
                if not events:
                    return
                request = next((e for e in events if isinstance(e, Request)), None)
                if request is not None:
                    break
            else:  # pragma: no cover
                return
            assert request.target.startswith("/_worker/ws/")
            headers = {k.decode().lower(): v.decode() for k, v in request.extra_headers}
            if headers.get("x-worker-token") != token:
                await peer.send(RejectConnection(status_code=401))
                return
            await peer.send(AcceptConnection())
            await behaviour(peer)

    async with anyio.create_task_group() as tg:
        port = await tg.start(listening, handle)
        try:
            yield f"ws://127.0.0.1:{port}/_worker/ws/w1"
        finally:
            tg.cancel_scope.cancel()


TOKEN = (("X-Worker-Token", "tok"),)


async def test_ws_messages_both_ways_and_a_clean_close() -> None:
    peers: list[WsPeer] = []

    async def behaviour(peer: WsPeer) -> None:
        peers.append(peer)
        got = peer.received
        await peer.send(TextMessage(data='{"command":"cancel_task"}'))
        await peer.send(TextMessage(data="par", message_finished=False))
        await peer.send(TextMessage(data="ts", message_finished=True))
        await peer.send(BytesMessage(data=b"\x00\x01"))
        await peer.send(Ping(payload=b"p"))
        for _ in range(MAX_READS):
            await peer.events()
            if any(isinstance(e, TextMessage) for e in got):
                break
        await peer.send(CloseConnection(code=1000, reason="bye"))
        for _ in range(MAX_READS):  # until the client's close reply (or EOF)
            events = await peer.events()
            if not events or any(isinstance(e, CloseConnection) for e in events):
                break

    async with ws_server(behaviour) as url:
        with anyio.fail_after(5):
            ws = await connect_websocket(url, TOKEN)
            messages = [await ws.receive() for _ in range(3)]
            await ws.send_text("progress")
            rest = [m async for m in ws]
            await ws.aclose()
    assert messages == ['{"command":"cancel_task"}', "parts", b"\x00\x01"]
    assert rest == []
    assert ws.close_code == 1000
    assert "bye" in ws.close_reason
    got = peers[0].received
    assert any(isinstance(e, Pong) and e.payload == b"p" for e in got)
    assert any(isinstance(e, TextMessage) and e.data == "progress" for e in got)
    with pytest.raises(WebSocketError):
        await ws.send_text("after close")


async def test_ws_refused_upgrade_names_the_status() -> None:
    async def behaviour(peer: WsPeer) -> None:  # pragma: no cover - never accepted
        pass

    async with ws_server(behaviour, token="other") as url:
        with pytest.raises(WebSocketError, match="HTTP 401"):
            await connect_websocket(url, TOKEN)


async def test_ws_dead_peer_is_detected_by_ping() -> None:
    async def behaviour(peer: WsPeer) -> None:
        await anyio.sleep_forever()  # reads nothing, answers nothing

    async with ws_server(behaviour) as url:
        ws = await connect_websocket(url, TOKEN, ping_interval=0.1, ping_timeout=0.2)
        with anyio.fail_after(5):
            with pytest.raises(WebSocketError, match="ping"):
                await ws.receive()
        await ws.aclose()
    assert ws.close_code == 1006


async def test_ws_pong_keeps_a_quiet_channel_open() -> None:
    async def behaviour(peer: WsPeer) -> None:
        for _ in range(MAX_READS):  # answers pings (wsproto does), sends nothing else
            events = await peer.events()
            if not events:
                return
            for event in events:
                if isinstance(event, Ping):
                    await peer.send(event.response())
                elif isinstance(event, CloseConnection):
                    await peer.send(event.response())
                    return

    async with ws_server(behaviour) as url:
        ws = await connect_websocket(url, TOKEN, ping_interval=0.05, ping_timeout=0.5)
        with anyio.move_on_after(0.5) as quiet:
            await ws.receive()
        assert quiet.cancelled_caught  # several pings answered: still open
        with anyio.fail_after(3):
            await ws.aclose()
    assert ws.close_code == 1000


async def test_ws_eof_without_close_frame() -> None:
    async def behaviour(peer: WsPeer) -> None:
        await peer.send(TextMessage(data="last"))

    async with ws_server(behaviour) as url:
        with anyio.fail_after(5):
            ws = await connect_websocket(url, TOKEN)
            assert await ws.receive() == "last"
            assert await ws.receive() is None
            assert await ws.receive() is None
            await ws.aclose()
    assert ws.close_code == 1006


async def test_ws_oversized_message_is_refused() -> None:
    async def behaviour(peer: WsPeer) -> None:
        await anyio.sleep(0.1)  # after the handshake, not with it
        await peer.send(TextMessage(data="x" * 5000))
        await peer.events()

    async with ws_server(behaviour) as url:
        ws = await connect_websocket(url, TOKEN, max_message=1000)
        with anyio.fail_after(5):
            with pytest.raises(WebSocketError, match="larger"):
                await ws.receive()
            await ws.aclose()


async def test_ws_cannot_connect() -> None:
    with pytest.raises(WebSocketError):
        await connect_websocket(f"ws://127.0.0.1:{free_port()}/_worker/ws/w", TOKEN)
    with pytest.raises(WebSocketError, match="not a WebSocket URL"):
        await connect_websocket("http://127.0.0.1/_worker/ws/w", TOKEN)

    async def silent(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        port = await tg.start(listening, silent)
        with pytest.raises(WebSocketError, match="within"):
            await connect_websocket(f"ws://127.0.0.1:{port}/_worker/ws/w", open_timeout=0.2)
        tg.cancel_scope.cancel()


# -- the health server ------------------------------------------------------------------------


def snapshot(state: str = "running") -> dict[str, Any]:
    return {
        "state": state,
        "slots": {"limit": 2, "polling": 2, "held": 0, "running": {}, "waiting": {}},
        "orchestrators": [{"url": "http://o", "state": "registered", "healthy": True}],
        "outbox": 0,
        "counters": {"tasks_received": 3},
    }


@asynccontextmanager
async def health_server(
    state: HealthState, metrics: WorkerMetrics | None, backend: str
) -> AsyncIterator[str]:
    server = HealthServer(state, metrics, host="127.0.0.1", port=0, backend=backend)
    await anyio.to_thread.run_sync(server.start)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await anyio.to_thread.run_sync(server.stop)


async def test_health_readiness_and_metrics_from_the_state(anyio_backend: str) -> None:
    state = HealthState(blocked_threshold=1.0)
    metrics = WorkerMetrics(state.latest_snapshot)
    async with health_server(state, metrics, anyio_backend) as base, client() as c:
        r = await c.get(f"{base}/health")
        assert r.status_code == 503  # no tick yet: the worker loop has not started
        state.tick(time.monotonic(), snapshot("running"), registered=False, failure=None)
        r = await c.get(f"{base}/health")
        assert (r.status_code, r.json()["status"]) == (200, "ok")
        assert r.headers["content-type"] == "application/json"
        r = await c.get(f"{base}/ready")
        assert (r.status_code, r.json()["registered"]) == (503, False)
        state.tick(time.monotonic(), snapshot("running"), registered=True, failure=None)
        r = await c.get(f"{base}/ready?verbose=1")
        assert (r.status_code, r.json()["status"]) == (200, "ready")
        r = await c.get(f"{base}/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert 'rca_slots_in_use{kind="limit"} 2.0' in r.text
        state.tick(time.monotonic() - 5, snapshot("running"), registered=True, failure=None)
        r = await c.get(f"{base}/health")
        assert r.status_code == 503 and "blocked" in r.text  # the last tick is too old
        state.tick(time.monotonic(), snapshot("draining"), registered=True, failure="Bug: x")
        assert (await c.get(f"{base}/health")).status_code == 503
        assert (await c.get(f"{base}/ready")).status_code == 503


async def test_health_server_http_details(anyio_backend: str) -> None:
    state = HealthState(blocked_threshold=1.0)
    state.tick(time.monotonic() + 60, snapshot(), registered=True, failure=None)
    async with health_server(state, None, anyio_backend) as base, client() as c:
        r = await c.head(f"{base}/health")
        assert r.status_code == 200
        assert r.content == b""
        assert int(r.headers["content-length"]) > 0
        assert (await c.get(f"{base}/nope")).status_code == 404
        assert (await c.get(f"{base}/metrics")).status_code == 404  # no metrics given
        r = await c.post(f"{base}/health", content=b"x" * 10_000)
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD"
        assert (await c.get(f"{base}/health")).status_code == 200  # the connection survived
        host, port = base.removeprefix("http://").split(":")
        stream = await anyio.connect_tcp(host, int(port))
        async with stream:
            await stream.send(b"NOT HTTP AT ALL\r\n\r\n")
            with anyio.fail_after(5):
                data = await stream.receive()
        assert data.startswith(b"HTTP/1.1 400")


async def test_health_server_port_in_use_fails_at_start(anyio_backend: str) -> None:
    state = HealthState(blocked_threshold=1.0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HealthServer(state, None, host="127.0.0.1", port=port, backend=anyio_backend)
        with pytest.raises(OSError):
            await anyio.to_thread.run_sync(server.start)
        server.stop()


# -- the Worker's own surface -------------------------------------------------------------


def test_public_api_matches_rca_aiohttp() -> None:
    import rca_aiohttp

    assert rca_httpx.__all__ == rca_aiohttp.__all__
    assert httpx_config.WorkerConfig is rca_httpx.WorkerConfig
    assert httpx_typing.__all__ == rca_aiohttp_typing.__all__


@pytest.mark.parametrize(
    ("env", "argument", "expected"),
    [
        ({}, None, "asyncio"),
        ({"RCA_BACKEND": "trio"}, None, "trio"),
        ({"RCA_BACKEND": "trio"}, "asyncio", "asyncio"),
        ({}, "trio", "trio"),
    ],
)
def test_run_picks_the_backend(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argument: str | None, expected: str
) -> None:
    calls: list[tuple[Any, str]] = []
    monkeypatch.setattr(_worker.anyio, "run", lambda func, backend: calls.append((func, backend)))
    worker = rca_httpx.Worker(config=WorkerConfig({"WORKER_TOKEN": "t", **env}))
    worker.run(backend=argument)  # type: ignore[arg-type]
    worker.run_with_health_check(backend=argument)  # type: ignore[arg-type]
    assert [backend for _, backend in calls] == [expected, expected]
    assert calls[0][0].keywords == {"handle_signals": True}
    assert calls[1][0].keywords == {"health": True, "handle_signals": True}


def test_httpx_request_lines_are_dropped_for_the_workers_own_urls() -> None:
    quiet = _worker._QuietOwnRequests()
    quiet.urls.add("http://o/_worker/tasks/result")

    def record(level: int, url: str) -> logging.LogRecord:
        args = ("POST", httpx.URL(url), "HTTP/1.1", 200, "OK")
        return logging.LogRecord(
            "httpx", level, __file__, 1, 'HTTP Request: %s %s "%s %d %s"', args, None
        )

    assert not quiet.filter(record(logging.INFO, "http://o/_worker/tasks/result"))
    assert quiet.filter(record(logging.INFO, "http://elsewhere/api"))
    assert quiet.filter(record(logging.WARNING, "http://o/_worker/tasks/result"))


async def test_serve_raises_a_single_failure_as_itself(anyio_backend: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = WorkerConfig(
            {
                "WORKER_TOKEN": "t",
                "ORCHESTRATOR_URL": f"http://127.0.0.1:{free_port()}",
                "WORKER_HOST": "127.0.0.1",
                "WORKER_PORT": str(taken.getsockname()[1]),
            }
        )
        worker = rca_httpx.Worker(config=config)
        with anyio.fail_after(10), pytest.raises(OSError):
            await worker.serve(health=True)
    assert worker.snapshot() == {}


def test_run_rejects_an_unknown_backend() -> None:
    worker = rca_httpx.Worker(config=WorkerConfig({"WORKER_TOKEN": "t"}))
    with pytest.raises(ValueError, match="curio"):
        worker.run(backend="curio")  # type: ignore[arg-type]

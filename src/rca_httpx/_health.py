"""The health and metrics server: h11 over an anyio listener, in a thread of its own.

It answers from :class:`rca_core._health.HealthState`, which the worker's
loop refreshes about once a second, exactly as ``rca_aiohttp``'s server does.
Serving from another thread (with its own event loop, on the worker's anyio
backend) is what makes ``/health`` truthful: when the worker's loop is
blocked, this server still answers, and it answers 503.

Routes: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics``
(Prometheus text format). This module only speaks HTTP/1.1, strictly,
because anything can connect to it: GET and HEAD only, request bodies are
dropped, every connection has an idle deadline and a cap on its requests, and
a misbehaving client only ever loses its own connection.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Final

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import h11

from rca_core._health import HealthReply, HealthState
from rca_core._metrics import CONTENT_TYPE, WorkerMetrics

__all__ = ["HealthServer"]

log = logging.getLogger("rca_httpx")

# A probe sends one tiny request; these bound what any client can make us hold.
_IDLE_TIMEOUT: Final = 10.0
_REQUESTS_PER_CONNECTION: Final = 100
_MAX_HEAD: Final = 16 * 1024
_READ_SIZE: Final = 4096
_READS_PER_REQUEST: Final = 1024
_START_TIMEOUT: Final = 10.0
_STOP_TIMEOUT: Final = 10.0


class HealthServer:
    """``start()`` binds and serves from a new thread; ``stop()`` ends it. Both block briefly."""

    def __init__(
        self,
        state: HealthState,
        metrics: WorkerMetrics | None,
        *,
        host: str,
        port: int,
        backend: str = "asyncio",
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._host = host
        self._port = port
        self._backend = backend
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._scope: anyio.CancelScope | None = None
        self.port: int | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="rca-health", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT):
            raise RuntimeError(f"the health server did not start within {_START_TIMEOUT:g} s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        token, scope = self._token, self._scope
        if token is not None and scope is not None:
            try:
                anyio.from_thread.run_sync(scope.cancel, token=token)
            except Exception:  # the server's loop already ended
                pass
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT)

    def _main(self) -> None:
        try:
            anyio.run(self._serve, backend=self._backend)
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        async with listener:
            with anyio.CancelScope() as scope:
                self._scope = scope
                self._token = anyio.lowlevel.current_token()
                self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
                self._ready.set()
                await listener.serve(self._connection)

    # -- one client ---------------------------------------------------------------------

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        """Keep-alive requests until the client closes, idles or misbehaves."""
        async with stream:
            h = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
            try:
                for _ in range(_REQUESTS_PER_CONNECTION):
                    request: h11.Request | None = None
                    with anyio.move_on_after(_IDLE_TIMEOUT):
                        request = await _read_request(h, stream)
                    if request is None:
                        return
                    await stream.send(await self._respond(h, request))
                    if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                        return
                    h.start_next_cycle()
            except h11.RemoteProtocolError as exc:
                if h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    reply = _text(exc.error_status_hint, "bad request")
                    await _send_quietly(stream, _encode(h, reply, head=False))
            except (
                OSError,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.EndOfStream,
            ):
                pass  # the client went away
            except Exception:  # never let one client take the listener down
                log.exception("health server: unexpected error on a connection")

    async def _respond(self, h: h11.Connection, request: h11.Request) -> bytes:
        method = request.method
        head = method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            reply = _text(405, "method not allowed")
            return _encode(h, reply, head=False, extra=((b"Allow", b"GET, HEAD"),))
        path = request.target.split(b"?", 1)[0]
        if path == b"/health":
            reply = self._state.liveness(time.monotonic())
        elif path == b"/ready":
            reply = self._state.readiness(time.monotonic())
        elif path == b"/metrics" and self._metrics is not None:
            body = await anyio.to_thread.run_sync(self._metrics.render)
            reply = HealthReply(status=200, body=body, content_type=CONTENT_TYPE)
        else:
            reply = _text(404, "not found")
        return _encode(h, reply, head=head)


async def _read_request(h: h11.Connection, stream: anyio.abc.SocketStream) -> h11.Request | None:
    """The next complete request (its body read and dropped), or None if the client closed."""
    request: h11.Request | None = None
    for _ in range(_READS_PER_REQUEST):
        event = h.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(_READ_SIZE)
            except anyio.EndOfStream:
                data = b""
            h.receive_data(data)
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None
        # h11.Data: a body nobody asked for; dropped
    return None  # a request body longer than we care to read


def _text(status: int, text: str) -> HealthReply:
    return HealthReply(status=status, body=text.encode(), content_type="text/plain; charset=utf-8")


def _encode(
    h: h11.Connection,
    reply: HealthReply,
    *,
    head: bool,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    headers = [
        (b"Content-Type", reply.content_type.encode()),
        (b"Content-Length", str(len(reply.body)).encode()),
        (b"Cache-Control", b"no-store"),
        *extra,
    ]
    out = h.send(h11.Response(status_code=reply.status, headers=headers)) or b""
    if not head:
        out += h.send(h11.Data(data=reply.body)) or b""
    out += h.send(h11.EndOfMessage()) or b""
    return out


async def _send_quietly(stream: anyio.abc.SocketStream, data: bytes) -> None:
    try:
        with anyio.move_on_after(_IDLE_TIMEOUT):
            await stream.send(data)
    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass

"""The health server: h11 over an anyio TCP listener, on asyncio or trio.

``/health`` (liveness) and ``/ready`` (readiness) answer exactly what
``rca_aiohttp``'s server answers: the decision and the JSON body come from
:func:`rca_core._probes.probe_reply`; this module only speaks HTTP/1.1. It is
deliberately small and strict, because anything can connect to it: GET and
HEAD only, no request body is kept, every connection has an idle deadline and
a cap on the requests it may send, and a misbehaving client only ever loses
its own connection.
"""

from __future__ import annotations

import functools
import logging
from typing import Final, Protocol

import anyio
import anyio.abc
import h11

from rca_core._machine import WorkerMachine
from rca_core._probes import probe_reply

__all__ = ["serve_health"]

log = logging.getLogger("rca_httpx")

# A probe sends one tiny request; these bound what any client can make us hold.
_IDLE_TIMEOUT: Final = 10.0
_REQUESTS_PER_CONNECTION: Final = 100
_MAX_HEAD: Final = 16 * 1024
_READ_SIZE: Final = 4096
_READS_PER_REQUEST: Final = 1024


class ProbeSource(Protocol):
    """What the server reads: the driver's machine and failure."""

    @property
    def machine(self) -> WorkerMachine: ...

    @property
    def failure(self) -> BaseException | None: ...


async def serve_health(
    source: ProbeSource,
    *,
    host: str,
    port: int,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the bound port (for ``port=0``)."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        log.info("health server on %s:%d (/health, /ready)", host, bound)
        task_status.started(bound)
        await listener.serve(functools.partial(_connection, source))


async def _connection(source: ProbeSource, stream: anyio.abc.SocketStream) -> None:
    """One client connection: keep-alive requests until it closes, idles or misbehaves."""
    async with stream:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            for _ in range(_REQUESTS_PER_CONNECTION):
                request: h11.Request | None = None
                with anyio.move_on_after(_IDLE_TIMEOUT):
                    request = await _read_request(h, stream)
                if request is None:
                    return
                await stream.send(_respond(h, source, request))
                if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                    return
                h.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send_quietly(stream, _simple(h, exc.error_status_hint, b"bad request"))
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the client went away
        except Exception:  # never let one client take the listener down
            log.exception("health server: unexpected error on a connection")


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


def _respond(h: h11.Connection, source: ProbeSource, request: h11.Request) -> bytes:
    method = request.method
    if method not in (b"GET", b"HEAD"):
        return _simple(h, 405, b"method not allowed", extra=((b"Allow", b"GET, HEAD"),))
    path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
    reply = probe_reply(path, source.machine, source.failure)
    if reply is None:
        return _simple(h, 404, b"not found")
    status, body = reply
    return _encode(h, status, body, b"application/json", head=method == b"HEAD")


def _simple(
    h: h11.Connection,
    status: int,
    text: bytes,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    return _encode(h, status, text, b"text/plain; charset=utf-8", extra=extra)


def _encode(
    h: h11.Connection,
    status: int,
    body: bytes,
    content_type: bytes,
    *,
    head: bool = False,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    headers = [
        (b"Content-Type", content_type),
        (b"Content-Length", str(len(body)).encode()),
        (b"Cache-Control", b"no-store"),
        *extra,
    ]
    out = h.send(h11.Response(status_code=status, headers=headers)) or b""
    if not head:
        out += h.send(h11.Data(data=body)) or b""
    out += h.send(h11.EndOfMessage()) or b""
    return out


async def _send_quietly(stream: anyio.abc.SocketStream, data: bytes) -> None:
    try:
        with anyio.move_on_after(_IDLE_TIMEOUT):
            await stream.send(data)
    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass

"""A lean HTTP/1.1 transport for ``httpx.AsyncClient``: h11 over pooled anyio streams.

Why it exists: stock ``httpx.AsyncClient`` (httpcore underneath) costs several
times aiohttp's CPU per request (``/work/shared/spec/PERFORMANCE.md``); most of
the transport half of that goes to httpcore's general machinery (a pool with
locks and events, per-request trace hooks, anyio backend wrappers, HTTP/2 and
proxy plumbing). A worker only ever talks HTTP/1.1 to a few orchestrators, so
this transport keeps exactly what it needs:

* one pool of keep-alive connections per origin, one request per connection at
  a time (LIFO reuse, so the warmest connection goes first); a connection is
  reused only when h11 says the exchange ended cleanly, and an idle one is
  checked for a peer close before it is reused;
* a request that fails on a *reused* connection before any byte of a response
  arrived is retried once on a fresh connection (if its body is in memory):
  that is the keep-alive race (the server closed the idle connection as we
  sent), not a server failure;
* ``Content-Length`` and chunked bodies both ways (h11 frames them);
* a response whose body is already in hand when its head is parsed (the usual
  small JSON reply) is returned at once and the connection released; larger
  bodies stream, with the connection held until the body is read or closed;
* timeouts from the request's ``timeout`` extension, with anyio deadlines:
  ``connect`` bounds opening a connection, ``write`` each send, ``read`` each
  wait for response bytes (so a long poll needs a read timeout above the hold).

Content-Encoding is left to httpx, which decodes gzip/deflate (and br/zstd when
their packages are installed) from the headers, exactly as with the stock
transport. No proxies and no HTTP/2: use the stock transport for those.
"""

from __future__ import annotations

import select
import ssl
import time
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc
import h11
import httpx

__all__ = ["H11Transport"]

_DEFAULT_PORTS: Final = {b"http": 80, b"https": 443, b"ws": 80, b"wss": 443}
_READ_SIZE: Final = 65_536
# Reads that may yield no body byte in a row (h11 framing only) before giving up.
_MAX_EMPTY_READS: Final = 10_000
# Errors of a broken or closed connection, as raised by anyio streams and sockets.
_IO_ERRORS: Final = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)

_Origin = tuple[bytes, bytes, int]


class _NoResponseYet(Exception):
    """A reused connection failed before any response byte: safe to retry once."""


class _Connection:
    """One keep-alive connection: an anyio byte stream and its h11 client machine."""

    __slots__ = ("h11", "idle_since", "origin", "sock", "stream")

    def __init__(self, origin: _Origin, stream: anyio.abc.ByteStream, sock: Any) -> None:
        self.origin = origin
        self.stream = stream
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def peer_closed(self) -> bool:
        """True if the idle connection has a pending EOF or stray bytes (so: unusable).

        A readable idle socket can only mean the server closed it (or sent
        garbage); the check is one non-blocking ``select`` call.
        """
        sock = self.sock
        if sock is None:
            return False
        try:
            if sock.fileno() < 0:
                return True
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except _IO_ERRORS:  # pragma: no cover - closing a broken stream
                pass


class H11Transport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` speaking HTTP/1.1 with h11 over anyio streams.

    Runs on whatever anyio backend is current (asyncio or trio). Use one per
    event loop: pooled connections belong to the loop that opened them.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle_per_origin: int = 64,
        keepalive_expiry: float = 30.0,
    ) -> None:
        if max_idle_per_origin < 0:
            raise ValueError("max_idle_per_origin must not be negative")
        self._ssl_context = ssl_context
        self._max_idle = max_idle_per_origin
        self._expiry = keepalive_expiry
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._closed = False

    # -- the transport API ----------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(
                f"H11Transport speaks http and https, not {scheme.decode()!r}", request=request
            )
        origin = (scheme, url.raw_host, url.port or _DEFAULT_PORTS[scheme])
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        conn = await self._checkout(origin)
        if conn is not None:
            try:
                # Only an in-memory body can be sent twice; a stream is consumed by then.
                retryable = isinstance(request.stream, httpx.ByteStream)
                return await self._exchange(conn, request, timeouts, retryable=retryable)
            except _NoResponseYet:
                pass  # the keep-alive race: once more, on a new connection
        conn = await self._connect(origin, request, timeouts.get("connect"))
        try:
            return await self._exchange(conn, request, timeouts, retryable=False)
        except _NoResponseYet as exc:  # pragma: no cover - only raised for reused ones
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their exchange ends."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.aclose()

    async def __aenter__(self) -> H11Transport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    # -- the pool -------------------------------------------------------------------

    async def _checkout(self, origin: _Origin) -> _Connection | None:
        conns = self._idle.get(origin)
        if not conns:
            return None
        expired_before = time.monotonic() - self._expiry
        while conns:  # bounded: every iteration removes one connection
            conn = conns.pop()
            if conn.idle_since >= expired_before and not conn.peer_closed():
                return conn
            await conn.aclose()
        return None

    async def _checkin(self, conn: _Connection) -> None:
        """Back to the pool if h11 says the exchange ended cleanly and both sides keep it."""
        h = conn.h11
        if self._closed or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            await conn.aclose()
            return
        h.start_next_cycle()
        conns = self._idle.setdefault(conn.origin, [])
        if len(conns) >= self._max_idle:
            await conn.aclose()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # built once: loading the CA store is not cheap
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def _connect(
        self, origin: _Origin, request: httpx.Request, connect_timeout: float | None
    ) -> _Connection:
        scheme, raw_host, port = origin
        host = raw_host.decode("ascii")
        stream: anyio.abc.ByteStream
        try:
            with anyio.fail_after(connect_timeout):
                if scheme == b"https":
                    stream = await anyio.connect_tcp(
                        host,
                        port,
                        tls=True,
                        ssl_context=self._tls_context(),
                        tls_standard_compatible=False,
                    )
                else:
                    stream = await anyio.connect_tcp(host, port)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(
                f"connect timed out after {connect_timeout} s", request=request
            ) from exc
        except (*_IO_ERRORS, OSError) as exc:
            raise httpx.ConnectError(_describe(exc), request=request) from exc
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        return _Connection(origin, stream, sock)

    # -- one exchange ---------------------------------------------------------------

    async def _exchange(
        self,
        conn: _Connection,
        request: httpx.Request,
        timeouts: dict[str, float | None],
        *,
        retryable: bool,
    ) -> httpx.Response:
        """Send ``request`` on ``conn``; read the response head (and the body if at hand).

        ``retryable``: a failure before any response byte raises
        :class:`_NoResponseYet` (the caller retries on a new connection).

        An in-memory body (the worker's JSON) goes out in the same write as the
        head, and sending it plus waiting for the response head share one
        deadline (the larger of the read and write timeouts): one cancel scope
        per request instead of one per operation, which is measurable here.
        """
        h = conn.h11
        done = False
        sent = False
        got_bytes = False
        read_timeout = timeouts.get("read")
        try:
            try:
                out = h.send(
                    h11.Request(
                        method=request.method,
                        target=request.url.raw_path,
                        headers=request.headers.raw,
                    )
                )
                body_stream = request.stream
                in_memory = isinstance(body_stream, httpx.ByteStream)
                if in_memory:
                    body = request.content
                    if body:
                        out += h.send(h11.Data(data=body))
                    out += h.send(h11.EndOfMessage())
                    timeout = _larger(read_timeout, timeouts.get("write"))
                else:
                    await self._send_streaming(conn, out, body_stream, timeouts.get("write"))
                    sent = True
                    timeout = read_timeout
                with anyio.fail_after(timeout):
                    if not sent:
                        await conn.stream.send(out)
                        sent = True
                    event = h.next_event()
                    # bounded by the reply: each turn consumes received bytes or ends
                    while event is h11.NEED_DATA or type(event) is h11.InformationalResponse:
                        if event is h11.NEED_DATA:
                            try:
                                data = await conn.stream.receive(_READ_SIZE)
                            except anyio.EndOfStream:
                                data = b""
                            if data:
                                got_bytes = True
                            elif retryable and not got_bytes:
                                raise _NoResponseYet("the server closed the connection")
                            h.receive_data(data)
                        event = h.next_event()
            except TimeoutError as exc:
                if sent:
                    raise httpx.ReadTimeout(
                        f"no response within {timeout} s", request=request
                    ) from exc
                raise httpx.WriteTimeout(
                    f"send timed out after {timeout} s", request=request
                ) from exc
            except _IO_ERRORS as exc:
                if retryable and not got_bytes:
                    raise _NoResponseYet(_describe(exc)) from exc
                if sent:
                    raise httpx.ReadError(_describe(exc), request=request) from exc
                raise httpx.WriteError(_describe(exc), request=request) from exc
            except h11.LocalProtocolError as exc:
                raise httpx.LocalProtocolError(str(exc), request=request) from exc
            except h11.RemoteProtocolError as exc:
                if retryable and not got_bytes:
                    raise _NoResponseYet(str(exc)) from exc
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            if type(event) is not h11.Response:  # ConnectionClosed before a response
                if retryable and not got_bytes:
                    raise _NoResponseYet("the server closed the connection")
                raise httpx.RemoteProtocolError(
                    "the server closed the connection without a response", request=request
                )
            response = await self._response(conn, request, event, read_timeout)
            done = True
            return response
        finally:
            if not done:
                await conn.aclose()

    async def _send_streaming(
        self,
        conn: _Connection,
        head: bytes | None,
        body: httpx.SyncByteStream | httpx.AsyncByteStream,
        write_timeout: float | None,
    ) -> None:
        """A body that is not in memory: sent chunk by chunk, each within the write timeout."""
        if not isinstance(body, httpx.AsyncByteStream):
            raise TypeError("an AsyncClient request body must be an async stream")
        h = conn.h11
        with anyio.fail_after(write_timeout):
            await conn.stream.send(head or b"")
        async for chunk in body:
            if chunk:
                data = h.send(h11.Data(data=chunk))
                with anyio.fail_after(write_timeout):
                    await conn.stream.send(data or b"")
        with anyio.fail_after(write_timeout):
            await conn.stream.send(h.send(h11.EndOfMessage()) or b"")

    async def _response(
        self,
        conn: _Connection,
        request: httpx.Request,
        event: h11.Response,
        read_timeout: float | None,
    ) -> httpx.Response:
        """The response for ``event``: whole if its body is already here, else streaming."""
        h = conn.h11
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": event.reason}
        chunks: list[bytes] = []
        try:
            nxt = h.next_event()
            while type(nxt) is h11.Data:  # bounded by the bytes already received
                chunks.append(bytes(nxt.data))
                nxt = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        if type(nxt) is h11.EndOfMessage:  # the usual small reply: no stream needed
            await self._checkin(conn)
            return httpx.Response(
                event.status_code,
                headers=event.headers.raw_items(),
                stream=httpx.ByteStream(b"".join(chunks)),
                extensions=extensions,
            )
        if nxt is not h11.NEED_DATA:  # ConnectionClosed mid-body
            raise httpx.RemoteProtocolError(
                "the server closed the connection in the middle of the body", request=request
            )
        return httpx.Response(
            event.status_code,
            headers=event.headers.raw_items(),
            stream=_BodyStream(self, conn, request, chunks, read_timeout),
            extensions=extensions,
        )


class _BodyStream(httpx.AsyncByteStream):
    """The rest of a response body, read from the connection as it is consumed.

    An iterator object rather than an async generator: a body abandoned half
    way is then closed by :meth:`aclose` alone, with no generator for the
    event loop to finalise later.
    """

    def __init__(
        self,
        transport: H11Transport,
        conn: _Connection,
        request: httpx.Request,
        first: list[bytes],
        read_timeout: float | None,
    ) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._request = request
        self._pending = first
        self._timeout = read_timeout
        self._started = False

    def __aiter__(self) -> _BodyStream:
        if self._started:
            raise httpx.StreamConsumed()
        self._started = True
        return self

    async def __anext__(self) -> bytes:
        if self._pending:
            return self._pending.pop(0)
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        h = conn.h11
        request = self._request
        timeout = self._timeout
        try:
            for _ in range(_MAX_EMPTY_READS):  # each turn reads bytes or returns
                event = h.next_event()
                if event is h11.NEED_DATA:
                    with anyio.fail_after(timeout):
                        try:
                            data = await conn.stream.receive(_READ_SIZE)
                        except anyio.EndOfStream:
                            data = b""
                    h.receive_data(data)
                elif type(event) is h11.Data:
                    return bytes(event.data)
                elif type(event) is h11.EndOfMessage:
                    self._conn = None
                    await self._transport._checkin(conn)
                    raise StopAsyncIteration
                else:
                    raise httpx.RemoteProtocolError(
                        "the server closed the connection in the middle of the body",
                        request=request,
                    )
            raise httpx.RemoteProtocolError("no body data in many reads", request=request)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"no data within {timeout} s", request=request) from exc
        except _IO_ERRORS as exc:
            raise httpx.ReadError(_describe(exc), request=request) from exc
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc

    async def aclose(self) -> None:
        """A body closed before its end leaves the connection mid-message: close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()


def _larger(a: float | None, b: float | None) -> float | None:
    """The larger of two timeouts, where None means no limit."""
    if a is None or b is None:
        return None
    return max(a, b)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

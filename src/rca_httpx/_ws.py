"""A WebSocket client on wsproto over anyio streams: the command channel, on asyncio or trio.

wsproto is the protocol (handshake, framing, control frames) as a sans-IO
machine; this module feeds it bytes from an anyio TCP (or TLS) stream and
sends what it produces. Only what the command channel needs is here: text
and binary messages, pings that detect a dead peer, and a bounded closing
handshake. Nothing in it runs on a timer of its own: the idle check lives in
:meth:`WebSocket.receive`, which the channel task is always waiting in.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Final
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError

__all__ = ["WebSocket", "WebSocketError", "connect_websocket"]

_READ_SIZE: Final = 65_536
_DEFAULT_PORTS: Final = {"ws": 80, "wss": 443}
_IO_ERRORS: Final = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


class WebSocketError(Exception):
    """The WebSocket could not be opened, or broke: the message says why (never a header)."""


class WebSocket:
    """An open client WebSocket. Receive from one task; send from any number of tasks."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        conn: WSConnection,
        *,
        ping_interval: float,
        ping_timeout: float,
        max_message: int,
    ) -> None:
        self._stream = stream
        self._ws = conn
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_message = max_message
        self._send_lock = anyio.Lock()
        self._messages: deque[str | bytes] = deque()
        self._parts: list[str | bytes] = []
        self._part_size = 0
        self._accepted = False
        self._rejected: int | None = None
        self._stream_closed = False
        self.close_code: int | None = None
        self.close_reason = ""

    # -- receiving ------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str | bytes]:
        while True:  # ends when the socket closes; every turn waits for a message
            message = await self.receive()
            if message is None:
                return
            yield message

    async def receive(self) -> str | bytes | None:
        """The next message, or None once the WebSocket is closed (see :attr:`close_code`).

        Waits for bytes at most ``ping_interval`` at a time: after that much
        silence it sends a ping, and if ``ping_timeout`` more passes without a
        single byte the peer is declared dead (:class:`WebSocketError`).
        """
        pinged = False
        while not self._messages:  # every turn reads from the network or ends
            if self.close_code is not None:
                return None
            timeout = self._ping_timeout if pinged else self._ping_interval
            data: bytes | None = None
            with anyio.move_on_after(timeout) as idle:
                try:
                    data = await self._stream.receive(_READ_SIZE)
                except anyio.EndOfStream:
                    data = None
                except _IO_ERRORS as exc:
                    self._lost(f"connection lost: {_describe(exc)}")
                    raise WebSocketError(self.close_reason) from exc
            if idle.cancelled_caught:
                if pinged:
                    self._lost(f"no reply to a ping within {self._ping_timeout:g} s")
                    raise WebSocketError(self.close_reason)
                pinged = True
                await self._send_event(Ping(payload=b"rca"))
                continue
            pinged = False
            if data is None:  # EOF without a closing handshake
                self._lost("the connection closed without a closing handshake")
                await self._close_stream()
                return None
            try:
                self._ws.receive_data(data)
            except ProtocolError as exc:
                self._lost(f"protocol error: {exc}")
                raise WebSocketError(self.close_reason) from exc
            await self._handle_events()
        return self._messages.popleft()

    async def _handle_events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, TextMessage):
                self._add_part(event.data, event.message_finished)
            elif isinstance(event, BytesMessage):
                self._add_part(bytes(event.data), event.message_finished)
            elif isinstance(event, Ping):
                await self._send_event(event.response())
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                self.close_reason = f"closed by the peer (code {event.code}{_reason(event)})"
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._send_event(event.response())
                await self._close_stream()
            elif isinstance(event, AcceptConnection):
                self._accepted = True
            elif isinstance(event, RejectConnection):
                self._rejected = event.status_code
            elif isinstance(event, RejectData):
                pass  # the body of a refusal: the status says enough
            # Pong: any bytes already proved the peer alive

    def _add_part(self, data: str | bytes, finished: bool) -> None:
        self._part_size += len(data)
        if self._part_size > self._max_message:
            raise WebSocketError(f"message larger than {self._max_message} bytes")
        self._parts.append(data)
        if finished:
            parts, self._parts, self._part_size = self._parts, [], 0
            if isinstance(parts[0], str):
                self._messages.append("".join(p for p in parts if isinstance(p, str)))
            else:
                self._messages.append(b"".join(p for p in parts if isinstance(p, bytes)))

    # -- sending --------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send one text message (:class:`WebSocketError` if the socket is closed or broken)."""
        await self._send_event(TextMessage(data=text))

    async def _send_event(self, event: Event) -> None:
        # Serialising under the lock keeps wsproto's state and the bytes on the wire in order.
        async with self._send_lock:
            if self._stream_closed:
                raise WebSocketError("the WebSocket is closed")
            try:
                data = self._ws.send(event)
                await self._stream.send(data)
            except ProtocolError as exc:
                raise WebSocketError(f"cannot send now: {exc}") from exc
            except _IO_ERRORS as exc:
                raise WebSocketError(f"send failed: {_describe(exc)}") from exc

    # -- closing --------------------------------------------------------------------

    async def aclose(self, code: int = 1000, *, close_timeout: float = 2.0) -> None:
        """Closing handshake (bounded by ``close_timeout``), then the stream; safe to call twice.

        Shielded: a cancelled channel task still says goodbye properly, but never
        waits more than ``close_timeout`` for the peer's answer.
        """
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(close_timeout):
                if not self._stream_closed and self._ws.state is ConnectionState.OPEN:
                    try:
                        await self._send_event(CloseConnection(code=code))
                    except WebSocketError:
                        pass
                    else:
                        await self._await_close_reply()
            await self._close_stream()
        if self.close_code is None:
            self.close_code = code
            self.close_reason = f"closed by us (code {code})"

    async def _await_close_reply(self) -> None:
        for _ in range(64):  # a few reads; the deadline around us bounds the time
            if self._ws.state is ConnectionState.CLOSED or self._stream_closed:
                return
            try:
                data = await self._stream.receive(_READ_SIZE)
            except _IO_ERRORS:
                return
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, CloseConnection):
                    return

    def _lost(self, reason: str) -> None:
        self.close_code = 1006
        self.close_reason = reason

    async def _close_stream(self) -> None:
        if self._stream_closed:
            return
        self._stream_closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._stream.aclose()
            except _IO_ERRORS:  # pragma: no cover - closing a broken stream
                pass


async def connect_websocket(
    url: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    open_timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    ping_interval: float = 20.0,
    ping_timeout: float = 20.0,
    max_message: int = 4 * 1024 * 1024,
) -> WebSocket:
    """Open ``url`` (``ws://`` or ``wss://``): TCP, TLS and the upgrade within ``open_timeout``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise WebSocketError(f"not a WebSocket URL: {parts.scheme}://{parts.hostname or ''}")
    host = parts.hostname
    port = parts.port or _DEFAULT_PORTS[scheme]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = host if ":" not in host else f"[{host}]"
    if parts.port is not None:
        authority += f":{parts.port}"
    stream: anyio.abc.ByteStream | None = None
    try:
        with anyio.fail_after(open_timeout):
            if scheme == "wss":
                stream = await anyio.connect_tcp(
                    host,
                    port,
                    tls=True,
                    ssl_context=ssl_context or ssl.create_default_context(),
                    tls_standard_compatible=False,
                )
            else:
                stream = await anyio.connect_tcp(host, port)
            conn = WSConnection(ConnectionType.CLIENT)
            ws = WebSocket(
                stream,
                conn,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                max_message=max_message,
            )
            request = Request(
                host=authority,
                target=target,
                extra_headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            )
            await stream.send(conn.send(request))
            for _ in range(256):  # the handshake reply; the deadline bounds the time
                if ws._accepted:
                    return ws
                if ws._rejected is not None:
                    raise WebSocketError(f"upgrade refused: HTTP {ws._rejected}")
                data = await stream.receive(_READ_SIZE)
                conn.receive_data(data)
                await ws._handle_events()
            raise WebSocketError("no reply to the upgrade request")
    except TimeoutError:
        await _close(stream)
        raise WebSocketError(f"could not open the WebSocket within {open_timeout:g} s") from None
    except WebSocketError:
        await _close(stream)
        raise
    except ProtocolError as exc:
        await _close(stream)
        raise WebSocketError(f"bad upgrade reply: {exc}") from exc
    except _IO_ERRORS as exc:
        await _close(stream)
        raise WebSocketError(_describe(exc)) from exc
    except BaseException:
        await _close(stream)
        raise


async def _close(stream: anyio.abc.ByteStream | None) -> None:
    if stream is not None:
        with anyio.CancelScope(shield=True):
            try:
                await stream.aclose()
            except _IO_ERRORS:  # pragma: no cover
                pass


def _reason(event: CloseConnection) -> str:
    return f": {event.reason}" if event.reason else ""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

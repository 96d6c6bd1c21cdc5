"""A trio-websocket connection as a :class:`trio.abc.Stream` of agent frame bytes.

:class:`corral.actors.channel.AgentChannel` speaks to any trio byte stream. Over cloud
that stream is the ``corral.v1`` WebSocket of ``corral serve``: ``send_all`` sends
one binary message, ``receive_some`` hands out received messages piece by piece.
Message boundaries carry no meaning (frames carry their own lengths).

A connection lives in a *holder* task in the driver's nursery (trio-websocket needs a
nursery for its reader), so the stream can be handed to the actor like a socket.
``aclose`` only tells the holder to go; the holder closes the socket (closing
handshake bounded by ``disconnect_timeout``). When the server ends the connection,
``receive_some`` returns EOF for a normal close (1000) and raises
``BrokenResourceError`` otherwise; either way the channel fails its requests in flight
at once, and ``on_lost`` runs (the driver checks the sandbox's status right away).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from ...protocol import MAX_FRAME

__all__ = ["MAX_MESSAGE", "WebSocketStream", "hold_websocket"]

log = logging.getLogger("corral.drivers.cloud")

MAX_MESSAGE = MAX_FRAME + 64 * 1024
"""Largest WebSocket message accepted: one whole frame (4 MiB) and then some."""
RECEIVE_BUFFER = 64 * 1024
CONNECT_TIMEOUT = 10.0
DISCONNECT_TIMEOUT = 2.0
NORMAL_CLOSURE = 1000


class WebSocketStream(trio.abc.Stream):
    """Binary WebSocket messages as a byte stream (one reader, one writer at a time)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._pending = memoryview(b"")
        self._closed = False
        self.finished = trio.Event()
        """Set once the stream is of no more use (closed by us, or lost)."""
        self.lost_reason: str | None = None

    @property
    def subprotocol(self) -> str | None:
        return self._ws.subprotocol

    def _lost(self, exc: ConnectionClosed) -> int | None:
        """Record why the connection ended; its close code (None when unknown)."""
        reason = exc.reason
        if reason is None:
            self.lost_reason = "connection lost"
            code = None
        else:
            extra = f" ({reason.reason})" if reason.reason else ""
            self.lost_reason = f"{reason.code} {reason.name}{extra}"
            code = reason.code
        self.finished.set()
        return code

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the agent websocket is closed")
        try:
            await self._ws.send_message(bytes(data))
        except ConnectionClosed as exc:
            self._lost(exc)
            raise trio.BrokenResourceError(f"agent websocket closed: {self.lost_reason}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the agent websocket is closed")
        while not self._pending:
            try:
                message = await self._ws.get_message()
            except ConnectionClosed as exc:
                if self._lost(exc) == NORMAL_CLOSURE:
                    return b""
                raise trio.BrokenResourceError(
                    f"agent websocket closed: {self.lost_reason}"
                ) from exc
            if isinstance(message, str):
                self.lost_reason = "the server sent a text message"
                self.finished.set()
                raise trio.BrokenResourceError("agent websocket: text message on corral.v1")
            self._pending = memoryview(message)
        size = len(self._pending) if max_bytes is None else max(1, max_bytes)
        chunk, self._pending = self._pending[:size], self._pending[size:]
        return bytes(chunk)

    async def aclose(self) -> None:
        self._closed = True
        self.finished.set()
        await trio.lowlevel.checkpoint()


TcpStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


async def _open_tcp(url: str, ssl_context: ssl.SSLContext | None) -> tuple[TcpStream, str, str]:
    """The TCP (or TLS) stream for ``url``, the Host header and the resource."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    header = host if port in (80, 443) else f"{host}:{port}"
    if ":" in host and port not in (80, 443):
        header = f"[{host}]:{port}"
    stream: TcpStream
    if secure:
        context = ssl_context or ssl.create_default_context()
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=context, https_compatible=True
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    return stream, header, resource


def _one_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The single non-Cancelled leaf of ``group``, if there is exactly one."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


async def hold_websocket(
    url: str,
    *,
    headers: list[tuple[bytes, bytes]],
    subprotocol: str,
    ssl_context: ssl.SSLContext | None,
    on_lost: Callable[[], None],
    task_status: trio.TaskStatus[WebSocketStream] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open ``url`` and hand its stream to the starter; keep it open until finished.

    Errors before the stream is handed over (a refused upgrade: ``ConnectionRejected``;
    the network: ``OSError``/``HandshakeError``; ``trio.TooSlowError``) go to the starter
    (``nursery.start``); later ones only end the connection. The TCP stream is opened
    and always closed here: trio-websocket leaves it open after a refused upgrade or a
    close the server started.
    """
    with trio.fail_after(CONNECT_TIMEOUT):
        tcp, host, resource = await _open_tcp(url, ssl_context)
    started = False
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(CONNECT_TIMEOUT):
                ws = await wrap_client_stream(
                    nursery,
                    tcp,
                    host,
                    resource,
                    subprotocols=[subprotocol],
                    extra_headers=headers,
                    message_queue_size=1,
                    max_message_size=MAX_MESSAGE,
                    receive_buffer_size=RECEIVE_BUFFER,
                )
            stream = WebSocketStream(ws)
            task_status.started(stream)
            started = True
            await stream.finished.wait()
            if not stream._closed:
                on_lost()
            with trio.move_on_after(DISCONNECT_TIMEOUT):
                await ws.aclose()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        error = _one_error(group)
        if started:
            log.debug("agent websocket %s ended: %r", url, group)
            if not stream._closed:
                on_lost()
        elif error is not None:
            raise error from None
        else:
            raise
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(tcp)

"""``WS /v1/sandboxes/{id}/corral``: corral's own agent frames, relayed to the sandbox.

corral's cloud driver (:mod:`corral.drivers.cloud`) opens this socket with the
subprotocol ``corral.v1`` (any other offer is refused with a 400 before the upgrade)
and speaks :mod:`corral.protocol` over it exactly as it would over the agent's Unix
socket: its own ``Hello``, then multiplexed requests. The relay opens a fresh
connection to the sandbox's agent (``Supervisor.connect_agent``) per socket and moves
bytes both ways. It is called by :class:`corral.server.app.App` after auth and the
org-scoped lookup, so another org's sandbox is already a 404.

- Whole frames: each direction cuts the byte stream at frame boundaries (headers only)
  so every WebSocket message holds whole frames, and the relay can answer a frame
  itself without tearing a frame in the other direction.
- No ``Shutdown`` from the client: a stop must go through the control plane's
  lifecycle (``POST …/stop``: recorded, logged, ephemeral sandboxes removed), not
  end the agent behind the server's back. Client frames are decoded (the agent's own
  decoder, so both sides see the same message); a ``Shutdown`` is answered with
  ``ErrorReply(unsupported)`` and never reaches the agent; an undecodable frame closes
  the socket (1008).
- Bounded, back-pressured: the next chunk is read from the agent only after the last
  WebSocket send completed, the next client message only after the agent took the
  last (hypercorn queues at most 4 inbound messages); each direction holds at most one
  partial frame (≤ 4 MiB).
- The socket counts as an agent session for ``idle_timeout_secs``. When the agent
  connection ends (the sandbox stopped) the socket closes (1000); when the client
  goes, the agent connection is closed (its execs end with it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..drivers.cloud.wire import SUBPROTOCOL
from ..errors import CorralError, ProtocolError, SandboxNotFound
from ..protocol import HEADER_SIZE, MAX_FRAME, TERMINAL, ErrorReply, Shutdown, decode_body, encode
from .http import ApiError, Receive, Scope, Send, deny_websocket
from .service import ControlPlane
from .store import SandboxRecord

__all__ = ["SUBPROTOCOL", "CorralRelay", "FrameCutter", "relay_for"]

log = logging.getLogger("corral.server")

AGENT_READ = 256 * 1024
NORMAL = 1000
POLICY = 1008
INTERNAL = 1011

ConnectAgent = Callable[[str], Awaitable[trio.abc.Stream]]


class FrameCutter:
    """Cuts a byte stream into whole raw frames (sans-I/O; reads headers only)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The whole frames now available (header included); ProtocolError on garbage."""
        self._buf += data
        buf = self._buf
        frames: list[bytes] = []
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            length = int.from_bytes(buf[pos : pos + 4], "big")
            if length < HEADER_SIZE - 4:
                raise ProtocolError(f"frame length {length} is shorter than its header")
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self._max}-byte limit")
            end = pos + 4 + length
            if len(buf) < end:
                break
            frames.append(bytes(buf[pos:end]))
            pos = end
        if pos:
            del buf[:pos]
        return frames


def refused_reply(frame: bytes) -> bytes | None:
    """The answer the relay gives itself to a client frame, or None to forward it."""
    msg = decode_body(memoryview(frame)[HEADER_SIZE:])
    if isinstance(msg, Shutdown):
        request_id = int.from_bytes(frame[4:8], "big")
        reply = ErrorReply(
            code="unsupported",
            message="Shutdown is not relayed: stop the sandbox with POST /v1/sandboxes/{id}/stop",
        )
        return encode(request_id, reply, TERMINAL)
    return None


class ClientGoneError(Exception):
    """The client went away while the relay was sending to it."""


class CorralRelay:
    """The ``/corral`` route handler (``App(plane, relay=CorralRelay(...))``)."""

    def __init__(self, plane: ControlPlane, connect_agent: ConnectAgent) -> None:
        self.plane = plane
        self._connect_agent = connect_agent
        self.live: set[trio.CancelScope] = set()
        """One cancel scope per open relay (``drop_all`` ends them abruptly)."""
        self._dropped: set[trio.CancelScope] = set()

    def drop_all(self) -> int:
        """Cut every open relay at once, without a closing handshake (tests, admin)."""
        for scope in self.live:
            self._dropped.add(scope)
            scope.cancel()
        return len(self.live)

    async def __call__(
        self, rec: SandboxRecord, scope: Scope, receive: Receive, send: Send
    ) -> None:
        offered = [str(p) for p in scope.get("subprotocols") or ()]
        try:
            if SUBPROTOCOL not in offered:
                raise ApiError(
                    400,
                    "unsupported_subprotocol",
                    f"this route speaks the {SUBPROTOCOL!r} WebSocket subprotocol"
                    f" (Sec-WebSocket-Protocol); offered: {', '.join(offered) or 'none'}",
                )
            try:
                await self.plane.agent_target(rec)  # 409 unless running (waits for starting)
                agent = await self._connect_agent(rec.id)
            except SandboxNotFound:
                raise ApiError(
                    409, "sandbox_not_running", f"sandbox {rec.name!r} is not running"
                ) from None
            except (CorralError, OSError) as exc:
                raise ApiError(
                    409, "sandbox_not_running", f"cannot reach the agent of {rec.name!r}: {exc}"
                ) from None
        except ApiError as err:
            await deny_websocket(scope, send, err)
            return
        await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
        session = self.plane.session_started(rec)
        ws = _Socket(send)
        with trio.CancelScope() as cancel:
            self.live.add(cancel)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._upstream, receive, agent, ws, session.touch, cancel)
                    nursery.start_soon(self._downstream, agent, ws, cancel)
            finally:
                self.live.discard(cancel)
                session.end()
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(agent)
        if cancel in self._dropped:
            self._dropped.discard(cancel)
            return  # dropped on purpose: hypercorn ends the socket (1011), no handshake
        if not ws.disconnected:
            with trio.CancelScope(shield=True):
                await ws.close(ws.close_code or NORMAL, ws.close_reason)

    async def _upstream(
        self,
        receive: Receive,
        agent: trio.abc.Stream,
        ws: _Socket,
        touch: Callable[[], None],
        cancel: trio.CancelScope,
    ) -> None:
        """Client → agent, whole frames, Shutdown answered here."""
        cutter = FrameCutter()
        try:
            while True:
                msg: dict[str, Any] = dict(await receive())
                if msg["type"] == "websocket.disconnect":
                    ws.disconnected = True
                    break
                if msg["type"] != "websocket.receive" or msg.get("bytes") is None:
                    continue
                touch()
                forward: list[bytes] = []
                for frame in cutter.feed(msg["bytes"]):
                    reply = refused_reply(frame)
                    if reply is None:
                        forward.append(frame)
                    else:
                        await ws.send(reply)
                if forward:
                    await agent.send_all(b"".join(forward))
        except ProtocolError as exc:
            ws.close_code, ws.close_reason = POLICY, f"protocol error: {exc}"[:120]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ws.close_code, ws.close_reason = INTERNAL, "the agent connection was lost"
        cancel.cancel()

    async def _downstream(
        self, agent: trio.abc.Stream, ws: _Socket, cancel: trio.CancelScope
    ) -> None:
        """Agent → client, whole frames; the next read waits for the send."""
        cutter = FrameCutter()
        try:
            while True:
                data = await agent.receive_some(AGENT_READ)
                if not data:
                    ws.close_code = ws.close_code or NORMAL
                    ws.close_reason = "the agent closed the connection"
                    break
                frames = cutter.feed(data)
                if frames:
                    await ws.send(b"".join(frames))
        except ProtocolError as exc:
            ws.close_code, ws.close_reason = INTERNAL, f"agent protocol error: {exc}"[:120]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ws.close_code, ws.close_reason = INTERNAL, "the agent connection was lost"
        except ClientGoneError:
            ws.disconnected = True
        cancel.cancel()


class _Socket:
    """The accepted ASGI WebSocket: one sender at a time, close state."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = trio.Lock()
        self.disconnected = False
        self.close_code: int | None = None
        self.close_reason: str | None = None

    async def send(self, data: bytes) -> None:
        async with self._lock:
            try:
                await self._send({"type": "websocket.send", "bytes": data})
            except OSError as exc:  # hypercorn: the client is gone
                raise ClientGoneError(str(exc)) from exc

    async def close(self, code: int, reason: str | None) -> None:
        async with self._lock:
            message: dict[str, Any] = {"type": "websocket.close", "code": code}
            if reason:
                message["reason"] = reason
            try:
                await self._send(message)
            except OSError:
                pass


def relay_for(plane: ControlPlane, sandboxes: object) -> CorralRelay | None:
    """The relay when the sandbox host can hand out agent streams (``connect_agent``)."""
    connect = getattr(sandboxes, "connect_agent", None)
    if connect is None:
        return None
    return CorralRelay(plane, connect)

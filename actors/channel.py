"""Host side of one agent connection: many conversations multiplexed by request id.

A reader task decodes frames and routes each to its conversation's bounded memory
channel. Routing never blocks: conversations are flow controlled (exec output by
credit, everything else by one reply per request), so a full route means the peer
broke the rules, and only that conversation fails. When the connection dies, every
conversation in flight fails at once with :class:`AgentGone` (or the protocol error
that killed it): no caller waits on a dead agent.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from ..errors import AgentError, AgentGone, CorralError, ProtocolError, error_from_code
from ..protocol import (
    PROTOCOL_VERSION,
    SESSION_START,
    Cancel,
    ErrorReply,
    Frame,
    FrameDecoder,
    Hello,
    Message,
    Ready,
    encode,
)

HANDSHAKE_TIMEOUT = 10.0
ROUTE_CAPACITY = 1 << 16
"""Frames one conversation may have queued. Exec credit counts bytes, not frames, so up
to ``Exec.window`` tiny output frames may legitimately be in flight (one 256 KiB read
can hold thousands); this is a backstop against a runaway agent, not flow control."""
RECEIVE_SIZE = 256 * 1024
SEND_TIMEOUT = 10.0
"""How long one frame may take to write before the agent counts as gone. Frames are
written whole even when the sender is cancelled: a half-written frame would corrupt the
stream for every conversation."""

M = TypeVar("M", bound=Message)


def raise_for_error(msg: Message) -> None:
    """Raise the typed error an ErrorReply carries."""
    if isinstance(msg, ErrorReply):
        raise error_from_code(msg.code, msg.message, msg.errno)


class Conversation:
    """One request id on a channel: send follow-ups, receive replies until TERMINAL."""

    def __init__(self, channel: AgentChannel, id: int) -> None:
        self.id = id
        self._channel = channel
        self._send, self._recv = trio.open_memory_channel[Frame](ROUTE_CAPACITY)
        self._error: CorralError | None = None
        self.done = False

    # called by the channel's reader -------------------------------------------------------
    def _deliver(self, frame: Frame) -> None:
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            self._fail(ProtocolError(f"agent overran the flow-control window of request {self.id}"))
            self._channel._drop(self.id)
            return
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        if frame.terminal:
            self._send.close()
            self._channel._drop(self.id)

    def _fail(self, error: CorralError) -> None:
        if self._error is None:
            self._error = error
        self._send.close()

    # used by the caller ------------------------------------------------------------------
    async def send(self, msg: Message, flags: int = 0) -> None:
        await self._channel._send_frame(self.id, msg, flags)

    async def receive(self) -> Message:
        """Next reply. ErrorReply raises its typed error; a dead channel raises AgentGone."""
        try:
            frame = await self._recv.receive()
        except trio.EndOfChannel:
            self.done = True
            if self._error is not None:
                raise self._error from None
            raise AgentGone(f"conversation {self.id} already ended") from None
        if frame.terminal:
            self.done = True
        raise_for_error(frame.msg)
        return frame.msg

    async def expect(self, kind: type[M]) -> M:
        msg = await self.receive()
        if not isinstance(msg, kind):
            raise ProtocolError(f"expected {kind.__name__}, agent sent {type(msg).__name__}")
        return msg

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while not self.done:
            yield await self.receive()


class AgentChannel:
    """Multiplexes conversations over one byte stream to an agent."""

    def __init__(self, stream: trio.abc.Stream, *, label: str = "agent") -> None:
        self._stream = stream
        self._label = label
        self._send_lock = trio.Lock()
        self._routes: dict[int, Conversation] = {}
        self._next_id = 1
        self._error: CorralError | None = None
        self.ready: Ready | None = None
        self.closed = trio.Event()

    @classmethod
    @asynccontextmanager
    async def open(
        cls, stream: trio.abc.Stream, *, label: str = "agent", timeout: float = HANDSHAKE_TIMEOUT
    ) -> AsyncIterator[AgentChannel]:
        """Handshake, run the reader in the background, close everything on exit."""
        channel = cls(stream, label=label)
        try:
            await channel.handshake(timeout)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(channel.run)
                try:
                    yield channel
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()

    async def handshake(self, timeout: float = HANDSHAKE_TIMEOUT) -> Ready:
        """Send Hello, wait for Ready (reading frames directly, before ``run``)."""
        await self._send_frame(0, Hello(version=PROTOCOL_VERSION))
        decoder = FrameDecoder()
        with trio.move_on_after(timeout) as scope:
            while True:
                try:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise AgentGone(f"{self._label}: connection lost during handshake") from exc
                if not data:
                    raise AgentGone(f"{self._label}: agent closed the connection during handshake")
                frames = decoder.feed(data)
                if frames:
                    break
        if scope.cancelled_caught:
            raise AgentGone(f"{self._label}: no handshake from the agent within {timeout:g}s")
        first = frames[0].msg
        raise_for_error(first)
        if not isinstance(first, Ready):
            raise ProtocolError(f"{self._label}: expected Ready, got {type(first).__name__}")
        if first.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"{self._label}: agent speaks protocol {first.version}, host {PROTOCOL_VERSION}"
            )
        if len(frames) > 1 or decoder.buffered:
            raise ProtocolError(f"{self._label}: agent sent frames before any request")
        self.ready = first
        return first

    async def run(self) -> None:
        """Reader loop: route frames until the connection ends, then fail the rest."""
        decoder = FrameDecoder()
        error: CorralError = AgentGone(f"{self._label}: agent closed the connection")
        try:
            while True:
                data = await self._stream.receive_some(RECEIVE_SIZE)
                if not data:
                    if decoder.buffered:  # the agent died part-way through a frame
                        error = AgentGone(
                            f"{self._label}: connection lost inside a frame "
                            f"({decoder.buffered} bytes left over)"
                        )
                    break
                for frame in decoder.feed(data):
                    route = self._routes.get(frame.id)
                    if route is not None:
                        route._deliver(frame)
        except ProtocolError as exc:
            error = exc
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            error = AgentGone(f"{self._label}: connection to the agent was lost")
        finally:
            self._fail_all(error)

    def _fail_all(self, error: CorralError) -> None:
        if self._error is None:
            self._error = error
        routes, self._routes = self._routes, {}
        for route in routes.values():
            route._fail(error)
        self.closed.set()

    def _drop(self, id: int) -> None:
        self._routes.pop(id, None)

    def _allocate(self) -> Conversation:
        if self._error is not None:
            raise self._error
        while True:
            id = self._next_id
            self._next_id = 1 if id >= 0xFFFFFFFF else id + 1
            if id not in self._routes:
                break
        conv = Conversation(self, id)
        self._routes[id] = conv
        return conv

    async def _send_frame(self, id: int, msg: Message, flags: int = 0) -> None:
        if self._error is not None:
            raise self._error
        data = encode(id, msg, flags)
        async with self._send_lock:
            if self._error is not None:
                raise self._error
            # Shielded: a send_all cancelled part-way leaves the stream in an unknown
            # state. Bounded: an agent that stops reading is treated as gone.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + SEND_TIMEOUT
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._fail_all(AgentGone(f"{self._label}: connection to the agent was lost"))
                    raise AgentGone(f"{self._label}: connection to the agent was lost") from exc
            if scope.cancelled_caught:
                error = AgentGone(f"{self._label}: agent stopped reading (send timed out)")
                self._fail_all(error)
                raise error
        await trio.lowlevel.checkpoint_if_cancelled()

    @property
    def alive(self) -> bool:
        return self._error is None

    @property
    def in_flight(self) -> int:
        return len(self._routes)

    @asynccontextmanager
    async def conversation(self, request: Message) -> AsyncIterator[Conversation]:
        """Open a conversation; leaving it before its terminal frame sends Cancel."""
        conv = self._allocate()
        try:
            await conv.send(request, SESSION_START)
            yield conv
        finally:
            if not conv.done and self._routes.get(conv.id) is conv and self.alive:
                with trio.move_on_after(1.0, shield=True):
                    try:
                        await conv.send(Cancel())
                    except CorralError:
                        pass
            self._drop(conv.id)

    async def request(self, request: Message, *, timeout: float = math.inf) -> Message:
        """Send one request and return its single (terminal) reply."""
        async with self.conversation(request) as conv:
            with trio.move_on_after(timeout):
                return await conv.receive()
        raise AgentError(f"{self._label}: no reply to {type(request).__name__} within {timeout:g}s")

    async def aclose(self) -> None:
        self._fail_all(AgentGone(f"{self._label}: channel closed"))
        await trio.aclose_forcefully(self._stream)

"""One host connection: handshake, request routing by id, replies.

The host speaks first (``Hello`` on id 0). After that every frame either opens a
conversation (a request) or belongs to one (``ExecStdin``, ``ExecSignal``,
``ExecResize``, ``ExecCredit``, ``LogAck``, ``Cancel``); follow-ups for an id with no
live conversation are dropped. Jobs (``agentd.jobs``) and the log ring
(``agentd.logring``) belong to the agent, not to a connection: a connection only holds
its ``JobWait`` and ``LogSubscribe`` conversations. Garbage closes this connection only, after an
``ErrorReply`` on id 0. Writing back-pressure pauses both the exec output readers
and the reading of new requests.
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from typing import TYPE_CHECKING, cast

import msgspec

from ..errors import ProtocolError
from ..protocol.framing import TERMINAL, Frame, FrameDecoder, encode
from ..protocol.messages import (
    PROTOCOL_VERSION,
    Cancel,
    ErrorReply,
    Exec,
    ExecCredit,
    ExecResize,
    ExecSignal,
    ExecStdin,
    FsCopy,
    FsExists,
    FsList,
    FsMkdir,
    FsRead,
    FsRemove,
    FsRename,
    FsStat,
    FsSymlink,
    FsWrite,
    Hello,
    JobKill,
    JobList,
    JobStart,
    JobWait,
    LogAck,
    LogSubscribe,
    Ping,
    Pong,
    Ready,
    Shutdown,
)
from . import fs
from .execs import ExecSession
from .jobs import JobWaiter
from .logring import LogSubscription

if TYPE_CHECKING:
    from ..protocol.messages import Message
    from .agent import Agent

AGENT_VERSION = "corral-agentd 0.1.0"

FOLLOW_UPS = (ExecStdin, ExecSignal, ExecResize, ExecCredit, LogAck, Cancel)
FS_REQUESTS = (
    FsRead,
    FsWrite,
    FsStat,
    FsList,
    FsMkdir,
    FsRemove,
    FsCopy,
    FsRename,
    FsExists,
    FsSymlink,
)

WRITE_HIGH = 4 << 20
"""Transport buffer size at which the connection pauses output and request reading."""

CLOSE_WAIT = 2.0
"""How long a closing connection may take to flush before it is aborted."""


class Busy:
    """A conversation with no follow-ups of its own (a threaded fs op, a Shutdown)."""

    def follow_up(self, msg: Message) -> None:
        pass

    def flow_changed(self) -> None:
        pass

    def end_now(self) -> None:
        pass


class Connection(asyncio.Protocol):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.ready = False
        self.closing = False
        self.paused = False
        self.convs: dict[int, ExecSession | Busy | JobWaiter | LogSubscription] = {}

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH)
        self.agent.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            self.fail(exc.code, exc.message)
            return
        for frame in frames:
            if self.is_closing():
                return
            try:
                self.handle(frame)
            except Exception as exc:  # a bug here must not take the other requests down
                traceback.print_exc(file=sys.stderr)
                if frame.id not in self.convs:
                    err = ErrorReply(code="agent_error", message=f"{type(exc).__name__}: {exc}")
                    self.send(frame.id, err, TERMINAL)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.agent.connections.discard(self)
        convs = list(self.convs.values())
        self.convs.clear()
        for conv in convs:
            conv.end_now()

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        for conv in list(self.convs.values()):
            conv.flow_changed()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()
        for conv in list(self.convs.values()):
            conv.flow_changed()

    # -- sending -----------------------------------------------------------------------------

    def send(self, id: int, msg: Message, flags: int = 0) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            frame = encode(id, msg, flags)
        except (ProtocolError, msgspec.EncodeError) as exc:
            code = exc.code if isinstance(exc, ProtocolError) else "agent_error"
            frame = encode(id, ErrorReply(code=code, message=f"reply not sent: {exc}"), flags)
        transport.write(frame)

    def buffered(self) -> int:
        transport = self.transport
        if transport is None or transport.is_closing():
            return 0
        return transport.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self.closing

    def fail(self, code: str, message: str) -> None:
        """Report a protocol violation on id 0 and close this connection."""
        self.send(0, ErrorReply(code=code, message=message), TERMINAL)
        self.transport_close()

    def transport_close(self) -> None:
        self.closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            self.agent.loop.call_later(CLOSE_WAIT, transport.abort)

    # -- requests ----------------------------------------------------------------------------

    def handle(self, frame: Frame) -> None:
        id, msg = frame.id, frame.msg
        if not self.ready:
            self._handshake(id, msg)
            return
        if isinstance(msg, FOLLOW_UPS):
            conv = self.convs.get(id)
            if conv is not None:
                conv.follow_up(msg)
            return
        if id in self.convs:
            self.fail("protocol_error", f"request id {id} is already in use")
            return
        if isinstance(msg, FS_REQUESTS):
            if fs.is_slow(msg):
                self._fs_threaded(id, msg)
            else:
                self.send(id, fs.handle(msg), TERMINAL)
        elif isinstance(msg, Exec):
            if self.agent.shutting_down:
                err = ErrorReply(code="sandbox_not_running", message="the agent is shutting down")
                self.send(id, err, TERMINAL)
            else:
                ExecSession(self.agent, self, id, msg).start()
        elif isinstance(msg, JobStart):
            if self.agent.shutting_down:
                err = ErrorReply(code="sandbox_not_running", message="the agent is shutting down")
                self.send(id, err, TERMINAL)
            else:
                self.agent.jobs.start(self, id, msg)
        elif isinstance(msg, JobList):
            self.send(id, self.agent.jobs.list(), TERMINAL)
        elif isinstance(msg, JobWait):
            self.agent.jobs.wait(self, id, msg)
        elif isinstance(msg, JobKill):
            self.send(id, self.agent.jobs.kill(msg), TERMINAL)
        elif isinstance(msg, LogSubscribe):
            self.agent.logs.subscribe(self, id, msg)
        elif isinstance(msg, Ping):
            self.send(id, Pong(), TERMINAL)
        elif isinstance(msg, Shutdown):
            self.convs[id] = Busy()
            self.agent.request_shutdown(msg.grace, (self, id))
        elif isinstance(msg, Hello):
            err = ErrorReply(code="protocol_error", message="Hello after the handshake")
            self.send(id, err, TERMINAL)
        else:
            err = ErrorReply(code="unsupported", message=f"{type(msg).__name__} is not served")
            self.send(id, err, TERMINAL)

    def _handshake(self, id: int, msg: Message) -> None:
        if id != 0 or not isinstance(msg, Hello):
            self.fail("protocol_error", f"expected Hello on id 0, got {type(msg).__name__}")
        elif msg.version != PROTOCOL_VERSION:
            text = (
                f"protocol version mismatch: host speaks {msg.version}, "
                f"agent speaks {PROTOCOL_VERSION}"
            )
            self.fail("protocol_error", text)
        else:
            self.ready = True
            ready = Ready(version=PROTOCOL_VERSION, agent_version=AGENT_VERSION, pid=os.getpid())
            self.send(0, ready, TERMINAL)

    def _fs_threaded(self, id: int, msg: fs.FsRequest) -> None:
        busy = Busy()
        self.convs[id] = busy
        self.agent.threads_busy += 1
        future = self.agent.loop.run_in_executor(None, fs.handle, msg)

        def done(fut: asyncio.Future[Message]) -> None:
            self.agent.threads_busy -= 1
            if self.convs.get(id) is busy:
                del self.convs[id]
            try:
                reply = fut.result()
            except Exception as exc:
                reply = ErrorReply(code="agent_error", message=f"{type(exc).__name__}: {exc}")
            self.send(id, reply, TERMINAL)

        future.add_done_callback(done)

"""Exec over an agent channel: collected (``run_exec``) and streamed (``ExecSession``).

Output is flow controlled (see :mod:`corral.protocol.messages`): the agent keeps at most
``Exec.window`` output bytes in flight, and the host returns ``ExecCredit`` as output
is consumed. ``run_exec`` consumes as fast as frames arrive and returns credit in
batches of half a window; an exec stream returns credit only once its user has taken
the event (the relay hands events over an unbuffered channel), so a reader that stops
reading stops the command on its pipe.
"""

from __future__ import annotations

import math
import signal as _signal
from collections.abc import Callable

import msgspec
import trio

from ..errors import (
    AgentError,
    CorralError,
    ExecFailed,
    ExecTimeout,
    InvalidConfig,
    JobNotFound,
    ProtocolError,
    Runtime,
)
from ..protocol import (
    Exec,
    ExecCredit,
    ExecExited,
    ExecSignal,
    ExecStarted,
    ExecStartFailed,
    ExecStderr,
    ExecStdout,
    JobExited,
    JobInfo,
    JobKill,
    JobList,
    JobListReply,
    JobStart,
    JobStarted,
    JobWait,
    Message,
    Ok,
)
from .channel import AgentChannel, Conversation
from .mailbox import Actor

__all__ = [
    "EXEC_TIMEOUT_MARGIN",
    "JOB_REPLIES",
    "ExecResult",
    "ExecSession",
    "Job",
    "check_signal",
    "job_request",
    "open_session",
    "relay_exec",
    "run_exec",
    "start_failed_error",
]

EXEC_TIMEOUT_MARGIN = 5.0
"""Host-side guard beyond ``Exec.timeout``, in case the agent is wedged."""

SIGNAL_TIMEOUT = 1.0


class ExecResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a command ended, with everything it wrote."""

    exit_code: int
    """The exit status, or 128 + signal number when a signal ended it."""
    stdout: bytes = b""
    stderr: bytes = b""
    signal: int | None = None
    pid: int | None = None

    @property
    def success(self) -> bool:
        return self.exit_code == 0 and self.signal is None

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


def start_failed_error(msg: ExecStartFailed) -> ExecFailed:
    return ExecFailed(msg.message, kind=msg.kind, errno=msg.errno)


def credit_threshold(window: int) -> int:
    return max(1, window // 2)


async def _kill_quietly(conv: Conversation) -> None:
    """Best effort SIGKILL for an exec being abandoned (the Cancel follows)."""
    with trio.move_on_after(SIGNAL_TIMEOUT, shield=True):
        try:
            await conv.send(ExecSignal(signal=int(_signal.SIGKILL)))
        except CorralError:
            pass


async def run_exec(channel: AgentChannel, request: Exec) -> ExecResult:
    """Run one command to its end and collect its output.

    Raises ExecFailed (could not start), ExecTimeout (the agent's timeout, or the host
    guard of ``timeout + EXEC_TIMEOUT_MARGIN``; partial output attached), AgentGone.
    """
    if request.interactive:
        request = msgspec.structs.replace(request, interactive=False)
    stdout: list[bytes] = []
    stderr: list[bytes] = []
    pid: int | None = None
    owed = 0
    threshold = credit_threshold(request.window)
    guard = math.inf if request.timeout is None else request.timeout + EXEC_TIMEOUT_MARGIN
    async with channel.conversation(request) as conv:
        with trio.move_on_after(guard):
            while not conv.done:
                msg = await conv.receive()
                if isinstance(msg, ExecStdout):
                    stdout.append(msg.data)
                    owed += len(msg.data)
                elif isinstance(msg, ExecStderr):
                    stderr.append(msg.data)
                    owed += len(msg.data)
                elif isinstance(msg, ExecExited):
                    out, err = b"".join(stdout), b"".join(stderr)
                    if msg.timed_out:
                        raise ExecTimeout(
                            f"{request.cmd}: timed out after {request.timeout:g}s",
                            stdout=out,
                            stderr=err,
                        )
                    return ExecResult(
                        exit_code=msg.exit_code,
                        stdout=out,
                        stderr=err,
                        signal=msg.signal,
                        pid=pid,
                    )
                elif isinstance(msg, ExecStarted):
                    pid = msg.pid
                elif isinstance(msg, ExecStartFailed):
                    raise start_failed_error(msg)
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} in an exec")
                if owed >= threshold and not conv.done:
                    await conv.send(ExecCredit(bytes=owed))
                    owed = 0
            raise ProtocolError(f"{request.cmd}: exec ended without an exit event")
        await _kill_quietly(conv)
    raise ExecTimeout(
        f"{request.cmd}: no exit from the agent within {guard:g}s (timeout + host margin)",
        stdout=b"".join(stdout),
        stderr=b"".join(stderr),
    )


class ExecSession:
    """The actor's end of one streamed exec: ordered events in, control frames out.

    ``events`` yields the wire events (ExecStarted, ExecStdout, ExecStderr, ExecExited).
    When it ends without ExecExited, ``error`` says why. ``discard()`` (sync) abandons
    the exec: the relay kills the process and ends the conversation.
    """

    def __init__(
        self,
        conv: Conversation,
        events: trio.MemoryReceiveChannel[Message],
        translate: Callable[[CorralError], CorralError],
    ) -> None:
        self._conv = conv
        self.events = events
        self._translate = translate
        self.error: CorralError | None = None
        self.exited: ExecExited | None = None
        self.pid: int | None = None
        self.scope = trio.CancelScope()
        """The relay runs inside it; ``discard`` cancels it."""
        self.closed = trio.Event()
        """Set when the relay has ended (the conversation is over)."""

    async def send(self, msg: Message) -> None:
        """Send a control frame (ExecStdin, ExecSignal, ExecResize) to the command."""
        if self.closed.is_set():
            if self.error is not None:
                raise self.error
            raise Runtime("the exec has ended")
        try:
            await self._conv.send(msg)
        except AgentError as exc:
            raise self._translate(exc) from None

    def discard(self) -> None:
        """Abandon the exec: the relay kills the command and ends the conversation."""
        self.events.close()
        self.scope.cancel()


async def relay_exec(
    conv: Conversation,
    session: ExecSession,
    send: trio.MemorySendChannel[Message],
    window: int,
) -> None:
    """Move events from ``conv`` to the session's user, returning credit as they are taken.

    Ends at ExecExited (normally), when the user closes the events channel, or with
    the typed error the conversation raised (the caller records it on the session).
    Whenever it ends before the command exited, it sends SIGKILL first (bounded).
    """
    owed = 0
    threshold = credit_threshold(window)
    try:
        while not conv.done:
            msg = await conv.receive()
            if isinstance(msg, ExecStartFailed):
                raise start_failed_error(msg)
            if isinstance(msg, ExecStarted):
                session.pid = msg.pid
            elif isinstance(msg, ExecExited):
                session.exited = msg
            elif not isinstance(msg, ExecStdout | ExecStderr):
                raise ProtocolError(f"unexpected {type(msg).__name__} in an exec")
            await send.send(msg)
            if isinstance(msg, ExecExited):
                return
            if isinstance(msg, ExecStdout | ExecStderr):
                owed += len(msg.data)
                if owed >= threshold and not conv.done:
                    await conv.send(ExecCredit(bytes=owed))
                    owed = 0
        raise ProtocolError("exec ended without an exit event")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the user left (or discarded the session) before the command ended
    finally:
        if session.exited is None and not conv.done:
            await _kill_quietly(conv)


def open_session(
    conv: Conversation, translate: Callable[[CorralError], CorralError]
) -> tuple[ExecSession, trio.MemorySendChannel[Message]]:
    """A session and the send side of its (unbuffered) event channel."""
    send, receive = trio.open_memory_channel[Message](0)
    return ExecSession(conv, receive, translate), send


# -- detached jobs ----------------------------------------------------------------------------

JOB_REPLIES: dict[type[Message], type[Message]] = {
    JobStart: JobStarted,
    JobList: JobListReply,
    JobWait: JobExited,
    JobKill: Ok,
}
"""Job requests and the reply each gets."""

_SIGNALS = frozenset(int(s) for s in _signal.valid_signals())


def check_signal(signum: object) -> int:
    """A signal number this host knows (InvalidConfig otherwise)."""
    if isinstance(signum, bool) or not isinstance(signum, int) or int(signum) not in _SIGNALS:
        raise InvalidConfig(f"invalid signal number {signum!r}")
    return int(signum)


async def job_request(channel: AgentChannel, request: Message) -> Message:
    """One job request, its one reply (ExecFailed when a job cannot start)."""
    reply = await channel.request(request)
    if isinstance(reply, ExecStartFailed):
        raise start_failed_error(reply)
    expected = JOB_REPLIES[type(request)]
    if not isinstance(reply, expected):
        raise ProtocolError(
            f"agent answered {type(request).__name__} with {type(reply).__name__}, "
            f"expected {expected.__name__}"
        )
    return reply


class Job:
    """A detached job in a sandbox: it runs in the agent, whoever started it.

    A cheap handle (``sb.exec_detached`` returns one, ``sb.job(id)`` makes one for a
    job started earlier or by another client). Its output goes to the sandbox log
    (``sb.logs()`` entries with ``job == id``).
    """

    __slots__ = ("_actor", "args", "cmd", "id", "pid")

    def __init__(
        self, actor: Actor, id: int, *, pid: int | None = None, cmd: str = "", args: list[str]
    ) -> None:
        self._actor = actor
        self.id = id
        self.pid = pid
        self.cmd = cmd
        self.args = args

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.cmd!r} pid={self.pid}>"

    async def wait(self) -> int:
        """Wait for the job to end; its exit code (ExecTimeout if its timeout killed it)."""
        exited = await self._actor.ask_as(JobWait(id=self.id), JobExited)
        if exited.timed_out:
            raise ExecTimeout(f"job {self.id} ({self.cmd}): timed out")
        return exited.exit_code

    async def kill(self, signal: int = _signal.SIGKILL) -> None:
        """Send ``signal`` (SIGKILL by default) to the job's process group."""
        await self._actor.ask_as(JobKill(id=self.id, signal=check_signal(signal)), Ok)

    async def info(self) -> JobInfo:
        reply = await self._actor.ask_as(JobList(), JobListReply)
        for info in reply.jobs:
            if info.id == self.id:
                return info
        raise JobNotFound(f"no job {self.id} in sandbox {self._actor.name!r}")

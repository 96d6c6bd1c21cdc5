"""An in-memory driver for unit tests: fake sandboxes whose agent speaks the real protocol.

``FakeDriver`` is an async context manager (it owns the nursery its agents run in).
Each ``spawn`` gives a :class:`FakeSandboxProcess`; ``connect`` returns one end of a
``trio.testing.memory_stream_pair`` whose other end a :class:`FakeAgent` serves with
:mod:`corral.protocol` frames: handshake, Ping, Shutdown, Exec (scripted commands, with
output credit honoured), and the Fs* requests over an in-memory file tree.

Scripted commands: ``echo ARGS``, ``cat`` (stdin → stdout), ``sleep SECONDS``,
``exit CODE``, ``ignore-term`` (ignores SIGTERM until SIGKILL), ``bytes N`` (N bytes of
stdout in credit-limited chunks), ``lines N`` (N tiny frames), ``burst N`` (N tiny frames
in a single write, within the window), ``tick N SECONDS`` (N
lines, one every SECONDS), ``stderr TEXT``,
``printenv NAME``, ``pwd``, ``agent-die`` (the agent dies mid-exec: the sandbox crashes),
``wedge`` (the agent stops answering anything). Anything else fails to start
(ExecStartFailed not_found).

Failure knobs (:class:`FakeBehaviour`, per driver or per sandbox name via
``configure``): spawn delay, spawn error, connect and ready delays, an agent that
ignores Shutdown, a process that ignores SIGTERM or never shows SIGKILL (until cleanup),
a wedged agent. Every process records what happened to it in ``events`` (time, what).
"""

from __future__ import annotations

import dataclasses
import signal as _signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from ..errors import AgentGone, CorralError, Runtime, fs_error_from_oserror
from ..protocol import (
    FS_CHUNK,
    PROTOCOL_VERSION,
    SESSION_START,
    TERMINAL,
    Cancel,
    ErrorReply,
    Exec,
    FrameDecoder,
    FsData,
    FsRead,
    Hello,
    Message,
    Ok,
    Ping,
    Pong,
    Ready,
    Shutdown,
    encode,
)
from .base import Driver, ExitStatus, ProcessIds, SandboxProcess, SandboxSpec
from .fake_exec import FakeExec
from .fake_fs import FakeFs
from .fake_jobs import REQUESTS as JOB_REQUESTS
from .fake_jobs import FakeJobs

if TYPE_CHECKING:
    from .local.metrics import SandboxMetrics

__all__ = ["FakeAgent", "FakeBehaviour", "FakeDriver", "FakeExec", "FakeSandboxProcess"]

SIGTERM = int(_signal.SIGTERM)
SIGKILL = int(_signal.SIGKILL)


@dataclasses.dataclass
class FakeBehaviour:
    spawn_delay: float = 0.0
    spawn_error: BaseException | None = None
    connect_delay: float = 0.0
    ready_delay: float = 0.0
    ignore_shutdown: bool = False
    ignore_sigterm: bool = False
    ignore_sigkill: bool = False
    """SIGKILL is never observed (only ``cleanup`` ends the process)."""
    wedged: bool = False
    """The agent answers the handshake, then nothing."""
    fs_chunk: int = FS_CHUNK
    read_per_request: bool = False
    """Answer each FsRead with one chunk (the host asks again) instead of streaming."""


class FakeDriver(Driver):
    kind = "fake"

    def __init__(self, **behaviour: Any) -> None:
        self.behaviour = FakeBehaviour(**behaviour)
        self.overrides: dict[str, FakeBehaviour] = {}
        self.spawned: list[FakeSandboxProcess] = []
        self.processes: dict[str, FakeSandboxProcess] = {}
        """The latest process spawned under each name."""
        self._nursery: trio.Nursery | None = None
        self._manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._next_pid = 1000
        self.rename_error: BaseException | None = None
        """Raised by :meth:`rename` (a test plays a failing rename)."""

    def configure(self, name: str, **changes: Any) -> FakeBehaviour:
        """Behaviour for sandboxes called ``name`` (the driver's, with ``changes``)."""
        behaviour = dataclasses.replace(self.behaviour, **changes)
        self.overrides[name] = behaviour
        return behaviour

    @property
    def leaked(self) -> list[FakeSandboxProcess]:
        """Processes nobody cleaned up (detached ones excepted)."""
        return [p for p in self.spawned if not p.cleaned_up and not p.spec.detached]

    @property
    def running(self) -> list[FakeSandboxProcess]:
        return [p for p in self.spawned if p.exit_status is None]

    async def __aenter__(self) -> FakeDriver:
        self._manager = trio.open_nursery()
        self._nursery = await self._manager.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> bool:
        await self.aclose()
        return False

    async def aclose(self) -> None:
        for proc in self.spawned:
            proc._end(ExitStatus(None, SIGKILL), "driver closed")
        if self._manager is not None and self._nursery is not None:
            manager, self._manager = self._manager, None
            self._nursery.cancel_scope.cancel()
            await manager.__aexit__(None, None, None)

    def start_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None:
            raise Runtime("FakeDriver must be entered (async with FakeDriver() as driver)")
        self._nursery.start_soon(fn, *args)

    async def attach(self, spec: SandboxSpec, ids: ProcessIds) -> FakeSandboxProcess:
        """The running fake sandbox ``spec.name`` (the process another supervisor spawned)."""
        await trio.lowlevel.checkpoint()
        proc = self.processes.get(spec.name)
        if proc is None or proc.exit_status is not None or ids.pid not in (None, proc.pid):
            raise Runtime(f"sandbox {spec.name!r} is not running any more")
        return proc

    def rename(self, proc: SandboxProcess, spec: SandboxSpec) -> None:
        """A warm pool's sandbox takes ``spec.name`` (its spawn-time env and spec stay)."""
        if not isinstance(proc, FakeSandboxProcess):
            raise Runtime(f"cannot rename {proc!r}: not a fake sandbox")
        if self.rename_error is not None:
            raise self.rename_error
        if self.processes.get(proc.name) is proc:
            del self.processes[proc.name]
        proc.record(f"rename:{spec.name}")
        proc.name = spec.name
        proc.spec = dataclasses.replace(proc.spec, name=spec.name)
        self.processes[spec.name] = proc

    async def spawn(self, spec: SandboxSpec) -> FakeSandboxProcess:
        if self._nursery is None:
            raise Runtime("FakeDriver must be entered (async with FakeDriver() as driver)")
        behaviour = self.overrides.get(spec.name, self.behaviour)
        self._next_pid += 1
        proc = FakeSandboxProcess(self, spec, behaviour, self._next_pid)
        self.spawned.append(proc)
        self.processes[spec.name] = proc
        try:
            if behaviour.spawn_delay > 0:
                await trio.sleep(behaviour.spawn_delay)
            else:
                await trio.lowlevel.checkpoint()
            if behaviour.spawn_error is not None:
                raise behaviour.spawn_error
        except BaseException:
            with trio.CancelScope(shield=True):
                await proc.cleanup()
            raise
        return proc


class FakeSandboxProcess(SandboxProcess):
    pid: int

    def __init__(
        self, driver: FakeDriver, spec: SandboxSpec, behaviour: FakeBehaviour, pid: int
    ) -> None:
        self.driver = driver
        self.name = spec.name
        self.spec = spec
        self.behaviour = behaviour
        self.pid = pid
        self.fs = FakeFs(spec.workdir)
        self.events: list[tuple[float, str]] = []
        self.agents: list[FakeAgent] = []
        self.execs: list[FakeExec] = []
        self.jobs = FakeJobs(self)
        """Detached jobs and the log ring (drivers/fake_jobs.py)."""
        self.limit_note: str | None = None
        """What ``limit_report()`` says (a test sets it to play an OOM kill)."""
        self.cleaned_up = False
        self._exit: ExitStatus | None = None
        self._exited = trio.Event()
        self._spawned_at = trio.current_time()
        self.record("spawn")

    def __repr__(self) -> str:
        return f"<FakeSandboxProcess {self.name!r} pid={self.pid} exit={self._exit}>"

    def record(self, what: str) -> None:
        self.events.append((trio.current_time(), what))

    def times(self, what: str) -> list[float]:
        return [t for t, w in self.events if w == what]

    @property
    def exit_status(self) -> ExitStatus | None:
        return self._exit

    def limit_report(self) -> str | None:
        return self.limit_note

    async def metrics(self) -> SandboxMetrics:
        """Made-up but consistent numbers: 1 MiB and one pid per live command, plus the
        agent's."""
        from .local.metrics import SandboxMetrics

        await trio.lowlevel.checkpoint()
        if self._exit is not None:
            raise AgentGone(f"sandbox {self.name!r} is not running")
        live = sum(1 for e in self.execs if not e.finished.is_set())
        limit = self.spec.memory_mib
        return SandboxMetrics(
            cpu_percent=float(live),
            memory_bytes=(1 + live) << 20,
            memory_limit_bytes=None if limit is None else limit << 20,
            pids=1 + live,
            uptime_s=trio.current_time() - self._spawned_at,
            source="fake",
        )

    async def wait(self) -> ExitStatus:
        await self._exited.wait()
        assert self._exit is not None
        return self._exit

    def _end(self, status: ExitStatus, why: str = "exit") -> None:
        if self._exit is not None:
            return
        self._exit = status
        self.record(f"exit:{why}")
        for agent in self.agents:
            agent.close()
        self._exited.set()

    async def connect(self) -> trio.abc.Stream:
        if self._exit is not None:
            raise AgentGone(f"sandbox {self.name!r} is not running")
        if self.behaviour.connect_delay > 0:
            await trio.sleep(self.behaviour.connect_delay)
        host, guest = trio.testing.memory_stream_pair()
        agent = FakeAgent(self, guest)
        self.agents.append(agent)
        self.driver.start_soon(agent.serve)
        return host

    async def terminate(self) -> None:
        self.record("SIGTERM")
        await trio.lowlevel.checkpoint()
        if not self.behaviour.ignore_sigterm:
            self._end(ExitStatus(None, SIGTERM), "SIGTERM")

    async def kill(self) -> None:
        self.record("SIGKILL")
        await trio.lowlevel.checkpoint()
        if not self.behaviour.ignore_sigkill:
            self._end(ExitStatus(None, SIGKILL), "SIGKILL")

    async def cleanup(self) -> None:
        if not self.cleaned_up:
            self.cleaned_up = True
            self.record("cleanup")
        self._end(ExitStatus(None, SIGKILL), "cleanup")
        await trio.lowlevel.checkpoint()

    # -- test helpers ------------------------------------------------------------------
    def crash(self, code: int = 1) -> None:
        """The agent (the sandbox's first process) dies: connections drop, it exits."""
        self._end(ExitStatus(code), "crash")

    def drop_connections(self) -> None:
        """Every agent connection closes; the process keeps running."""
        for agent in self.agents:
            agent.close()

    async def shutdown(self, grace: float) -> None:
        """What the agent does on Shutdown: SIGTERM sessions, wait ``grace``, exit 0."""
        self.record("shutdown")
        await self.jobs.log.append("system", f"agent shutting down (grace {grace:g}s)")
        live = [e for e in self.execs if not e.finished.is_set()]
        for session in live:
            session.deliver(SIGTERM)
        with trio.move_on_after(grace):
            for session in live:
                await session.finished.wait()
        for session in live:
            session.deliver(SIGKILL)
        self._end(ExitStatus(0), "shutdown")


class FakeAgent:
    """Serves one connection of a fake sandbox with real protocol frames."""

    def __init__(
        self,
        proc: FakeSandboxProcess,
        stream: trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream],
    ) -> None:
        self.proc = proc
        self.stream = stream
        self.wedged = proc.behaviour.wedged
        self.sessions: dict[int, FakeExec] = {}
        self.received: list[Message] = []
        self._lock = trio.Lock()
        self._scope = trio.CancelScope()
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stream.send_stream.close()
        self.stream.receive_stream.close()
        self._scope.cancel()

    async def send(self, id: int, msg: Message, flags: int = 0) -> None:
        await self.send_raw(encode(id, msg, flags))

    async def send_raw(self, data: bytes) -> None:
        """Already-encoded frames, in one write (so they arrive in one read)."""
        if self.closed:
            raise trio.ClosedResourceError
        async with self._lock:
            await self.stream.send_all(data)

    async def serve(self) -> None:
        decoder = FrameDecoder()
        with self._scope:
            async with trio.open_nursery() as nursery:
                try:
                    while True:
                        data = await self.stream.receive_some(1 << 16)
                        if not data:
                            break
                        for frame in decoder.feed(data):
                            self._dispatch(nursery, frame.id, frame.flags, frame.msg)
                except (trio.BrokenResourceError, trio.ClosedResourceError, CorralError):
                    pass
                nursery.cancel_scope.cancel()
        self.close()

    def _dispatch(self, nursery: trio.Nursery, id: int, flags: int, msg: Message) -> None:
        self.received.append(msg)
        if id == 0:
            if isinstance(msg, Hello):
                nursery.start_soon(self._ready)
            return
        if self.wedged:
            return
        if flags & SESSION_START:
            if isinstance(msg, Exec):
                new = FakeExec(self, id, msg)
                self.sessions[id] = new
                self.proc.execs.append(new)
                nursery.start_soon(new.run)
            elif isinstance(msg, JOB_REQUESTS):
                nursery.start_soon(self.proc.jobs.request, self, id, msg)
            else:
                nursery.start_soon(self._request, id, msg)
            return
        if self.proc.jobs.follow_up(self, id, msg):
            return
        session = self.sessions.get(id)
        if session is not None:
            session.control(msg)

    async def _ready(self) -> None:
        if self.proc.behaviour.ready_delay > 0:
            await trio.sleep(self.proc.behaviour.ready_delay)
        ready = Ready(version=PROTOCOL_VERSION, agent_version="fake", pid=self.proc.pid)
        await self._quiet_send(0, ready)

    async def _quiet_send(self, id: int, msg: Message, flags: int = 0) -> None:
        try:
            await self.send(id, msg, flags)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _request(self, id: int, msg: Message) -> None:
        reply: Message
        if isinstance(msg, Ping):
            reply = Pong()
        elif isinstance(msg, Shutdown):
            if self.proc.behaviour.ignore_shutdown:
                return
            await self._quiet_send(id, Ok(), TERMINAL)
            await self.proc.shutdown(msg.grace)
            return
        elif isinstance(msg, FsRead):
            await self._read(id, msg)
            return
        elif isinstance(msg, Cancel):
            return
        else:
            try:
                reply = self.proc.fs.handle(msg)
            except OSError as exc:
                reply = _error_reply(exc, getattr(msg, "path", ""))
        await self._quiet_send(id, reply, TERMINAL)

    async def _read(self, id: int, msg: FsRead) -> None:
        try:
            data = self.proc.fs.read(msg.path, msg.offset, msg.length)
        except OSError as exc:
            await self._quiet_send(id, _error_reply(exc, msg.path), TERMINAL)
            return
        end_of_file = msg.offset + len(data) >= self.proc.fs.size(msg.path)
        chunk = max(1, self.proc.behaviour.fs_chunk)
        if self.proc.behaviour.read_per_request:
            piece = data[:chunk]
            eof = end_of_file and len(piece) == len(data)
            await self._quiet_send(id, _fs_data(piece, eof), TERMINAL)
            return
        starts = list(range(0, len(data), chunk)) or [0]
        for n, start in enumerate(starts):
            last = n == len(starts) - 1
            piece = data[start : start + chunk]
            await self._quiet_send(
                id, _fs_data(piece, end_of_file and last), TERMINAL if last else 0
            )


def _fs_data(data: bytes, eof: bool) -> Message:
    return FsData(data=data, eof=eof)


def _error_reply(exc: OSError, path: str) -> ErrorReply:
    error = fs_error_from_oserror(exc, path)
    return ErrorReply(code=error.code, message=error.message, errno=error.errno)

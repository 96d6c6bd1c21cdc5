"""SandboxActor: owns one sandbox process and its agent channel.

Lifecycle (stop, drain, the stop ladder) is serialised by a lock; kill is not (it
escalates a stop in progress). Execs and fs requests run concurrently, each as its own
task, and talk to the agent over the one multiplexed channel.

Status: created → starting → running → draining → stopped. A process that ends on its
own, or an agent connection that drops, while nobody is stopping it is ``crashed``.
Every request in flight when the sandbox stops or crashes ends at once with a typed
error (SandboxNotRunning when it was stopped, AgentGone when it crashed); requests
made while it is not running are refused with SandboxNotRunning.

The stop ladder follows the seed (``SandboxHandle::stop_with_timeout``): timeout 0 →
kill; else ``Shutdown(grace)`` to the agent, poll every 100 ms up to ``timeout``, SIGTERM
and poll up to the kill timeout (5 s), SIGKILL and poll up to the kill timeout, else
``Runtime("timed out observing stopped state ...")``; then the driver's cleanup.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
import trio

from ..drivers.base import Driver, ExitStatus, SandboxProcess, SandboxSpec
from ..errors import (
    AgentGone,
    CorralError,
    InvalidConfig,
    Runtime,
    SandboxNotRunning,
)
from ..protocol import (
    Exec,
    FsData,
    FsRead,
    FsWrite,
    FsWritten,
    JobExited,
    JobKill,
    JobList,
    JobStart,
    JobWait,
    Message,
    Ok,
    Shutdown,
)
from .channel import AgentChannel
from .execs import (
    ExecResult,
    ExecSession,
    check_signal,
    job_request,
    open_session,
    relay_exec,
    run_exec,
)
from .fsops import REPLY_TYPES, read_file, simple_request, write_file
from .logs import SandboxLog, log_dir
from .mailbox import Actor, Handler
from .state import SandboxStatus, Watch

__all__ = [
    "CLEANUP_TIMEOUT",
    "DEFAULT_KILL_TIMEOUT",
    "DEFAULT_STOP_TIMEOUT",
    "POLL_INTERVAL",
    "Describe",
    "Drain",
    "GetMetrics",
    "Kill",
    "OpenExecStream",
    "Release",
    "SandboxActor",
    "SandboxInfo",
    "Start",
    "Stop",
]

logger = logging.getLogger("corral.actors")

DEFAULT_STOP_TIMEOUT = 10.0
DEFAULT_KILL_TIMEOUT = 5.0
POLL_INTERVAL = 0.1
CLEANUP_TIMEOUT = 10.0
"""Backstop around the driver's (already bounded) cleanup."""

T = TypeVar("T")
R = TypeVar("R")
E = TypeVar("E", Exec, JobStart)


# -- control messages (actor-internal vocabulary, next to the wire Structs) -----------------


class Stop(msgspec.Struct, frozen=True, kw_only=True):
    """The stop ladder. ``sigterm=False`` skips the SIGTERM rung (fast shutdown)."""

    timeout: float = DEFAULT_STOP_TIMEOUT
    sigterm: bool = True


class Kill(msgspec.Struct, frozen=True, kw_only=True):
    """SIGKILL now; wait up to ``timeout`` (the kill timeout) to see it gone."""

    timeout: float = DEFAULT_KILL_TIMEOUT


class Start(msgspec.Struct, frozen=True, kw_only=True):
    """Start a sandbox that is ``created``, ``stopped`` or ``crashed`` (again)."""


class Drain(msgspec.Struct, frozen=True, kw_only=True):
    """Refuse new work, let what runs finish (up to ``timeout``), then stop."""

    timeout: float | None = None
    stop_timeout: float = DEFAULT_STOP_TIMEOUT


class OpenExecStream(msgspec.Struct, frozen=True, kw_only=True):
    """Start an interactive exec; the answer is an :class:`ExecSession`."""

    exec: Exec


class GetMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """Resource usage now: the driver's ``SandboxProcess.metrics()`` (running only)."""


class Describe(msgspec.Struct, frozen=True, kw_only=True):
    """Answered at once (no I/O) with a :class:`SandboxInfo`."""


class Release(msgspec.Struct, frozen=True, kw_only=True):
    """Let go of a detached sandbox: close the channel, leave the process running."""


class SandboxInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    status: SandboxStatus
    image: str
    created_at: datetime
    detached: bool = False
    pid: int | None = None
    ephemeral: bool = False
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    owner_pid: int | None = None
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    last_error: str | None = None
    restarts: int = 0


def _timeout_for_grace(grace: float) -> float:
    """The ladder timeout whose Shutdown grace is ``grace`` (inverse of the grace rule)."""
    grace = max(0.0, grace)
    return grace + 1.0 if grace >= 1.0 else 2.0 * grace


def _check_exec(msg: Exec) -> None:
    if msg.window < 1:
        raise InvalidConfig(f"exec window must be at least 1 byte, got {msg.window}")


class SandboxActor(Actor):
    priority = frozenset({Stop, Kill, Drain, Shutdown, Describe, Release, Start})

    def __init__(
        self,
        spec: SandboxSpec,
        driver: Driver,
        *,
        opener: Callable[[], Awaitable[SandboxProcess]] | None = None,
        status: SandboxStatus = SandboxStatus.CREATED,
        created_at: datetime | None = None,
        elapsed: float = 0.0,
    ) -> None:
        """``opener`` replaces ``driver.spawn`` for the first start (attach to a sandbox
        that already runs; ``elapsed``: for how long, for its max_duration). ``status``:
        where a sandbox that is not started yet stands (created, stopped or crashed)."""
        super().__init__(spec.name)
        self.spec = spec
        self.driver = driver
        self.created_at = datetime.now(UTC) if created_at is None else created_at
        self.status: Watch[SandboxStatus] = Watch(status)
        self._opener = opener
        self._elapsed = elapsed
        self._incarnation = 0
        self._timers: list[trio.CancelScope] = []
        self._last_activity = 0.0
        self.stop_reason = ""
        """Why the sandbox stopped by itself (idle timeout, max duration), if it did."""
        self.before_start: Callable[[], None] | None = None
        """Called (under the lifecycle lock) before a later start; may raise to refuse."""
        self.stopped_elsewhere: Callable[[], bool] | None = None
        """Asked when the sandbox ends without this actor stopping it: True means someone
        else (another process) stopped it, so it is ``stopped``, not ``crashed``."""
        self.proc: SandboxProcess | None = None
        self.channel: AgentChannel | None = None
        self.exit_status: ExitStatus | None = None
        self.started = False
        self._lifecycle = trio.Lock()
        self._connecting = trio.Lock()
        self._stopping = False
        self._finishing = False
        self._final: SandboxStatus | None = None
        self._crash_reason = ""
        self._released = False
        self._ops: set[trio.CancelScope] = set()
        self.active = Watch(0)
        """Requests in flight (execs, exec streams, fs ops)."""
        self.log = SandboxLog(log_dir(driver, spec.name))
        """The sandbox log (job output, agent and lifecycle events); see actors/logs.py."""
        op = functools.partial(Handler, concurrent=True)
        life = functools.partial(Handler, concurrent=True, cancellable=False)
        self._handlers: dict[type, Handler] = {
            Exec: op(self._on_exec),
            FsRead: op(self._on_fs_read),
            FsWrite: op(self._on_fs_write),
            OpenExecStream: op(self._on_exec_stream),
            JobStart: op(self._on_job),
            JobList: op(self._on_job),
            JobWait: op(self._on_job),
            JobKill: op(self._on_job),
            GetMetrics: op(self._on_metrics),
            Stop: life(self._on_stop),
            Kill: life(self._on_kill),
            Start: life(self._on_start),
            Drain: life(self._on_drain),
            Shutdown: life(self._on_shutdown),
            Describe: Handler(self._on_describe),
            Release: Handler(self._on_release),
        }
        for kind in REPLY_TYPES:
            self._handlers[kind] = op(self._on_simple)

    def handler_for(self, msg: object) -> Handler:
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise InvalidConfig(f"a sandbox does not handle {type(msg).__name__} messages")
        return handler

    def info(self) -> SandboxInfo:
        return SandboxInfo(
            name=self.name,
            status=self.status.value,
            image=self.spec.image,
            created_at=self.created_at,
            detached=self.spec.detached,
            pid=None if self.proc is None else self.proc.pid,
            ephemeral=self.spec.ephemeral,
            labels=dict(self.spec.labels),
            exit_code=None if self.exit_status is None else self.exit_status.code,
            exit_signal=None if self.exit_status is None else self.exit_status.signal,
            last_error=self.last_error,
        )

    @property
    def last_error(self) -> str | None:
        """Why it crashed, or why it stopped by itself (None when neither)."""
        if self._final is SandboxStatus.CRASHED and self._crash_reason:
            return self._crash_reason
        return self.stop_reason or self.log.limit_error or None

    # -- the actor's task ------------------------------------------------------------------
    async def run(
        self,
        *,
        start: bool = True,
        on_ready: Callable[[], None] | None = None,
        task_status: trio.TaskStatus[SandboxActor] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the sandbox (``start=False``: it waits for a :class:`Start`), report
        ready, serve the mailbox; always clean up."""
        failed = False
        try:
            channel = await self._boot() if start else None
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if start:
                    self._launch(nursery, channel)
                self.started = True
                if on_ready is not None:
                    on_ready()
                task_status.started(self)
                await self.serve(nursery)
                nursery.cancel_scope.cancel()
        except Exception:
            failed = True
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown(failed)
            self._shut_mailbox()
            self.finished.set()

    async def _boot(self) -> AgentChannel | None:
        """Spawn (or attach to) the process and open its channel; status ``starting``."""
        self._incarnation += 1
        self._stopping = self._finishing = False
        self._final = None
        self._crash_reason = self.stop_reason = ""
        self.exit_status = None
        self.channel = None
        self.status.set(SandboxStatus.STARTING)
        opener, self._opener = self._opener, None
        self.proc = await (opener() if opener is not None else self.driver.spawn(self.spec))
        if self.proc.reconnectable:  # a reconnectable one connects on first use
            return None
        stream = await self.proc.connect()
        self.channel = channel = AgentChannel(stream, label=f"sandbox {self.name!r}")
        await channel.handshake()
        return channel

    def _launch(self, nursery: trio.Nursery, channel: AgentChannel | None) -> None:
        """The tasks of one incarnation (channel, watchers, timers); status ``running``."""
        assert self.proc is not None
        gen = self._incarnation
        if channel is not None:
            nursery.start_soon(channel.run)
            nursery.start_soon(self._watch_channel, channel, gen)
            self.log.start(nursery, channel, self.proc)
        nursery.start_soon(self._watch_process, self.proc, gen)
        elapsed, self._elapsed = self._elapsed, 0.0
        self._timers = [trio.CancelScope(), trio.CancelScope()]
        if self.spec.idle_timeout is not None:
            nursery.start_soon(self._idle_timer, self._timers[0], self.spec.idle_timeout)
        if self.spec.max_duration is not None:
            left = self.spec.max_duration - elapsed
            nursery.start_soon(self._duration_timer, self._timers[1], left)
        self._last_activity = trio.current_time()
        self.status.set(SandboxStatus.RUNNING)

    def usable(self) -> bool:
        """Running, not ending, its process there and its agent connection open (what a
        warm pool checks before handing a sandbox out)."""
        return (
            self.status.value is SandboxStatus.RUNNING
            and not self._finishing
            and not self._stopping
            and self.channel is not None
            and self.channel.alive
            and self.proc is not None
            and self.proc.exit_status is None
        )

    def claimed(self, spec: SandboxSpec, created_at: datetime) -> None:
        """A warm pool's running sandbox becomes the one a create asked for (``spec``:
        same image, workdir, network and limits; the driver renamed it already): its
        name, env (added to each exec), labels, lifecycle timers, log directory."""
        assert self._nursery is not None
        self.name = spec.name
        self.spec = spec
        self.created_at = created_at
        self.log.store.directory = log_dir(self.driver, spec.name)
        if self.channel is not None:
            self.channel._label = f"sandbox {spec.name!r}"
        for timer in self._timers:
            timer.cancel()
        self._timers = [trio.CancelScope(), trio.CancelScope()]
        if spec.idle_timeout is not None:
            self._nursery.start_soon(self._idle_timer, self._timers[0], spec.idle_timeout)
        if spec.max_duration is not None:
            self._nursery.start_soon(self._duration_timer, self._timers[1], spec.max_duration)
        self._last_activity = trio.current_time()

    async def start(self) -> None:
        """Start a created, stopped or crashed sandbox; a no-op when it runs already."""
        async with self._lifecycle:
            status = self.status.value
            if status is not SandboxStatus.CREATED and not status.terminal:
                await trio.lowlevel.checkpoint()
                return
            if self.before_start is not None:
                self.before_start()
            assert self._nursery is not None
            try:
                channel = await self._boot()
            except BaseException as exc:
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    if self.channel is not None:
                        await self.channel.aclose()
                    if self.proc is not None:
                        await self.proc.cleanup()
                if self.proc is not None and self.proc.exit_status is not None:
                    self.exit_status = self.proc.exit_status
                self._finishing = True
                self._final = SandboxStatus.CRASHED
                self._crash_reason = f"start failed: {exc}"
                self.status.set(SandboxStatus.CRASHED)
                raise
            self._launch(self._nursery, channel)

    async def _on_start(self, msg: Start) -> Ok:
        await self.start()
        return Ok()

    async def _idle_timer(self, scope: trio.CancelScope, timeout: float) -> None:
        with scope:
            while True:
                if self.active.value > 0:
                    await self.active.wait_for(lambda n: n == 0)
                    continue
                deadline = self._last_activity + timeout
                if trio.current_time() >= deadline:
                    break
                await trio.sleep_until(deadline)
        if not scope.cancel_called:
            await self._timed_stop(f"idle for {timeout:g}s (idle_timeout)")

    async def _duration_timer(self, scope: trio.CancelScope, seconds: float) -> None:
        with scope:
            await trio.sleep(max(0.0, seconds))
        if not scope.cancel_called:
            await self._timed_stop(f"ran for {self.spec.max_duration:g}s (max_duration)")

    async def _timed_stop(self, reason: str) -> None:
        if self._stopping or self._finishing:
            return
        self.stop_reason = reason
        logger.info("sandbox %r: stopping: %s", self.name, reason)
        try:
            await self.stop(DEFAULT_STOP_TIMEOUT)
        except CorralError as exc:
            logger.warning("sandbox %r: stopping after %s: %s", self.name, reason, exc)

    async def _teardown(self, failed: bool) -> None:
        with trio.move_on_after(CLEANUP_TIMEOUT):
            if self.channel is not None:
                await self.channel.aclose()
            if self.proc is not None and not self._released:
                await self.proc.cleanup()
        if self.proc is not None and self.proc.exit_status is not None:
            self.exit_status = self.proc.exit_status
        if not self._released and not self.status.value.terminal:
            self.status.set(SandboxStatus.CRASHED if failed else SandboxStatus.STOPPED)
        self.log.close()

    async def _watch_process(self, proc: SandboxProcess, gen: int = -1) -> None:
        gen = self._incarnation if gen < 0 else gen
        status = await proc.wait()
        if gen != self._incarnation:
            return  # an earlier incarnation (the sandbox was started again since)
        self.exit_status = status
        if not self._stopping and not self._finishing:
            await self._ended_by_itself(f"its process {status.describe()}")

    async def _watch_channel(self, channel: AgentChannel, gen: int = -1) -> None:
        gen = self._incarnation if gen < 0 else gen
        await channel.closed.wait()
        if self.proc is not None and self.proc.reconnectable:
            return  # not a crash: the next request reconnects; _watch_process sees an end
        if gen == self._incarnation and not self._stopping and not self._finishing:
            await self._ended_by_itself("the agent connection was lost")

    async def _ended_by_itself(self, reason: str) -> None:
        """Ended while this actor was not stopping it: crashed, unless stopped elsewhere."""
        elsewhere = False
        if self.stopped_elsewhere is not None:
            try:
                elsewhere = self.stopped_elsewhere()
            except Exception:
                logger.exception("sandbox %r: stopped_elsewhere failed", self.name)
        if elsewhere:
            await self._finish(SandboxStatus.STOPPED)
        else:
            await self._finish(SandboxStatus.CRASHED, reason)

    async def _finish(self, final: SandboxStatus, reason: str = "") -> None:
        """Enter a terminal state once: abort requests, close, clean up, publish."""
        if self._finishing:
            await self.status.wait_for(lambda s: s.terminal)
            return
        self._finishing = True
        self._final = final
        self._crash_reason = reason
        for timer in self._timers:
            timer.cancel()
        if final is SandboxStatus.CRASHED:
            logger.warning("sandbox %r crashed: %s", self.name, reason)
        for scope in list(self._ops):
            scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            await self.log.settle(self.channel, self.proc)
            if self.channel is not None:
                await self.channel.aclose()
            await self.log.drained()
            if self.proc is not None and not self._released:
                await self.proc.cleanup()
        if self.proc is not None and self.proc.exit_status is not None:
            self.exit_status = self.proc.exit_status
        self.status.set(final)
        self.log.ended(final, reason)

    # -- requests (concurrent) ---------------------------------------------------------------
    def _require_channel(self) -> AgentChannel | None:
        """The channel (None: a reconnectable process not connected yet); refused unless
        running."""
        status = self.status.value
        lazy = self.proc is not None and self.proc.reconnectable
        if status is not SandboxStatus.RUNNING or self._finishing or not (self.channel or lazy):
            raise SandboxNotRunning(f"sandbox {self.name!r} is {status}")
        return self.channel

    async def _agent(self) -> AgentChannel:
        """The channel for a request; a reconnectable process whose connection is gone
        (or was never opened) connects again, once for all waiting requests."""
        channel = self._require_channel()
        proc = self.proc
        if channel is not None and (channel.alive or proc is None or not proc.reconnectable):
            return channel
        assert proc is not None and self._nursery is not None
        async with self._connecting:
            channel = self._require_channel()
            if channel is not None and channel.alive:
                return channel
            fresh = AgentChannel(await proc.connect(), label=f"sandbox {self.name!r}")
            try:
                await fresh.handshake()
                self._require_channel()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await fresh.aclose()
                raise
            self.channel = fresh
            self._nursery.start_soon(fresh.run)
            self._nursery.start_soon(self._watch_channel, fresh)
            return fresh

    def _translate(self, exc: CorralError) -> CorralError:
        if isinstance(exc, AgentGone) and (self._stopping or self._final is SandboxStatus.STOPPED):
            return SandboxNotRunning(f"sandbox {self.name!r} was stopped")
        return exc

    def _abort_error(self) -> CorralError:
        if self._final is SandboxStatus.CRASHED:
            return AgentGone(f"sandbox {self.name!r} crashed: {self._crash_reason}")
        return SandboxNotRunning(f"sandbox {self.name!r} was stopped")

    async def _op(self, fn: Callable[[AgentChannel, T], Awaitable[R]], msg: T) -> R:
        """Run one request: refused unless running, aborted when the sandbox ends."""
        self._require_channel()
        scope = trio.CancelScope()
        self._ops.add(scope)
        self._last_activity = trio.current_time()
        self.active.set(self.active.value + 1)
        try:
            with scope:
                try:
                    return await fn(await self._agent(), msg)
                except AgentGone as exc:
                    raise self._translate(exc) from None
        finally:
            self._ops.discard(scope)
            self._last_activity = trio.current_time()
            self.active.set(self.active.value - 1)
        raise self._abort_error()

    def _with_env(self, msg: E) -> E:
        """The sandbox's env (``spec.env``) under the request's own: the same as the
        process env of a sandbox spawned with it, and how a warm pool's sandbox (spawned
        before the create named its env) gets it."""
        if not self.spec.env:
            return msg
        return msgspec.structs.replace(msg, env={**self.spec.env, **msg.env})

    async def _on_exec(self, msg: Exec) -> ExecResult:
        _check_exec(msg)
        msg = self._with_env(msg)
        result = await self._op(run_exec, msg)
        self.log.note_exit(result.exit_code, f"exec {msg.cmd!r}")
        return result

    async def _on_job(self, msg: JobStart | JobList | JobWait | JobKill) -> Message:
        if isinstance(msg, JobKill):
            check_signal(msg.signal)
        elif isinstance(msg, JobStart):
            msg = self._with_env(msg)
        reply = await self._op(job_request, msg)
        if isinstance(reply, JobExited):
            await self.log.job_logged(reply.id)
        return reply

    async def _on_metrics(self, msg: GetMetrics) -> object:
        self._require_channel()
        assert self.proc is not None
        return await self.proc.metrics()

    async def _on_fs_read(self, msg: FsRead) -> FsData:
        return await self._op(read_file, msg)

    async def _on_fs_write(self, msg: FsWrite) -> FsWritten:
        return await self._op(write_file, msg)

    async def _on_simple(self, msg: Message) -> Message:
        return await self._op(simple_request, msg)

    async def _on_exec_stream(self, msg: OpenExecStream) -> ExecSession:
        _check_exec(msg.exec)
        self._require_channel()
        assert self._nursery is not None
        request = self._with_env(msg.exec)
        if not request.interactive:
            request = msgspec.structs.replace(request, interactive=True)
        session: ExecSession = await self._nursery.start(self._relay, request)
        return session

    async def _relay(self, request: Exec, *, task_status: trio.TaskStatus[ExecSession]) -> None:
        sessions: list[ExecSession] = []

        async def body(channel: AgentChannel, req: Exec) -> None:
            async with channel.conversation(req) as conv:
                session, send = open_session(conv, self._translate)
                sessions.append(session)
                with session.scope:
                    async with send:
                        task_status.started(session)
                        await relay_exec(conv, session, send, req.window)

        try:
            await self._op(body, request)
        except CorralError as exc:
            if not sessions:
                raise
            sessions[0].error = exc
        finally:
            if sessions:
                sessions[0].closed.set()
                if sessions[0].exited is not None:
                    self.log.note_exit(sessions[0].exited.exit_code, f"exec {request.cmd!r}")

    # -- lifecycle (serialised; kill escalates) ----------------------------------------------
    async def _on_stop(self, msg: Stop) -> Ok:
        await self.stop(msg.timeout, sigterm=msg.sigterm)
        return Ok()

    async def _on_shutdown(self, msg: Shutdown) -> Ok:
        await self.stop(_timeout_for_grace(msg.grace))
        return Ok()

    async def _on_kill(self, msg: Kill) -> Ok:
        await self.kill(msg.timeout)
        return Ok()

    async def _on_drain(self, msg: Drain) -> Ok:
        async with self._lifecycle:
            if self._settled():
                await self._wait_terminal()
                return Ok()
            self.status.set(SandboxStatus.DRAINING)
            with trio.move_on_after(float("inf") if msg.timeout is None else msg.timeout):
                await self.active.wait_for(lambda n: n == 0)
            await self._ladder(msg.stop_timeout, sigterm=True)
        return Ok()

    async def _on_describe(self, msg: Describe) -> SandboxInfo:
        return self.info()

    async def _on_release(self, msg: Release) -> Ok:
        self._released = True
        self.close()
        return Ok()

    def _settled(self) -> bool:
        return self.status.value.terminal or self._finishing or self.proc is None

    async def _wait_terminal(self) -> None:
        if self.proc is None:
            await trio.lowlevel.checkpoint()
            return
        await self.status.wait_for(lambda s: s.terminal)

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT, *, sigterm: bool = True) -> None:
        """The stop ladder (see the module docstring)."""
        if self._settled():
            await self._wait_terminal()
            return
        if timeout <= 0:
            await self.kill()
            return
        async with self._lifecycle:
            if self._settled():
                await self._wait_terminal()
                return
            await self._ladder(timeout, sigterm=sigterm)

    async def _ladder(self, timeout: float, *, sigterm: bool) -> None:
        proc = self.proc
        assert proc is not None and self._nursery is not None
        self._stopping = True
        self.status.set(SandboxStatus.DRAINING)
        grace = max(0.0, timeout - min(1.0, timeout / 2))
        self._nursery.start_soon(self._send_shutdown, grace, timeout)
        exited = await self._poll_exit(timeout)
        if not exited and sigterm:
            logger.warning("sandbox %r: graceful stop exceeded %gs, SIGTERM", self.name, timeout)
            await self._signal(proc.terminate)
            exited = await self._poll_exit(DEFAULT_KILL_TIMEOUT)
        if not exited:
            logger.warning("sandbox %r: escalating to SIGKILL", self.name)
            await self._signal(proc.kill)
            exited = await self._poll_exit(DEFAULT_KILL_TIMEOUT)
        await self._finish(SandboxStatus.STOPPED)
        if not exited:
            raise Runtime(f"timed out observing stopped state for sandbox {self.name!r}")

    async def kill(self, timeout: float = DEFAULT_KILL_TIMEOUT) -> None:
        """SIGKILL, wait up to ``timeout`` (the kill timeout) to observe it, clean up."""
        if self._settled():
            await self._wait_terminal()
            return
        proc = self.proc
        assert proc is not None
        self._stopping = True
        self.status.set(SandboxStatus.DRAINING)
        await self._signal(proc.kill)
        exited = await self._poll_exit(timeout)
        await self._finish(SandboxStatus.STOPPED)
        if not exited:
            raise Runtime(f"timed out observing stopped state for sandbox {self.name!r}")

    async def _send_shutdown(self, grace: float, bound: float) -> None:
        with trio.move_on_after(bound):
            try:
                if self.proc is not None and await self.proc.request_stop(grace):
                    return  # the driver stops it out of band (cloud: POST .../stop)
                channel = self.channel
                if channel is None or not channel.alive:
                    return
                await channel.request(Shutdown(grace=grace))
            except (OSError, CorralError) as exc:
                logger.debug("sandbox %r: graceful stop request failed: %s", self.name, exc)

    async def _signal(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except (OSError, CorralError) as exc:
            logger.warning("sandbox %r: %s failed: %s", self.name, fn.__name__, exc)

    async def _poll_exit(self, duration: float) -> bool:
        """Poll ``exit_status`` every 100 ms for ``duration``; True once it is gone."""
        proc = self.proc
        assert proc is not None
        start = trio.current_time()
        deadline = start + duration
        tick = 0
        while True:
            if self._finishing or proc.exit_status is not None:
                return True
            if trio.current_time() >= deadline:
                return False
            tick += 1
            await trio.sleep_until(min(start + tick * POLL_INTERVAL, deadline))

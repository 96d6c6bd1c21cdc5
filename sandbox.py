"""The user-facing sandbox handle returned by ``Supervisor.create`` / ``get``.

A :class:`Sandbox` is a thin, cheap handle: every operation is an ``ask`` (or ``tell``)
to the sandbox's actor, with the same message Structs the wire carries. Its ``status``
is the actor's watchable value, read directly.
"""

from __future__ import annotations

import os
import signal as _signal
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import trio

from .actors.execs import ExecResult, ExecSession, Job, check_signal
from .actors.fsops import FsReadStream, check_chunk_size, write_chunks
from .actors.logs import LogFollower, LogRecord
from .actors.metrics import MetricsStream, check_interval
from .actors.sandbox import (
    Describe,
    Drain,
    GetMetrics,
    Kill,
    OpenExecStream,
    SandboxActor,
    SandboxInfo,
    Start,
    Stop,
)
from .actors.state import SandboxStatus
from .errors import AgentGone, ExecTimeout, InvalidConfig, Runtime
from .protocol import (
    EXEC_CHUNK,
    FS_CHUNK,
    Exec,
    ExecExited,
    ExecResize,
    ExecSignal,
    ExecStdin,
    FsCopy,
    FsData,
    FsEntry,
    FsExists,
    FsExistsReply,
    FsList,
    FsListReply,
    FsMkdir,
    FsRead,
    FsRemove,
    FsRename,
    FsStat,
    FsStatReply,
    FsSymlink,
    FsWrite,
    FsWritten,
    JobInfo,
    JobList,
    JobListReply,
    JobStart,
    JobStarted,
    Message,
    Ok,
    Ping,
    Pong,
)

if TYPE_CHECKING:
    from .drivers.local.metrics import SandboxMetrics

__all__ = ["ExecProcess", "Job", "Sandbox", "SandboxFs"]

CLOSE_TIMEOUT = 3.0
"""How long leaving an exec_stream block waits for the kill to be delivered."""


def _exec_request(
    cmd: str,
    args: Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
) -> dict[str, Any]:
    if not isinstance(cmd, str) or not cmd:
        raise InvalidConfig("cmd must be a non-empty string")
    if isinstance(args, str | bytes):
        raise InvalidConfig("args must be a sequence of strings, not a single string")
    argv = list(args)
    if not all(isinstance(a, str) for a in argv):
        raise InvalidConfig("every argument must be a string")
    if timeout is not None and not timeout > 0:
        raise InvalidConfig(f"timeout must be greater than 0, got {timeout!r}")
    return {
        "cmd": cmd,
        "args": argv,
        "env": dict(env or {}),
        "cwd": cwd,
        "timeout": None if timeout is None else float(timeout),
    }


def _as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(data, str):
        return data.encode()
    return bytes(data)


class Sandbox:
    """A handle on one sandbox (cheap; many handles may point at the same sandbox)."""

    __slots__ = ("_actor", "fs")

    def __init__(self, actor: SandboxActor) -> None:
        self._actor = actor
        self.fs = SandboxFs(actor)

    def __repr__(self) -> str:
        return f"<Sandbox {self.name!r} {self.status}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sandbox) and other._actor is self._actor

    def __hash__(self) -> int:
        return hash(id(self._actor))

    @property
    def name(self) -> str:
        return self._actor.name

    @property
    def status(self) -> SandboxStatus:
        """The current status (a live value, no I/O)."""
        return self._actor.status.value

    @property
    def image(self) -> str:
        return self._actor.spec.image

    @property
    def created_at(self) -> datetime:
        return self._actor.created_at

    async def info(self) -> SandboxInfo:
        return await self._actor.ask_as(Describe(), SandboxInfo)

    # -- exec --------------------------------------------------------------------------
    async def exec(
        self,
        cmd: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command to its end; ExecTimeout (with partial output) past ``timeout``."""
        fields = _exec_request(cmd, args, env, cwd, timeout)
        request = Exec(**fields, stdin=None if stdin is None else _as_bytes(stdin))
        return await self._actor.ask_as(request, ExecResult)

    @asynccontextmanager
    async def exec_stream(
        self,
        cmd: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        timeout: float | None = None,
    ) -> AsyncIterator[ExecProcess]:
        """An interactive exec; leaving the block (or being cancelled) kills the process."""
        fields = _exec_request(cmd, args, env, cwd, timeout)
        request = Exec(**fields, interactive=True, tty=bool(tty), rows=rows, cols=cols)
        session = await self._actor.ask_as(OpenExecStream(exec=request), ExecSession)
        proc = ExecProcess(session, request)
        try:
            yield proc
        finally:
            await proc.aclose()

    # -- detached jobs, logs, metrics ------------------------------------------------------
    async def exec_detached(
        self,
        cmd: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
    ) -> Job:
        """Start a job that runs on its own in the sandbox (its output goes to the sandbox
        log); returns once it runs. ExecFailed when it cannot start."""
        fields = _exec_request(cmd, args, env, cwd, timeout)
        request = JobStart(**fields, stdin=None if stdin is None else _as_bytes(stdin))
        started = await self._actor.ask_as(request, JobStarted)
        return Job(self._actor, started.id, pid=started.pid, cmd=cmd, args=fields["args"])

    async def jobs(self) -> list[JobInfo]:
        """Every job the sandbox's agent knows: running, and the latest finished ones."""
        reply = await self._actor.ask_as(JobList(), JobListReply)
        return reply.jobs

    def job(self, id: int) -> Job:
        """A handle on job ``id`` (started earlier, maybe by another client; no I/O)."""
        if isinstance(id, bool) or not isinstance(id, int) or id < 1:
            raise InvalidConfig(f"a job id is a whole number >= 1, got {id!r}")
        return Job(self._actor, id, args=[])

    async def logs(
        self, *, tail: int | None = None, since: float | datetime | None = None
    ) -> list[LogRecord]:
        """The sandbox log (job output, agent and lifecycle events), oldest first: entries
        at or after ``since`` (a datetime or Unix time), the last ``tail`` of them."""
        return await self._actor.log.store.read_async(tail=tail, since=since)

    def log_stream(
        self, *, tail: int | None = None, since: float | datetime | None = None
    ) -> LogFollower:
        """``async for entry in sb.log_stream()``: what ``logs()`` gives, then each new
        entry as it comes; ends once the sandbox has stopped (or crashed)."""
        actor = self._actor
        return actor.log.store.follow(
            tail=tail, since=since, until=lambda: actor.status.value.terminal
        )

    async def metrics(self) -> SandboxMetrics:
        """Resource usage now (SandboxNotRunning unless it runs)."""
        return cast("SandboxMetrics", await self._actor.ask(GetMetrics()))

    def metrics_stream(self, interval: float = 1.0) -> MetricsStream:
        """``async for m in sb.metrics_stream(1.0)``: a sample now, then every ``interval``
        seconds on a fixed grid; ends when the sandbox stops."""
        return MetricsStream(self._actor, GetMetrics(), check_interval(interval))

    # -- lifecycle ---------------------------------------------------------------------
    async def stop(self, timeout: float = 10.0) -> None:
        """The stop ladder: Shutdown, ``timeout``, SIGTERM, 5 s, SIGKILL, 5 s."""
        await self._actor.ask_as(Stop(timeout=timeout), Ok)

    async def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL now; Runtime if it is not seen gone within ``timeout`` seconds."""
        if not timeout > 0:
            raise InvalidConfig(f"timeout must be greater than 0, got {timeout!r}")
        await self._actor.ask_as(Kill(timeout=timeout), Ok)

    async def start(self) -> None:
        """Start a sandbox created with ``start=False`` (or stopped, or crashed) again."""
        await self._actor.ask_as(Start(), Ok)

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new work, let running work finish (up to ``timeout``), then stop."""
        await self._actor.ask_as(Drain(timeout=timeout), Ok)

    async def wait_until_stopped(self) -> SandboxStatus:
        """Wait (no polling) until the sandbox is stopped or crashed; return which."""
        return await self._actor.status.wait_for(lambda s: s.terminal)

    async def wait_status(self, *wanted: SandboxStatus | str) -> SandboxStatus:
        """Wait (no polling) until the status is one of ``wanted`` and return it; with
        none given, wait for the next change."""
        if not wanted:
            return await self._actor.status.wait_change()
        try:
            targets = {SandboxStatus(w) for w in wanted}
        except ValueError:
            raise InvalidConfig(f"unknown sandbox status in {wanted!r}") from None
        return await self._actor.status.wait_for(lambda s: s in targets)

    async def ping(self) -> None:
        await self._actor.ask_as(Ping(), Pong)

    # -- low level ---------------------------------------------------------------------
    async def ask(self, msg: object) -> Any:
        return await self._actor.ask(msg)

    async def tell(self, msg: object) -> None:
        await self._actor.tell(msg)


class SandboxFs:
    """``sb.fs``: files inside the sandbox (paths are the sandbox's own).

    Relative paths resolve against the sandbox's workdir. A missing path raises
    :class:`~corral.errors.FsNotFound`; other failures raise the matching ``FsError``
    leaf; bad arguments raise ``InvalidConfig`` before anything is sent. Contents move in
    chunks of at most ``FS_CHUNK`` (1 MiB, a quarter of the frame limit): ``read`` and
    ``write`` hold the whole file, ``read_stream`` / ``write_stream`` one chunk at a time.
    """

    __slots__ = ("_actor",)

    def __init__(self, actor: SandboxActor) -> None:
        self._actor = actor

    async def _ask_read(self, request: FsRead) -> FsData:
        return await self._actor.ask_as(request, FsData)

    async def _ask_write(self, request: FsWrite) -> FsWritten:
        return await self._actor.ask_as(request, FsWritten)

    async def read(self, path: str) -> bytes:
        reply = await self._ask_read(FsRead(path=_fs_path(path)))
        return reply.data

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    def read_stream(
        self, path: str, *, chunk_size: int = FS_CHUNK, offset: int = 0, length: int | None = None
    ) -> FsReadStream:
        """``async for chunk in sb.fs.read_stream(path)``: the file in ``chunk_size`` pieces.

        One request per chunk, nothing read ahead; errors come on the first iteration.
        ``offset`` / ``length`` read a part of the file.
        """
        _fs_count("offset", offset)
        if length is not None:
            _fs_count("length", length)
        return FsReadStream(
            self._ask_read,
            _fs_path(path),
            chunk_size=check_chunk_size(chunk_size),
            offset=offset,
            length=length,
        )

    async def write(
        self,
        path: str,
        data: bytes | bytearray | memoryview | str,
        *,
        append: bool = False,
        mode: int | None = None,
    ) -> int:
        """Write (replace, or append to) a file of any size; returns the bytes written."""
        if not isinstance(data, bytes | bytearray | memoryview | str):
            raise InvalidConfig(f"data must be bytes or str, got {type(data).__name__}")
        _fs_mode(mode)
        request = FsWrite(path=_fs_path(path), data=_as_bytes(data), append=append, mode=mode)
        reply = await self._ask_write(request)
        return reply.written

    async def write_stream(
        self,
        path: str,
        chunks: AsyncIterable[bytes] | Iterable[bytes],
        *,
        chunk_size: int = FS_CHUNK,
        mode: int | None = None,
    ) -> int:
        """Replace ``path`` with what ``chunks`` (an async or plain iterable of bytes)
        yields, sent ``chunk_size`` at a time; returns the bytes written. Not atomic: a
        failure part-way leaves a partial file. ``mode`` applies at the end."""
        _fs_mode(mode)
        return await write_chunks(
            self._ask_write,
            _fs_path(path),
            chunks,
            chunk_size=check_chunk_size(chunk_size),
            mode=mode,
        )

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FsEntry:
        request = FsStat(path=_fs_path(path), follow_symlinks=follow_symlinks)
        reply = await self._actor.ask_as(request, FsStatReply)
        return reply.entry

    async def list(self, path: str) -> list[FsEntry]:
        """The entries of a directory, sorted by name (symlinks not followed)."""
        reply = await self._actor.ask_as(FsList(path=_fs_path(path)), FsListReply)
        return reply.entries

    async def mkdir(self, path: str, *, parents: bool = False, mode: int | None = None) -> None:
        _fs_mode(mode)
        await self._actor.ask_as(FsMkdir(path=_fs_path(path), parents=parents, mode=mode), Ok)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._actor.ask_as(FsRemove(path=_fs_path(path), recursive=recursive), Ok)

    async def copy(self, src: str, dst: str) -> None:
        """Copy a file or a directory tree inside the sandbox (symlinks copied as links)."""
        await self._actor.ask_as(FsCopy(src=_fs_path(src, "src"), dst=_fs_path(dst, "dst")), Ok)

    async def rename(self, src: str, dst: str) -> None:
        await self._actor.ask_as(FsRename(src=_fs_path(src, "src"), dst=_fs_path(dst, "dst")), Ok)

    async def symlink(self, target: str, path: str) -> None:
        """Create a symlink at ``path`` pointing at ``target`` (kept verbatim)."""
        await self._actor.ask_as(
            FsSymlink(target=_fs_path(target, "target"), path=_fs_path(path)), Ok
        )

    async def exists(self, path: str) -> bool:
        reply = await self._actor.ask_as(FsExists(path=_fs_path(path)), FsExistsReply)
        return reply.exists

    async def copy_from_host(self, host_path: str | os.PathLike[str], path: str) -> None:
        """Copy a host file or directory tree into the sandbox at ``path``.

        Modes are kept (not owners); symlinks inside a tree are recreated, never
        followed; devices, FIFOs and sockets refuse the copy (``FsError``). For a tree,
        ``path`` must not exist or be an empty directory. See :mod:`corral.hostfs_in`."""
        from .hostfs_in import copy_from_host

        await copy_from_host(self, _host_path(host_path), _fs_path(path))

    async def copy_to_host(self, path: str, host_path: str | os.PathLike[str]) -> None:
        """Copy a sandbox file or directory tree to ``host_path``, never writing outside it.

        Names that are not plain, symlinks that lead out of the copy and host symlinks
        in the way raise ``FsPathEscape``; a failed copy leaves nothing behind. For a
        tree, ``host_path`` must not exist or be an empty directory. See
        :mod:`corral.hostfs` for the exact rules."""
        from .hostfs import copy_to_host

        await copy_to_host(self, _fs_path(path), _host_path(host_path))


def _fs_path(path: object, what: str = "path") -> str:
    if not isinstance(path, str):
        raise InvalidConfig(f"{what} must be a string, got {type(path).__name__}")
    if not path:
        raise InvalidConfig(f"{what} must not be empty")
    if "\0" in path:
        raise InvalidConfig(f"{what} must not contain a NUL byte: {path!r}")
    return path


def _host_path(path: object) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise InvalidConfig(f"host_path must be a str or os.PathLike, got {type(path).__name__}")
    return _fs_path(path, "host_path")


def _fs_count(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidConfig(f"{what} must be a whole number >= 0, got {value!r}")


def _fs_mode(mode: object) -> None:
    if mode is None:
        return
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InvalidConfig(f"mode must be a permission number like 0o644, got {mode!r}")


class ExecProcess:
    """A running streamed exec: stdin, signals, resize, and its events in order.

    ``async for ev in proc`` yields ExecStarted / ExecStdout / ExecStderr / ExecExited;
    ``await proc.wait()`` reads (and drops) what is left and returns the exit code.
    """

    def __init__(self, session: ExecSession, request: Exec) -> None:
        self._session = session
        self._request = request

    def __repr__(self) -> str:
        return f"<ExecProcess {self._request.cmd!r} pid={self.pid} exit={self.exit_code}>"

    @property
    def pid(self) -> int | None:
        return self._session.pid

    @property
    def exited(self) -> ExecExited | None:
        return self._session.exited

    @property
    def exit_code(self) -> int | None:
        exited = self._session.exited
        return None if exited is None else exited.exit_code

    async def _send(self, msg: Message) -> None:
        await self._session.send(msg)

    async def send_stdin(self, data: bytes | bytearray | memoryview | str) -> None:
        raw = _as_bytes(data)
        for start in range(0, len(raw), EXEC_CHUNK):
            await self._send(ExecStdin(data=raw[start : start + EXEC_CHUNK]))

    async def close_stdin(self) -> None:
        await self._send(ExecStdin(eof=True))

    async def signal(self, signum: int) -> None:
        await self._send(ExecSignal(signal=check_signal(signum)))

    async def kill(self) -> None:
        await self.signal(_signal.SIGKILL)

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(ExecResize(rows=rows, cols=cols))

    def __aiter__(self) -> ExecProcess:
        return self

    async def __anext__(self) -> Message:
        session = self._session
        try:
            return await session.events.receive()
        except trio.EndOfChannel:
            pass
        except trio.ClosedResourceError:
            raise Runtime("this exec stream is closed") from None
        await session.closed.wait()
        if session.exited is not None:
            raise StopAsyncIteration
        if session.error is not None:
            raise session.error
        raise AgentGone(f"{self._request.cmd}: exec stream ended without an exit event")

    async def wait(self) -> int:
        """Wait for the command to end (dropping unread output); its exit code."""
        async for _event in self:
            pass
        exited = self._session.exited
        assert exited is not None
        if exited.timed_out:
            raise ExecTimeout(f"{self._request.cmd}: timed out after {self._request.timeout:g}s")
        return exited.exit_code

    async def aclose(self) -> None:
        """Kill the command unless it has ended; wait (bounded, shielded) for the relay."""
        self._session.discard()
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await self._session.closed.wait()

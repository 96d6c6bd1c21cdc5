"""One microsandbox agent WebSocket, served from a corral sandbox.

The released microsandbox client dials ``/v1/sandboxes/{id}/agent`` once per SDK call
(``exec``, ``exec_stream``, ``shell``, each ``fs.*``) and speaks the protocol in
:mod:`corral.server.msb_agent` over it. :class:`AgentSession` answers it: it sends the
handshake, reassembles frames from the byte stream, and runs one task per correlation id
that translates to corral's sandbox API (:class:`AgentTarget`).

Memory per connection is bounded: the decoder holds at most one partial frame (≤ 4 MiB),
each session's inbox holds one follow-up frame, at most :data:`MAX_SESSIONS` ids are live,
and file contents move in chunks of at most 1 MiB. Back-pressure runs end to end: a slow
client makes ``send`` wait (hypercorn awaits the socket), which stops the exec's output
pump, which stops corral's exec credit, which blocks the command on its pipe; a fast
writer waits on its session's inbox, which stops the socket reader.
"""

from __future__ import annotations

import errno as _errno
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..errors import CorralError, ExecFailed, FsError, FsNotFound, ProtocolError
from ..protocol import ExecExited, ExecStarted, ExecStartFailed, ExecStderr, ExecStdout, FsEntry
from . import msb_agent as ma

MAX_SESSIONS = 64
"""Live correlation ids per socket; more get a terminal error."""


class ExecProcess(Protocol):
    """A running command (corral's ``exec_stream`` handle)."""

    async def send_stdin(self, data: bytes) -> None: ...
    async def close_stdin(self) -> None: ...
    async def signal(self, signum: int) -> None: ...
    async def resize(self, rows: int, cols: int) -> None: ...
    async def wait(self) -> int: ...
    def __aiter__(self) -> AsyncIterator[Any]: ...


class AgentTarget(Protocol):
    """What a session needs from a running corral sandbox."""

    def exec_stream(
        self,
        cmd: str,
        args: list[str],
        *,
        env: dict[str, str],
        cwd: str | None,
        tty: bool,
        rows: int,
        cols: int,
    ) -> AbstractAsyncContextManager[ExecProcess]: ...
    async def read_chunk(self, path: str, offset: int, length: int) -> tuple[bytes, bool]: ...
    async def write_chunk(
        self, path: str, data: bytes, offset: int, *, truncate: bool, append: bool
    ) -> None: ...
    async def stat(self, path: str, follow_symlinks: bool = True) -> FsEntry: ...
    async def list(self, path: str) -> list[FsEntry]: ...
    async def mkdir(self, path: str) -> None: ...
    async def remove(self, path: str, recursive: bool) -> None: ...
    async def copy(self, src: str, dst: str) -> None: ...
    async def rename(self, src: str, dst: str) -> None: ...


class Transport(Protocol):
    async def receive(self) -> bytes | None:
        """The next binary message; None once the client is gone."""

    async def send(self, data: bytes) -> None: ...


@dataclass
class _Handle:
    path: str
    read: bool
    append: bool


def fs_error_text(exc: CorralError) -> str:
    """Errors the way the microsandbox agent words them: ``<strerror> (os error N)``."""
    if isinstance(exc, FsError) and exc.errno:
        return f"{os.strerror(exc.errno)} (os error {exc.errno})"
    return str(exc) or type(exc).__name__


def _oserr(code: int) -> str:
    return f"{os.strerror(code)} (os error {code})"


def entry_out(e: FsEntry) -> dict[str, Any]:
    return ma.fs_entry(
        path=e.path, kind=e.kind, size=e.size, mode=e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime
    )


class AgentSession:
    def __init__(
        self,
        target: AgentTarget,
        transport: Transport,
        *,
        on_activity: Callable[[], None] | None = None,
        log: Callable[[str, bytes | str, int | None], None] | None = None,
        agent_version: str = "corral",
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self._target = target
        self._transport = transport
        self._on_activity = on_activity or (lambda: None)
        self._log = log or (lambda source, data, session_id: None)
        self._agent_version = agent_version
        self._max_sessions = max_sessions
        self._decoder = ma.FrameDecoder()
        self._send_lock = trio.Lock()
        self._inboxes: dict[int, trio.MemorySendChannel[Any]] = {}
        self._live: set[int] = set()
        self._handles: dict[int, _Handle] = {}
        self._next_handle = 1

    async def run(self) -> None:
        """Serve until the client goes away (or sends a frame it may not send)."""
        boot = time.time_ns()
        await self._send(
            ma.encode_handshake(
                boot_time_ns=boot,
                init_time_ns=boot,
                ready_time_ns=boot,
                agent_version=self._agent_version,
            )
        )
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    data = await self._transport.receive()
                    if data is None:
                        break
                    for frame in self._decoder.feed(data):
                        await self._dispatch(nursery, frame)
            except ProtocolError:
                pass  # an out-of-range length: the stream cannot be resynchronised
            finally:
                # Nobody is left to read replies: end every command and transfer.
                nursery.cancel_scope.cancel()

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self._transport.send(data)

    # -- routing -------------------------------------------------------------------------------

    async def _dispatch(self, nursery: trio.Nursery, frame: ma.RawFrame) -> None:
        if not ma.ID_MIN <= frame.id < ma.ID_MAX:
            return
        try:
            env = ma.decode_envelope(frame.body)
        except ProtocolError:
            return  # undecodable: dropped, as the reference agent does
        self._on_activity()
        rid = frame.id
        if env.t in (ma.EXEC_REQUEST, ma.FS_REQUEST):
            if rid in self._live:
                return
            if len(self._live) >= self._max_sessions:
                await self._refuse(rid, env.t)
                return
            self._live.add(rid)
            # The inbox exists before the task runs: follow-ups (fs.data after a Write)
            # may arrive in the very next frame.
            inbox = self._open_inbox(rid)
            task = self._exec if env.t == ma.EXEC_REQUEST else self._fs
            nursery.start_soon(task, rid, env.payload, inbox)
            return
        follow_up = _FOLLOW_UPS.get(env.t)
        route = self._inboxes.get(rid)
        if follow_up is None or route is None:
            return  # unknown type or no session for this id: dropped
        try:
            msg = ma.parse_payload(env.payload, follow_up)
        except ProtocolError:
            return
        try:
            await route.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the session ended meanwhile

    async def _refuse(self, rid: int, t: str) -> None:
        text = f"too many concurrent requests on one connection (limit {self._max_sessions})"
        if t == ma.EXEC_REQUEST:
            await self._send(ma.exec_failed(rid, kind="resource_limit", message=text))
        else:
            await self._send(ma.fs_response(rid, ok=False, error=text))

    def _open_inbox(self, rid: int) -> trio.MemoryReceiveChannel[Any]:
        send, recv = trio.open_memory_channel[Any](1)
        self._inboxes[rid] = send
        return recv

    def _end(self, rid: int) -> None:
        self._live.discard(rid)
        inbox = self._inboxes.pop(rid, None)
        if inbox is not None:
            inbox.close()

    # -- exec ----------------------------------------------------------------------------------

    async def _exec(self, rid: int, payload: Any, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        try:
            try:
                req = ma.parse_payload(payload, ma.ExecRequest)
            except ProtocolError as exc:
                await self._send(ma.exec_failed(rid, kind="bad_args", message=str(exc)))
                return
            if req.user is not None:
                await self._send(
                    ma.exec_failed(
                        rid,
                        kind="user_setup_failed",
                        message=f"running as user {req.user!r} is not supported by corral",
                        stage="user",
                    )
                )
                return
            if req.rlimits:
                await self._send(
                    ma.exec_failed(
                        rid, kind="resource_limit", message="per-exec rlimits are not supported"
                    )
                )
                return
            self._log("system", f"exec {' '.join([req.cmd, *req.args])[:200]}", rid)
            await self._run_exec(rid, req, inbox)
        finally:
            self._end(rid)

    async def _run_exec(
        self, rid: int, req: ma.ExecRequest, inbox: trio.MemoryReceiveChannel[Any]
    ) -> None:
        code = 0
        failure: CorralError | None = None
        try:
            async with self._target.exec_stream(
                req.cmd,
                list(req.args),
                env=req.env_map(),
                cwd=req.cwd,
                tty=req.tty,
                rows=req.rows,
                cols=req.cols,
            ) as proc:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._exec_input, rid, proc, inbox)
                    try:
                        code = await self._exec_output(rid, proc)
                    except CorralError as exc:  # caught here: a nursery would wrap it
                        failure = exc
                    nursery.cancel_scope.cancel()
            if failure is not None:
                raise failure
        except ExecFailed as exc:
            await self._send(
                ma.exec_failed(
                    rid,
                    kind=exc.kind,
                    message=exc.message or str(exc),
                    errno=exc.errno,
                    errno_name=_errno.errorcode.get(exc.errno) if exc.errno else None,
                    stage="execvp",
                )
            )
            return
        except CorralError as exc:
            await self._send(ma.exec_failed(rid, kind="other", message=str(exc)))
            return
        await self._send(ma.exec_exited(rid, code))

    async def _exec_output(self, rid: int, proc: ExecProcess) -> int:
        """Forward the command's events until it exits; its exit code."""
        async for ev in proc:
            if isinstance(ev, ExecStdout):
                self._log("stdout", ev.data, rid)
                await self._send(ma.exec_stdout(rid, ev.data))
            elif isinstance(ev, ExecStderr):
                self._log("stderr", ev.data, rid)
                await self._send(ma.exec_stderr(rid, ev.data))
            elif isinstance(ev, ExecStarted):
                await self._send(ma.exec_started(rid, ev.pid))
            elif isinstance(ev, ExecExited):
                self._log("system", f"exec exited with code {ev.exit_code}", rid)
                return ev.exit_code
            elif isinstance(ev, ExecStartFailed):
                raise ExecFailed(ev.message, kind=ev.kind, errno=ev.errno)
        return await proc.wait()

    async def _exec_input(
        self, rid: int, proc: ExecProcess, inbox: trio.MemoryReceiveChannel[Any]
    ) -> None:
        async for msg in inbox:
            try:
                if isinstance(msg, ma.ExecStdin):
                    if msg.data:
                        await proc.send_stdin(msg.data)
                    else:
                        await proc.close_stdin()
                elif isinstance(msg, ma.ExecSignal):
                    await proc.signal(msg.signal)
                elif isinstance(msg, ma.ExecResize):
                    await proc.resize(msg.rows, msg.cols)
            except CorralError as exc:
                if isinstance(msg, ma.ExecStdin):
                    await self._send(ma.exec_stdin_error(rid, str(exc) or "stdin closed"))

    # -- filesystem ----------------------------------------------------------------------------

    async def _fs(self, rid: int, payload: Any, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        try:
            try:
                op = ma.parse_fs_op(payload)
                data = await self._fs_op(rid, op, inbox)
            except ma.UnknownFsOp as exc:
                await self._send(ma.fs_response(rid, ok=False, error=str(exc)))
            except ProtocolError as exc:
                await self._send(ma.fs_response(rid, ok=False, error=f"bad request: {exc}"))
            except _FsFail as exc:
                await self._send(ma.fs_response(rid, ok=False, error=exc.text))
            except CorralError as exc:
                await self._send(ma.fs_response(rid, ok=False, error=fs_error_text(exc)))
            else:
                await self._send(ma.fs_response(rid, data=data))
        finally:
            self._end(rid)

    async def _fs_op(self, rid: int, op: ma.FsOp, inbox: trio.MemoryReceiveChannel[Any]) -> Any:
        t = self._target
        match op:
            case ma.OpenFile():
                return {"Handle": await self._open(op)}
            case ma.Write():
                await self._write(op, inbox)
            case ma.Read():
                await self._read(rid, op)
            case ma.CloseHandle():
                if self._handles.pop(op.handle, None) is None:
                    raise _FsFail(_oserr(_errno.EBADF))
            case ma.List():
                return {"List": [entry_out(e) for e in await t.list(op.path)]}
            case ma.Stat():
                return {"Stat": entry_out(await t.stat(op.path, op.follow_symlink))}
            case ma.Mkdir():
                await t.mkdir(op.path)
            case ma.Remove():
                await t.remove(op.path, False)
            case ma.RemoveDir():
                await t.remove(op.path, op.recursive)
            case ma.Copy():
                await t.copy(op.src, op.dst)
            case ma.Rename():
                await t.rename(op.src, op.dst)
        return None

    async def _open(self, op: ma.OpenFile) -> int:
        o = op.options
        t = self._target
        try:
            entry = await t.stat(op.path)
        except FsNotFound:
            exists = False
        else:
            exists = True
            if entry.kind == "dir":
                raise _FsFail(_oserr(_errno.EISDIR))
        writing = o.write or o.append
        if exists and o.create_new:
            raise _FsFail(_oserr(_errno.EEXIST))
        if not exists and not (writing and (o.create or o.create_new)):
            raise _FsFail(_oserr(_errno.ENOENT))
        if writing and (o.truncate or not exists):
            await t.write_chunk(op.path, b"", 0, truncate=True, append=False)
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = _Handle(op.path, read=not writing, append=o.append)
        return handle

    def _handle(self, n: int, *, read: bool) -> _Handle:
        h = self._handles.get(n)
        if h is None or h.read != read:
            raise _FsFail(_oserr(_errno.EBADF))
        return h

    async def _write(self, op: ma.Write, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        h = self._handle(op.handle, read=False)
        offset = op.offset
        async for msg in inbox:
            if not isinstance(msg, ma.FsData):
                continue
            if not msg.data:
                return
            await self._target.write_chunk(
                h.path, msg.data, offset, truncate=False, append=h.append
            )
            offset += len(msg.data)
        raise _FsFail("write ended before its end-of-data frame")

    async def _read(self, rid: int, op: ma.Read) -> None:
        h = self._handle(op.handle, read=True)
        offset, remaining = op.offset, op.len
        while remaining is None or remaining > 0:
            want = ma.FS_DATA_CHUNK if remaining is None else min(remaining, ma.FS_DATA_CHUNK)
            data, eof = await self._target.read_chunk(h.path, offset, want)
            if data:
                await self._send(ma.fs_data(rid, data))
                offset += len(data)
                if remaining is not None:
                    remaining -= len(data)
            if eof or not data:
                return


class _FsFail(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


_FOLLOW_UPS: dict[str, type[Any]] = {
    ma.EXEC_STDIN: ma.ExecStdin,
    ma.EXEC_SIGNAL: ma.ExecSignal,
    ma.EXEC_RESIZE: ma.ExecResize,
    ma.FS_DATA: ma.FsData,
}

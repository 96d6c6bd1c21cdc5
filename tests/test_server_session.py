"""AgentSession (the microsandbox agent WebSocket) over an in-memory transport.

The "client" side here sends frames exactly as the captured SDK does (header and body as
two messages, flags 2 on requests, v=10); the target is a small in-memory fake of a
corral sandbox. The real SDK is exercised end to end in test_server_client.py.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import pytest
import trio
import trio.testing

from corral.errors import ExecFailed, FsNotFound, Runtime
from corral.protocol import ExecExited, ExecStarted, ExecStderr, ExecStdout, FsEntry
from corral.server import msb_agent as ma
from corral.server.msb_session import AgentSession


class MemTransport:
    def __init__(self, out_capacity: float = 1000) -> None:
        self.to_server_send, self.to_server = trio.open_memory_channel[bytes | None](1000)
        self.to_client, self.from_server = trio.open_memory_channel[bytes](out_capacity)

    async def receive(self) -> bytes | None:
        try:
            return await self.to_server.receive()
        except trio.EndOfChannel:
            return None

    async def send(self, data: bytes) -> None:
        await self.to_client.send(data)


class FakeProc:
    def __init__(self, cmd: str, args: list[str], env: dict[str, str]) -> None:
        self.cmd, self.args, self.env = cmd, args, env
        self.events_send, self.events = trio.open_memory_channel[Any](0)
        self.stdin: list[bytes] = []
        self.stdin_closed = trio.Event()
        self.signals: list[int] = []
        self.resizes: list[tuple[int, int]] = []
        self.signalled = trio.Event()
        self.produced = 0

    async def send_stdin(self, data: bytes) -> None:
        if self.stdin_closed.is_set():
            raise Runtime("stdin is closed")
        self.stdin.append(data)

    async def close_stdin(self) -> None:
        self.stdin_closed.set()

    async def signal(self, signum: int) -> None:
        self.signals.append(signum)
        self.signalled.set()

    async def resize(self, rows: int, cols: int) -> None:
        self.resizes.append((rows, cols))

    async def wait(self) -> int:
        return 0

    def __aiter__(self) -> AsyncIterator[Any]:
        return self.events.__aiter__()

    async def script(self) -> None:
        send = self.events_send
        async with send:
            await send.send(ExecStarted(pid=42))
            if self.cmd == "echo":
                await send.send(ExecStdout(data=" ".join(self.args).encode() + b"\n"))
                await send.send(ExecExited(exit_code=0))
            elif self.cmd == "cat":
                await self.stdin_closed.wait()
                await send.send(ExecStdout(data=b"".join(self.stdin)))
                await send.send(ExecStderr(data=b"done\n"))
                await send.send(ExecExited(exit_code=3))
            elif self.cmd == "wait":
                await self.signalled.wait()
                await send.send(ExecExited(exit_code=128 + self.signals[0], signal=self.signals[0]))
            elif self.cmd == "flood":
                for _ in range(int(self.args[0])):
                    await send.send(ExecStdout(data=b"x" * 1000))
                    self.produced += 1
                await send.send(ExecExited(exit_code=0))


class FakeTarget:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {"/", "/w"}
        self.procs: list[FakeProc] = []
        self.killed: list[FakeProc] = []
        self.writes: list[tuple[str, int, int, bool]] = []

    @asynccontextmanager
    async def exec_stream(
        self,
        cmd: str,
        args: list[str],
        *,
        env: dict[str, str],
        cwd: str | None,
        tty: bool,
        rows: int,
        cols: int,
    ) -> AsyncIterator[FakeProc]:
        if cmd == "nope":
            raise ExecFailed("nope: command not found", kind="not_found", errno=errno.ENOENT)
        proc = FakeProc(cmd, args, env)
        self.procs.append(proc)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proc.script)
            try:
                yield proc
            finally:
                self.killed.append(proc)
                nursery.cancel_scope.cancel()

    def _missing(self, path: str) -> FsNotFound:
        return FsNotFound(f"no such file: {path}", path=path, errno=errno.ENOENT)

    async def read_chunk(self, path: str, offset: int, length: int) -> tuple[bytes, bool]:
        if path not in self.files:
            raise self._missing(path)
        data = self.files[path][offset : offset + length]
        return data, offset + len(data) >= len(self.files[path])

    async def write_chunk(
        self, path: str, data: bytes, offset: int, *, truncate: bool, append: bool
    ) -> None:
        self.writes.append((path, offset, len(data), truncate))
        old = b"" if truncate else self.files.get(path, b"")
        self.files[path] = old[:offset] + data + old[offset + len(data) :]

    async def stat(self, path: str, follow_symlinks: bool = True) -> FsEntry:
        if path in self.dirs:
            return FsEntry(name="", path=path, kind="dir", size=0, mode=0o40755, mtime=1.5)
        if path in self.files:
            size = len(self.files[path])
            return FsEntry(name="", path=path, kind="file", size=size, mode=0o100644, mtime=2.5)
        raise self._missing(path)

    async def list(self, path: str) -> list[FsEntry]:
        names = [p for p in self.files if p.rsplit("/", 1)[0] == path.rstrip("/")]
        return [await self.stat(p) for p in sorted(names)]

    async def mkdir(self, path: str) -> None:
        self.dirs.add(path)

    async def remove(self, path: str, recursive: bool) -> None:
        if self.files.pop(path, None) is None:
            raise self._missing(path)

    async def copy(self, src: str, dst: str) -> None:
        self.files[dst] = self.files[src]

    async def rename(self, src: str, dst: str) -> None:
        self.files[dst] = self.files.pop(src)


class Client:
    """Plays the SDK's side of the socket."""

    def __init__(self, transport: MemTransport) -> None:
        self.t = transport
        self.dec = ma.FrameDecoder()
        self.pending: list[ma.RawFrame] = []
        self.buf = b""
        self.next_id = 1

    async def handshake(self) -> tuple[int, int, ma.Envelope]:
        while len(self.buf) < 8:
            self.buf += await self.t.from_server.receive()
        id_min, id_max = struct.unpack(">II", self.buf[:8])
        self.pending += self.dec.feed(self.buf[8:])
        frame = await self.frame()
        assert (frame.id, frame.flags) == (0, 0)
        return id_min, id_max, ma.decode_envelope(frame.body)

    async def send(self, id: int, t: str, payload: Any, flags: int = 0) -> None:
        body = cbor2.dumps({"v": 10, "t": t, "p": cbor2.dumps(payload)})
        await self.t.to_server_send.send(struct.pack(">IIB", len(body) + 5, id, flags))
        await self.t.to_server_send.send(body)

    async def request(self, t: str, payload: Any) -> int:
        rid = self.next_id
        self.next_id += 1
        await self.send(rid, t, payload, ma.SESSION_START)
        return rid

    async def frame(self) -> ma.RawFrame:
        while not self.pending:
            self.pending += self.dec.feed(await self.t.from_server.receive())
        return self.pending.pop(0)

    async def until_terminal(self, rid: int) -> list[tuple[str, Any, int]]:
        out = []
        while True:
            f = await self.frame()
            assert f.id == rid
            env = ma.decode_envelope(f.body)
            out.append((env.t, env.payload, f.flags))
            if f.flags & ma.TERMINAL:
                return out

    async def fs(self, op: str, **fields: Any) -> tuple[int, list[tuple[str, Any, int]]]:
        rid = await self.request(ma.FS_REQUEST, {"op": {op: fields}})
        return rid, await self.until_terminal(rid)


@asynccontextmanager
async def session(
    target: FakeTarget | None = None, **kw: Any
) -> AsyncIterator[tuple[Client, FakeTarget, MemTransport]]:
    target = target or FakeTarget()
    transport = MemTransport(kw.pop("out_capacity", 1000))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(AgentSession(target, transport, **kw).run)
            client = Client(transport)
            yield client, target, transport
            await transport.to_server_send.aclose()


async def test_handshake_claims_generation_7_and_a_safe_id_range() -> None:
    async with session() as (client, _, _):
        id_min, id_max, ready = await client.handshake()
        assert (id_min, id_max) == (1, 0x02000000)
        assert (ready.t, ready.v) == (ma.READY, 7)
        assert {"boot_time_ns", "init_time_ns", "ready_time_ns"} <= set(ready.payload)


async def test_exec_round_trip_echo() -> None:
    async with session() as (client, target, _):
        await client.handshake()
        req = {"cmd": "echo", "args": ["hi"], "env": ["A=1"], "cwd": "/", "user": None}
        rid = await client.request(ma.EXEC_REQUEST, req | {"tty": False, "rows": 24, "cols": 80})
        await client.send(rid, ma.EXEC_STDIN, {"data": b""})
        frames = await client.until_terminal(rid)
        assert frames == [
            (ma.EXEC_STARTED, {"pid": 42}, 0),
            (ma.EXEC_STDOUT, {"data": b"hi\n"}, 0),
            (ma.EXEC_EXITED, {"code": 0}, ma.TERMINAL),
        ]
        assert target.procs[0].env == {"A": "1"}


async def test_exec_stdin_resize_signal_reach_the_process() -> None:
    async with session() as (client, target, _):
        await client.handshake()
        rid = await client.request(ma.EXEC_REQUEST, {"cmd": "cat", "tty": True})
        await client.send(rid, ma.EXEC_STDIN, {"data": b"piped-bytes\n"})
        await client.send(rid, ma.EXEC_RESIZE, {"rows": 40, "cols": 100})
        await client.send(rid, ma.EXEC_SIGNAL, {"signal": 15})
        await client.send(rid, ma.EXEC_STDIN, {"data": b""})
        frames = await client.until_terminal(rid)
        assert frames[1:] == [
            (ma.EXEC_STDOUT, {"data": b"piped-bytes\n"}, 0),
            (ma.EXEC_STDERR, {"data": b"done\n"}, 0),
            (ma.EXEC_EXITED, {"code": 3}, ma.TERMINAL),
        ]
        proc = target.procs[0]
        assert (proc.resizes, proc.signals) == ([(40, 100)], [15])


async def test_stdin_after_eof_reports_stdin_error() -> None:
    async with session() as (client, _, _):
        await client.handshake()
        rid = await client.request(ma.EXEC_REQUEST, {"cmd": "wait"})
        await client.send(rid, ma.EXEC_STDIN, {"data": b""})
        await client.send(rid, ma.EXEC_STDIN, {"data": b"late"})
        assert (await client.frame()).id == rid  # started
        env = ma.decode_envelope((await client.frame()).body)
        assert env.t == ma.EXEC_STDIN_ERROR
        assert env.payload["message"] == "stdin is closed"
        await client.send(rid, ma.EXEC_SIGNAL, {"signal": 9})
        assert (await client.until_terminal(rid))[-1] == (
            ma.EXEC_EXITED,
            {"code": 137},
            ma.TERMINAL,
        )


async def test_exec_failures_are_terminal_exec_failed_frames() -> None:
    async with session() as (client, _, _):
        await client.handshake()
        rid = await client.request(ma.EXEC_REQUEST, {"cmd": "nope"})
        ((t, payload, flags),) = await client.until_terminal(rid)
        assert (t, flags) == (ma.EXEC_FAILED, ma.TERMINAL)
        assert payload == {
            "kind": "not_found",
            "errno": 2,
            "errno_name": "ENOENT",
            "message": "nope: command not found",
            "stage": "execvp",
        }
        rid = await client.request(ma.EXEC_REQUEST, {"cmd": "echo", "user": "bob"})
        ((t, payload, _),) = await client.until_terminal(rid)
        assert (t, payload["kind"]) == (ma.EXEC_FAILED, "user_setup_failed")
        rid = await client.request(ma.EXEC_REQUEST, {"args": ["no cmd"]})
        ((t, payload, _),) = await client.until_terminal(rid)
        assert (t, payload["kind"]) == (ma.EXEC_FAILED, "bad_args")


async def test_unknown_and_orphan_frames_are_dropped_and_the_session_goes_on() -> None:
    async with session() as (client, _, transport):
        await client.handshake()
        await client.send(77, "core.nonsense", {"x": 1})
        await client.send(78, ma.EXEC_STDIN, {"data": b"nobody"})
        await transport.to_server_send.send(struct.pack(">IIB", 7, 79, 0) + b"\xff\xff")
        await client.send(0, ma.EXEC_REQUEST, {"cmd": "echo"}, ma.SESSION_START)  # id 0: reserved
        rid = await client.request(ma.EXEC_REQUEST, {"cmd": "echo", "args": ["ok"]})
        frames = await client.until_terminal(rid)
        assert frames[-2][1] == {"data": b"ok\n"}


async def test_client_leaving_mid_exec_ends_the_command() -> None:
    target = FakeTarget()
    async with session(target) as (client, _, transport):
        await client.handshake()
        rid = await client.request(ma.EXEC_REQUEST, {"cmd": "wait"})
        assert (await client.frame()).id == rid
        await transport.to_server_send.aclose()
    assert target.killed == target.procs and len(target.procs) == 1


async def test_slow_client_back_pressure_stops_the_output_pump() -> None:
    async with session(out_capacity=0) as (client, target, _):
        await client.handshake()
        rid = await client.request(ma.EXEC_REQUEST, {"cmd": "flood", "args": ["50"]})
        await trio.testing.wait_all_tasks_blocked()
        proc = target.procs[0]
        # Nothing read: the session is stuck sending its first frame, so the process is
        # stuck on its first output event; nothing piles up in between.
        assert client.t.to_client.statistics().tasks_waiting_send == 1
        assert proc.events.statistics().tasks_waiting_send == 1
        assert proc.produced == 0
        frames = await client.until_terminal(rid)
        assert proc.produced == 50
        assert len(frames) == 52


async def test_session_limit_refuses_extra_requests() -> None:
    async with session(max_sessions=1) as (client, _, _):
        await client.handshake()
        first = await client.request(ma.EXEC_REQUEST, {"cmd": "wait"})
        assert (await client.frame()).id == first
        rid = await client.request(ma.EXEC_REQUEST, {"cmd": "echo"})
        ((t, payload, _),) = await client.until_terminal(rid)
        assert (t, payload["kind"]) == (ma.EXEC_FAILED, "resource_limit")
        rid, ((t, payload, _),) = await client.fs("Stat", path="/w")
        assert payload["ok"] is False and "too many" in payload["error"]
        await client.send(first, ma.EXEC_SIGNAL, {"signal": 9})
        await client.until_terminal(first)


async def test_fs_write_then_read_in_chunks() -> None:
    async with session() as (client, target, _):
        await client.handshake()
        opts = {"read": False, "write": True, "create": True, "truncate": True}
        _, [(t, resp, flags)] = await client.fs("OpenFile", path="/w/a", options=opts)
        assert (t, flags, resp) == (
            ma.FS_RESPONSE,
            ma.TERMINAL,
            {"ok": True, "error": None, "data": {"Handle": 1}},
        )
        data = bytes(range(256)) * 9000  # 2.3 MB: three client chunks of ≤ 1 MiB here
        rid = await client.request(ma.FS_REQUEST, {"op": {"Write": {"handle": 1, "offset": 0}}})
        for i in range(0, len(data), 1 << 20):
            await client.send(rid, ma.FS_DATA, {"data": data[i : i + (1 << 20)]})
        await client.send(rid, ma.FS_DATA, {"data": b""})
        [(_, resp, _)] = await client.until_terminal(rid)
        assert resp["ok"] is True
        _, [(_, resp, _)] = await client.fs("CloseHandle", handle=1)
        assert resp["ok"] is True
        assert target.files["/w/a"] == data
        assert [w[1] for w in target.writes] == [0, 0, 1 << 20, 2 << 20]

        _, [(_, resp, _)] = await client.fs("OpenFile", path="/w/a", options={"read": True})
        handle = resp["data"]["Handle"]
        rid, frames = await client.fs("Read", handle=handle, offset=0, len=None)
        chunks = [p["data"] for t, p, _ in frames if t == ma.FS_DATA]
        assert [len(c) for c in chunks] == [1 << 20, 1 << 20, len(data) - (2 << 20)]
        assert b"".join(chunks) == data
        assert frames[-1] == (ma.FS_RESPONSE, {"ok": True, "error": None, "data": None}, 1)


async def test_fs_metadata_ops_and_errors() -> None:
    target = FakeTarget()
    target.files["/w/x"] = b"abc"
    async with session(target) as (client, _, _):
        await client.handshake()
        _, [(_, resp, _)] = await client.fs("Stat", path="/w/x", follow_symlink=True)
        assert resp["data"] == {
            "Stat": {
                "path": "/w/x",
                "kind": "file",
                "size": 3,
                "mode": 0o100644,
                "uid": 0,
                "gid": 0,
                "modified": 2,
                "mtime": 2,
            }
        }
        _, [(_, resp, _)] = await client.fs("List", path="/w")
        assert [e["path"] for e in resp["data"]["List"]] == ["/w/x"]
        ops: list[tuple[str, dict[str, Any]]] = [
            ("Mkdir", {"path": "/w/d", "mode": None, "user": None}),
            ("Copy", {"src": "/w/x", "dst": "/w/y"}),
            ("Rename", {"src": "/w/y", "dst": "/w/z"}),
            ("Remove", {"path": "/w/z"}),
        ]
        for op, fields in ops:
            _, [(_, resp, _)] = await client.fs(op, **fields)
            assert resp == {"ok": True, "error": None, "data": None}, op
        assert set(target.files) == {"/w/x"} and "/w/d" in target.dirs
        _, [(_, resp, _)] = await client.fs("Stat", path="/w/missing")
        assert resp == {
            "ok": False,
            "error": "No such file or directory (os error 2)",
            "data": None,
        }
        _, [(_, resp, _)] = await client.fs("OpenFile", path="/w/missing", options={"read": True})
        assert resp["error"] == "No such file or directory (os error 2)"
        _, [(_, resp, _)] = await client.fs("OpenFile", path="/w", options={"read": True})
        assert resp["error"] == "Is a directory (os error 21)"
        opts = {"write": True, "create_new": True}
        _, [(_, resp, _)] = await client.fs("OpenFile", path="/w/x", options=opts)
        assert resp["error"] == "File exists (os error 17)"
        _, [(_, resp, _)] = await client.fs("Read", handle=99, offset=0, len=None)
        assert resp["error"] == "Bad file descriptor (os error 9)"
        _, [(_, resp, _)] = await client.fs("ReadLink", path="/w/x")
        assert resp == {"ok": False, "error": "unsupported fs op 'ReadLink'", "data": None}


@pytest.mark.parametrize("truncate", [True, False])
async def test_open_for_write_truncates_only_when_asked(truncate: bool) -> None:
    target = FakeTarget()
    target.files["/w/x"] = b"old contents"
    async with session(target) as (client, _, _):
        await client.handshake()
        opts = {"write": True, "create": True, "truncate": truncate}
        await client.fs("OpenFile", path="/w/x", options=opts)
    assert target.files["/w/x"] == (b"" if truncate else b"old contents")

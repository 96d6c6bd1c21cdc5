"""Host-side helpers to run ``agentd`` as a plain subprocess and talk to it (trio).

For tests only: this module imports trio, so the agent itself never imports it. The
agent is started the way the local driver starts it (``python -I -S -B`` with a
package directory holding only ``corral.{protocol,errors,agentd}`` and ``msgspec``),
so a stray import of anything else fails here too.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio

from ..errors import AgentGone
from ..protocol.framing import SESSION_START, TERMINAL, Frame, FrameDecoder, encode
from ..protocol.messages import (
    PROTOCOL_VERSION,
    Exec,
    ExecCredit,
    ExecExited,
    ExecStarted,
    ExecStartFailed,
    ExecStderr,
    ExecStdout,
    Hello,
    Message,
    Ready,
)

_REPO = Path(__file__).resolve().parent.parent


def make_package_dir(root: Path) -> Path:
    """Lay out what the sandbox's ``/.corral/pkg`` holds, as symlinks into this checkout."""
    pkg = root / "pkg"
    corral = pkg / "corral"
    corral.mkdir(parents=True)
    (corral / "__init__.py").write_bytes(b"")
    for name in ("protocol", "errors.py", "agentd"):
        (corral / name).symlink_to(_REPO / name)
    (pkg / "msgspec").symlink_to(Path(msgspec.__file__).parent)
    return pkg


def agent_argv(pkg: Path) -> list[str]:
    code = (
        f"import sys; sys.path.insert(0, {str(pkg)!r}); from corral.agentd.main import main; main()"
    )
    return [sys.executable, "-I", "-S", "-B", "-c", code]


@dataclass
class AgentProcess:
    process: trio.Process
    socket_path: str
    workdir: Path
    ready_seconds: float

    async def connect(self) -> AgentClient:
        stream = await trio.open_unix_socket(self.socket_path)
        return AgentClient(stream)

    async def handshake(self) -> tuple[AgentClient, Ready]:
        client = await self.connect()
        ready = await client.hello()
        return client, ready


@asynccontextmanager
async def spawn_agent(
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    wrapper: Sequence[str] = (),
) -> AsyncIterator[AgentProcess]:
    """Start an agent on the host; on exit SIGTERM it (then SIGKILL) and clean up.

    ``wrapper`` is prepended to the command line (e.g. ``unshare --pid --fork``); it must
    pass SIGTERM on to the agent.
    """
    root = Path(tempfile.mkdtemp(prefix="agentd-"))  # short: AF_UNIX paths are limited
    try:
        pkg = make_package_dir(root)
        sock = str(root / "agent.sock")
        r, w = os.pipe()
        child_env = dict(os.environ if env is None else env)
        child_env["CORRAL_AGENT_SOCKET"] = sock
        child_env["CORRAL_READY_FD"] = str(w)
        t0 = time.perf_counter()
        try:
            proc = await trio.lowlevel.open_process(
                [*wrapper, *agent_argv(pkg)], env=child_env, pass_fds=(w,), cwd=cwd or str(root)
            )
        finally:
            os.close(w)
        ready = trio.lowlevel.FdStream(r)
        try:
            async with ready:
                got = await ready.receive_some(1)
            if got != b"R":
                raise AgentGone(f"agent exited before it was ready (status {await proc.wait()})")
            agent = AgentProcess(proc, sock, root, time.perf_counter() - t0)
            yield agent
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def stop_process(proc: trio.Process, grace: float = 3.0) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await proc.wait()
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


@dataclass
class ExecResult:
    pid: int = 0
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exited: ExecExited | None = None
    failed: Message | None = None
    chunks: list[int] = field(default_factory=list)


class AgentClient:
    """A minimal multiplexing client: frames for other ids wait in per-id queues."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.queues: dict[int, deque[Frame]] = {}
        self.next_id = 1
        self.eof = False

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, id: int, msg: Message, flags: int = 0) -> None:
        await self.stream.send_all(encode(id, msg, flags))

    async def request(self, msg: Message) -> int:
        id = self.next_id
        self.next_id += 1
        await self.send(id, msg, SESSION_START)
        return id

    async def hello(self, version: int | None = None) -> Ready:
        await self.send(
            0, Hello(version=PROTOCOL_VERSION if version is None else version), SESSION_START
        )
        frame = await self.recv(0)
        if not isinstance(frame.msg, Ready):
            raise AssertionError(f"expected Ready, got {frame.msg!r}")
        return frame.msg

    async def _pump(self) -> None:
        data = await self.stream.receive_some(1 << 20)
        if not data:
            self.eof = True
            self.decoder.close()
            raise AgentGone("agent closed the connection")
        for frame in self.decoder.feed(data):
            self.queues.setdefault(frame.id, deque()).append(frame)

    async def recv(self, id: int) -> Frame:
        """The next frame for ``id`` (raises AgentGone at EOF)."""
        while True:
            queue = self.queues.get(id)
            if queue:
                return queue.popleft()
            await self._pump()

    async def recv_eof(self) -> list[Frame]:
        """Read until the agent closes the connection; return every frame left over."""
        while not self.eof:
            try:
                await self._pump()
            except AgentGone:
                break
        frames = [f for q in self.queues.values() for f in q]
        self.queues.clear()
        return frames

    async def call(self, msg: Message) -> Message:
        """One request, one TERMINAL reply."""
        id = await self.request(msg)
        frame = await self.recv(id)
        if not frame.flags & TERMINAL:
            raise AssertionError(f"reply without TERMINAL: {frame!r}")
        return frame.msg

    async def collect(self, id: int, *, credit: bool = True) -> ExecResult:
        """Run an exec conversation to its end, granting credit as data arrives."""
        result = ExecResult()
        while True:
            frame = await self.recv(id)
            msg = frame.msg
            if isinstance(msg, ExecStarted):
                result.pid = msg.pid
            elif isinstance(msg, ExecStdout | ExecStderr):
                (result.stdout if isinstance(msg, ExecStdout) else result.stderr).extend(msg.data)
                result.chunks.append(len(msg.data))
                if credit:
                    await self.send(id, ExecCredit(bytes=len(msg.data)))
            elif isinstance(msg, ExecExited):
                result.exited = msg
            else:
                result.failed = msg
            if frame.flags & TERMINAL:
                if isinstance(msg, ExecStartFailed):
                    result.failed = msg
                return result

    async def exec(self, cmd: str, *args: str, **kw: object) -> ExecResult:
        id = await self.request(Exec(cmd=cmd, args=list(args), **kw))  # type: ignore[arg-type]
        return await self.collect(id)

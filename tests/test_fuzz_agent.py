"""Fuzzing the in-sandbox agent (``agentd``) with hypothesis-made byte streams.

The agent runs as a plain process on the host, started the way
:mod:`corral.agentd.testing` starts it, but wrapped in bubblewrap with a read-only
view of the host, no capabilities, and private pid and network namespaces: fuzzed
requests run commands and touch files, so they must not be able to touch the host.
Its working directory (where the fuzzed relative paths land) is a private temp dir.

Every example opens a fresh connection and sends garbage, truncated, huge or
out-of-order frames. The agent must never crash or hang: it answers what it can,
closes the connection after an ``ErrorReply`` on id 0 when the stream is broken, and
serves the next connection as if nothing happened. At the end of each test the agent
still answers, holds no more fds than before, and has no child processes left.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.agentd.testing import agent_argv, make_package_dir
from corral.drivers.local.bwrap import find_tool
from corral.drivers.local.launch import sandbox_pids
from corral.protocol import (
    FS_CHUNK,
    MAX_FRAME,
    PROTOCOL_VERSION,
    SESSION_START,
    TERMINAL,
    Cancel,
    ErrorReply,
    Exec,
    ExecCredit,
    ExecResize,
    ExecSignal,
    ExecStdin,
    Frame,
    FrameDecoder,
    FsCopy,
    FsData,
    FsExists,
    FsList,
    FsMkdir,
    FsRead,
    FsRemove,
    FsRename,
    FsStat,
    FsWrite,
    FsWritten,
    Hello,
    Message,
    Ok,
    Ping,
    Pong,
    Ready,
    encode,
)
from corral.testing import wait_until

SOAK = bool(os.environ.get("CORRAL_SLOW"))
FUZZ = settings(
    # CI: a fixed, modest set of examples (same every run); CORRAL_SLOW=1: explore
    max_examples=60 * (50 if SOAK else 1),
    derandomize=not SOAK,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STEP = 10.0
"""Bound on one example (each takes milliseconds)."""
SENTINEL = 0xFFFF_FF00
"""A request id the strategies never use: its Pong proves the agent got through the rest."""


@dataclass
class HostAgent:
    popen: subprocess.Popen[bytes]
    socket_path: str
    root: Path

    def agent_pid(self) -> int:
        for pid in sandbox_pids(self.popen.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"corral.agentd.main" in cmdline and b"bwrap" not in cmdline:
                return pid
        raise AssertionError(f"no agent under bwrap pid {self.popen.pid}")

    @property
    def fixed(self) -> str:
        """A directory the fuzzed requests (relative paths) never touch."""
        return str(self.root / "fixed")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.agent_pid()}/fd"))

    def children(self) -> list[int]:
        agent = self.agent_pid()
        return [p for p in sandbox_pids(agent) if p != agent]


@pytest.fixture(scope="module")
def host_agent() -> Iterator[HostAgent]:
    bwrap = find_tool("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap is needed to confine the fuzzed agent")
    root = Path(tempfile.mkdtemp(prefix="fuzz-agentd-"))
    work = root / "work"
    work.mkdir()
    (root / "fixed").mkdir()
    pkg = make_package_dir(root)
    sock = str(root / "agent.sock")
    confine = [bwrap, "--ro-bind", "/", "/", "--bind", str(root), str(root)]
    confine += ["--dev", "/dev", "--proc", "/proc", "--unshare-pid", "--unshare-net"]
    confine += ["--unshare-ipc", "--unshare-uts", "--cap-drop", "ALL", "--die-with-parent"]
    confine += ["--new-session", "--chdir", str(work), "--"]
    read_end, write_end = os.pipe()
    log = os.open(root / "agent.log", os.O_WRONLY | os.O_CREAT, 0o600)
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "CORRAL_AGENT_SOCKET": sock,
        "CORRAL_READY_FD": str(write_end),
    }
    try:
        popen = subprocess.Popen(
            [*confine, *agent_argv(pkg)],
            env=env,
            pass_fds=(write_end,),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    finally:
        os.close(write_end)
        os.close(log)
    try:
        with os.fdopen(read_end, "rb") as ready:
            if ready.read(1) != b"R":
                raise AssertionError(f"agent did not start: {(root / 'agent.log').read_text()}")
        yield HostAgent(popen, sock, root)
    finally:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(5)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        shutil.rmtree(root, ignore_errors=True)


# -- a raw client ----------------------------------------------------------------------------


class Raw:
    """One connection, raw bytes out, decoded frames in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []
        self.eof = False

    @classmethod
    @asynccontextmanager
    async def connect(cls, agent: HostAgent) -> AsyncIterator[Raw]:
        """A connection, closed however the block ends."""
        client = cls(await trio.open_unix_socket(agent.socket_path))
        try:
            yield client
        finally:
            await client.aclose()

    async def send(self, data: bytes) -> bool:
        """False once the agent has closed the connection on us."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def _pump(self) -> None:
        try:
            data = await self.stream.receive_some(1 << 20)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
            self.decoder.close()  # the agent never leaves half a frame behind
            return
        self.frames.extend(self.decoder.feed(data))

    async def until(self, frame_id: int, kind: type[Message]) -> bool:
        """Read until a ``kind`` frame for ``frame_id`` (True) or EOF (False)."""
        seen = 0
        while True:
            for frame in self.frames[seen:]:
                if frame.id == frame_id and isinstance(frame.msg, kind):
                    return True
            seen = len(self.frames)
            if self.eof:
                return False
            await self._pump()

    async def reply(self, frame_id: int) -> Message:
        """The TERMINAL frame for ``frame_id`` (fails at EOF: never waits forever)."""
        while True:
            for frame in self.frames:
                if frame.id == frame_id and frame.terminal:
                    return frame.msg
            assert not self.eof, f"the agent hung up before answering request {frame_id}"
            await self._pump()

    async def until_eof(self) -> None:
        while not self.eof:
            await self._pump()

    async def hello(self) -> None:
        await self.send(encode(0, Hello(version=PROTOCOL_VERSION), SESSION_START))
        assert await self.until(0, Ready)

    async def aclose(self) -> None:
        await self.stream.aclose()

    def assert_clean_failure(self) -> None:
        """The agent hung up: its last frame explains why, on id 0."""
        assert self.frames, "the agent closed the connection without a word"
        last = self.frames[-1]
        assert last.id == 0 and last.terminal, last
        assert isinstance(last.msg, ErrorReply), last
        assert last.msg.code in ("protocol_error", "frame_too_large"), last.msg


async def assert_healthy(agent: HostAgent, fds_before: int) -> None:
    """The agent answers a fresh connection, and has released what earlier ones held."""
    assert agent.popen.poll() is None, "the agent died"
    async with Raw.connect(agent) as client:
        await client.hello()
        await client.send(encode(7, Ping(), SESSION_START))
        assert await client.until(7, Pong)
    assert await wait_until(lambda: agent.fds() <= fds_before, timeout=5), (
        agent.fds(),
        fds_before,
    )
    assert await wait_until(lambda: not agent.children(), timeout=5), agent.children()


# -- strategies ------------------------------------------------------------------------------

# Relative paths in the agent's private working directory; never "..": a fuzzed
# recursive remove or copy must stay inside it.
paths = st.sampled_from(["a", "b", "a/b", "a/b/c", "c.txt", "a/c.txt", "", ".", "d/", "n\0ul"])
offsets = st.integers(-5, 1 << 20) | st.sampled_from([(1 << 44) + 1, 2**63 - 1, 2**63, -(2**63)])
modes = st.none() | st.integers(0, 0o777) | st.sampled_from([-1, 2**32, 2**63])
small = st.binary(max_size=256)
text = st.text(max_size=12)
floats = st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 0.2)
ids = st.integers(0, 12)

commands = st.sampled_from(["true", "echo", "cat", "sleep", "/nonexistent/cmd", "", "sh\0"])
execs = st.builds(
    Exec,
    cmd=commands,
    args=st.lists(st.sampled_from(["0.01", "30", "hi", "-n", "", "x\0y"]), max_size=3),
    env=st.dictionaries(st.sampled_from(["A", "PATH", "", "B=C", "N\0"]), text, max_size=2),
    cwd=st.none() | st.sampled_from([".", "a", "/", "/nonexistent", "c.txt"]),
    user=st.none() | st.sampled_from(["root", "0", "nobody", "x\0"]),
    timeout=floats,
    stdin=st.none() | small,
    interactive=st.booleans(),
    tty=st.booleans(),
    rows=st.integers(-(2**31), 2**31),
    cols=st.integers(-(2**31), 2**31),
    window=st.integers(-(2**31), 2**31),
)
requests: st.SearchStrategy[Message] = st.one_of(
    execs,
    st.builds(FsRead, path=paths, offset=offsets, length=st.none() | offsets),
    st.builds(
        FsWrite,
        path=paths,
        data=small,
        offset=offsets,
        truncate=st.booleans(),
        append=st.booleans(),
        mode=modes,
    ),
    st.builds(FsStat, path=paths, follow_symlinks=st.booleans()),
    st.builds(FsList, path=paths),
    st.builds(FsMkdir, path=paths, parents=st.booleans(), mode=modes),
    st.builds(FsRemove, path=paths.filter(lambda p: p not in ("", ".")), recursive=st.booleans()),
    st.builds(FsCopy, src=paths.filter(lambda p: p not in ("", ".")), dst=paths),
    st.builds(FsRename, src=paths, dst=paths),
    st.builds(FsExists, path=paths),
    st.builds(Ping),
    st.builds(Hello, version=st.integers(-1, 3)),
    # replies and frames that make no sense coming from the host
    st.builds(Ok),
    st.builds(Pong),
    st.builds(FsData, data=small),
    st.builds(FsWritten, written=st.integers(0, 10)),
    st.builds(ErrorReply, code=text, message=text),
)
follow_ups: st.SearchStrategy[Message] = st.one_of(
    st.builds(ExecStdin, data=small, eof=st.booleans()),
    st.builds(ExecSignal, signal=st.integers(-5, 70) | st.sampled_from([2**31, 2**63])),
    st.builds(ExecResize, rows=st.integers(-(2**31), 2**31), cols=st.integers(-(2**31), 2**31)),
    st.builds(ExecCredit, bytes=st.integers(-(2**63), 2**63)),
    st.builds(Cancel),
)
flags = st.sampled_from([0, SESSION_START, TERMINAL, 0xFF])
frames = st.tuples(ids, flags, st.one_of(requests, follow_ups))


# -- the tests -------------------------------------------------------------------------------


@FUZZ
@given(
    greet=st.booleans(),
    garbage=st.binary(max_size=1024),
    cuts=st.lists(st.integers(0, 1024), max_size=6),
)
async def test_garbage_closes_only_that_connection_with_a_clear_error(
    host_agent: HostAgent, greet: bool, garbage: bytes, cuts: list[int]
) -> None:
    with trio.fail_after(STEP):
        async with Raw.connect(host_agent) as client:
            if greet:
                await client.hello()
            points = sorted({0, len(garbage), *(min(c, len(garbage)) for c in cuts)})
            for a, b in itertools.pairwise(points):
                if not await client.send(garbage[a:b]):
                    break
            try:
                await client.stream.send_eof()  # our side is done: the agent must hang up
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await client.until_eof()
        errors = [f for f in client.frames if isinstance(f.msg, ErrorReply) and f.id == 0]
        if errors:
            client.assert_clean_failure()
        assert host_agent.popen.poll() is None


@FUZZ
@given(st.lists(frames, max_size=12))
async def test_out_of_order_and_nonsense_frames_never_wedge_the_agent(
    host_agent: HostAgent, sent: list[tuple[int, int, Message]]
) -> None:
    """Follow-ups before requests, ids reused, Hello twice, replies sent as requests,
    absurd field values: afterwards a Ping still gets its Pong, or the agent has
    closed the connection after saying why on id 0."""
    with trio.fail_after(STEP):
        async with Raw.connect(host_agent) as client:
            await client.hello()
            for frame_id, flag, msg in sent:
                if not await client.send(encode(frame_id, msg, flag)):
                    break
            await client.send(encode(SENTINEL, Ping(), SESSION_START))
            if not await client.until(SENTINEL, Pong):
                client.assert_clean_failure()
        assert host_agent.popen.poll() is None


@FUZZ
@given(st.lists(st.tuples(ids, flags, st.one_of(requests, follow_ups)), min_size=1, max_size=6))
async def test_a_connection_dropped_mid_conversation_leaves_nothing_behind(
    host_agent: HostAgent, sent: list[tuple[int, int, Message]]
) -> None:
    with trio.fail_after(STEP):
        async with Raw.connect(host_agent) as client:
            await client.hello()
            for frame_id, flag, msg in sent:
                await client.send(encode(frame_id, msg, flag))
        # hung up mid-exec, mid-read: the agent ends those sessions
    assert host_agent.popen.poll() is None


@FUZZ
@given(st.lists(frames, min_size=1, max_size=4), st.data())
async def test_a_stream_truncated_inside_a_frame_is_dropped_cleanly(
    host_agent: HostAgent, sent: list[tuple[int, int, Message]], data: st.DataObject
) -> None:
    stream = b"".join(encode(i, m, f) for i, f, m in sent)
    cut = data.draw(st.integers(1, len(stream) - 1))
    with trio.fail_after(STEP):
        async with Raw.connect(host_agent) as client:
            await client.hello()
            await client.send(stream[:cut])
            try:
                await client.stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await client.until_eof()  # the agent hangs up; its own frames are whole
    assert host_agent.popen.poll() is None


async def test_an_oversized_header_is_refused_at_once(host_agent: HostAgent) -> None:
    fds = host_agent.fds()
    with trio.fail_after(STEP):
        for greet in (False, True):
            async with Raw.connect(host_agent) as client:
                if greet:
                    await client.hello()
                # the header of a 4 GiB frame, and nothing else: no waiting for the body
                await client.send((2**32 - 1).to_bytes(4, "big") + b"\0\0\0\1\2")
                await client.until_eof()
                client.assert_clean_failure()
                assert client.frames[-1].msg.code == "frame_too_large"  # type: ignore[attr-defined]
        await assert_healthy(host_agent, fds)


async def test_frames_of_the_largest_size_are_served(host_agent: HostAgent) -> None:
    fds = host_agent.fds()
    big = f"{host_agent.fixed}/big"
    probe = 1 << 17
    overhead = len(encode(1, FsWrite(path=big, data=b"z" * probe), SESSION_START)) - 4 - probe
    data = os.urandom(MAX_FRAME - overhead)
    frame = encode(1, FsWrite(path=big, data=data), SESSION_START)
    assert len(frame) - 4 == MAX_FRAME
    with trio.fail_after(STEP):
        async with Raw.connect(host_agent) as client:
            await client.hello()
            await client.send(frame)
            assert await client.reply(1) == FsWritten(written=len(data))
            await client.send(encode(2, FsRead(path=big), SESSION_START))
            assert await client.reply(2) == FsData(data=data[:FS_CHUNK])  # one chunk
        await assert_healthy(host_agent, fds)


async def test_requests_before_the_handshake_and_reused_ids_fail_cleanly(
    host_agent: HostAgent,
) -> None:
    fds = host_agent.fds()
    with trio.fail_after(STEP):
        # a request before Hello
        async with Raw.connect(host_agent) as client:
            await client.send(encode(1, Ping(), SESSION_START))
            await client.until_eof()
            client.assert_clean_failure()
        # a wrong protocol version
        async with Raw.connect(host_agent) as client:
            await client.send(encode(0, Hello(version=PROTOCOL_VERSION + 1), SESSION_START))
            await client.until_eof()
            client.assert_clean_failure()
        # a request on an id that a running exec holds: the connection fails, the exec dies
        async with Raw.connect(host_agent) as client:
            await client.hello()
            await client.send(encode(1, Exec(cmd="cat", interactive=True), SESSION_START))
            await client.send(encode(1, Ping(), SESSION_START))
            await client.until_eof()
            client.assert_clean_failure()
        # follow-ups and Cancel for ids nobody opened are ignored
        async with Raw.connect(host_agent) as client:
            await client.hello()
            for msg in (Cancel(), ExecCredit(bytes=5), ExecStdin(data=b"x"), ExecSignal(signal=9)):
                await client.send(encode(3, msg))
            await client.send(encode(4, Ping(), SESSION_START))
            assert await client.until(4, Pong)
        await assert_healthy(host_agent, fds)


async def test_out_of_range_numbers_in_fs_requests_are_fs_errors(host_agent: HostAgent) -> None:
    """Found by the fuzzing: a mode or offset past the C types was an internal
    ``agent_error`` (with a traceback in the agent's log), not an fs error."""
    probe = f"{host_agent.fixed}/probe.txt"
    cases: list[Message] = [
        FsMkdir(path=f"{host_agent.fixed}/m", mode=2**40),
        FsWrite(path=f"{host_agent.fixed}/w", data=b"x", mode=2**40),
        FsWrite(path=f"{host_agent.fixed}/w", data=b"x", offset=2**63),
        FsRead(path=probe, offset=2**63),
        FsRead(path=probe, length=2**64 - 1),
    ]
    with trio.fail_after(STEP):
        async with Raw.connect(host_agent) as client:
            await client.hello()
            await client.send(encode(1, FsWrite(path=probe, data=b"abc"), SESSION_START))
            assert await client.reply(1) == FsWritten(written=3)
            for n, msg in enumerate(cases, start=2):
                await client.send(encode(n, msg, SESSION_START))
                reply = await client.reply(n)
                if isinstance(reply, ErrorReply):
                    assert reply.code.startswith("fs_"), (msg, reply)
                else:
                    assert isinstance(reply, FsData), (msg, reply)  # a clamped read


async def test_the_agent_is_healthy_after_the_fuzzing(host_agent: HostAgent) -> None:
    """Runs last in this module: every fuzz test above shared this agent."""
    with trio.fail_after(STEP):
        async with Raw.connect(host_agent) as client:
            await client.hello()
            await client.send(encode(1, Exec(cmd="echo", args=["still", "here"]), SESSION_START))
            out = b""
            while not any(f.id == 1 and f.terminal for f in client.frames):
                await client._pump()
            for f in client.frames:
                if f.id == 1 and hasattr(f.msg, "data"):
                    out += f.msg.data
            assert out == b"still here\n"
    fds = len(os.listdir(f"/proc/{host_agent.agent_pid()}/fd"))
    # listening socket, stdio, the epoll and self-pipe of asyncio: a handful, not one
    # per connection the fuzzing opened
    assert fds < 16, fds
    assert await wait_until(lambda: not host_agent.children(), timeout=5)

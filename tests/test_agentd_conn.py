"""agentd connections: handshake, multiplexing, bad input, drops and shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from corral.agentd.main import listen
from corral.agentd.testing import AgentClient, AgentProcess, spawn_agent
from corral.errors import AgentGone
from corral.protocol import (
    PROTOCOL_VERSION,
    TERMINAL,
    ErrorReply,
    Exec,
    ExecExited,
    ExecStarted,
    ExecStdin,
    ExecStdout,
    Hello,
    Ok,
    Ping,
    Pong,
    Shutdown,
    encode,
)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    async with AsyncExitStack() as stack:
        with trio.fail_after(10):
            ag = await stack.enter_async_context(spawn_agent(cwd=str(tmp_path)))
        yield ag


def alive(pid: int) -> bool:
    """Running and not a zombie (this host's pid 1 does not reap orphans)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return data[data.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


async def wait_dead(pid: int) -> None:
    """Poll until ``pid`` is gone (a process's end has no event to wait on)."""
    while True:
        if not alive(pid):
            return
        await trio.sleep(0.01)


async def start_with_child(client: AgentClient, script: str) -> tuple[int, int, int]:
    """Start ``sh -c script`` (which prints a child's pid); return (id, sh pid, child pid)."""
    id = await client.request(Exec(cmd="sh", args=["-c", script]))
    frame = await client.recv(id)
    assert isinstance(frame.msg, ExecStarted)
    out = await client.recv(id)
    assert isinstance(out.msg, ExecStdout)
    return id, frame.msg.pid, int(out.msg.data)


async def test_handshake(agent: AgentProcess) -> None:
    with trio.fail_after(10):
        client, ready = await agent.handshake()
        assert ready.version == PROTOCOL_VERSION
        assert ready.pid == agent.process.pid
        assert ready.agent_version.startswith("corral-agentd")
        assert stat.S_IMODE(os.stat(agent.socket_path).st_mode) == 0o600
        assert await client.call(Ping()) == Pong()
        await client.aclose()


async def test_version_mismatch_is_refused(agent: AgentProcess) -> None:
    with trio.fail_after(10):
        client = await agent.connect()
        await client.send(0, Hello(version=999))
        frame = await client.recv(0)
        assert isinstance(frame.msg, ErrorReply) and frame.flags & TERMINAL
        assert frame.msg.code == "protocol_error"
        assert "999" in frame.msg.message and str(PROTOCOL_VERSION) in frame.msg.message
        assert await client.recv_eof() == []
        await client.aclose()
        other, _ = await agent.handshake()  # the agent lives on
        await other.aclose()


async def test_request_before_hello_is_refused(agent: AgentProcess) -> None:
    with trio.fail_after(10):
        client = await agent.connect()
        await client.send(1, Ping())
        frame = await client.recv(0)
        assert isinstance(frame.msg, ErrorReply) and frame.msg.code == "protocol_error"
        assert await client.recv_eof() == []
        await client.aclose()


async def test_many_clients_and_reconnect(agent: AgentProcess) -> None:
    with trio.fail_after(10):
        a, _ = await agent.handshake()
        b, _ = await agent.handshake()
        # an exec on a, a ping on b while it runs
        id = await a.request(Exec(cmd="cat", interactive=True))
        assert isinstance((await a.recv(id)).msg, ExecStarted)
        assert await b.call(Ping()) == Pong()
        await a.send(id, ExecStdin(data=b"x", eof=True))
        assert (await a.collect(id)).stdout == b"x"
        await a.aclose()
        await b.aclose()
        c, _ = await agent.handshake()
        assert (await c.exec("echo", "again")).stdout == b"again\n"
        await c.aclose()


async def test_garbage_closes_only_that_connection(agent: AgentProcess) -> None:
    with trio.fail_after(10):
        good, _ = await agent.handshake()
        bad, _ = await agent.handshake()
        await bad.send_raw(b"\x00\x00\x00\x09\x00\x00\x00\x01\x00garbage!")
        frame = await bad.recv(0)
        assert isinstance(frame.msg, ErrorReply) and frame.msg.code == "protocol_error"
        assert await bad.recv_eof() == []
        await bad.aclose()
        huge = await agent.connect()
        await huge.hello()
        await huge.send_raw(b"\xff\xff\xff\xff" + b"\x00" * 5)
        frame = await huge.recv(0)
        assert isinstance(frame.msg, ErrorReply) and frame.msg.code == "frame_too_large"
        await huge.aclose()
        assert await good.call(Ping()) == Pong()
        await good.aclose()


async def test_unknown_ids_and_unserved_requests(agent: AgentProcess) -> None:
    with trio.fail_after(10):
        client, _ = await agent.handshake()
        await client.send(77, ExecStdin(data=b"nobody"))  # follow-up for no session: dropped
        reply = await client.call(Pong())  # a reply type sent as a request
        assert isinstance(reply, ErrorReply) and reply.code == "unsupported"
        assert await client.call(Ping()) == Pong()
        assert 77 not in client.queues
        # a request reusing a live id is a protocol error
        id = await client.request(Exec(cmd="sleep", args=["30"]))
        assert isinstance((await client.recv(id)).msg, ExecStarted)
        await client.send(id, Ping())
        frame = await client.recv(0)
        assert isinstance(frame.msg, ErrorReply) and frame.msg.code == "protocol_error"
        await client.recv_eof()
        await client.aclose()


async def test_dropped_connection_kills_its_execs(agent: AgentProcess) -> None:
    with trio.fail_after(10):
        keep, _ = await agent.handshake()
        drop, _ = await agent.handshake()
        _, sh, child = await start_with_child(drop, "sleep 30 & echo $!; wait")
        _, ksh, kchild = await start_with_child(keep, "sleep 30 & echo $!; wait")
        await drop.aclose()
        await wait_dead(sh)
        await wait_dead(child)
        assert alive(ksh) and alive(kchild)
        assert await keep.call(Ping()) == Pong()
        await keep.aclose()


async def test_shutdown_kills_what_ignores_sigterm(agent: AgentProcess) -> None:
    with trio.fail_after(10):
        client, _ = await agent.handshake()
        other, _ = await agent.handshake()
        script = "trap '' TERM; sleep 30 & echo $!; wait"
        id, sh, child = await start_with_child(client, script)
        oid, osh, ochild = await start_with_child(other, "sleep 30 & echo $!; wait")
        t0 = trio.current_time()
        sid = await client.request(Shutdown(grace=0.5))
        exited = await client.recv(id)
        assert exited.flags & TERMINAL
        assert exited.msg == ExecExited(exit_code=137, signal=9)
        ok = await client.recv(sid)
        assert ok.msg == Ok() and ok.flags & TERMINAL
        assert trio.current_time() - t0 >= 0.5
        # the cooperative exec on the other connection ended by SIGTERM
        other_exit = await other.recv(oid)
        assert isinstance(other_exit.msg, ExecExited) and other_exit.msg.signal == signal.SIGTERM
        assert await client.recv_eof() == []
        assert await agent.process.wait() == 0
        for pid in (sh, child, osh, ochild):
            await wait_dead(pid)
        assert not await trio.Path(agent.socket_path).exists()
        await client.aclose()
        await other.aclose()


async def test_shutdown_does_not_wait_the_full_grace(agent: AgentProcess) -> None:
    with trio.fail_after(10):
        client, _ = await agent.handshake()
        id = await client.request(Exec(cmd="sleep", args=["30"]))
        assert isinstance((await client.recv(id)).msg, ExecStarted)
        t0 = trio.current_time()
        assert await client.call(Shutdown(grace=30)) == Ok()
        assert trio.current_time() - t0 < 5
        assert await agent.process.wait() == 0
        assert (await client.recv(id)).msg == ExecExited(exit_code=143, signal=15)
        await client.aclose()


async def test_sigterm_to_the_agent(agent: AgentProcess) -> None:
    with trio.fail_after(10):
        client, _ = await agent.handshake()
        id, sh, child = await start_with_child(client, "sleep 30 & echo $!; wait")
        agent.process.send_signal(signal.SIGTERM)
        assert await agent.process.wait() == 0
        frame = await client.recv(id)
        assert isinstance(frame.msg, ExecExited) and frame.flags & TERMINAL
        await wait_dead(sh)
        await wait_dead(child)
        assert await client.recv_eof() == []
        with pytest.raises(AgentGone):
            await client.recv(0)
        await client.aclose()


def test_listen_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    Path(path).write_text("stale")
    sock = listen(path)
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            c.sendall(encode(0, Hello(version=PROTOCOL_VERSION)))
    finally:
        sock.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
async def test_as_pid_1_it_reaps_orphans() -> None:
    wrapper = ["unshare", "--pid", "--mount-proc", "--kill-child=SIGTERM"]
    with trio.fail_after(10):
        async with spawn_agent(wrapper=wrapper) as agent:
            client, ready = await agent.handshake()
            assert ready.pid == 1
            res = await client.exec("sh", "-c", "sleep 0.05 & sleep 0.05 & exit 0")
            assert res.exited == ExecExited(exit_code=0)
            while True:  # the orphaned sleeps were reparented to the agent: gone, not zombies
                ps = await client.exec("ps", "-eo", "stat=,comm=")
                if b"sleep" not in ps.stdout:
                    break
                await trio.sleep(0.02)
            assert b"Z" not in ps.stdout.split()[::2]
            await client.aclose()
            # unshare blocks SIGTERM while it waits: signal the agent (its child) directly
            unshare = agent.process.pid
            children = (
                await trio.Path(f"/proc/{unshare}/task/{unshare}/children").read_text()
            ).split()
            os.kill(int(children[0]), signal.SIGTERM)
            assert await agent.process.wait() == 0

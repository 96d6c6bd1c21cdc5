"""agentd exec: a real agent process on the host, driven over its Unix socket."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from corral.agentd.testing import AgentClient, AgentProcess, spawn_agent
from corral.protocol import (
    EXEC_CHUNK,
    TERMINAL,
    Cancel,
    ErrorReply,
    Exec,
    ExecCredit,
    ExecExited,
    ExecResize,
    ExecSignal,
    ExecStarted,
    ExecStartFailed,
    ExecStdin,
    ExecStdout,
)

PY = sys.executable


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    async with AsyncExitStack() as stack:
        with trio.fail_after(10):
            ag = await stack.enter_async_context(spawn_agent(cwd=str(tmp_path)))
        yield ag


@pytest.fixture
async def client(agent: AgentProcess) -> AsyncIterator[AgentClient]:
    c, _ = await agent.handshake()
    yield c
    await c.aclose()


def alive(pid: int) -> bool:
    """Running and not a zombie (this host's pid 1 does not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


async def wait_dead(pid: int) -> None:
    """Poll until ``pid`` is gone (a process's end has no event to wait on)."""
    while True:
        if not alive(pid):
            return
        await trio.sleep(0.01)


async def started(client: AgentClient, id: int) -> int:
    frame = await client.recv(id)
    msg = frame.msg
    assert isinstance(msg, ExecStarted), frame
    return msg.pid


async def test_exit_codes(client: AgentClient) -> None:
    with trio.fail_after(10):
        ok = await client.exec("true")
        assert ok.exited == ExecExited(exit_code=0) and ok.pid > 0
        three = await client.exec("sh", "-c", "exit 3")
        assert three.exited == ExecExited(exit_code=3)
        killed = await client.exec("sh", "-c", "kill -KILL $$")
        assert killed.exited == ExecExited(exit_code=137, signal=9)


async def test_binary_output_intact(client: AgentClient) -> None:
    script = (
        "import sys; p = bytes(range(256)); "
        "sys.stdout.buffer.write(p * 4200); sys.stderr.buffer.write(p[::-1] * 1000)"
    )
    with trio.fail_after(10):
        res = await client.exec(PY, "-I", "-c", script)
    pattern = bytes(range(256))
    assert res.exited == ExecExited(exit_code=0)
    assert len(res.stdout) > 1 << 20
    assert res.stdout == pattern * 4200
    assert res.stderr == pattern[::-1] * 1000
    assert max(res.chunks) <= EXEC_CHUNK


async def test_stdin_bytes_larger_than_a_pipe(client: AgentClient) -> None:
    data = os.urandom(3 << 20)
    with trio.fail_after(10):
        res = await client.exec("cat", stdin=data)
    assert res.exited == ExecExited(exit_code=0)
    assert res.stdout == data


async def test_no_stdin_means_closed(client: AgentClient) -> None:
    with trio.fail_after(10):
        res = await client.exec("cat")
    assert res.exited == ExecExited(exit_code=0) and res.stdout == b""


async def test_interactive_stdin_and_eof(client: AgentClient) -> None:
    with trio.fail_after(10):
        id = await client.request(Exec(cmd="cat", interactive=True, stdin=b"first\n"))
        await started(client, id)
        frame = await client.recv(id)
        assert frame.msg == ExecStdout(data=b"first\n")
        await client.send(id, ExecStdin(data=b"ping\n"))
        frame = await client.recv(id)
        assert frame.msg == ExecStdout(data=b"ping\n")
        await client.send(id, ExecStdin(data=b"last", eof=True))
        res = await client.collect(id)
    assert res.stdout == b"last"
    assert res.exited == ExecExited(exit_code=0)


async def test_signal_goes_to_the_group(client: AgentClient) -> None:
    with trio.fail_after(10):
        id = await client.request(Exec(cmd="sleep", args=["30"]))
        await started(client, id)
        await client.send(id, ExecSignal(signal=signal.SIGTERM))
        res = await client.collect(id)
    assert res.exited == ExecExited(exit_code=128 + signal.SIGTERM, signal=signal.SIGTERM)


async def test_cancel_kills(client: AgentClient) -> None:
    with trio.fail_after(10):
        id = await client.request(Exec(cmd="sleep", args=["30"]))
        await started(client, id)
        await client.send(id, Cancel())
        res = await client.collect(id)
    assert res.exited == ExecExited(exit_code=137, signal=9)


async def test_timeout_kills_the_whole_group(client: AgentClient) -> None:
    with trio.fail_after(10):
        t0 = trio.current_time()
        res = await client.exec("sh", "-c", "sleep 30 & echo $!; wait", timeout=0.3)
        assert trio.current_time() - t0 < 5
        assert res.exited == ExecExited(exit_code=137, signal=9, timed_out=True)
        child = int(res.stdout)
        await wait_dead(child)
        await wait_dead(res.pid)


async def test_exited_waits_for_pipe_eof(client: AgentClient) -> None:
    with trio.fail_after(10):
        res = await client.exec("sh", "-c", "echo a; (sleep 0.2; echo b) & exit 0")
    assert res.stdout == b"a\nb\n"
    assert res.exited == ExecExited(exit_code=0)


async def test_ends_when_group_is_gone_even_if_pipe_stays_open(client: AgentClient) -> None:
    # The child leaves the group (setsid) but keeps stdout: the exec must still end.
    with trio.fail_after(10):
        res = await client.exec("sh", "-c", "setsid sleep 30 & echo $!; exit 4")
    escaped = int(res.stdout.split()[0])
    try:
        assert alive(escaped)
        assert res.exited == ExecExited(exit_code=4)
    finally:
        os.kill(escaped, signal.SIGKILL)


async def test_flow_control_blocks_the_command(client: AgentClient) -> None:
    total, window = 300_000, 100_000
    script = f"import sys; sys.stdout.buffer.write(b'x' * {total})"
    with trio.fail_after(10):
        id = await client.request(Exec(cmd=PY, args=["-I", "-c", script], window=window))
        pid = await started(client, id)
        got = 0
        while got < window:
            frame = await client.recv(id)
            assert isinstance(frame.msg, ExecStdout), frame
            got += len(frame.msg.data)
        assert got == window
        # Back-pressure reached the command: it sleeps in a pipe write.
        wchan = trio.Path(f"/proc/{pid}/wchan")
        while True:
            if "pipe_write" in await wchan.read_text():
                break
            await trio.sleep(0.01)
        with trio.move_on_after(0.2) as idle:
            frame = await client.recv(id)
        assert idle.cancelled_caught, f"frame past the window: {frame!r}"
        await client.send(id, ExecCredit(bytes=total - window))
        res = await client.collect(id, credit=False)
    assert got + len(res.stdout) == total
    assert res.exited == ExecExited(exit_code=0)


async def test_zero_window_waits_for_credit(client: AgentClient) -> None:
    with trio.fail_after(10):
        id = await client.request(Exec(cmd="echo", args=["hello"], window=0))
        await started(client, id)
        with trio.move_on_after(0.2) as idle:
            await client.recv(id)
        assert idle.cancelled_caught
        await client.send(id, ExecCredit(bytes=3))
        frame = await client.recv(id)
        assert frame.msg == ExecStdout(data=b"hel")
        await client.send(id, ExecCredit(bytes=100))
        res = await client.collect(id, credit=False)
    assert res.stdout == b"lo\n" and res.exited == ExecExited(exit_code=0)


async def test_concurrent_execs_are_routed_by_id(client: AgentClient) -> None:
    with trio.fail_after(10):
        ids = []
        for _ in range(3):
            req = Exec(cmd="sh", args=["-c", 'read x; echo "got $x"'], interactive=True)
            ids.append(await client.request(req))
        for id in ids:
            await started(client, id)
        for id in reversed(ids):  # answer the last one first: each waits for its own stdin
            await client.send(id, ExecStdin(data=f"{id}\n".encode(), eof=True))
            res = await client.collect(id)
            assert res.stdout == f"got {id}\n".encode()
            assert res.exited == ExecExited(exit_code=0)


async def test_tty_size_and_resize(client: AgentClient) -> None:
    with trio.fail_after(10):
        res = await client.exec("stty", "size", tty=True, rows=33, cols=101)
        assert res.stdout == b"33 101\r\n" and res.stderr == b""
        all_tty = await client.exec("sh", "-c", "test -t 0 && test -t 1 && test -t 2", tty=True)
        assert all_tty.exited == ExecExited(exit_code=0)
        assert (await client.exec("test", "-t", "1")).exited == ExecExited(exit_code=1)
        req = Exec(cmd="sh", args=["-c", "read x; stty size"], tty=True, interactive=True)
        id = await client.request(req)
        await started(client, id)
        await client.send(id, ExecResize(rows=50, cols=132))
        await client.send(id, ExecStdin(data=b"go\n"))
        res = await client.collect(id)
    assert res.stdout.endswith(b"50 132\r\n")
    assert res.exited == ExecExited(exit_code=0)


async def test_tty_interactive_eof(client: AgentClient) -> None:
    with trio.fail_after(10):
        id = await client.request(Exec(cmd="cat", tty=True, interactive=True))
        await started(client, id)
        await client.send(id, ExecStdin(data=b"hi\n", eof=True))
        res = await client.collect(id)
    assert res.stdout == b"hi\r\nhi\r\n"  # the echo, then cat's copy
    assert res.exited == ExecExited(exit_code=0)


async def test_launch_failures(client: AgentClient, tmp_path: Path) -> None:
    no_x = tmp_path / "no-x"
    no_x.write_text("#!/bin/sh\necho hi\n")
    no_x.chmod(0o644)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01\x02not a program")
    garbage.chmod(0o755)
    cases = [
        (Exec(cmd="definitely-not-a-cmd"), "not_found", 2),
        (Exec(cmd=str(no_x)), "permission_denied", 13),
        (Exec(cmd=str(garbage)), "not_executable", 8),
        (Exec(cmd="true", cwd=str(tmp_path / "missing")), "bad_cwd", 2),
        (Exec(cmd="true", cwd=str(no_x)), "bad_cwd", 20),
    ]
    with trio.fail_after(10):
        for req, kind, errno in cases:
            id = await client.request(req)
            frame = await client.recv(id)
            assert frame.flags & TERMINAL
            assert isinstance(frame.msg, ExecStartFailed), frame
            assert (frame.msg.kind, frame.msg.errno) == (kind, errno), frame.msg
        reply = await client.call(Exec(cmd="true", user="somebody-else"))
        assert isinstance(reply, ErrorReply) and reply.code == "unsupported"
        res = await client.exec("true", user="root")
        assert res.exited == ExecExited(exit_code=0)


async def test_env_and_cwd(tmp_path: Path) -> None:
    env = dict(os.environ, CORRAL_SECRET="x", KEEP="kept")
    (tmp_path / "sub").mkdir()
    with trio.fail_after(10):
        async with spawn_agent(env=env, cwd=str(tmp_path)) as agent:
            client, _ = await agent.handshake()
            res = await client.exec("env", env={"ADDED": "1", "KEEP": "over"})
            lines = set(bytes(res.stdout).decode().splitlines())
            assert {"ADDED=1", "KEEP=over"} <= lines
            assert not [x for x in lines if x.startswith("CORRAL_")]
            assert (await client.exec("pwd")).stdout == f"{tmp_path}\n".encode()
            assert (await client.exec("pwd", cwd="sub")).stdout == f"{tmp_path}/sub\n".encode()
            await client.aclose()

"""agentd detached jobs: a real agent process on the host, driven over its Unix socket."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from corral.agentd.testing import AgentClient, AgentProcess, spawn_agent
from corral.protocol import (
    TERMINAL,
    Cancel,
    ErrorReply,
    ExecStartFailed,
    JobExited,
    JobKill,
    JobList,
    JobListReply,
    JobStart,
    JobStarted,
    JobWait,
    LogEntry,
    LogSubscribe,
    Ok,
    Ping,
)

PY = sys.executable


class Agent:
    """An agent process and the connections a test opened to it (closed at the end)."""

    def __init__(self, process: AgentProcess) -> None:
        self.process = process
        self.clients: list[AgentClient] = []

    async def connect(self) -> AgentClient:
        client, _ = await self.process.handshake()
        self.clients.append(client)
        return client


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    with trio.fail_after(10):
        async with spawn_agent(cwd=str(tmp_path)) as process:
            ag = Agent(process)
            try:
                yield ag
            finally:
                for client in ag.clients:
                    await client.aclose()


async def connect(agent: Agent) -> AgentClient:
    return await agent.connect()


async def start(client: AgentClient, cmd: str, *args: str, **kw: object) -> JobStarted:
    reply = await client.call(JobStart(cmd=cmd, args=list(args), **kw))  # type: ignore[arg-type]
    assert isinstance(reply, JobStarted), reply
    return reply


async def logs_until(client: AgentClient, id: int, done: str) -> list[LogEntry]:
    """Log entries of subscription ``id`` up to the first whose text contains ``done``."""
    got: list[LogEntry] = []
    while True:
        frame = await client.recv(id)
        assert isinstance(frame.msg, LogEntry), frame
        got.append(frame.msg)
        if done.encode() in frame.msg.data:
            return got


async def test_a_job_runs_detached_and_its_output_goes_to_the_log(agent: Agent) -> None:
    with trio.fail_after(10):
        client = await connect(agent)
        job = await start(client, "sh", "-c", "echo out; echo err >&2; exit 3")
        assert job.id == 1 and job.pid > 0
        exited = await client.call(JobWait(id=job.id))
        assert exited == JobExited(id=1, exit_code=3)
        sub = await client.request(LogSubscribe())
        entries = await logs_until(client, sub, "job 1 exited")
    streams = [(e.stream, e.data, e.job) for e in entries]
    assert ("stdout", b"out\n", 1) in streams and ("stderr", b"err\n", 1) in streams
    started = [e for e in entries if e.stream == "system" and b"started" in e.data]
    assert b"job 1 started (pid %d): sh -c" % job.pid in started[0].data
    assert entries[-1].exit_code == 3 and entries[-1].job == 1
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    assert all(e.ts > 1e9 for e in entries)


async def test_a_job_survives_its_connection_and_another_one_waits_and_kills(
    agent: Agent,
) -> None:
    with trio.fail_after(10):
        first = await connect(agent)
        job = await start(first, "sleep", "30")
        await first.aclose()
        second = await connect(agent)
        listing = await second.call(JobList())
        assert isinstance(listing, JobListReply)
        (info,) = listing.jobs
        assert (info.id, info.cmd, info.args, info.pid) == (job.id, "sleep", ["30"], job.pid)
        assert info.status == "running" and info.exit_code is None and info.ended_at is None
        waiting = await second.request(JobWait(id=job.id))
        assert await second.call(JobKill(id=job.id, signal=int(signal.SIGTERM))) == Ok()
        frame = await second.recv(waiting)
        assert frame.flags & TERMINAL
        assert frame.msg == JobExited(id=job.id, exit_code=143, signal=15)
        listing = await second.call(JobList())
        assert isinstance(listing, JobListReply)
        (info,) = listing.jobs
        assert info.status == "exited" and info.exit_code == 143 and info.signal == 15
        assert info.ended_at is not None and info.ended_at >= info.started_at
        # A finished job still answers wait (at once) and kill (a no-op).
        assert await second.call(JobWait(id=job.id)) == JobExited(id=1, exit_code=143, signal=15)
        assert await second.call(JobKill(id=job.id)) == Ok()


async def test_bad_inputs_are_typed_errors(agent: Agent) -> None:
    with trio.fail_after(10):
        client = await connect(agent)
        for request in (JobWait(id=42), JobKill(id=42)):
            reply = await client.call(request)
            assert isinstance(reply, ErrorReply) and reply.code == "job_not_found", reply
        job = await start(client, "sleep", "30")
        for bad in (0, -1, 65, 1000):
            reply = await client.call(JobKill(id=job.id, signal=bad))
            assert isinstance(reply, ErrorReply) and reply.code == "invalid_config", reply
        failed = await client.call(JobStart(cmd="/no/such/command"))
        assert isinstance(failed, ExecStartFailed) and failed.kind == "not_found"
        user = await client.call(JobStart(cmd="true", user="nobody-here"))
        assert isinstance(user, ErrorReply) and user.code == "unsupported"
        listing = await client.call(JobList())
        assert isinstance(listing, JobListReply) and [j.id for j in listing.jobs] == [job.id]
        sub = await client.request(LogSubscribe())
        entries = await logs_until(client, sub, "nobody-here")
        texts = [e.data for e in entries if e.stream == "system"]
        assert any(b"exec failed to start: /no/such/command" in t for t in texts), texts
        assert await client.call(JobKill(id=job.id)) == Ok()


async def test_timeout_and_stdin(agent: Agent) -> None:
    with trio.fail_after(10):
        client = await connect(agent)
        cat = await start(client, "cat", stdin=b"fed\n")
        assert await client.call(JobWait(id=cat.id)) == JobExited(id=cat.id, exit_code=0)
        slow = await start(client, "sleep", "30", timeout=0.2)
        exited = await client.call(JobWait(id=slow.id))
        assert exited == JobExited(id=slow.id, exit_code=137, signal=9, timed_out=True)
        sub = await client.request(LogSubscribe())
        entries = await logs_until(client, sub, f"job {slow.id} exited")
    assert any(e.data == b"fed\n" and e.job == cat.id for e in entries)
    assert b"(timed out)" in entries[-1].data


async def test_cancelling_a_wait_leaves_the_job_running(agent: Agent) -> None:
    with trio.fail_after(10):
        client = await connect(agent)
        job = await start(client, "sleep", "30")
        waiting = await client.request(JobWait(id=job.id))
        await client.send(waiting, Cancel())
        frame = await client.recv(waiting)
        assert frame.msg == Ok() and frame.flags & TERMINAL
        listing = await client.call(JobList())
        assert isinstance(listing, JobListReply) and listing.jobs[0].status == "running"
        await client.call(JobKill(id=job.id))
        assert await client.call(JobWait(id=job.id)) == JobExited(
            id=job.id, exit_code=137, signal=9
        )


async def test_shutdown_ends_jobs_and_logs_it(agent: Agent) -> None:
    from corral.protocol import Shutdown

    with trio.fail_after(10):
        client = await connect(agent)
        sub = await client.request(LogSubscribe())
        job = await start(client, "sleep", "30")
        waiting = await client.request(JobWait(id=job.id))
        await client.request(Shutdown(grace=0.2))
        frames = await client.recv_eof()
    by_id: dict[int, list[object]] = {}
    for frame in frames:
        by_id.setdefault(frame.id, []).append(frame.msg)
    assert by_id[waiting] == [JobExited(id=job.id, exit_code=143, signal=15)]
    texts = [m.data for m in by_id[sub] if isinstance(m, LogEntry)]
    assert any(b"agent shutting down" in t for t in texts), texts
    assert any(b"job 1 exited with code 143" in t for t in texts), texts


async def test_many_connections_wait_for_the_same_job(agent: Agent) -> None:
    with trio.fail_after(10):
        clients = [await connect(agent) for _ in range(3)]
        job = await start(clients[0], "sh", "-c", "read x; exit 5", stdin=b"go\n")
        ids = [await c.request(JobWait(id=job.id)) for c in clients]
        for c, id in zip(clients, ids, strict=True):
            frame = await c.recv(id)
            assert frame.msg == JobExited(id=job.id, exit_code=5)
        assert await clients[1].call(Ping()) is not None

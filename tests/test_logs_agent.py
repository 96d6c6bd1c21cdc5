"""The agent's log ring: bounds, drop-oldest marker, credit, acks, resubscription.

The ring is plain code (no event loop), driven here through a recording connection;
the last tests run a real agent process over its socket.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from corral.agentd.logring import MIN_RING_BYTES, LogRing
from corral.agentd.testing import AgentClient, spawn_agent
from corral.protocol import (
    LOG_ENTRY_COST,
    TERMINAL,
    Cancel,
    Exec,
    ExecStartFailed,
    JobExited,
    JobStart,
    JobStarted,
    JobWait,
    LogAck,
    LogEntry,
    LogSubscribe,
    Message,
    Ok,
    Ping,
    Pong,
)

PY = sys.executable


class Conn:
    """What the ring needs of a connection, recording what it is sent."""

    def __init__(self) -> None:
        self.paused = False
        self.convs: dict[int, Any] = {}
        self.sent: list[tuple[int, Message, int]] = []

    def send(self, id: int, msg: Message, flags: int = 0) -> None:
        self.sent.append((id, msg, flags))

    def is_closing(self) -> bool:
        return False

    def entries(self) -> list[LogEntry]:
        return [m for _, m, _ in self.sent if isinstance(m, LogEntry)]


def ring(limit: int = MIN_RING_BYTES) -> LogRing:
    return LogRing(limit, clock=lambda: 1000.0)


def test_entries_go_out_in_order_within_the_window_and_acks_free_them() -> None:
    r = ring()
    conn = Conn()
    for n in range(3):
        r.append("stdout", f"early {n}", job=7)
    sub = r.subscribe(conn, 5, LogSubscribe(window=2 * (LOG_ENTRY_COST + 7)))
    assert conn.convs[5] is sub
    assert [e.data for e in conn.entries()] == [b"early 0", b"early 1"]
    assert [(e.seq, e.ts, e.stream, e.job) for e in conn.entries()] == [
        (1, 1000.0, "stdout", 7),
        (2, 1000.0, "stdout", 7),
    ]
    sub.follow_up(LogAck(seq=1))
    assert [e.data for e in conn.entries()][-1] == b"early 2"
    r.append("system", "later", exit_code=0)
    assert len(conn.entries()) == 3  # window full: seq 2 and 3 unacknowledged
    sub.follow_up(LogAck(seq=3))
    assert conn.entries()[-1].data == b"later" and conn.entries()[-1].exit_code == 0
    sub.follow_up(LogAck(seq=4))
    assert len(r) == 0 and r.size == 0 and r.in_flight == 0


def test_a_paused_connection_gets_nothing_until_it_resumes() -> None:
    r = ring()
    conn = Conn()
    sub = r.subscribe(conn, 1, LogSubscribe())
    conn.paused = True
    r.append("stdout", "a")
    r.append("stdout", "b")
    assert conn.entries() == []
    conn.paused = False
    sub.flow_changed()
    assert [e.data for e in conn.entries()] == [b"a", b"b"]


def test_with_nobody_reading_the_oldest_go_and_a_marker_says_how_much() -> None:
    r = ring()
    chunk = b"x" * 10_000
    for _ in range(40):  # 400 KB into a 128 KiB ring
        r.append("stdout", chunk, job=1)
    assert r.size <= r.limit + LOG_ENTRY_COST + 200
    conn = Conn()
    r.subscribe(conn, 1, LogSubscribe(window=1 << 30))
    got = conn.entries()
    marker, rest = got[0], got[1:]
    assert marker.stream == "system" and marker.job is None
    kept = sum(len(e.data) for e in rest)
    dropped = 40 * len(chunk) - kept
    assert marker.data.startswith(b"dropped %d bytes of log output" % dropped)
    assert r.dropped == dropped
    assert [e.seq for e in rest] == list(range(40 - len(rest) + 1, 41))
    assert marker.seq == rest[0].seq - 1
    # More drops merge into the one marker at the head.
    conn2 = Conn()
    r.subscribe(conn2, 2, LogSubscribe(after=40))
    assert conn2.entries() == []


def test_markers_merge() -> None:
    r = ring()
    for _ in range(30):
        r.append("stdout", b"y" * 10_000)
    first = r.dropped
    for _ in range(30):
        r.append("stdout", b"y" * 10_000)
    conn = Conn()
    r.subscribe(conn, 1, LogSubscribe(window=1 << 30))
    markers = [e for e in conn.entries() if e.stream == "system"]
    assert len(markers) == 1 and first < r.dropped
    assert markers[0].data.startswith(b"dropped %d bytes" % r.dropped)


def test_a_new_subscription_replaces_the_old_and_resends_what_was_not_acknowledged() -> None:
    r = ring()
    old = Conn()
    sub = r.subscribe(old, 3, LogSubscribe())
    for n in range(5):
        r.append("stdout", f"{n}")
    sub.follow_up(LogAck(seq=2))
    new = Conn()
    r.subscribe(new, 9, LogSubscribe(after=3))
    assert old.sent[-1] == (3, Ok(), TERMINAL) and 3 not in old.convs
    assert [e.seq for e in new.entries()] == [4, 5]
    # A dropped connection: what it had not acknowledged waits for the next one.
    new_sub = new.convs[9]
    new_sub.end_now()
    r.append("stdout", "6")
    assert len(new.entries()) == 2
    third = Conn()
    r.subscribe(third, 1, LogSubscribe(after=0))
    assert [e.seq for e in third.entries()] == [4, 5, 6]
    # An `after` beyond anything this agent wrote (another agent's) means "everything".
    fourth = Conn()
    r.subscribe(fourth, 1, LogSubscribe(after=10_000))
    assert [e.seq for e in fourth.entries()] == [4, 5, 6]


def test_cancel_ends_the_subscription() -> None:
    r = ring()
    conn = Conn()
    sub = r.subscribe(conn, 4, LogSubscribe())
    sub.follow_up(Cancel())
    assert conn.sent[-1] == (4, Ok(), TERMINAL) and r.sub is None and 4 not in conn.convs
    r.append("stdout", "kept")
    assert len(r) == 1


def test_the_ring_size_has_a_floor() -> None:
    assert LogRing(10).limit == MIN_RING_BYTES


# -- a real agent ----------------------------------------------------------------------------


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[AgentClient]:
    import os

    env = dict(os.environ, CORRAL_LOG_RING_BYTES=str(MIN_RING_BYTES))
    with trio.fail_after(10):
        async with spawn_agent(cwd=str(tmp_path), env=env) as agent:
            c, _ = await agent.handshake()
            try:
                yield c
            finally:
                await c.aclose()


async def test_agent_ring_is_bounded_by_its_setting(client: AgentClient) -> None:
    total = 600_000
    script = f"import sys; sys.stdout.buffer.write(b'z' * {total})"
    with trio.fail_after(10):
        job = await client.call(JobStart(cmd=PY, args=["-I", "-c", script]))
        assert isinstance(job, JobStarted)
        assert await client.call(JobWait(id=job.id)) == JobExited(id=job.id, exit_code=0)
        sub = await client.request(LogSubscribe(window=1 << 30))
        got: list[LogEntry] = []
        while not got or b"exited" not in got[-1].data:
            frame = await client.recv(sub)
            assert isinstance(frame.msg, LogEntry)
            got.append(frame.msg)
    assert got[0].stream == "system" and got[0].data.startswith(b"dropped ")
    kept = sum(len(e.data) for e in got if e.stream == "stdout")
    assert 0 < kept < MIN_RING_BYTES < total
    assert sum(len(e.data) + LOG_ENTRY_COST for e in got) <= MIN_RING_BYTES + 200


async def test_agent_honours_the_window_until_acked(client: AgentClient) -> None:
    window = 20_000
    with trio.fail_after(10):
        sub = await client.request(LogSubscribe(window=window))
        script = "import sys\nfor i in range(100): sys.stdout.write('%04d' % i + 'x' * 995 + '\\n')"
        job = await client.call(JobStart(cmd=PY, args=["-I", "-c", script]))
        assert isinstance(job, JobStarted)
        assert await client.call(JobWait(id=job.id)) == JobExited(id=job.id, exit_code=0)
        assert await client.call(Ping()) == Pong()  # every frame sent before it is here
        queued = list(client.queues.get(sub, ()))
        client.queues.pop(sub, None)
        entries = [f.msg for f in queued if isinstance(f.msg, LogEntry)]
        assert len(entries) == len(queued)
        in_flight = sum(len(e.data) + LOG_ENTRY_COST for e in entries)
        assert 0 < in_flight <= window
        data = bytearray()
        for e in entries:
            data += e.data if e.stream == "stdout" else b""
        last = entries[-1]
        assert isinstance(last, LogEntry)
        while b"exited" not in last.data:
            await client.send(sub, LogAck(seq=last.seq))
            frame = await client.recv(sub)
            assert isinstance(frame.msg, LogEntry)
            last = frame.msg
            data += last.data if last.stream == "stdout" else b""
    lines = data.decode().splitlines()
    assert [line[:4] for line in lines] == [f"{i:04d}" for i in range(100)]


async def test_exec_start_failures_are_logged(client: AgentClient) -> None:
    with trio.fail_after(10):
        id = await client.request(Exec(cmd="/nope"))
        frame = await client.recv(id)
        assert isinstance(frame.msg, ExecStartFailed)
        sub = await client.request(LogSubscribe())
        frame = await client.recv(sub)
    assert isinstance(frame.msg, LogEntry) and frame.msg.stream == "system"
    assert frame.msg.data == b"exec failed to start: /nope: command not found"


async def test_keep_logs_stores_and_resumes_without_duplicates(tmp_path: Path) -> None:
    from corral.actors.channel import AgentChannel
    from corral.actors.logfiles import follow_log, read_log
    from corral.actors.logs import keep_logs

    where = tmp_path / "logs"

    async def keep_until(agent_socket: str, text: bytes) -> None:
        stream = await trio.open_unix_socket(agent_socket)
        async with AgentChannel.open(stream) as channel, trio.open_nursery() as nursery:
            nursery.start_soon(keep_logs, channel, where)
            job = await channel.request(JobStart(cmd="echo", args=[text.decode()]))
            assert isinstance(job, JobStarted)
            async for record in follow_log(where, interval=0.01):
                if record.data == text + b"\n":
                    break
            nursery.cancel_scope.cancel()

    with trio.fail_after(20):
        async with spawn_agent(cwd=str(tmp_path)) as agent:
            await keep_until(agent.socket_path, b"first")
            await keep_until(agent.socket_path, b"second")
    records = read_log(where)
    outputs = [r.data for r in records if r.stream == "stdout"]
    assert outputs == [b"first\n", b"second\n"]
    agent_seqs = [r.agent_seq or 0 for r in records]
    assert 0 not in agent_seqs and agent_seqs == sorted(set(agent_seqs))  # none twice

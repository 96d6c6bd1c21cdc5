"""Detached jobs and the log ring of a fake sandbox (see drivers/fake.py).

Like the real agent's (``agentd.jobs``, ``agentd.logring``), but simpler: jobs are
scripted :class:`FakeExec` commands that belong to the sandbox process, not to a
connection (they survive it, any connection may list, wait for or kill them; they are
killed when the sandbox ends), and their output goes to the log. The log keeps what the
subscriber has not acknowledged (bounded by entries, oldest dropped with a marker) and
sends everything at once: no window.
"""

from __future__ import annotations

import shlex
import signal as _signal
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import msgspec
import trio

from ..protocol import (
    TERMINAL,
    Cancel,
    ErrorReply,
    Exec,
    ExecExited,
    ExecStarted,
    ExecStartFailed,
    ExecStderr,
    ExecStdout,
    FrameDecoder,
    JobExited,
    JobInfo,
    JobKill,
    JobList,
    JobListReply,
    JobStart,
    JobStarted,
    JobWait,
    LogAck,
    LogEntry,
    LogSubscribe,
    Message,
    Ok,
)
from .fake_exec import FakeExec

if TYPE_CHECKING:
    from .fake import FakeAgent, FakeSandboxProcess

__all__ = ["REQUESTS", "FakeJob", "FakeJobs", "FakeLog"]

REQUESTS = (JobStart, JobList, JobWait, JobKill, LogSubscribe)
"""Requests the fake agent hands to :class:`FakeJobs`."""

MAX_ENTRIES = 10_000
_SIGNALS = frozenset(int(s) for s in _signal.valid_signals())


class FakeLog:
    """The fake agent's log ring and its (single) subscriber."""

    def __init__(self, proc: FakeSandboxProcess, max_entries: int = MAX_ENTRIES) -> None:
        self.proc = proc
        self.max_entries = max_entries
        self.entries: deque[LogEntry] = deque()
        self.seq = 0
        self.dropped = 0
        self.sub: tuple[FakeAgent, int] | None = None
        self._lock = trio.Lock()  # entries go out in seq order

    async def append(
        self,
        stream: str,
        data: bytes | str,
        *,
        job: int | None = None,
        exit_code: int | None = None,
    ) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.seq += 1
        entry = LogEntry(
            seq=self.seq,
            ts=time.time(),
            stream=stream,
            data=raw,
            job=job,
            exit_code=exit_code,
        )
        self.entries.append(entry)
        while len(self.entries) > self.max_entries:
            old = self.entries.popleft()
            self.dropped += len(old.data)
            marker = LogEntry(
                seq=old.seq, ts=old.ts, stream="system", data=b"dropped %d bytes" % self.dropped
            )
            if self.entries[0].stream == "system" and self.entries[0].data.startswith(b"dropped"):
                self.entries.popleft()
            self.entries.appendleft(marker)
        await self._push([entry])

    async def _push(self, entries: list[LogEntry]) -> None:
        async with self._lock:
            sub = self.sub
            if sub is None:
                return
            agent, id = sub
            for entry in entries:
                try:
                    await agent.send(id, entry)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    if self.sub == sub:
                        self.sub = None
                    return

    async def subscribe(self, agent: FakeAgent, id: int, req: LogSubscribe) -> None:
        old = self.sub
        self.sub = (agent, id)
        if old is not None:
            try:
                await old[0].send(old[1], Ok(), TERMINAL)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        after = req.after if req.after <= self.seq else 0
        await self._push([e for e in self.entries if e.seq > after])

    def follow_up(self, agent: FakeAgent, id: int, msg: Message) -> bool:
        if self.sub != (agent, id):
            return False
        if isinstance(msg, LogAck):
            while self.entries and self.entries[0].seq <= msg.seq:
                self.entries.popleft()
        elif isinstance(msg, Cancel):
            self.sub = None
            agent.proc.driver.start_soon(_quiet_send, agent, id, Ok(), TERMINAL)
        return True


async def _quiet_send(agent: FakeAgent, id: int, msg: Message, flags: int = 0) -> None:
    try:
        await agent.send(id, msg, flags)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class FakeJob:
    """A detached job: the FakeExec's "agent", taking its frames (see FakeExec)."""

    def __init__(self, jobs: FakeJobs, id: int, req: JobStart) -> None:
        self.jobs = jobs
        self.proc = jobs.proc
        self.id = id
        self.req = req
        self.wedged = False
        self.sessions: dict[int, FakeExec] = {}
        self.info = JobInfo(id=id, cmd=req.cmd, args=list(req.args), started_at=0.0)
        self.exec = FakeExec(cast("FakeAgent", self), id, _exec_of(req))
        self.started = trio.Event()
        self.failure: Message | None = None
        self.exited: JobExited | None = None
        self.waiters: list[tuple[FakeAgent, int]] = []
        """JobWait conversations, answered (before the job counts as finished) at its end."""

    async def send(self, id: int, msg: Message, flags: int = 0) -> None:
        log = self.jobs.log
        if isinstance(msg, ExecStdout | ExecStderr):
            self.exec.credit += len(msg.data)
            stream = "stdout" if isinstance(msg, ExecStdout) else "stderr"
            await log.append(stream, msg.data, job=self.id)
        elif isinstance(msg, ExecStarted):
            self.info.pid = msg.pid
            self.info.started_at = time.time()
            cmdline = shlex.join([self.req.cmd, *self.req.args])
            self.started.set()
            text = f"job {self.id} started (pid {msg.pid}): {cmdline}"
            await log.append("system", text, job=self.id)
        elif isinstance(msg, ExecExited):
            info = self.info
            info.status, info.exit_code, info.signal = "exited", msg.exit_code, msg.signal
            info.timed_out, info.ended_at = msg.timed_out, time.time()
            self.exited = JobExited(
                id=self.id, exit_code=msg.exit_code, signal=msg.signal, timed_out=msg.timed_out
            )
            text = f"job {self.id} exited with code {msg.exit_code}"
            await log.append("system", text, job=self.id, exit_code=msg.exit_code)
            waiters, self.waiters = self.waiters, []
            for agent, wait_id in waiters:
                self.jobs.waiters.pop((agent, wait_id), None)
                await _quiet_send(agent, wait_id, self.exited, TERMINAL)
        elif isinstance(msg, ExecStartFailed):
            self.failure = msg
            self.started.set()
            await log.append("system", f"exec failed to start: {msg.message}")

    async def send_raw(self, data: bytes) -> None:
        for frame in FrameDecoder().feed(data):
            await self.send(frame.id, frame.msg, frame.flags)


def _exec_of(req: JobStart) -> Exec:
    return Exec(
        cmd=req.cmd,
        args=list(req.args),
        env=dict(req.env),
        cwd=req.cwd,
        timeout=req.timeout,
        stdin=req.stdin,
    )


class FakeJobs:
    """The jobs and the log of one fake sandbox process."""

    def __init__(self, proc: FakeSandboxProcess) -> None:
        self.proc = proc
        self.log = FakeLog(proc)
        self.jobs: dict[int, FakeJob] = {}
        self.waiters: dict[tuple[FakeAgent, int], FakeJob] = {}
        self.next_id = 1
        self._reaper = False

    async def request(self, agent: FakeAgent, id: int, msg: Message) -> None:
        """Serve one request (runs as its own task in the agent's nursery)."""
        reply: Message
        if isinstance(msg, LogSubscribe):
            await self.log.subscribe(agent, id, msg)
            return
        if isinstance(msg, JobStart):
            reply = await self._start(msg)
        elif isinstance(msg, JobList):
            reply = JobListReply(jobs=[msgspec.structs.replace(j.info) for j in self.jobs.values()])
        elif isinstance(msg, JobWait):
            job = self.jobs.get(msg.id)
            if job is None:
                reply = _not_found(msg.id)
            elif job.exited is not None:
                reply = job.exited
            else:  # the job answers when it ends
                job.waiters.append((agent, id))
                self.waiters[(agent, id)] = job
                await trio.lowlevel.checkpoint()
                return
        elif isinstance(msg, JobKill):
            reply = self._kill(msg)
        else:
            reply = ErrorReply(code="unsupported", message=f"{type(msg).__name__} is not served")
        await _quiet_send(agent, id, reply, TERMINAL)

    def follow_up(self, agent: FakeAgent, id: int, msg: Message) -> bool:
        """A follow-up frame for one of our conversations (True when it was ours)."""
        job = self.waiters.get((agent, id))
        if job is not None:
            if isinstance(msg, Cancel):
                del self.waiters[(agent, id)]
                job.waiters.remove((agent, id))
                agent.proc.driver.start_soon(_quiet_send, agent, id, Ok(), TERMINAL)
            return True
        return self.log.follow_up(agent, id, msg)

    async def _start(self, req: JobStart) -> Message:
        job = FakeJob(self, self.next_id, req)
        self.next_id += 1
        if not self._reaper:
            self._reaper = True
            self.proc.driver.start_soon(self._reap)
        self.proc.execs.append(job.exec)
        self.proc.driver.start_soon(job.exec.run)
        await job.started.wait()
        if job.failure is not None:
            return job.failure
        self.jobs[job.id] = job
        return JobStarted(id=job.id, pid=job.info.pid)

    def _kill(self, req: JobKill) -> Message:
        if req.signal not in _SIGNALS:
            return ErrorReply(code="invalid_config", message=f"invalid signal number {req.signal}")
        job = self.jobs.get(req.id)
        if job is None:
            return _not_found(req.id)
        job.exec.deliver(req.signal)
        return Ok()

    async def _reap(self) -> None:
        """Jobs die with their sandbox."""
        await self.proc.wait()
        for job in self.jobs.values():
            job.exec.deliver(int(_signal.SIGKILL))


def _not_found(id: int) -> ErrorReply:
    return ErrorReply(code="job_not_found", message=f"no job {id} in this sandbox")

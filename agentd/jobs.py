"""Detached jobs: commands the agent runs on its own, output to the sandbox log.

A job is an :class:`~corral.agentd.execs.ExecSession` whose "connection" is the
:class:`Job` itself: output chunks become log entries (stream ``stdout``/``stderr``,
tagged with the job id) and credit is handed straight back, so a job never waits for a
reader (the log ring drops its oldest entries instead). Jobs belong to the agent, not
to a connection: they survive the host disconnecting, and any connection may list,
wait for or kill them. Finished jobs are kept (the newest ``MAX_FINISHED``) so a late
``JobWait`` still gets the exit status.
"""

from __future__ import annotations

import shlex
import signal as _signal
import time
from typing import TYPE_CHECKING, Any

import msgspec

from ..protocol.framing import TERMINAL
from ..protocol.messages import (
    EXEC_WINDOW,
    Cancel,
    ErrorReply,
    Exec,
    ExecExited,
    ExecStarted,
    ExecStderr,
    ExecStdout,
    JobExited,
    JobInfo,
    JobKill,
    JobListReply,
    JobStart,
    JobStarted,
    JobWait,
    Ok,
)
from .execs import ExecSession, killpg

if TYPE_CHECKING:
    from ..protocol.messages import Message
    from .agent import Agent
    from .conn import Connection

__all__ = ["MAX_FINISHED", "Job", "JobTable", "JobWaiter"]

MAX_FINISHED = 256
"""Finished jobs remembered; older ones are forgotten (JobWait then says job_not_found)."""

_SIGNALS = frozenset(int(s) for s in _signal.valid_signals())


def _cmdline(req: JobStart) -> str:
    return shlex.join([req.cmd, *req.args])[:500]


def _not_found(id: int) -> ErrorReply:
    return ErrorReply(code="job_not_found", message=f"no job {id} in this sandbox")


class Job:
    """One detached job; also the sink its exec session reports to."""

    paused = False

    def __init__(self, table: JobTable, id: int, req: JobStart) -> None:
        self.table = table
        self.id = id
        self.req = req
        self.convs: dict[int, Any] = {}
        self.info = JobInfo(id=id, cmd=req.cmd, args=list(req.args), started_at=time.time())
        self.session: ExecSession | None = None
        self.failure: Message | None = None
        self.exited: JobExited | None = None
        self.waiters: list[JobWaiter] = []

    def is_closing(self) -> bool:
        return False

    def send(self, id: int, msg: Message, flags: int = 0) -> None:
        """What the exec session reports: output to the log, the end to the waiters."""
        logs = self.table.agent.logs
        if isinstance(msg, ExecStdout | ExecStderr):
            stream = "stdout" if isinstance(msg, ExecStdout) else "stderr"
            logs.append(stream, msg.data, job=self.id)
            if self.session is not None:
                self.session.credit += len(msg.data)  # nobody to wait for
        elif isinstance(msg, ExecStarted):
            self.info.pid = msg.pid
            text = f"job {self.id} started (pid {msg.pid}): {_cmdline(self.req)}"
            logs.append("system", text, job=self.id)
        elif isinstance(msg, ExecExited):
            self._on_exit(msg)
        else:  # ExecStartFailed or ErrorReply: start() reports it
            self.failure = msg

    def _on_exit(self, msg: ExecExited) -> None:
        info = self.info
        info.status = "exited"
        info.exit_code = msg.exit_code
        info.signal = msg.signal
        info.timed_out = msg.timed_out
        info.ended_at = time.time()
        how = f"exited with code {msg.exit_code}"
        if msg.timed_out:
            how += " (timed out)"
        elif msg.signal:
            how += f" (signal {msg.signal})"
        self.table.agent.logs.append(
            "system", f"job {self.id} {how}", job=self.id, exit_code=msg.exit_code
        )
        self.exited = JobExited(
            id=self.id, exit_code=msg.exit_code, signal=msg.signal, timed_out=msg.timed_out
        )
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.answer(self.exited)
        self.table.prune()


class JobWaiter:
    """A ``JobWait`` conversation parked until its job ends."""

    def __init__(self, job: Job, conn: Connection, id: int) -> None:
        self.job = job
        self.conn = conn
        self.id = id

    def answer(self, reply: Message) -> None:
        if self.conn.convs.get(self.id) is self:
            del self.conn.convs[self.id]
            self.conn.send(self.id, reply, TERMINAL)

    def follow_up(self, msg: Message) -> None:
        if isinstance(msg, Cancel):
            self.end_now()
            self.answer(Ok())

    def flow_changed(self) -> None:
        pass

    def end_now(self) -> None:
        if self in self.job.waiters:
            self.job.waiters.remove(self)


class JobTable:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.jobs: dict[int, Job] = {}
        self.next_id = 1

    def start(self, conn: Connection, id: int, req: JobStart) -> None:
        job = Job(self, self.next_id, req)
        self.next_id += 1
        request = Exec(
            cmd=req.cmd,
            args=list(req.args),
            env=dict(req.env),
            cwd=req.cwd,
            user=req.user,
            timeout=req.timeout,
            stdin=req.stdin,
            window=EXEC_WINDOW,
        )
        job.session = ExecSession(self.agent, job, job.id, request)
        job.session.start()
        if job.failure is not None:
            conn.send(id, job.failure, TERMINAL)
            return
        self.jobs[job.id] = job
        conn.send(id, JobStarted(id=job.id, pid=job.info.pid), TERMINAL)

    def list(self) -> JobListReply:
        infos = [msgspec.structs.replace(job.info) for job in self.jobs.values()]
        return JobListReply(jobs=infos)

    def wait(self, conn: Connection, id: int, req: JobWait) -> None:
        job = self.jobs.get(req.id)
        if job is None:
            conn.send(id, _not_found(req.id), TERMINAL)
        elif job.exited is not None:
            conn.send(id, job.exited, TERMINAL)
        else:
            waiter = JobWaiter(job, conn, id)
            job.waiters.append(waiter)
            conn.convs[id] = waiter

    def kill(self, req: JobKill) -> Message:
        if req.signal not in _SIGNALS:
            return ErrorReply(code="invalid_config", message=f"invalid signal number {req.signal}")
        job = self.jobs.get(req.id)
        if job is None:
            return _not_found(req.id)
        if job.exited is None and job.info.pid:
            killpg(job.info.pid, req.signal)
        return Ok()

    def prune(self) -> None:
        finished = [j for j in self.jobs.values() if j.exited is not None]
        for job in finished[: max(0, len(finished) - MAX_FINISHED)]:
            del self.jobs[job.id]

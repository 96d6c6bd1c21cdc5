"""Detached jobs, and execs whose agent or sandbox goes away, on real sandboxes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

import corral
from corral.actors.channel import AgentChannel
from corral.drivers.local import launch
from corral.drivers.local.cgroup import detect
from corral.errors import AgentGone, SandboxNotRunning
from corral.protocol import (
    ExecStarted,
    JobExited,
    JobKill,
    JobList,
    JobListReply,
    JobStart,
    JobStarted,
    JobWait,
    Ok,
)

pytestmark = pytest.mark.integration


def agent_host_pid(sb: corral.Sandbox) -> int:
    proc = sb._actor.proc
    init = getattr(proc, "init_pid", None)
    assert init is not None
    for pid in launch.sandbox_pids(init):
        if b"corral.agentd" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError("no agent process in the sandbox")


async def test_jobs_run_detached_list_wait_kill_and_log(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("jobs")
        t0 = trio.current_time()
        slow = await sb.exec_detached("sh", ["-c", "echo begin; sleep 30"])
        assert trio.current_time() - t0 < 5 and slow.pid is not None and slow.pid > 1
        quick = await sb.exec_detached("sh", ["-c", "echo out; echo err >&2; exit 4"])
        assert await quick.wait() == 4
        listing = {j.id: j for j in await sb.jobs()}
        assert listing[slow.id].status == "running" and listing[quick.id].exit_code == 4
        await slow.kill(signal.SIGTERM)
        assert await slow.wait() == 143
        info = await slow.info()
        assert info.status == "exited" and info.signal == signal.SIGTERM
        records = [r for r in await sb.logs() if r.job in (slow.id, quick.id)]
        by_job = {(r.job, r.stream, r.text) for r in records}
        assert (quick.id, "stdout", "out\n") in by_job and (quick.id, "stderr", "err\n") in by_job
        assert (slow.id, "stdout", "begin\n") in by_job
        assert (quick.id, "system", f"job {quick.id} exited with code 4") in by_job


async def test_jobs_survive_the_connection_that_started_them(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("jobs-conn")
        async with AgentChannel.open(await local_sup.connect_agent("jobs-conn")) as first:
            started = await first.request(JobStart(cmd="sleep", args=["30"]))
            assert isinstance(started, JobStarted)
        # That connection is gone; the job is not. Another one (and the handle) see it.
        async with AgentChannel.open(await local_sup.connect_agent("jobs-conn")) as second:
            listing = await second.request(JobList())
            assert isinstance(listing, JobListReply)
            (info,) = listing.jobs
            assert info.id == started.id and info.status == "running" and info.pid == started.pid
            job = sb.job(started.id)
            async with trio.open_nursery() as nursery:
                codes: list[int] = []

                async def wait() -> None:
                    codes.append(await job.wait())

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                assert await second.request(JobKill(id=started.id)) == Ok()
                exited = await second.request(JobWait(id=started.id))
            assert exited == JobExited(id=started.id, exit_code=137, signal=9)
            assert codes == [137]


async def test_execs_and_waits_fail_with_agent_gone_at_once_when_the_agent_is_killed(
    local_sup: corral.Supervisor,
) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("agent-dies")
        job = await sb.exec_detached("sleep", ["30"])
        failures: dict[str, tuple[float, BaseException]] = {}
        async with trio.open_nursery() as nursery:

            async def collect(name: str, fn: object) -> None:
                try:
                    await fn()  # type: ignore[operator]
                except AgentGone as exc:
                    failures[name] = (trio.current_time(), exc)

            nursery.start_soon(collect, "exec", lambda: sb.exec("sleep", ["30"]))
            nursery.start_soon(collect, "wait", job.wait)
            await trio.testing.wait_all_tasks_blocked()
            async with sb.exec_stream("sleep", ["30"]) as proc:
                assert isinstance(await proc.__anext__(), ExecStarted)  # the others run too
                os.kill(agent_host_pid(sb), signal.SIGKILL)
                killed_at = trio.current_time()
                with pytest.raises(AgentGone):
                    await proc.wait()
                failures["stream"] = (trio.current_time(), AgentGone())
        assert set(failures) == {"exec", "wait", "stream"}
        for name, (when, _exc) in failures.items():
            assert when - killed_at < 0.1, (name, when - killed_at)
        assert await sb.wait_until_stopped() is corral.SandboxStatus.CRASHED
        with pytest.raises(SandboxNotRunning):
            await sb.exec("true")


async def test_an_exec_in_flight_ends_at_once_when_the_sandbox_is_killed(
    local_sup: corral.Supervisor,
) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("killed-under")
        errors: list[tuple[float, BaseException]] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                try:
                    await sb.exec("sleep", ["30"])
                except SandboxNotRunning as exc:
                    errors.append((trio.current_time(), exc))

            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            await sb.kill()
        assert len(errors) == 1 and errors[0][0] - t0 < 1.0


async def test_a_stop_delivers_the_exit_of_what_runs(local_sup: corral.Supervisor) -> None:
    """The agent's shutdown SIGTERMs running commands: their exit event is not lost."""
    with trio.fail_after(60):
        sb = await local_sup.create("stop-under")
        job = await sb.exec_detached("sleep", ["30"])
        async with sb.exec_stream("sleep", ["30"]) as proc, trio.open_nursery() as nursery:
            codes: list[int] = []

            async def wait_job() -> None:
                codes.append(await job.wait())

            nursery.start_soon(wait_job)
            assert isinstance(await proc.__anext__(), ExecStarted)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(sb.stop)
            assert await proc.wait() == 143
        assert codes == [143]
        texts = [r.text for r in await sb.logs()]
        assert f"job {job.id} exited with code 143 (signal 15)" in texts
        assert texts[-1] == "sandbox stopped"


@pytest.mark.skipif(detect() is None, reason="no per-sandbox cgroups here")
async def test_an_oom_killed_job_is_recorded(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("oom", memory_mib=64)
        hog = "b = b'x' * (300 << 20)"
        job = await sb.exec_detached("python3", ["-c", hog])
        assert await job.wait() == 137
        async for record in sb.log_stream(tail=1):  # the agent's "exited" entry, then the note
            if "killed (exit 137)" in record.text:
                break
        error = (await sb.info()).last_error
        assert error is not None and error.startswith(f"job {job.id} was killed (exit 137): ")
        assert "out of memory" in error
        assert error in [r.text for r in await sb.logs()]
        result = await sb.exec("python3", ["-c", hog])
        assert result.exit_code == 137
        assert "2 processes" in ((await sb.info()).last_error or "")

"""Detached jobs through the public API, on the fake driver."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from corral.actors.channel import AgentChannel
from corral.actors.supervisor import Supervisor, open_supervisor
from corral.drivers.fake import FakeDriver
from corral.errors import (
    AgentGone,
    ExecFailed,
    ExecTimeout,
    InvalidConfig,
    JobNotFound,
    SandboxNotRunning,
)
from corral.protocol import JobExited, JobKill, JobList, JobListReply, JobWait, Ok
from corral.sandbox import Sandbox


@asynccontextmanager
async def harness(**behaviour: Any) -> AsyncIterator[tuple[FakeDriver, Supervisor, Sandbox]]:
    with trio.fail_after(60):
        async with FakeDriver(**behaviour) as driver, open_supervisor(driver=driver) as sup:
            yield driver, sup, await sup.create("a")


async def test_exec_detached_returns_at_once_and_wait_gives_the_exit_code(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (_driver, _sup, sb):
        t0 = trio.current_time()
        job = await sb.exec_detached("sleep", ["5"])
        assert trio.current_time() == t0  # did not wait for the command
        assert job.id == 1 and job.pid is not None and job.cmd == "sleep" and job.args == ["5"]
        info = await job.info()
        assert info.status == "running" and info.pid == job.pid
        assert await job.wait() == 0
        assert trio.current_time() - t0 == pytest.approx(5)
        info = await job.info()
        assert info.status == "exited" and info.exit_code == 0 and info.ended_at is not None
        failing = await sb.exec_detached("exit", ["3"])
        assert await failing.wait() == 3


async def test_jobs_lists_them_and_kill_ends_one(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, _sup, sb):
        a = await sb.exec_detached("sleep", ["100"])
        b = await sb.exec_detached("echo", ["hi"])
        assert await b.wait() == 0
        infos = {i.id: i for i in await sb.jobs()}
        assert infos[a.id].status == "running" and infos[b.id].status == "exited"
        await a.kill(signal.SIGTERM)
        assert await a.wait() == 128 + signal.SIGTERM
        info = await a.info()
        assert info.signal == signal.SIGTERM and info.exit_code == 143
        await a.kill()  # a finished job: nothing to do, no error


async def test_a_handle_by_id_waits_for_a_job_started_elsewhere(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (_driver, _sup, sb):
        job = await sb.exec_detached("sleep", ["2"])
        other = sb.job(job.id)  # a fresh handle, from the id alone
        assert other is not job and other.pid is None
        assert (await other.info()).cmd == "sleep"
        assert await other.wait() == 0


async def test_jobs_live_in_the_agent_and_another_connection_sees_them(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (_driver, sup, sb):
        job = await sb.exec_detached("sleep", ["100"])
        stream = await sup.connect_agent("a")
        async with AgentChannel.open(stream, label="second") as channel:
            listing = await channel.request(JobList())
            assert isinstance(listing, JobListReply) and [j.id for j in listing.jobs] == [job.id]
            assert await channel.request(JobKill(id=job.id)) == Ok()
            exited = await channel.request(JobWait(id=job.id))
            assert exited == JobExited(id=job.id, exit_code=137, signal=9)
        assert await job.wait() == 137


async def test_a_timeout_kills_the_job(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, _sup, sb):
        job = await sb.exec_detached("sleep", ["100"], timeout=2)
        with pytest.raises(ExecTimeout):
            await job.wait()
        info = await job.info()
        assert info.timed_out and info.exit_code == 137


async def test_bad_inputs_are_typed_errors(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, _sup, sb):
        with pytest.raises(ExecFailed) as failed:
            await sb.exec_detached("no-such-command")
        assert failed.value.kind == "not_found"
        with pytest.raises(InvalidConfig):
            await sb.exec_detached("")
        with pytest.raises(InvalidConfig):
            await sb.exec_detached("sleep", "10")
        with pytest.raises(InvalidConfig):
            await sb.exec_detached("sleep", ["10"], timeout=0)
        ghost = sb.job(99)
        with pytest.raises(JobNotFound):
            await ghost.wait()
        with pytest.raises(JobNotFound):
            await ghost.kill()
        with pytest.raises(JobNotFound):
            await ghost.info()
        for bad_id in (0, -1, True, "1"):
            with pytest.raises(InvalidConfig):
                sb.job(bad_id)  # type: ignore[arg-type]
        job = await sb.exec_detached("sleep", ["100"])
        received = driver.processes["a"].agents[0].received
        kills = sum(isinstance(m, JobKill) for m in received)
        for bad_signal in (0, -3, 65, 1.5, True):
            with pytest.raises(InvalidConfig, match="signal"):
                await job.kill(bad_signal)  # type: ignore[arg-type]
        assert (await job.info()).status == "running"
        assert sum(isinstance(m, JobKill) for m in received) == kills  # refused on the host


async def test_stopping_the_sandbox_ends_its_jobs_and_waits_see_the_exit(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (_driver, _sup, sb):
        job = await sb.exec_detached("sleep", ["1000"])
        codes: list[int] = []
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                codes.append(await job.wait())

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await sb.stop(timeout=1)
        assert codes == [128 + signal.SIGTERM]  # the agent's shutdown ended it
        for call in (
            sb.exec_detached("echo"),
            sb.jobs(),
            job.wait(),
            job.kill(),
        ):
            with pytest.raises(SandboxNotRunning):
                await call


async def test_a_wait_in_flight_ends_at_once_when_the_sandbox_is_killed(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (_driver, _sup, sb):
        job = await sb.exec_detached("sleep", ["1000"])
        errors: list[BaseException] = []
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                try:
                    await job.wait()
                except SandboxNotRunning as exc:
                    errors.append(exc)

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            await sb.kill()
        assert len(errors) == 1 and trio.current_time() == t0


async def test_a_wait_in_flight_fails_with_agent_gone_when_the_sandbox_crashes(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, _sup, sb):
        job = await sb.exec_detached("sleep", ["1000"])
        async with trio.open_nursery() as nursery:
            errors: list[BaseException] = []

            async def wait() -> None:
                try:
                    await job.wait()
                except AgentGone as exc:
                    errors.append(exc)

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            driver.processes["a"].crash()
        assert len(errors) == 1 and trio.current_time() == t0


async def test_a_job_s_output_goes_to_the_log(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, _sup, sb):
        job = await sb.exec_detached("tick", ["3", "1"])
        assert await job.wait() == 0  # returns once the job's log entries are stored
        mine = [r for r in await sb.logs() if r.job == job.id]
        assert [r.data for r in mine if r.stream == "stdout"] == [b"0\n", b"1\n", b"2\n"]
        system = [r.text for r in mine if r.stream == "system"]
        assert system[0].startswith(f"job {job.id} started") and system[-1].endswith("code 0")


async def test_a_bad_signal_for_an_exec_stream_is_invalid_config(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, _sup, sb):
        async with sb.exec_stream("sleep", ["100"]) as proc:
            for bad in (0, 65, -9, True):
                with pytest.raises(InvalidConfig, match="signal"):
                    await proc.signal(bad)
            await proc.signal(signal.SIGTERM)
            assert await proc.wait() == 143
        (session,) = driver.processes["a"].execs
        assert session.signals == [signal.SIGTERM]

"""The sandbox log through the public API, on the fake driver: what goes in, reading it
back, following it, the limit notes, and the pump's acknowledgements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from corral.actors.channel import AgentChannel
from corral.actors.logs import LogStore, pump_logs
from corral.actors.supervisor import Supervisor, open_supervisor
from corral.drivers.fake import FakeDriver
from corral.errors import InvalidConfig
from corral.protocol import LogAck, LogEntry
from corral.sandbox import Sandbox


@asynccontextmanager
async def harness(**behaviour: Any) -> AsyncIterator[tuple[FakeDriver, Supervisor, Sandbox]]:
    with trio.fail_after(60):
        async with FakeDriver(**behaviour) as driver, open_supervisor(driver=driver) as sup:
            yield driver, sup, await sup.create("a")


async def test_the_log_holds_lifecycle_job_and_agent_events_and_outlives_the_stop(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (_driver, _sup, sb):
        job = await sb.exec_detached("echo", ["hello"])
        assert await job.wait() == 0
        with pytest.raises(Exception, match="not found"):
            await sb.exec_detached("nope")
        await sb.stop()
        records = await sb.logs()
        texts = [r.text for r in records]
        assert texts[0].startswith("sandbox started (pid ")
        assert f"job {job.id} started (pid {job.pid}): echo hello" in texts
        assert "hello\n" in texts
        assert f"job {job.id} exited with code 0" in texts
        assert "exec failed to start: nope: command not found" in texts
        assert any(t.startswith("agent shutting down") for t in texts)
        assert texts[-1] == "sandbox stopped"
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        out = next(r for r in records if r.text == "hello\n")
        assert out.stream == "stdout" and out.job == job.id and out.agent_seq is not None
        assert [r.text for r in await sb.logs(tail=1)] == ["sandbox stopped"]
        since = records[-2].timestamp
        assert [r.seq for r in await sb.logs(since=since)] == [r.seq for r in records[-2:]]
        with pytest.raises(InvalidConfig):
            await sb.logs(tail=-1)


async def test_a_crash_is_in_the_log(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, _sup, sb):
        driver.processes["a"].crash(3)
        await sb.wait_until_stopped()
        last = (await sb.logs(tail=1))[0]
        assert last.stream == "system" and last.text.startswith("sandbox crashed: ")
        assert "exited with code 3" in last.text or "connection" in last.text


async def test_log_stream_follows_live_output_and_ends_when_the_sandbox_stops(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (_driver, _sup, sb):
        got: list[tuple[float, str]] = []
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                async for record in sb.log_stream():
                    got.append((trio.current_time(), record.text))

            nursery.start_soon(follow)
            t0 = trio.current_time()
            job = await sb.exec_detached("tick", ["3", "10"])
            await job.wait()
            await sb.stop()
        outputs = [(t - t0, text) for t, text in got if text in ("0\n", "1\n", "2\n")]
        assert outputs == [(0, "0\n"), (10, "1\n"), (20, "2\n")]  # as they came, not later
        assert got[-1][1] == "sandbox stopped"
        # A stream opened after the stop gives what is there and ends.
        after = [r.text async for r in sb.log_stream(tail=2)]
        assert after[-1] == "sandbox stopped" and len(after) == 2


async def test_exit_137_with_a_limit_report_is_recorded_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, _sup, sb):
        proc = driver.processes["a"]
        assert (await sb.exec("exit", ["137"])).exit_code == 137
        assert (await sb.info()).last_error is None  # 137 without a report: a plain kill
        proc.limit_note = "out of memory: the memory limit of 64 MiB made the kernel kill 1"
        assert (await sb.exec("exit", ["137"])).exit_code == 137
        info = await sb.info()
        assert info.last_error == f"exec 'exit' was killed (exit 137): {proc.limit_note}"
        job = await sb.exec_detached("exit", ["137"])  # the same report: not again
        assert await job.wait() == 137
        await trio.testing.wait_all_tasks_blocked()
        notes = [r.text for r in await sb.logs() if "killed (exit 137)" in r.text]
        assert notes == [info.last_error]
        proc.limit_note += "; pids limit 10 refused 1 fork"
        job = await sb.exec_detached("exit", ["137"])
        assert await job.wait() == 137
        await trio.testing.wait_all_tasks_blocked()
        notes = [r.text for r in await sb.logs() if "killed (exit 137)" in r.text]
        assert notes[-1] == f"job {job.id} was killed (exit 137): {proc.limit_note}"
        assert (await sb.info()).last_error == notes[-1]
        async with sb.exec_stream("exit", ["137"]) as stream:
            assert await stream.wait() == 137


async def test_the_pump_acknowledges_and_a_second_subscriber_resumes_after_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, sup, sb):
        log = driver.processes["a"].jobs.log
        job = await sb.exec_detached("lines", ["5"])
        await job.wait()
        await trio.sleep(1)  # past the pump's acknowledgement delay
        assert len(log.entries) == 0  # all acknowledged, so the agent let them go
        acks = [m for m in driver.processes["a"].agents[0].received if isinstance(m, LogAck)]
        assert acks and acks[-1].seq == log.seq
        # Another host (a keeper, say) takes the subscription over, from where it stands.
        other = LogStore(None)
        stream = await sup.connect_agent("a")
        async with AgentChannel.open(stream) as channel, trio.open_nursery() as nursery:
            seen: list[LogEntry] = []

            async def pump() -> None:
                await pump_logs(channel, other, after=log.seq, on_entry=seen.append)

            nursery.start_soon(pump)
            await trio.testing.wait_all_tasks_blocked()
            second = await sb.exec_detached("echo", ["later"])
            await second.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert [r.text for r in other.read() if r.stream == "stdout"] == ["later\n"]
            assert all(e.seq > acks[-1].seq for e in seen)
            nursery.cancel_scope.cancel()

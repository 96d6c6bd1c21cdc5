"""The stop ladder's timings (seed: stop 10 s, kill 5 s, 100 ms polling), on virtual time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from corral.actors.state import SandboxStatus
from corral.actors.supervisor import Supervisor, open_supervisor
from corral.drivers.fake import FakeDriver, FakeSandboxProcess
from corral.errors import Runtime, SandboxNotRunning
from corral.protocol import Shutdown


@asynccontextmanager
async def harness(**behaviour: Any) -> AsyncIterator[tuple[FakeDriver, Supervisor]]:
    with trio.fail_after(120):
        async with FakeDriver(**behaviour) as driver, open_supervisor(driver=driver) as sup:
            yield driver, sup


def shutdowns(proc: FakeSandboxProcess) -> list[Shutdown]:
    return [m for agent in proc.agents for m in agent.received if isinstance(m, Shutdown)]


async def test_shutdown_honoured_stops_at_the_next_poll(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        proc = driver.processes["a"]
        t0 = trio.current_time()
        await sb.stop()
        assert trio.current_time() - t0 == pytest.approx(0.1)
        assert sb.status is SandboxStatus.STOPPED
        assert [s.grace for s in shutdowns(proc)] == [9.0]  # 10 - min(1, 10 / 2)
        assert proc.times("SIGTERM") == [] and proc.times("SIGKILL") == []
        assert proc.cleaned_up


async def test_shutdown_ignored_sigterm_at_the_stop_timeout(autojump_clock: trio.abc.Clock) -> None:
    async with harness(ignore_shutdown=True) as (driver, sup):
        sb = await sup.create("a")
        proc = driver.processes["a"]
        t0 = trio.current_time()
        await sb.stop()
        assert trio.current_time() - t0 == pytest.approx(10.0)
        assert [t - t0 for t in proc.times("SIGTERM")] == [pytest.approx(10.0)]
        assert proc.times("SIGKILL") == []
        assert sb.status is SandboxStatus.STOPPED and proc.cleaned_up


async def test_sigterm_ignored_sigkill_after_the_kill_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness(ignore_shutdown=True, ignore_sigterm=True) as (driver, sup):
        sb = await sup.create("a")
        proc = driver.processes["a"]
        t0 = trio.current_time()
        await sb.stop()
        assert trio.current_time() - t0 == pytest.approx(15.0)
        assert [t - t0 for t in proc.times("SIGTERM")] == [pytest.approx(10.0)]
        assert [t - t0 for t in proc.times("SIGKILL")] == [pytest.approx(15.0)]
        assert sb.status is SandboxStatus.STOPPED and proc.cleaned_up


async def test_kill_never_observed_raises_runtime_at_twenty_seconds(
    autojump_clock: trio.abc.Clock,
) -> None:
    behaviour = {"ignore_shutdown": True, "ignore_sigterm": True, "ignore_sigkill": True}
    async with harness(**behaviour) as (driver, sup):
        sb = await sup.create("a")
        proc = driver.processes["a"]
        t0 = trio.current_time()
        with pytest.raises(Runtime, match="timed out observing stopped state for sandbox 'a'"):
            await sb.stop()
        assert trio.current_time() - t0 == pytest.approx(20.0)
        assert [t - t0 for t in proc.times("SIGKILL")] == [pytest.approx(15.0)]
        # The driver's cleanup (its last resort) still ran, so nothing is left.
        assert proc.cleaned_up and sb.status is SandboxStatus.STOPPED


async def test_stop_with_timeout_zero_goes_straight_to_kill(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        proc = driver.processes["a"]
        t0 = trio.current_time()
        await sb.stop(timeout=0)
        assert trio.current_time() == t0
        assert shutdowns(proc) == [] and proc.times("SIGTERM") == []
        assert proc.times("SIGKILL") == [t0]
        assert sb.status is SandboxStatus.STOPPED and proc.cleaned_up


async def test_kill_waits_the_kill_timeout_then_raises_runtime(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness(ignore_sigkill=True) as (driver, sup):
        sb = await sup.create("a")
        t0 = trio.current_time()
        with pytest.raises(Runtime, match="timed out observing stopped state"):
            await sb.kill()
        assert trio.current_time() - t0 == pytest.approx(5.0)
        assert driver.processes["a"].cleaned_up


@pytest.mark.parametrize(("timeout", "grace"), [(10.0, 9.0), (3.0, 2.0), (1.0, 0.5), (0.4, 0.2)])
async def test_shutdown_grace_rule(
    timeout: float, grace: float, autojump_clock: trio.abc.Clock
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        await sb.stop(timeout=timeout)
        assert [s.grace for s in shutdowns(driver.processes["a"])] == [pytest.approx(grace)]


async def test_status_is_draining_during_the_ladder_and_work_is_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness(ignore_shutdown=True) as (_driver, sup):
        sb = await sup.create("a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sb.stop)
            await trio.testing.wait_all_tasks_blocked()
            assert sb.status is SandboxStatus.DRAINING
            with pytest.raises(SandboxNotRunning):
                await sb.exec("echo", ["late"])
        assert sb.status.value == "stopped"


async def test_kill_escalates_a_stop_in_progress(autojump_clock: trio.abc.Clock) -> None:
    async with harness(ignore_shutdown=True) as (driver, sup):
        sb = await sup.create("a")
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sb.stop)
            await trio.sleep(2)
            await sb.kill()
            assert sb.status is SandboxStatus.STOPPED
        # The stop returns at its next poll after the kill, long before SIGTERM at 10 s.
        assert trio.current_time() - t0 < 2.2
        assert driver.processes["a"].times("SIGTERM") == []


async def test_concurrent_stops_share_one_ladder(autojump_clock: trio.abc.Clock) -> None:
    async with harness(ignore_shutdown=True) as (driver, sup):
        sb = await sup.create("a")
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(sb.stop)
        assert trio.current_time() - t0 == pytest.approx(10.0)
        assert len(driver.processes["a"].times("SIGTERM")) == 1


async def test_stop_of_a_stopped_sandbox_returns_at_once(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        await sb.stop()
        t0 = trio.current_time()
        await sb.stop()
        await sb.kill()
        assert trio.current_time() == t0


async def test_shutdown_message_runs_the_ladder_with_its_grace(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness(ignore_shutdown=True) as (driver, sup):
        await sup.create("a")
        t0 = trio.current_time()
        await sup.ask("a", Shutdown(grace=2.0))
        # grace 2 ⇒ ladder timeout 3 (whose Shutdown grace is again 2), then SIGTERM.
        assert [s.grace for s in shutdowns(driver.processes["a"])] == [2.0]
        assert trio.current_time() - t0 == pytest.approx(3.0)


async def test_a_process_that_ends_on_its_own_is_crashed(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        driver.processes["a"].crash(code=3)
        assert await sb.wait_until_stopped() is SandboxStatus.CRASHED
        assert driver.processes["a"].cleaned_up
        with pytest.raises(SandboxNotRunning):
            await sb.exec("echo")


async def test_wait_until_stopped_follows_a_stop(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sb.stop)
            assert await sb.wait_until_stopped() is SandboxStatus.STOPPED

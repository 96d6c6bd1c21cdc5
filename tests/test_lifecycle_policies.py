"""Lifecycle policies on fake sandboxes: start=False, kill timeout, idle timeout, max
duration, ephemeral, restart policies (permanent / transient / temporary, intensity)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from corral.actors.lifecycle import Restart, RestartPolicy, RestartTracker
from corral.actors.state import SandboxStatus
from corral.actors.supervisor import Supervisor, open_supervisor
from corral.drivers.fake import FakeDriver
from corral.errors import (
    InvalidConfig,
    Runtime,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxStillRunning,
)
from corral.sandbox import Sandbox


def now(sb: Sandbox) -> SandboxStatus:
    """The live status (a function, so mypy does not narrow it between checks)."""
    return sb.status


@asynccontextmanager
async def harness(**behaviour: Any) -> AsyncIterator[tuple[FakeDriver, Supervisor]]:
    with trio.fail_after(600):
        async with FakeDriver(**behaviour) as driver, open_supervisor(driver=driver) as sup:
            yield driver, sup


async def status_of(sup: Supervisor, name: str) -> SandboxStatus:
    (info,) = [info for info in await sup.list() if info.name == name]
    return info.status


# -- start=False / start / kill(timeout) -------------------------------------------------------


async def test_created_without_starting_then_started() -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a", start=False)
        assert now(sb) is SandboxStatus.CREATED and driver.spawned == []
        assert await status_of(sup, "a") is SandboxStatus.CREATED
        with pytest.raises(SandboxNotRunning, match="created"):
            await sb.exec("echo", ["x"])
        await sb.stop()  # nothing runs: nothing to do
        assert now(sb) is SandboxStatus.CREATED
        await sb.start()
        assert now(sb) is SandboxStatus.RUNNING and len(driver.spawned) == 1
        assert await status_of(sup, "a") is SandboxStatus.RUNNING
        assert (await sb.exec("echo", ["x"])).stdout == b"x\n"
        await sb.start()  # already running: no second process
        assert len(driver.spawned) == 1
    assert driver.leaked == [] and driver.running == []


async def test_a_created_sandbox_can_be_removed_but_not_a_starting_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a", start=False)
        await sup.remove("a")
        with pytest.raises(SandboxNotFound):
            await sup.get("a")
        assert list(await sup.list()) == [] and driver.spawned == []
        driver.configure("b", spawn_delay=5)
        sb = await sup.create("b", start=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sb.start)
            await trio.testing.wait_all_tasks_blocked()
            assert now(sb) is SandboxStatus.STARTING
            with pytest.raises(SandboxStillRunning, match="starting"):
                await sup.remove("b")
        with pytest.raises(SandboxStillRunning, match="running"):
            await sup.remove("b")


async def test_a_failed_start_is_crashed_and_can_be_retried() -> None:
    async with harness() as (driver, sup):
        driver.configure("a", spawn_error=Runtime("no room"))
        sb = await sup.create("a", start=False)
        with pytest.raises(Runtime, match="no room"):
            await sb.start()
        assert now(sb) is SandboxStatus.CRASHED
        (info,) = await sup.list()
        assert info.status is SandboxStatus.CRASHED
        driver.configure("a")
        await sb.start()
        assert now(sb) is SandboxStatus.RUNNING
        assert driver.leaked == [driver.spawned[-1]]  # the failed one was cleaned up


async def test_kill_timeout(autojump_clock: trio.abc.Clock) -> None:
    async with harness(ignore_sigkill=True) as (_driver, sup):
        sb = await sup.create("a")
        t0 = trio.current_time()
        with pytest.raises(Runtime, match="timed out observing stopped state"):
            await sb.kill(timeout=2.5)
        assert trio.current_time() - t0 == pytest.approx(2.5, abs=0.11)
        assert now(sb) is SandboxStatus.STOPPED
        with pytest.raises(InvalidConfig):
            await sb.kill(timeout=0)
        with pytest.raises(InvalidConfig):
            await sup.kill("a", timeout=-1)
        with pytest.raises(SandboxNotRunning):
            await sb.exec("echo")


# -- timers -------------------------------------------------------------------------------------


async def test_idle_timeout_counts_from_the_last_request(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, sup):
        t0 = trio.current_time()
        sb = await sup.create("a", idle_timeout=30)
        await trio.sleep(20)
        await sb.exec("echo", ["still here"])
        await trio.sleep(25)  # 45 s after start, 25 s after the exec: still running
        assert now(sb) is SandboxStatus.RUNNING
        await sb.wait_until_stopped()
        assert trio.current_time() - t0 == pytest.approx(50, abs=0.2)
        assert now(sb) is SandboxStatus.STOPPED
        assert driver.spawned[0].times("shutdown")  # the normal ladder, not a kill
        (info,) = await sup.list()
        assert info.status is SandboxStatus.STOPPED
        assert info.last_error is not None and "idle_timeout" in info.last_error


async def test_a_long_exec_is_activity(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a", idle_timeout=10)
        out = await sb.exec("sleep", ["100"])
        assert out.exit_code == 0 and now(sb) is SandboxStatus.RUNNING
        async with sb.exec_stream("sleep", ["50"]) as proc:
            await proc.wait()
        t0 = trio.current_time()
        assert now(sb) is SandboxStatus.RUNNING
        await sb.wait_until_stopped()
        assert trio.current_time() - t0 == pytest.approx(10, abs=0.2)


async def test_max_duration_stops_even_a_busy_sandbox(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, sup):
        t0 = trio.current_time()
        sb = await sup.create("a", max_duration=60, idle_timeout=1000)
        out = await sb.exec("sleep", ["500"])  # ended by the stop's Shutdown (SIGTERM)
        assert out.exit_code != 0
        await sb.wait_until_stopped()
        assert trio.current_time() - t0 == pytest.approx(60, abs=2)
        assert now(sb) is SandboxStatus.STOPPED
        (info,) = await sup.list()
        assert info.last_error is not None and "max_duration" in info.last_error


async def test_timers_of_a_stopped_sandbox_do_not_fire_after_a_restart(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a", max_duration=30)
        await trio.sleep(20)
        await sb.stop()
        await sb.start()
        t0 = trio.current_time()
        await sb.wait_until_stopped()
        assert trio.current_time() - t0 == pytest.approx(30, abs=0.2)  # a fresh 30 s
        assert len(driver.spawned) == 2


# -- ephemeral -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "crash", "idle"])
async def test_ephemeral_sandboxes_are_removed_when_they_end(
    how: str, autojump_clock: trio.abc.Clock
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a", ephemeral=True, idle_timeout=5)
        await sup.create("b")
        if how == "stop":
            await sb.stop()
        elif how == "crash":
            driver.processes["a"].crash(3)
        await sb.wait_until_stopped()
        await trio.testing.wait_all_tasks_blocked()
        assert "a" not in sup
        assert [info.name for info in await sup.list()] == ["b"]
        with pytest.raises(SandboxNotFound):
            await sup.get("a")
        await sup.create("a")  # the name is free again


# -- restart policies ----------------------------------------------------------------------------


async def crash_and_settle(driver: FakeDriver, name: str, code: int) -> None:
    driver.processes[name].crash(code)
    await trio.testing.wait_all_tasks_blocked()


async def test_temporary_is_never_restarted() -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        await crash_and_settle(driver, "a", 1)
        assert now(sb) is SandboxStatus.CRASHED and len(driver.spawned) == 1


@pytest.mark.parametrize(
    ("policy", "code", "restarted"),
    [
        ("transient", 1, True),
        ("transient", 0, False),
        ("permanent", 0, True),
        ("permanent", 9, True),
        ("temporary", 1, False),
    ],
)
async def test_restart_after_a_crash_follows_the_policy(
    policy: str, code: int, restarted: bool
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a", restart=policy)
        await sb.fs.write("/workspace/f", b"1")
        first = driver.processes["a"]
        await crash_and_settle(driver, "a", code)
        if restarted:
            assert now(sb) is SandboxStatus.RUNNING
            assert driver.processes["a"] is not first and first.cleaned_up
            assert (await sb.exec("echo", ["again"])).stdout == b"again\n"
            (info,) = await sup.list()
            assert info.status is SandboxStatus.RUNNING and info.restarts == 1
        else:
            assert now(sb) is SandboxStatus.CRASHED and driver.processes["a"] is first
            with pytest.raises(SandboxNotRunning):
                await sb.exec("echo")


async def test_the_status_is_watchable_through_a_restart() -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a", restart="permanent")
        seen: list[SandboxStatus] = []

        async def watch() -> None:
            while True:
                seen.append(await sb.wait_status())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            driver.processes["a"].crash(1)
            assert await sb.wait_status("running", SandboxStatus.STARTING) in (
                SandboxStatus.STARTING,
                SandboxStatus.RUNNING,
            )
            assert await sb.wait_status("running") is SandboxStatus.RUNNING
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert seen and seen[-1] is SandboxStatus.RUNNING  # (changes may coalesce)
        with pytest.raises(InvalidConfig):
            await sb.wait_status("paused")


async def test_a_requested_stop_is_never_restarted() -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a", restart="permanent")
        await sb.stop()
        await trio.testing.wait_all_tasks_blocked()
        assert now(sb) is SandboxStatus.STOPPED and len(driver.spawned) == 1
        other = await sup.create("b", restart="permanent")
        await other.kill()
        await trio.testing.wait_all_tasks_blocked()
        assert now(other) is SandboxStatus.STOPPED and len(driver.spawned) == 2


async def test_too_many_restarts_in_the_window_give_up(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a", restart="permanent", max_restarts=2, restart_window=10)
        for _ in range(2):
            await crash_and_settle(driver, "a", 1)
            assert now(sb) is SandboxStatus.RUNNING
            await trio.sleep(1)
        await crash_and_settle(driver, "a", 1)
        assert now(sb) is SandboxStatus.CRASHED and len(driver.spawned) == 3
        (info,) = await sup.list()
        assert info.status is SandboxStatus.CRASHED and info.restarts == 2
        assert info.last_error is not None and "gave up after 2 restarts in 10s" in info.last_error
        await sb.start()  # a manual start still works
        assert now(sb) is SandboxStatus.RUNNING


async def test_restarts_spread_beyond_the_window_go_on(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a", restart="transient", max_restarts=1, restart_window=10)
        for _ in range(4):
            await crash_and_settle(driver, "a", 1)
            assert now(sb) is SandboxStatus.RUNNING
            await trio.sleep(11)
        assert len(driver.spawned) == 5


async def test_a_restart_that_fails_to_start_counts_as_a_crash(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a", restart="permanent", max_restarts=3, restart_window=60)
        driver.configure("a", spawn_error=Runtime("no room"))
        await crash_and_settle(driver, "a", 1)
        assert now(sb) is SandboxStatus.CRASHED
        assert len(driver.spawned) == 4  # the first + three failed restarts
        (info,) = await sup.list()
        assert info.last_error is not None and "no room" in info.last_error
        assert driver.leaked == []


async def test_no_restart_while_the_supervisor_closes(autojump_clock: trio.abc.Clock) -> None:
    async with FakeDriver() as driver:
        async with open_supervisor(driver=driver) as sup:
            await sup.create("a", restart="permanent")
            proc = driver.processes["a"]
        proc.crash(1)
        await trio.testing.wait_all_tasks_blocked()
        assert len(driver.spawned) == 1 and driver.running == []


# -- bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"restart": "sometimes"},
        {"restart": 3},
        {"max_restarts": -1},
        {"max_restarts": 1.5},
        {"restart_window": 0},
        {"restart_window": float("inf")},
        {"idle_timeout": 0},
        {"idle_timeout": -5},
        {"idle_timeout": "10"},
        {"idle_timeout": True},
        {"max_duration": float("nan")},
        {"max_duration": 0},
        {"labels": {"a": 1}},
    ],
)
async def test_bad_lifecycle_options_are_invalid_config(options: dict[str, Any]) -> None:
    async with harness() as (driver, sup):
        with pytest.raises(InvalidConfig):
            await sup.create("a", **options)
        assert driver.spawned == [] and list(await sup.list()) == []


async def test_every_bad_call_has_its_typed_error() -> None:
    async with harness() as (_driver, sup):
        for call in (sup.get("nope"), sup.start("nope"), sup.kill("nope"), sup.remove("nope")):
            with pytest.raises(SandboxNotFound):
                await call
        with pytest.raises(InvalidConfig):
            await sup.get(5)  # type: ignore[arg-type]
        sb: Sandbox = await sup.create("a")
        with pytest.raises(SandboxStillRunning):
            await sup.remove("a")
        await sb.stop()
        with pytest.raises(SandboxNotRunning):
            await sb.exec("echo")
        with pytest.raises(SandboxNotRunning):
            await sb.fs.read("/workspace/x")
        for limit in (0, -1, 1.5, True):
            with pytest.raises(InvalidConfig):
                await sup.list(limit=limit)  # type: ignore[arg-type]
        for cursor in ("", "!!", "bm9wZQ"):
            with pytest.raises(InvalidConfig):
                await sup.list(cursor=cursor)


def test_restart_policy_rules() -> None:
    assert RestartPolicy.build("PERMANENT").restart is Restart.PERMANENT
    policy = RestartPolicy.build(Restart.TRANSIENT, 2, 10)
    assert policy.wants_restart(clean_exit=False) and not policy.wants_restart(clean_exit=True)
    tracker = RestartTracker(policy)
    assert tracker.allow(0) and tracker.allow(5) and not tracker.allow(9.9)
    assert tracker.allow(10.0) and tracker.total == 3
    assert not RestartTracker(RestartPolicy.build(max_restarts=0)).allow(0)

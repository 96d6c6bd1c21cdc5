"""The warm pool on fake sandboxes: claims, refills, which creates match, failures while
refilling, cancellation during a claim, names/list/registry, and leaving the block."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from corral.actors import pool as pool_mod
from corral.actors.lifecycle import RestartPolicy
from corral.actors.pool import POOL_PREFIX, parse_pool
from corral.actors.registry import SandboxRecord
from corral.actors.state import SandboxStatus
from corral.actors.supervisor import Supervisor, open_supervisor
from corral.drivers.base import Driver, SandboxSpec
from corral.drivers.fake import FakeDriver, FakeSandboxProcess
from corral.errors import (
    InvalidConfig,
    Runtime,
    SandboxAlreadyExists,
    SandboxNotFound,
    Unsupported,
)
from corral.sandbox import Sandbox

SPAWN = 5.0
"""Virtual seconds a fake spawn takes: a cold create costs this, a warm one nothing."""


@asynccontextmanager
async def harness(
    pool: object = None, driver: FakeDriver | None = None, **behaviour: Any
) -> AsyncIterator[tuple[FakeDriver, Supervisor]]:
    with trio.fail_after(600):
        async with (
            driver or FakeDriver(spawn_delay=SPAWN, **behaviour) as fake,
            open_supervisor(driver=fake, pool=pool) as sup,
        ):
            yield fake, sup


def proc_of(sb: Sandbox) -> FakeSandboxProcess:
    proc = sb._actor.proc
    assert isinstance(proc, FakeSandboxProcess)
    return proc


def pooled_records(sup: Supervisor) -> list[SandboxRecord]:
    return [r for r in sup.registry.unsettled() if r.name.startswith(POOL_PREFIX)]


def renamed(proc: FakeSandboxProcess) -> bool:
    return any(what.startswith("rename:") for _, what in proc.events)


async def timed_create(sup: Supervisor, name: str, **options: Any) -> tuple[Sandbox, float]:
    start = trio.current_time()
    sb = await sup.create(name, **options)
    return sb, trio.current_time() - start


# -- off by default, configuration -------------------------------------------------------------


async def test_no_pool_unless_asked(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, sup):
        assert sup.pool is None
        await sup.wait_pool_ready()  # nothing to wait for
        sb, took = await timed_create(sup, "a")
        assert took == SPAWN and len(driver.spawned) == 1 and not renamed(proc_of(sb))
        assert pooled_records(sup) == []
    assert driver.leaked == []


def test_pool_forms() -> None:
    [(spec, size)] = parse_pool({"host": 8})
    assert (spec.image, size, spec.network, spec.memory_mib) == ("host", 8, False, None)
    [(spec, size)] = parse_pool({"img:1": {"size": 2, "network": True, "memory_mib": 64}})
    assert (spec.image, size, spec.network, spec.memory_mib) == ("img:1", 2, True, 64)
    pools = parse_pool([{"image": "host", "size": 1}, {"image": "host", "size": 2, "cpus": 1.0}])
    assert [(s.cpus, n) for s, n in pools] == [(None, 1), (1.0, 2)]
    assert parse_pool(None) == [] and parse_pool({}) == []


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"host": 0}, "size"),
        ({"host": True}, "size"),
        ({"host": {"network": True}}, "size"),
        ({"": 1}, "image"),
        ("host", "pool must"),
        ([3], "dict"),
        ({"host": {"size": 1, "labels": {"a": "b"}}}, "labels"),
        ({"host": {"size": 1, "detached": True}}, "detached"),
        ({"host": {"size": 1, "idle_timeout": 3}}, "idle_timeout"),
        ({"host": {"size": 1, "colour": "red"}}, "unknown option"),
        ({"host": {"size": 1, "memory_mib": -1}}, "memory_mib"),
        ({"host": {"size": 1, "workdir": "relative"}}, "workdir"),
        ([{"image": "host", "size": 1}, {"image": "host", "size": 2}], "twice"),
    ],
)
def test_bad_pool_configs(config: object, match: str) -> None:
    with pytest.raises(InvalidConfig, match=match):
        parse_pool(config)


async def test_a_driver_that_cannot_rename_has_no_pool() -> None:
    class NoRename(FakeDriver):
        rename = Driver.rename

    with trio.fail_after(10):
        async with NoRename() as driver:
            assert not driver.can_rename
            with pytest.raises(Unsupported, match="warm pool"):
                async with open_supervisor(driver=driver, pool={"host": 1}):
                    pass  # pragma: no cover
            assert driver.spawned == []


# -- claim and refill ------------------------------------------------------------------------------


async def test_claims_are_warm_and_the_pool_refills(autojump_clock: trio.abc.Clock) -> None:
    async with harness({"host": 3}) as (driver, sup):
        assert sup.pool is not None
        await sup.wait_pool_ready()
        assert len(driver.spawned) == 3 and sup.pool.ready_count() == 3
        pooled = list(driver.spawned)
        sbs = []
        for name in ("a", "b", "c"):
            sb, took = await timed_create(sup, name)
            assert took == 0  # no spawn, no connect: claimed in memory
            assert proc_of(sb) in pooled and renamed(proc_of(sb))
            assert proc_of(sb).name == name and driver.processes[name] is proc_of(sb)
            assert sb.name == name and sb.status is SandboxStatus.RUNNING
            assert (await sb.exec("echo", [name])).stdout == f"{name}\n".encode()
            sbs.append(sb)
        assert len({proc_of(sb) for sb in sbs}) == 3
        # empty now: the 4th create is cold (it does not wait for the refills)
        sb, took = await timed_create(sup, "d")
        assert took == SPAWN and not renamed(proc_of(sb))
        await sup.wait_pool_ready()
        assert sup.pool.ready_count() == 3 and len(driver.spawned) == 7
    assert driver.leaked == [] and driver.running == []


async def test_refills_wait_for_a_quiet_moment(autojump_clock: trio.abc.Clock) -> None:
    """A burst of claims is not interleaved with refill spawns (their synchronous part
    would delay the claims); the refill starts REFILL_QUIET after the last claim."""
    async with harness({"host": 2}) as (driver, sup):
        await sup.wait_pool_ready()
        await sup.create("a")
        await trio.sleep(pool_mod.REFILL_QUIET / 2)
        await sup.create("b")
        assert len(driver.spawned) == 2
        claimed_at = trio.current_time()
        await trio.sleep(pool_mod.REFILL_QUIET * 0.9)
        assert len(driver.spawned) == 2
        await trio.sleep(pool_mod.REFILL_QUIET * 0.2)
        assert len(driver.spawned) == 4
        assert min(t for p in driver.spawned[2:] for t in p.times("spawn")) >= claimed_at


async def test_concurrent_refills_are_bounded(autojump_clock: trio.abc.Clock) -> None:
    async with harness({"host": 5, "other": 3}) as (driver, sup):
        assert sup.pool is not None and sup.pool.concurrency == pool_mod.REFILL_CONCURRENCY
        await trio.testing.wait_all_tasks_blocked()
        starting = [p for p in driver.spawned if p.exit_status is None]
        assert len(starting) == pool_mod.REFILL_CONCURRENCY
        await sup.wait_pool_ready()
        assert trio.current_time() >= SPAWN * 8 / pool_mod.REFILL_CONCURRENCY
        assert sup.pool.ready_count("host") == 5 and sup.pool.ready_count("other") == 3


async def test_a_claimed_sandbox_is_never_reused(autojump_clock: trio.abc.Clock) -> None:
    async with harness({"host": 2}) as (_driver, sup):
        await sup.wait_pool_ready()
        sb = await sup.create("a")
        first = proc_of(sb)
        await sb.fs.write("/workspace/secret", b"x")
        await sb.stop()
        await sup.remove("a")
        assert first.cleaned_up
        await sup.wait_pool_ready()
        assert sup.pool is not None
        idle = [w.actor.proc for e in sup.pool.entries for w in e.ready]
        assert first not in idle
        again = await sup.create("a")
        assert proc_of(again) is not first and not await again.fs.exists("/workspace/secret")


# -- which creates match ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"image": "other"},
        {"network": True},
        {"memory_mib": 64},
        {"cpus": 0.5},
        {"pids_limit": 10},
        {"workdir": "/elsewhere"},
        {"detached": True},
        {"start": False},
    ],
)
async def test_creates_that_do_not_fit_are_cold(
    autojump_clock: trio.abc.Clock, options: dict[str, Any]
) -> None:
    async with harness({"host": 1}) as (driver, sup):
        assert sup.pool is not None
        await sup.wait_pool_ready()
        [pooled] = driver.spawned
        sb = await sup.create("a", **options)
        assert sup.pool.ready_count() == 1 and not renamed(pooled)
        if options != {"start": False}:
            assert proc_of(sb) is not pooled and proc_of(sb).spec.name == "a"
        await sb.kill()
    assert driver.leaked == []


async def test_claim_time_options_apply(autojump_clock: trio.abc.Clock) -> None:
    async with harness({"host": 3}) as (_driver, sup):
        await sup.wait_pool_ready()
        sb, took = await timed_create(
            sup,
            "a",
            env={"A": "1", "B": "2"},
            labels={"team": "x"},
            idle_timeout=30,
            restart="transient",
            max_restarts=5,
        )
        assert took == 0
        assert (await sb.exec("printenv", ["A"])).stdout == b"1\n"
        assert (await sb.exec("printenv", ["B"], env={"B": "own"})).stdout == b"own\n"
        async with sb.exec_stream("printenv", ["A"]) as proc:
            assert await proc.wait() == 0
        assert proc_of(sb).spec.env == {}  # applied per exec, not at spawn
        [info] = [i for i in await sup.list() if i.name == "a"]
        assert info.labels == {"team": "x"} and info.status is SandboxStatus.RUNNING
        record = sup.registry.get("a")
        assert record is not None and record.spec.env == {"A": "1", "B": "2"}
        assert record.policy == RestartPolicy.build("transient", 5)
        # the idle timer counts from the claim, not from the pooled sandbox's start
        claimed = trio.current_time()
        assert await sb.wait_until_stopped() is SandboxStatus.STOPPED
        assert trio.current_time() - claimed == pytest.approx(30, abs=0.2)
        # max_duration and ephemeral
        sb2, took = await timed_create(sup, "b", max_duration=7, ephemeral=True)
        assert took == 0
        start = trio.current_time()
        await sb2.wait_until_stopped()
        assert trio.current_time() - start == pytest.approx(7, abs=0.2)
        await trio.testing.wait_all_tasks_blocked()
        assert sup.registry.get("b") is None  # ephemeral: gone with its record


async def test_a_pool_with_env_serves_creates_that_contain_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness([{"image": "host", "size": 1, "env": {"X": "1"}}]) as (_driver, sup):
        assert sup.pool is not None
        await sup.wait_pool_ready()
        for name, env in (("a", None), ("b", {"X": "2"}), ("c", {"Y": "1"})):
            sb = await sup.create(name, env=env)
            assert not renamed(proc_of(sb)), name
        sb = await sup.create("d", env={"X": "1", "Y": "2"})
        assert renamed(proc_of(sb))
        assert (await sb.exec("printenv", ["Y"])).stdout == b"2\n"
        assert (await sb.exec("printenv", ["X"])).stdout == b"1\n"


async def test_a_restarted_claimed_sandbox_is_started_cold_as_itself(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness({"host": 1}) as (_driver, sup):
        await sup.wait_pool_ready()
        sb = await sup.create("a", restart="permanent", env={"A": "1"})
        first = proc_of(sb)
        first.crash(3)
        await sb.wait_status(SandboxStatus.CRASHED)
        await sb.wait_status(SandboxStatus.RUNNING)
        second = proc_of(sb)
        assert second is not first and second.spec.name == "a"
        assert second.spec.env == {"A": "1"} and not renamed(second)
        assert (await sb.exec("printenv", ["A"])).stdout == b"1\n"


# -- names, list, registry ---------------------------------------------------------------------


async def test_pooled_sandboxes_are_invisible_until_claimed(autojump_clock: trio.abc.Clock) -> None:
    async with harness({"host": 2}) as (driver, sup):
        await sup.wait_pool_ready()
        assert list(await sup.list()) == [] and len(sup) == 0
        records = pooled_records(sup)
        assert len(records) == 2
        assert {r.pid for r in records} == {p.pid for p in driver.spawned}
        assert all(
            r.status is SandboxStatus.RUNNING and r.owner_pid == os.getpid() for r in records
        )
        hidden = records[0].name
        for call in (sup.get, sup.remove, sup.stop, sup.kill, sup.start):
            with pytest.raises(SandboxNotFound):
                await call(hidden)
        assert hidden not in sup
        sb = await sup.create("a", labels={"k": "v"})
        proc = proc_of(sb)
        assert [i.name for i in await sup.list()] == ["a"] and "a" in sup
        assert await sup.get("a") == sb
        record = sup.registry.get("a")
        assert record is not None and record.status is SandboxStatus.RUNNING
        assert record.pid == proc.pid and record.spec.name == "a"
        assert record.spec.labels == {"k": "v"} and not record.detached
        gone = {r.name for r in records} - {r.name for r in pooled_records(sup)}
        assert len(gone) == 1  # the claimed one's record became "a"'s
        await sup.wait_pool_ready()
        assert len(pooled_records(sup)) == 2
        await sb.stop()
        assert sup.registry.get("a").status is SandboxStatus.STOPPED  # type: ignore[union-attr]
        await sup.remove("a")
        assert sup.registry.get("a") is None


async def test_a_taken_name_leaves_the_pool_as_it_was(autojump_clock: trio.abc.Clock) -> None:
    async with harness({"host": 2}) as (driver, sup):
        assert sup.pool is not None
        await sup.wait_pool_ready()
        first = sup.pool.entries[0].ready[0]
        # a record of another (live) owner holds the name
        holder = SandboxRecord(
            name="a",
            id="x",
            driver="fake",
            status=SandboxStatus.RUNNING,
            spec=SandboxSpec(name="a"),
            owner_pid=os.getpid(),
        )
        assert sup.registry.claim(holder) is None
        with pytest.raises(SandboxAlreadyExists):
            await sup.create("a")
        assert sup.pool.ready_count() == 2 and sup.pool.entries[0].ready[0] is first
        assert first.state == "ready" and first.actor.name == first.name
        assert not renamed(driver.spawned[0]) and len(pooled_records(sup)) == 2


async def test_a_stale_record_holding_the_name_is_reaped(autojump_clock: trio.abc.Clock) -> None:
    async with harness({"host": 1}) as (_driver, sup):
        await sup.wait_pool_ready()
        stale = SandboxRecord(
            name="a",
            id="old",
            driver="fake",
            status=SandboxStatus.RUNNING,
            spec=SandboxSpec(name="a"),
            owner_pid=2**22 + 1,  # above pid_max: no such process
        )
        assert sup.registry.claim(stale) is None
        sb, took = await timed_create(sup, "a")
        assert took == 0 and renamed(proc_of(sb))
        record = sup.registry.get("a")
        assert record is not None and record.id != "old"


# -- failures ----------------------------------------------------------------------------------


async def test_refill_failures_back_off_and_recover(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="corral.pool")
    fake = FakeDriver(spawn_error=Runtime("no room"))
    async with harness({"host": 1}, driver=fake) as (driver, sup):
        assert sup.pool is not None
        await trio.sleep(200)
        starts = [p.times("spawn")[0] for p in driver.spawned]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        expected = [min(30.0, 0.1 * 2**i) for i in range(len(gaps))]
        assert gaps == pytest.approx(expected, abs=1e-6)
        assert len(gaps) >= 9 and gaps[-1] == pytest.approx(30.0)
        assert "starting a sandbox failed" in caplog.text and "no room" in caplog.text
        assert pooled_records(sup) == [] and driver.leaked == []
        [entry] = sup.pool.entries
        assert entry.failures == len(starts) and entry.last_error == "no room"
        # the supervisor still works, and so does the pool once spawns do
        driver.behaviour.spawn_error = None
        with trio.fail_after(31):
            await sup.wait_pool_ready()
        assert entry.failures == 0 and entry.delay == 0
        _sb, took = await timed_create(sup, "a")
        assert took == 0


async def test_an_idle_sandbox_that_died_is_never_handed_out(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="corral.pool")
    async with harness({"host": 2}) as (driver, sup):
        assert sup.pool is not None
        await sup.wait_pool_ready()
        dead, alive = (w.actor.proc for w in sup.pool.entries[0].ready)  # first in line
        assert isinstance(dead, FakeSandboxProcess)
        dead.crash(1)  # no checkpoint: its actor has not noticed yet
        sb, took = await timed_create(sup, "a")
        assert proc_of(sb) is alive and took == 0
        assert (await sb.exec("echo", ["ok"])).stdout == b"ok\n"
        # one that dies while idle is dropped (record too) and replaced
        await sup.wait_pool_ready()
        idle = sup.pool.entries[0].ready[0]
        idle_proc = idle.actor.proc
        assert isinstance(idle_proc, FakeSandboxProcess)
        idle_proc.crash(1)
        await trio.testing.wait_all_tasks_blocked()
        assert idle_proc.cleaned_up and idle.name not in {r.name for r in pooled_records(sup)}
        await sup.wait_pool_ready()
        assert "idle sandbox" in caplog.text
    assert driver.leaked == []


async def test_a_failed_rename_falls_back_to_a_cold_create(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="corral.pool")
    async with harness({"host": 1}) as (driver, sup):
        await sup.wait_pool_ready()
        [pooled] = driver.spawned
        driver.rename_error = OSError("disk on fire")
        sb, took = await timed_create(sup, "a")
        assert took == SPAWN and proc_of(sb) is not pooled and pooled.cleaned_up
        assert "disk on fire" in caplog.text
        record = sup.registry.get("a")
        assert record is not None and record.pid == proc_of(sb).pid
        assert not any(r.pid == pooled.pid for r in sup.registry.unsettled())


class SlowRemove(FakeDriver):
    """``remove`` takes a while (reaping a stale record awaits it: the claim's only await)."""

    async def remove(self, name: str) -> None:
        await trio.sleep(1)


async def test_a_claim_cancelled_at_any_point_leaks_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A stale record holds the name, so the claim awaits (reaping it): cancel the create
    after every number of task steps until it completes; each time the pooled sandbox is
    either back in the pool or the create's, never lost."""

    class Steps(trio.abc.Instrument):
        def __init__(self, step: int, scope: trio.CancelScope) -> None:
            self.step, self.count, self.scope = step, 0, scope

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            self.count += 1
            if self.count == self.step:
                self.scope.cancel()

    async with harness({"host": 1}, driver=SlowRemove(spawn_delay=SPAWN)) as (driver, sup):
        assert sup.pool is not None
        completed = False
        step = 0
        while not completed:
            step += 1
            assert step < 500
            await sup.wait_pool_ready()
            stale = SandboxRecord(
                name="a",
                id=f"old{step}",
                driver="fake",
                status=SandboxStatus.RUNNING,
                spec=SandboxSpec(name="a"),
                owner_pid=2**22 + 1,
            )
            assert sup.registry.claim(stale) is None
            [warm] = sup.pool.entries[0].ready
            with trio.CancelScope() as scope:
                steps = Steps(step, scope)
                trio.lowlevel.add_instrument(steps)
                try:
                    sb = await sup.create("a")
                    completed = True
                finally:
                    trio.lowlevel.remove_instrument(steps)
            if completed:
                assert proc_of(sb) is warm.actor.proc and sb.name == "a"
                continue
            assert scope.cancelled_caught and "a" not in sup
            record = sup.registry.get("a")
            assert record is None or record.id == f"old{step}"
            sup.registry.delete("a")
            # the pooled sandbox went back (first in line), untouched, still its own
            assert warm.state == "ready" and sup.pool.entries[0].ready[0] is warm
            assert warm.actor.name == warm.name and warm.actor.usable()
            assert sup.registry.get(warm.name) is not None
            assert sup.pool.ready_count() >= 1
        assert step > 3  # the sweep did cancel inside the claim
    assert driver.leaked == [] and driver.running == []


# -- leaving the block -------------------------------------------------------------------------


async def test_leaving_stops_pooled_and_claimed_sandboxes(autojump_clock: trio.abc.Clock) -> None:
    async with harness({"host": 3}) as (driver, sup):
        await sup.wait_pool_ready()
        await sup.create("a")
        await trio.sleep(pool_mod.REFILL_QUIET * 2)  # a refill is on its way
        assert any(p.exit_status is None and p.times("spawn") for p in driver.spawned)
        registry = sup.registry
    assert driver.leaked == [] and driver.running == []
    assert all(p.cleaned_up for p in driver.spawned)
    with pytest.raises(Runtime):
        registry.unsettled()  # closed with the supervisor


async def test_an_exception_in_the_block_still_cleans_the_pool(
    autojump_clock: trio.abc.Clock,
) -> None:
    driver = FakeDriver(spawn_delay=SPAWN)
    with pytest.raises(KeyError):
        async with driver, open_supervisor(driver=driver, pool={"host": 2}) as sup:
            await sup.wait_pool_ready()
            await sup.create("a")
            raise KeyError("boom")
    assert driver.leaked == [] and driver.running == []


async def test_cancelled_while_filling(autojump_clock: trio.abc.Clock) -> None:
    driver = FakeDriver(spawn_delay=SPAWN)
    async with driver:
        with trio.move_on_after(SPAWN / 2):
            async with open_supervisor(driver=driver, pool={"host": 4}):
                await trio.sleep_forever()
        assert len(driver.spawned) == pool_mod.REFILL_CONCURRENCY
        assert driver.leaked == [] and driver.running == []

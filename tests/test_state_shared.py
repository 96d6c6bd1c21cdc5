"""Supervisors sharing one state db (fake sandboxes): listing, attaching, stopping from
elsewhere, paging, reaping records of dead owners, names claimed once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from corral.actors.registry import Registry, SandboxRecord, now_us, own_identity
from corral.actors.state import SandboxStatus
from corral.actors.supervisor import Supervisor, open_supervisor
from corral.backend import LocalBackend
from corral.drivers.base import SandboxSpec
from corral.drivers.fake import FakeDriver
from corral.errors import (
    InvalidConfig,
    SandboxAlreadyExists,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxStillRunning,
    Unsupported,
)
from corral.sandbox import Sandbox


def now(sb: Sandbox) -> SandboxStatus:
    """The live status (a function, so mypy does not narrow it between checks)."""
    return sb.status


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(home=tmp_path / "home")


@asynccontextmanager
async def two(backend: LocalBackend) -> AsyncIterator[tuple[FakeDriver, Supervisor, Supervisor]]:
    with trio.fail_after(60):
        async with (
            FakeDriver() as driver,
            open_supervisor(backend, driver=driver) as a,
            open_supervisor(backend, driver=driver) as b,
        ):
            yield driver, a, b


async def names(sup: Supervisor) -> dict[str, SandboxStatus]:
    return {info.name: info.status for info in await sup.list()}


async def test_the_state_lives_in_the_backends_db(backend: LocalBackend) -> None:
    async with FakeDriver() as driver, open_supervisor(backend, driver=driver) as sup:
        await sup.create("a", labels={"team": "x"})
        assert sup.registry.path == backend.db_path and backend.db_path.exists()
        (info,) = await sup.list()
        assert info.labels == {"team": "x"} and info.owner_pid == own_identity()[0]
        assert info.pid == driver.processes["a"].pid and info.started_at is not None
    # leaving the block stopped it and deleted its record
    assert Registry(backend.db_path).page() == ([], None)


async def test_without_a_local_backend_the_db_is_private() -> None:
    async with FakeDriver() as driver:
        async with open_supervisor(driver=driver) as a, open_supervisor(driver=driver) as b:
            await a.create("x")
            await b.create("x")  # separate in-memory dbs
            assert a.registry.path is None and list(await a.list()) != []


async def test_two_supervisors_see_and_use_each_others_sandboxes(backend: LocalBackend) -> None:
    async with two(backend) as (driver, a, b):
        mine = await a.create("mine")
        await b.create("theirs")
        assert await names(a) == await names(b) == {"mine": "running", "theirs": "running"}
        with pytest.raises(SandboxAlreadyExists):
            await b.create("mine")
        seen = await b.get("mine")  # attached: a second agent connection
        assert "mine" in b and now(seen) is SandboxStatus.RUNNING
        assert (await seen.exec("echo", ["via b"])).stdout == b"via b\n"
        assert len(driver.processes["mine"].agents) == 2 and len(driver.spawned) == 2
        await seen.stop()  # b stops a's sandbox
        await trio.testing.wait_all_tasks_blocked()
        assert now(mine) is SandboxStatus.STOPPED  # stopped elsewhere: not crashed
        assert (await names(a))["mine"] is SandboxStatus.STOPPED
        await a.remove("mine")
        assert "mine" not in await names(b)


async def test_leaving_stops_only_what_it_owns(backend: LocalBackend) -> None:
    with trio.fail_after(60):
        async with FakeDriver() as driver, open_supervisor(backend, driver=driver) as b:
            async with open_supervisor(backend, driver=driver) as a:
                await a.create("owned")
                await a.create("kept", detached=True)
                watched = await b.get("owned")
            await trio.testing.wait_all_tasks_blocked()
            assert now(watched) is SandboxStatus.STOPPED  # its owner stopped it on exit
            assert await names(b) == {"kept": SandboxStatus.RUNNING}
            kept = await b.get("kept")  # the detached one outlived its creator
            assert (await kept.exec("echo", ["hi"])).stdout == b"hi\n"
            await kept.stop()
            await b.remove("kept")
            assert await names(b) == {}
        assert driver.running == []


async def test_a_stopped_record_is_a_handle_that_can_start_again(backend: LocalBackend) -> None:
    async with two(backend) as (driver, a, b):
        sb = await a.create("s", detached=True)
        await sb.stop()
        handle = await b.get("s")
        assert now(handle) is SandboxStatus.STOPPED and len(driver.spawned) == 1
        with pytest.raises(SandboxNotRunning):
            await handle.exec("echo")
        await handle.start()  # b owns it now
        assert now(handle) is SandboxStatus.RUNNING and len(driver.spawned) == 2
        assert (await names(a))["s"] is SandboxStatus.RUNNING
        with pytest.raises(SandboxAlreadyExists, match="started elsewhere"):
            await sb.start()  # a's actor may not start it a second time
        with pytest.raises(SandboxStillRunning):
            await a.remove("s")


async def test_a_created_record_cannot_be_started_twice(backend: LocalBackend) -> None:
    async with two(backend) as (driver, a, b):
        sb = await a.create("c", start=False)
        other = await b.get("c")
        assert now(other) is SandboxStatus.CREATED
        await other.start()
        with pytest.raises(SandboxAlreadyExists):
            await sb.start()
        assert len(driver.spawned) == 1


async def test_concurrent_creates_of_one_name_have_one_winner(backend: LocalBackend) -> None:
    outcomes: list[str] = []

    async def create(sup: Supervisor) -> None:
        try:
            await sup.create("race")
            outcomes.append("created")
        except SandboxAlreadyExists:
            outcomes.append("exists")

    async with two(backend) as (driver, a, b):
        async with trio.open_nursery() as nursery:
            for sup in (a, b, a, b):
                nursery.start_soon(create, sup)
        assert sorted(outcomes) == ["created", "exists", "exists", "exists"]
        assert len(driver.spawned) == 1


async def test_paging_through_list(backend: LocalBackend) -> None:
    async with two(backend) as (_driver, a, b):
        for n in range(7):
            await (a if n % 2 else b).create(f"s{n}")
        first = await a.list(limit=3)
        assert [i.name for i in first] == ["s0", "s1", "s2"] and len(first) == 3
        assert first.next_cursor is not None and first.items == first.sandboxes
        second = await b.list(cursor=first.next_cursor, limit=3)
        third = await a.list(cursor=second.next_cursor, limit=3)
        assert [i.name for i in second] + [i.name for i in third] == ["s3", "s4", "s5", "s6"]
        assert third.next_cursor is None
        with pytest.raises(InvalidConfig):
            await a.list(cursor="garbage!", limit=3)


def stale(
    name: str, *, detached: bool, status: SandboxStatus, keeper: bool = False
) -> SandboxRecord:
    pid, start = own_identity()
    dead = (start or 0) + 12345  # our pid with another start time: a recycled pid
    return SandboxRecord(
        name=name,
        id=uuid.uuid4().hex,
        driver="fake",
        status=status,
        spec=SandboxSpec(name=name, detached=detached),
        detached=detached,
        owner_pid=pid,
        owner_start=dead,
        keeper_pid=pid if keeper else None,
        keeper_start=dead if keeper else None,
        created_at=now_us(),
        updated_at=now_us(),
    )


async def test_stale_records_are_reaped_on_open(backend: LocalBackend) -> None:
    db = Registry(backend.db_path)
    running = SandboxStatus.RUNNING
    db.claim(stale("gone", detached=False, status=running))
    db.claim(stale("never-started", detached=False, status=SandboxStatus.CREATED))
    db.claim(stale("orphan", detached=True, status=running, keeper=True))
    db.claim(stale("half-born", detached=True, status=SandboxStatus.STARTING))
    db.claim(stale("waiting", detached=True, status=SandboxStatus.CREATED))
    db.claim(stale("done", detached=False, status=SandboxStatus.STOPPED))
    (backend.sandboxes_dir / "gone").mkdir(parents=True)
    async with FakeDriver() as driver, open_supervisor(backend, driver=driver) as sup:
        listed = {info.name: info for info in await sup.list()}
        assert {name: info.status for name, info in listed.items()} == {
            "orphan": SandboxStatus.CRASHED,
            "half-born": SandboxStatus.CRASHED,
            "waiting": SandboxStatus.CREATED,
            "done": SandboxStatus.STOPPED,
        }
        assert "keeper" in (listed["orphan"].last_error or "")
        await sup.create("gone")  # the name is free again
        with pytest.raises(SandboxAlreadyExists):
            await sup.create("orphan")  # a crashed detached record stays until removed
        await sup.remove("orphan")
        await sup.create("orphan")


async def test_a_stale_record_met_later_is_reaped_then(backend: LocalBackend) -> None:
    async with FakeDriver() as driver, open_supervisor(backend, driver=driver) as sup:
        db = Registry(backend.db_path)
        db.claim(stale("late", detached=False, status=SandboxStatus.RUNNING))
        with pytest.raises(SandboxNotFound):
            await sup.get("late")
        db.claim(stale("late2", detached=False, status=SandboxStatus.RUNNING))
        await sup.create("late2")
        db.claim(stale("late3", detached=False, status=SandboxStatus.RUNNING))
        with pytest.raises(SandboxNotFound):
            await sup.remove("late3")


async def test_a_record_of_another_driver_is_listed_but_not_attached(
    backend: LocalBackend,
) -> None:
    async with FakeDriver() as driver, open_supervisor(backend, driver=driver) as sup:
        alive = stale("foreign", detached=True, status=SandboxStatus.RUNNING)
        alive.owner_start = own_identity()[1]
        alive.driver = "local"
        Registry(backend.db_path).claim(alive)
        assert (await names(sup))["foreign"] is SandboxStatus.RUNNING
        with pytest.raises(Unsupported):
            await sup.get("foreign")
        with pytest.raises(SandboxStillRunning):
            await sup.remove("foreign")

"""ControlPlane lifecycle rules on a virtual clock: limits, crashes, ephemeral, restarts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from corral.server.http import ApiError
from corral.server.service import ControlPlane
from corral.server.spec import CreatePlan
from corral.server.store import Store


class Host:
    def __init__(self) -> None:
        self.stopped: dict[str, trio.Event] = {}
        self.crash: dict[str, str] = {}
        self.stops: list[str] = []
        self.removed: list[str] = []

    async def start(self, sid: str, plan: CreatePlan) -> None:
        self.stopped[sid] = trio.Event()

    async def stop(self, sid: str) -> None:
        self.stops.append(sid)
        await trio.sleep(1)  # the stop ladder takes a while
        self.stopped[sid].set()

    async def wait(self, sid: str) -> str | None:
        await self.stopped[sid].wait()
        return self.crash.get(sid)

    async def remove(self, sid: str) -> None:
        self.removed.append(sid)

    def target(self, sid: str) -> Any:
        return object()


class SlowHost(Host):
    def __init__(self, gate: trio.Event) -> None:
        super().__init__()
        self.gate = gate

    async def start(self, sid: str, plan: CreatePlan) -> None:
        await self.gate.wait()
        await super().start(sid, plan)


def status(rec: Any) -> str:
    value: str = rec.out.status
    return value


def failure(rec: Any) -> str | None:
    value: str | None = rec.out.last_failure_message
    return value


def plan(name: str, **kw: Any) -> CreatePlan:
    return CreatePlan(name=name, image="host", cpus=1, memory_mib=512, **kw)


@asynccontextmanager
async def plane(tmp_path: Path, host: Host | None = None) -> AsyncIterator[ControlPlane]:
    store = Store.open(tmp_path)
    async with trio.open_nursery() as nursery:
        cp = ControlPlane(store, host or Host(), nursery)
        yield cp
        nursery.cancel_scope.cancel()
    cp.close()
    store.close()


async def create(cp: ControlPlane, p: CreatePlan) -> Any:
    return await cp.create("org", p, start=True, wait=True, wait_timeout=90)


async def test_max_duration_stops_the_sandbox(tmp_path: Path, autojump_clock: Any) -> None:
    async with plane(tmp_path) as cp:
        rec = await create(cp, plan("a", max_duration_secs=60))
        await trio.sleep(59.5)
        assert rec.out.status == "running"
        await trio.sleep(1)
        assert rec.out.status == "stopping"  # asked at t=60; the stop ladder takes 1 s
        await trio.sleep(1)
        assert rec.out.status == "stopped" and rec.out.last_failure_message is None
        texts = [e.data for e in cp.logs(rec).since(0)]
        assert "stopping: max_duration_secs=60 reached" in texts


async def test_idle_timeout_counts_agent_sessions_as_activity(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with plane(tmp_path) as cp:
        rec = await create(cp, plan("a", idle_timeout_secs=30))
        await trio.sleep(20)
        session = cp.session_started(rec)  # a client connects at t=20 and stays 100 s
        for _ in range(10):
            await trio.sleep(10)
            session.touch()
        assert rec.out.status == "running"
        await trio.sleep(100)  # connected but silent: still not idle
        assert rec.out.status == "running"
        session.end()
        session.end()  # idempotent: the count stays right
        await trio.sleep(29)
        assert rec.out.status == "running"
        await trio.sleep(2)
        assert rec.out.status in ("stopping", "stopped")


async def test_crash_is_failed_with_a_message(tmp_path: Path, autojump_clock: Any) -> None:
    host = Host()
    async with plane(tmp_path, host) as cp:
        rec = await create(cp, plan("a"))
        host.crash[rec.id] = "killed by SIGKILL"
        host.stopped[rec.id].set()
        await trio.testing.wait_all_tasks_blocked()
        assert rec.out.status == "failed"
        assert rec.out.last_failure_message == "killed by SIGKILL"
        # a sandbox asked to stop that dies by signal is "stopped", not "failed"
        rec2 = await create(cp, plan("b"))
        host.crash[rec2.id] = "killed by SIGTERM"
        await cp.stop(rec2)
        await trio.sleep(2)
        assert rec2.out.status == "stopped"


async def test_ephemeral_sandboxes_vanish_when_they_stop(
    tmp_path: Path, autojump_clock: Any
) -> None:
    host = Host()
    async with plane(tmp_path, host) as cp:
        rec = await create(cp, plan("eph", ephemeral=True))
        assert rec.out.ephemeral is True
        await cp.stop(rec)
        await trio.sleep(2)
        with pytest.raises(ApiError) as info:
            cp.get_by_name("org", "eph")
        assert info.value.status == 404
        assert rec.id in host.removed


async def test_stop_while_starting_stops_once_started(tmp_path: Path, autojump_clock: Any) -> None:
    gate = trio.Event()
    host = SlowHost(gate)
    async with plane(tmp_path, host) as cp:
        rec = await cp.create("org", plan("s"), start=True, wait=False, wait_timeout=0)
        assert status(rec) == "starting"
        await cp.stop(rec)
        assert status(rec) == "stopping"
        with pytest.raises(ApiError) as info:
            await cp.remove(rec)
        assert info.value.status == 409
        gate.set()
        await trio.sleep(2)
        assert status(rec) == "stopped" and host.stops == [rec.id]
        assert await cp.remove(rec) == "sandbox 's' removed"


async def test_restart_of_the_server_settles_records(tmp_path: Path) -> None:
    with trio.fail_after(10):
        store = Store.open(tmp_path)
        async with trio.open_nursery() as nursery:
            cp = ControlPlane(store, Host(), nursery)
            await create(cp, plan("keep"))
            await create(cp, plan("eph", ephemeral=True))
            await cp.create("org", plan("new"), start=False, wait=False, wait_timeout=0)
            nursery.cancel_scope.cancel()
        store.close()  # a crash: close() never ran

        store = Store.open(tmp_path)
        async with trio.open_nursery() as nursery:
            cp = ControlPlane(store, Host(), nursery)
            kept = cp.get_by_name("org", "keep")
            assert kept.out.status == "stopped"
            assert kept.out.last_failure_message == "the server restarted while the sandbox ran"
            assert cp.get_by_name("org", "new").out.status == "created"
            with pytest.raises(ApiError):
                cp.get_by_name("org", "eph")
            await cp.start(kept, wait=True, wait_timeout=5)
            assert status(kept) == "running"
            assert failure(kept) is None
            nursery.cancel_scope.cancel()
        cp.close()
        assert status(kept) == "stopped"
        assert failure(kept) == "the server shut down while the sandbox ran"
        store.close()


async def test_quota_per_org(tmp_path: Path) -> None:
    with trio.fail_after(10):
        store = Store.open(tmp_path)
        async with trio.open_nursery() as nursery:
            cp = ControlPlane(store, Host(), nursery, max_per_org=2)
            for name in ("a", "b"):
                await cp.create("org", plan(name), start=False, wait=False, wait_timeout=0)
            with pytest.raises(ApiError) as info:
                await cp.create("org", plan("c"), start=False, wait=False, wait_timeout=0)
            assert (info.value.status, info.value.code) == (429, "quota_exceeded")
            await cp.create("org2", plan("c"), start=False, wait=False, wait_timeout=0)
            nursery.cancel_scope.cancel()
        store.close()


async def test_a_session_from_a_previous_run_does_not_skew_idleness(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with plane(tmp_path) as cp:
        rec = await create(cp, plan("a", idle_timeout_secs=30))
        old = cp.session_started(rec)
        await cp.stop(rec)
        await trio.sleep(2)
        await cp.start(rec, wait=True, wait_timeout=5)
        old.end()  # the old run's client leaves after the restart
        current = cp.session_started(rec)
        await trio.sleep(100)
        assert status(rec) == "running"  # the open session keeps the new run alive
        current.end()
        await trio.sleep(31)
        assert status(rec) in ("stopping", "stopped")

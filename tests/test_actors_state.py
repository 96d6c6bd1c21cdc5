"""SandboxStatus and the watchable value."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from corral.actors.state import SandboxStatus, Watch


def test_status_values_are_the_seeds_names() -> None:
    assert [s.value for s in SandboxStatus] == [
        "created",
        "starting",
        "running",
        "draining",
        "stopped",
        "crashed",
    ]
    assert SandboxStatus("running") is SandboxStatus.RUNNING
    assert str(SandboxStatus.STOPPED) == "stopped"
    assert {s for s in SandboxStatus if s.terminal} == {
        SandboxStatus.STOPPED,
        SandboxStatus.CRASHED,
    }
    assert {s for s in SandboxStatus if s.active} == {
        SandboxStatus.RUNNING,
        SandboxStatus.DRAINING,
    }


async def test_wait_change_wakes_on_the_next_change_only() -> None:
    watch = Watch(1)
    seen: list[int] = []

    async def waiter() -> None:
        seen.append(await watch.wait_change())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        watch.set(1)  # equal: not a change
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        assert watch.version == 0
        watch.set(2)
    assert seen == [2]
    assert watch.version == 1


async def test_wait_for_returns_at_once_when_true_and_waits_otherwise() -> None:
    watch = Watch("a")
    assert await watch.wait_for(lambda v: v == "a") == "a"
    got: list[str] = []

    async def waiter() -> None:
        got.append(await watch.wait_for(lambda v: v == "c"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        watch.set("b")
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        watch.set("c")
    assert got == ["c"]


async def test_wait_for_is_a_checkpoint_even_when_already_true() -> None:
    watch = Watch(0)
    with trio.CancelScope() as scope:
        scope.cancel()
        await watch.wait_for(lambda v: v == 0)
        pytest.fail("wait_for did not checkpoint")
    assert scope.cancelled_caught

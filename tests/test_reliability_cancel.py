"""Cancelling ``create``, ``exec``, ``exec_stream`` and ``stop`` at every checkpoint.

A trio instrument counts task steps (every step ends at a checkpoint) and cancels the
operation's scope right after the N-th one; N sweeps from 1 until the operation
completes before being cancelled. On the fake driver (virtual time) every N is tried;
on real sandboxes a spread-out sample. After each cancellation nothing may be left
behind: no sandbox process, no open fd, no cgroup, no socket or sandbox dir, no
conversation on the channel, no request counted as in flight, and the supervisor
still works (the name can be created again, the sandbox still answers).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import corral
from corral.actors.sandbox import SandboxActor
from corral.actors.supervisor import Supervisor, open_supervisor
from corral.backend import LocalBackend
from corral.drivers.fake import FakeDriver
from corral.drivers.local import cgroup as cgroups
from corral.drivers.local.driver import LocalSandbox
from corral.protocol import ExecStdout
from corral.testing import processes_matching, wait_until

REAL_SAMPLES = 12
"""Cancellation points tried per operation on real sandboxes."""
MAX_STEPS = 5000
"""A sweep that never completes is a bug (the operation cannot finish uncancelled)."""


class CancelAfterSteps(trio.abc.Instrument):
    """Cancel ``scope`` right after the ``step``-th task step (of any task) from now."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.count = 0
        self.scope = trio.CancelScope()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.count += 1
        if self.count == self.step:
            self.scope.cancel()

    @property
    def fired(self) -> bool:
        return self.count >= self.step


async def run_cancelled_at(step: int, op: Callable[[], Awaitable[object]]) -> bool:
    """Run ``op`` cancelled after ``step`` steps; True if the cancel reached it in time.

    Any exception but the cancellation itself escapes (a cancelled operation must
    raise Cancelled, not some other error)."""
    canceller = CancelAfterSteps(step)
    trio.lowlevel.add_instrument(canceller)
    try:
        with canceller.scope:
            await op()
    finally:
        trio.lowlevel.remove_instrument(canceller)
    return canceller.fired


async def count_steps(op: Callable[[], Awaitable[object]]) -> int:
    """How many task steps ``op`` takes when nobody cancels it."""
    canceller = CancelAfterSteps(MAX_STEPS * 100)
    trio.lowlevel.add_instrument(canceller)
    try:
        await op()
    finally:
        trio.lowlevel.remove_instrument(canceller)
    return canceller.count


def sample(total: int, k: int) -> list[int]:
    """``k`` steps spread over 1..total, the first few always included."""
    picks = {1, 2, 3, 5, 8, total - 1, total}
    picks |= {max(1, total * i // k) for i in range(1, k)}
    return sorted(p for p in picks if 1 <= p <= total)[: k + 4]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def actor_of(sb: corral.Sandbox) -> SandboxActor:
    actor = sb._actor
    assert isinstance(actor, SandboxActor)
    return actor


def in_flight(actor: SandboxActor) -> int:
    """Conversations open on the sandbox's agent channel."""
    assert actor.channel is not None
    return actor.channel.in_flight


# ============================================================================ fake driver


@asynccontextmanager
async def fake(**behaviour: Any) -> AsyncIterator[tuple[FakeDriver, Supervisor]]:
    async with FakeDriver(**behaviour) as driver:
        async with open_supervisor(driver=driver) as sup:
            yield driver, sup
        assert driver.leaked == []


async def assert_fake_quiet(driver: FakeDriver, sup: Supervisor) -> None:
    """Every fake process is either owned by a live sandbox of ``sup`` or cleaned up."""
    await trio.testing.wait_all_tasks_blocked()
    for proc in driver.spawned:
        if proc.name in sup and proc is driver.processes[proc.name]:
            continue
        assert proc.cleaned_up and proc.exit_status is not None, proc
        assert all(agent.closed for agent in proc.agents), proc
    assert not sup._reserved
    await assert_no_stale_records(sup)


async def assert_no_stale_records(sup: Supervisor) -> None:
    """The state db lists only sandboxes this supervisor holds (a cancelled create
    leaves no record behind)."""
    listed = {info.name for info in await sup.list(limit=10_000)}
    assert {name for name in listed if name not in sup} == set(), listed


async def test_fake_create_cancelled_at_every_checkpoint(autojump_clock: trio.abc.Clock) -> None:
    async with fake(spawn_delay=0.01, ready_delay=0.01) as (driver, sup):
        with trio.fail_after(600):
            for step in range(1, MAX_STEPS):
                name = f"c{step}"

                async def create(name: str = name) -> None:
                    await sup.create(name)

                fired = await run_cancelled_at(step, create)
                await assert_fake_quiet(driver, sup)
                if not fired:
                    break
                if name in sup:  # the cancel came after create had finished its work
                    assert (await sup.get(name)).status is corral.SandboxStatus.RUNNING
                    continue
                sb = await sup.create(name)  # the name is free again and works
                assert (await sb.exec("echo", ["ok"])).stdout == b"ok\n"
                await sb.stop()
                await sup.remove(name)
            else:
                pytest.fail("create never finished uncancelled")
        assert step > 5  # the sweep did cover the start-up


async def test_fake_exec_cancelled_at_every_checkpoint(autojump_clock: trio.abc.Clock) -> None:
    async with fake() as (driver, sup):
        sb = await sup.create("e")
        actor = actor_of(sb)
        proc = driver.processes["e"]
        await trio.testing.wait_all_tasks_blocked()
        base = in_flight(actor)  # long-lived conversations (the log feed)
        with trio.fail_after(600):
            for step in range(1, MAX_STEPS):

                async def run() -> None:
                    await sb.exec("tick", ["3", "0.1"])

                fired = await run_cancelled_at(step, run)
                await trio.testing.wait_all_tasks_blocked()
                assert actor.active.value == 0
                assert in_flight(actor) == base, step
                assert all(e.finished.is_set() for e in proc.execs), step
                if not fired:
                    break
                assert sb.status is corral.SandboxStatus.RUNNING
            else:
                pytest.fail("exec never finished uncancelled")
        assert step > 5
        assert (await sb.exec("echo", ["after"])).stdout == b"after\n"
        # every cancelled exec was killed (or had ended) on the agent's side
        assert all(e.finished.is_set() for e in proc.execs)


async def test_fake_exec_stream_cancelled_at_every_checkpoint(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with fake() as (driver, sup):
        sb = await sup.create("s")
        actor = actor_of(sb)
        proc = driver.processes["s"]
        await trio.testing.wait_all_tasks_blocked()
        base = in_flight(actor)  # long-lived conversations (the log feed)
        with trio.fail_after(600):
            for step in range(1, MAX_STEPS):

                async def stream() -> None:
                    async with sb.exec_stream("cat") as p:
                        await p.send_stdin(b"ping\n")
                        async for event in p:
                            if isinstance(event, ExecStdout):
                                break
                        await p.close_stdin()
                        await p.wait()

                fired = await run_cancelled_at(step, stream)
                await trio.testing.wait_all_tasks_blocked()
                assert actor.active.value == 0, step
                assert in_flight(actor) == base, step
                assert all(e.finished.is_set() for e in proc.execs), step
                if not fired:
                    break
            else:
                pytest.fail("exec_stream never finished uncancelled")
        assert step > 5
        assert sb.status is corral.SandboxStatus.RUNNING


@pytest.mark.parametrize("behaviour", [{}, {"ignore_shutdown": True, "ignore_sigterm": True}])
async def test_fake_stop_cancelled_at_every_checkpoint(
    autojump_clock: trio.abc.Clock, behaviour: dict[str, bool]
) -> None:
    """Stopping is not undone by a cancelled caller: the ladder runs to its end."""
    async with fake(**behaviour) as (driver, sup):
        with trio.fail_after(6000):
            for step in range(1, MAX_STEPS):
                name = f"s{step}"
                sb = await sup.create(name)

                async def stop(sb: corral.Sandbox = sb) -> None:
                    await sb.stop(timeout=1.0)

                fired = await run_cancelled_at(step, stop)
                await trio.testing.wait_all_tasks_blocked()
                if sb.status is corral.SandboxStatus.RUNNING:
                    # cancelled before the actor took the Stop: nothing began, the
                    # sandbox still works and stops normally
                    assert (await sb.exec("echo", ["up"])).stdout == b"up\n", step
                    await sb.stop(timeout=1.0)
                # once begun, the ladder runs to its end without its caller
                assert await sb.wait_until_stopped() is corral.SandboxStatus.STOPPED, step
                proc = driver.processes[name]
                assert proc.cleaned_up and all(agent.closed for agent in proc.agents)
                await sup.remove(name)
                await assert_fake_quiet(driver, sup)
                if not fired:
                    break
            else:
                pytest.fail("stop never finished uncancelled")
        assert step > 5


# ============================================================================ real sandboxes


def cgroup_leftovers(name: str) -> list[Path]:
    layout = cgroups.detect()
    found: list[Path] = []
    for h in layout.hierarchies if layout is not None else ():
        if h.parent.exists():
            found += [p for p in h.parent.iterdir() if p.name.startswith(f"{name}-")]
    return found


async def assert_real_quiet(
    sup: Supervisor, home: Path, name: str, fds_before: int, *, dir_may_stay: bool
) -> None:
    """Nothing of sandbox ``name`` runs or is held, and our fd count is back."""
    assert await wait_until(lambda: not processes_matching(name), timeout=5), name
    assert cgroup_leftovers(name) == []
    root = home / "sandboxes" / name
    assert not (root / "run").exists(), f"{root}/run (the agent socket dir) left behind"
    if not dir_may_stay:
        left = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
        assert not root.exists(), f"{root} left behind by a cancelled create: {left}"
    assert await wait_until(lambda: open_fds() <= fds_before, timeout=5), (
        open_fds(),
        fds_before,
    )
    assert not sup._reserved
    await assert_no_stale_records(sup)


@pytest.mark.integration
async def test_real_create_cancelled_at_sampled_checkpoints(
    local_sup: Supervisor, corral_home: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    with trio.fail_after(120):
        fds = open_fds()
        total = await count_steps(lambda: local_sup.create(f"cr{tag}-probe"))
        await local_sup.stop(f"cr{tag}-probe", timeout=2)
        await local_sup.remove(f"cr{tag}-probe")
        steps = sample(total, REAL_SAMPLES)
        for step in steps:
            name = f"cr{tag}-{step}"

            async def create(name: str = name) -> None:
                await local_sup.create(name)

            fired = await run_cancelled_at(step, create)
            if name in local_sup:  # create had done its work before the cancel landed
                await local_sup.stop(name, timeout=2)
                await local_sup.remove(name)
                await assert_real_quiet(local_sup, corral_home, name, fds, dir_may_stay=True)
                continue
            assert fired
            await assert_real_quiet(local_sup, corral_home, name, fds, dir_may_stay=False)
        sb = await local_sup.create(f"cr{tag}-{steps[0]}")  # a cancelled name is free again
        assert (await sb.exec("echo", ["ok"])).stdout == b"ok\n"


@pytest.mark.integration
async def test_real_exec_cancelled_at_sampled_checkpoints(local_sup: Supervisor) -> None:
    tag = uuid.uuid4().hex[:8]
    with trio.fail_after(120):
        sb = await local_sup.create(f"ex{tag}")
        actor = actor_of(sb)
        await trio.testing.wait_all_tasks_blocked()
        fds = open_fds()
        base = in_flight(actor)  # long-lived conversations (the log feed)
        marker = f"mark{tag}"

        async def run() -> None:
            await sb.exec("sh", ["-c", f"echo out; echo err >&2; sleep 0.3; : {marker}"])

        total = await count_steps(run)
        for step in sample(total, REAL_SAMPLES):
            fired = await run_cancelled_at(step, run)
            assert await wait_until(lambda: not processes_matching(marker), timeout=3), step
            assert await wait_until(lambda: actor.active.value == 0, timeout=3), step
            assert in_flight(actor) == base, step
            assert await wait_until(lambda: open_fds() <= fds, timeout=3), (open_fds(), fds)
            assert sb.status is corral.SandboxStatus.RUNNING
            if not fired:
                break
        left = await sb.exec("sh", ["-c", "ps -eo comm | grep -c sleep || true"])
        assert left.stdout.strip() == b"0"  # no cancelled command lingers inside either


@pytest.mark.integration
async def test_real_exec_stream_cancelled_at_sampled_checkpoints(local_sup: Supervisor) -> None:
    tag = uuid.uuid4().hex[:8]
    with trio.fail_after(120):
        sb = await local_sup.create(f"st{tag}")
        actor = actor_of(sb)
        await trio.testing.wait_all_tasks_blocked()
        fds = open_fds()
        base = in_flight(actor)  # long-lived conversations (the log feed)
        marker = f"smark{tag}"

        async def stream() -> None:
            async with sb.exec_stream("sh", ["-c", f"read x; echo got $x; : {marker}"]) as p:
                await p.send_stdin(b"hi\n")
                await p.wait()

        total = await count_steps(stream)
        for step in sample(total, REAL_SAMPLES):
            await run_cancelled_at(step, stream)
            assert await wait_until(lambda: not processes_matching(marker), timeout=3), step
            assert await wait_until(lambda: actor.active.value == 0, timeout=3), step
            assert in_flight(actor) == base, step
            assert await wait_until(lambda: open_fds() <= fds, timeout=3), (open_fds(), fds)
        assert sb.status is corral.SandboxStatus.RUNNING


@pytest.mark.integration
async def test_real_stop_cancelled_at_sampled_checkpoints(
    local_backend: LocalBackend, corral_home: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    with trio.fail_after(120):
        async with corral.open_supervisor(local_backend) as sup:
            fds = open_fds()
            probe = await sup.create(f"sp{tag}-probe")
            total = await count_steps(lambda: probe.stop(timeout=2))
            await sup.remove(probe.name)
            for step in sample(total, REAL_SAMPLES):
                name = f"sp{tag}-{step}"
                sb = await sup.create(name)

                async def stop(sb: corral.Sandbox = sb) -> None:
                    await sb.stop(timeout=2)

                await run_cancelled_at(step, stop)
                await trio.testing.wait_all_tasks_blocked()
                if sb.status is corral.SandboxStatus.RUNNING:  # the Stop was never taken
                    assert (await sb.exec("echo", ["up"])).stdout == b"up\n", step
                    await sb.stop(timeout=2)
                with trio.fail_after(10):  # once begun, the ladder goes on without its caller
                    assert await sb.wait_until_stopped() is corral.SandboxStatus.STOPPED
                proc = actor_of(sb).proc
                assert isinstance(proc, LocalSandbox) and proc.exit_status is not None
                await sup.remove(name)
                await assert_real_quiet(sup, corral_home, name, fds, dir_may_stay=True)

"""Supervisor and open_supervisor: names, registry rules, cancellation, leaving the block."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import corral
from corral.actors import supervisor as supervisor_module
from corral.actors.state import SandboxStatus
from corral.actors.supervisor import FAST_STOP_TIMEOUT, Supervisor, driver_for, open_supervisor
from corral.drivers.base import Driver
from corral.drivers.fake import FakeDriver
from corral.errors import (
    ActorDead,
    InvalidConfig,
    Runtime,
    SandboxAlreadyExists,
    SandboxNotFound,
    SandboxStillRunning,
    Unsupported,
)


@asynccontextmanager
async def harness(**behaviour: Any) -> AsyncIterator[tuple[FakeDriver, Supervisor]]:
    with trio.fail_after(120):
        async with FakeDriver(**behaviour) as driver, open_supervisor(driver=driver) as sup:
            yield driver, sup


BAD_NAMES = ["", "-a", ".a", "_a", "a b", "a/b", "a:b", "ä", "aé", "a\n", "a" * 129, "a\0"]
GOOD_NAMES = ["a", "A", "0", "a.b-c_d", "Z" + "9" * 127]


# -- names and options ---------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_names_are_invalid_config(name: str) -> None:
    async with harness() as (driver, sup):
        with pytest.raises(InvalidConfig):
            await sup.create(name)
        assert driver.spawned == [] and len(sup) == 0


async def test_good_names_are_accepted() -> None:
    async with harness() as (_driver, sup):
        for name in GOOD_NAMES:
            sb = await sup.create(name)
            assert sb.name == name
        assert sorted(info.name for info in await sup.list()) == sorted(GOOD_NAMES)


def test_name_validator_directly() -> None:
    for name in GOOD_NAMES:
        assert corral.validate_sandbox_name(name) == name
    for name in BAD_NAMES:
        with pytest.raises(InvalidConfig):
            corral.validate_sandbox_name(name)
    with pytest.raises(InvalidConfig, match="must be a string"):
        corral.validate_sandbox_name(5)


@pytest.mark.parametrize(
    "options",
    [
        {"cpus": 0},
        {"cpus": -1.5},
        {"memory_mib": 0},
        {"memory_mib": 1.5},
        {"pids_limit": True},
        {"image": ""},
        {"workdir": "relative"},
        {"env": {"A=B": "x"}},
        {"env": {"A": 1}},
    ],
)
async def test_bad_options_are_invalid_config(options: dict[str, Any]) -> None:
    async with harness() as (driver, sup):
        with pytest.raises(InvalidConfig):
            await sup.create("a", **options)
        assert driver.spawned == []


async def test_unknown_options_are_unsupported() -> None:
    async with harness() as (_driver, sup):
        with pytest.raises(Unsupported, match="gpu"):
            await sup.create("a", gpu=True)


async def test_spec_reaches_the_driver() -> None:
    async with harness() as (driver, sup):
        await sup.create(
            "a", image="img", env={"K": "V"}, workdir="/w", network=True, cpus=1.5, memory_mib=256
        )
        spec = driver.processes["a"].spec
        assert (spec.image, dict(spec.env), spec.workdir) == ("img", {"K": "V"}, "/w")
        assert (spec.network, spec.cpus, spec.memory_mib) == (True, 1.5, 256)
        assert (spec.pids_limit, spec.detached) == (None, False)


# -- registry rules ------------------------------------------------------------------------


async def test_duplicates_are_refused_also_while_starting(autojump_clock: trio.abc.Clock) -> None:
    async with harness(spawn_delay=1.0) as (_driver, sup):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.create, "a")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(SandboxAlreadyExists):
                await sup.create("a")
            with pytest.raises(SandboxStillRunning, match="starting"):
                await sup.remove("a")
        with pytest.raises(SandboxAlreadyExists):
            await sup.create("a")


async def test_unknown_names_are_not_found() -> None:
    async with harness() as (_driver, sup):
        with pytest.raises(SandboxNotFound):
            await sup.get("nope")
        for call in (sup.stop("nope"), sup.kill("nope"), sup.remove("nope"), sup.ask("nope", 1)):
            with pytest.raises(SandboxNotFound):
                await call


async def test_remove_rules_and_name_reuse() -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        with pytest.raises(SandboxStillRunning, match="still running"):
            await sup.remove("a")
        await sup.stop("a")
        await sup.remove("a")
        assert "a" not in sup and list(await sup.list()) == []
        with pytest.raises(ActorDead):
            await sb.exec("echo")
        again = await sup.create("a")
        assert (await again.exec("echo", ["x"])).stdout == b"x\n"
        assert len(driver.spawned) == 2 and driver.spawned[0].cleaned_up


async def test_remove_a_crashed_sandbox() -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        driver.processes["a"].crash()
        await sb.wait_until_stopped()
        await sup.remove("a")
        assert len(sup) == 0


async def test_list_and_get() -> None:
    async with harness() as (_driver, sup):
        a = await sup.create("a", image="one")
        await sup.create("b")
        infos = {info.name: info for info in await sup.list()}
        assert set(infos) == {"a", "b"}
        assert infos["a"].image == "one" and infos["a"].status is SandboxStatus.RUNNING
        assert infos["a"].created_at <= infos["b"].created_at
        assert await sup.get("a") == a and await sup.get("a") != await sup.get("b")
        await a.stop()
        assert {i.name: i.status for i in await sup.list()}["a"] is SandboxStatus.STOPPED
        assert a.image == "one" and a.created_at == infos["a"].created_at
        assert (await a.info()).status is SandboxStatus.STOPPED


async def test_spawn_failure_propagates_and_leaves_nothing(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, sup):
        driver.configure("bad", spawn_delay=0.5, spawn_error=Runtime("no room"))
        with pytest.raises(Runtime, match="no room"):
            await sup.create("bad")
        assert "bad" not in sup and not sup._reserved
        assert driver.leaked == []
        driver.configure("bad")
        await sup.create("bad")


async def test_handshake_failure_leaves_nothing(autojump_clock: trio.abc.Clock) -> None:
    async with harness(wedged=True, ready_delay=60) as (driver, sup):
        with pytest.raises(corral.AgentGone, match="no handshake"):
            await sup.create("a")
        assert driver.leaked == [] and "a" not in sup


# -- cancellation of create at every step ----------------------------------------------------


class CancelAfterSteps(trio.abc.Instrument):
    """Cancel ``scope`` once ``steps`` task steps have run (any task)."""

    def __init__(self, scope: trio.CancelScope, steps: int) -> None:
        self.scope = scope
        self.remaining = steps

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.scope.cancel()


@pytest.mark.parametrize(
    "behaviour", [{}, {"spawn_delay": 1.0, "connect_delay": 1.0, "ready_delay": 1.0}]
)
async def test_create_cancelled_at_any_step_leaves_nothing_behind(
    behaviour: dict[str, Any], autojump_clock: trio.abc.Clock
) -> None:
    async with harness(**behaviour) as (driver, sup):
        cancelled_at = 0
        for steps in range(1, 500):
            created = None
            with trio.CancelScope() as scope:
                instrument = CancelAfterSteps(scope, steps)
                trio.lowlevel.add_instrument(instrument)
                try:
                    created = await sup.create("a")
                finally:
                    trio.lowlevel.remove_instrument(instrument)
            if created is not None:
                break
            cancelled_at += 1
            assert scope.cancelled_caught
            assert "a" not in sup and not sup._reserved, steps
            assert driver.leaked == [], steps
            assert driver.running == [], steps
        else:
            pytest.fail("create never completed")
        assert cancelled_at > 5  # the cancellation really landed at many different points
        assert (await created.exec("echo", ["ok"])).stdout == b"ok\n"
        assert len(driver.running) == 1


# -- leaving the block -------------------------------------------------------------------------


async def test_leaving_normally_stops_everything_concurrently(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with FakeDriver() as driver:
        async with open_supervisor(driver=driver) as sup:
            handles = [await sup.create(f"s{n}") for n in range(5)]
            t0 = trio.current_time()
        assert trio.current_time() - t0 == pytest.approx(0.1)  # one poll, all at once
        assert all(h.status is SandboxStatus.STOPPED for h in handles)
        assert driver.leaked == [] and driver.running == []
        with pytest.raises(ActorDead):
            await handles[0].exec("echo")
        assert driver.spawned[0].times("SIGTERM") == []


async def test_leaving_on_an_exception_is_a_fast_shutdown(autojump_clock: trio.abc.Clock) -> None:
    async with FakeDriver(ignore_shutdown=True) as driver:
        with pytest.raises(ValueError, match="user error"):  # not an ExceptionGroup
            async with open_supervisor(driver=driver) as sup:
                await sup.create("a")
                await sup.create("b")
                t0 = trio.current_time()
                raise ValueError("user error")
        assert trio.current_time() - t0 == pytest.approx(FAST_STOP_TIMEOUT)
        for proc in driver.spawned:
            assert proc.times("SIGTERM") == [] and len(proc.times("SIGKILL")) == 1
        assert driver.leaked == [] and driver.running == []


async def test_leaving_on_cancellation_stops_everything(autojump_clock: trio.abc.Clock) -> None:
    async with FakeDriver() as driver:
        with trio.move_on_after(5) as scope:
            async with open_supervisor(driver=driver) as sup:
                await sup.create("a")
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert driver.leaked == [] and driver.running == []


async def test_cancellation_during_a_normal_exit_falls_back_to_the_fast_shutdown(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with FakeDriver(ignore_shutdown=True) as driver:
        with trio.move_on_after(3) as scope:
            async with open_supervisor(driver=driver) as sup:
                await sup.create("a")
            # the normal ladder would SIGTERM at 10 s; the cancel at 3 s cuts it short
        assert scope.cancelled_caught
        assert driver.leaked == [] and driver.running == []
        assert driver.spawned[0].times("SIGTERM") == []


async def test_keyboard_interrupt_stops_everything_and_propagates() -> None:
    async with FakeDriver() as driver:
        with pytest.raises(KeyboardInterrupt):
            async with open_supervisor(driver=driver) as sup:
                await sup.create("a")
                raise KeyboardInterrupt
        assert driver.leaked == [] and driver.running == []


async def test_detached_sandboxes_outlive_the_block() -> None:
    async with FakeDriver() as driver:
        async with open_supervisor(driver=driver) as sup:
            await sup.create("kept", detached=True)
            await sup.create("gone")
        kept, gone = driver.processes["kept"], driver.processes["gone"]
        assert kept.exit_status is None and not kept.cleaned_up
        assert all(agent.closed for agent in kept.agents)  # the channel was let go
        assert gone.cleaned_up and driver.leaked == []


async def test_a_sandbox_that_cannot_be_stopped_is_reported_at_exit(
    autojump_clock: trio.abc.Clock,
) -> None:
    stuck = {"ignore_shutdown": True, "ignore_sigterm": True, "ignore_sigkill": True}
    async with FakeDriver(**stuck) as driver:
        with pytest.raises(Runtime, match="could not stop every sandbox cleanly"):
            async with open_supervisor(driver=driver) as sup:
                await sup.create("a")
        assert driver.leaked == []


async def test_create_after_the_block_is_refused() -> None:
    async with FakeDriver() as driver:
        async with open_supervisor(driver=driver) as sup:
            pass
        with pytest.raises(Runtime, match="shutting down"):
            await sup.create("a")


# -- backend → driver ------------------------------------------------------------------------


class Kind:
    def __init__(self, kind: str) -> None:
        self.kind = kind


def test_cloud_backend_is_unsupported_until_the_cloud_driver_lands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = supervisor_module._import_attr
    monkeypatch.setattr(
        supervisor_module,
        "_import_attr",
        lambda module, attr: None if module == "corral.drivers.cloud" else real(module, attr),
    )
    with pytest.raises(Unsupported) as info:
        driver_for(Kind("cloud"))
    assert info.value.feature == "cloud backend"
    assert info.value.available_when == "when the cloud driver lands"


def test_unknown_backend_is_invalid_config() -> None:
    with pytest.raises(InvalidConfig, match="unknown backend"):
        driver_for(Kind("martian"))


class RecordingDriver(FakeDriver):
    instances: list[RecordingDriver] = []

    def __init__(self, backend: object) -> None:
        super().__init__()
        self.backend = backend
        self.entered = self.exited = False
        RecordingDriver.instances.append(self)

    async def __aenter__(self) -> RecordingDriver:
        self.entered = True
        await super().__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> bool:
        self.exited = True
        return await super().__aexit__(*exc_info)


async def test_a_local_backend_gets_a_local_driver_entered_and_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        supervisor_module,
        "_import_attr",
        lambda module, attr: RecordingDriver if module == "corral.drivers.local" else None,
    )
    backend = Kind("local")
    async with open_supervisor(backend) as sup:
        (driver,) = RecordingDriver.instances
        assert driver.backend is backend and driver.entered and sup.driver is driver
        await sup.create("a")
    assert driver.exited and driver.leaked == []
    RecordingDriver.instances.clear()


def test_driver_interface_is_what_the_fake_implements() -> None:
    assert issubclass(FakeDriver, Driver)


async def test_fast_shutdown_does_not_wait_for_a_ladder_in_progress(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with FakeDriver(ignore_shutdown=True) as driver:
        with pytest.RaisesGroup(ZeroDivisionError):  # the test's own nursery's group
            async with open_supervisor(driver=driver) as sup, trio.open_nursery() as nursery:
                sb = await sup.create("a")
                nursery.start_soon(sb.stop)  # a normal ladder: SIGTERM would come at 10 s
                await trio.sleep(1)
                t0 = trio.current_time()
                raise ZeroDivisionError
        assert trio.current_time() - t0 <= FAST_STOP_TIMEOUT + 0.2
        proc = driver.spawned[0]
        assert proc.times("SIGTERM") == [] and proc.cleaned_up

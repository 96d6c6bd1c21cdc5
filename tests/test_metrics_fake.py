"""sb.metrics() and sb.metrics_stream() on the fake driver (virtual time)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from corral.actors.supervisor import Supervisor, open_supervisor
from corral.drivers.fake import FakeDriver
from corral.errors import InvalidConfig, SandboxNotRunning
from corral.sandbox import Sandbox


@asynccontextmanager
async def harness() -> AsyncIterator[tuple[FakeDriver, Supervisor, Sandbox]]:
    with trio.fail_after(60):
        async with FakeDriver() as driver, open_supervisor(driver=driver) as sup:
            yield driver, sup, await sup.create("a", memory_mib=64)


async def test_metrics_come_from_the_driver(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, _sup, sb):
        idle = await sb.metrics()
        assert idle.source == "fake" and idle.pids == 1 and idle.memory_limit_bytes == 64 << 20
        await sb.exec_detached("sleep", ["100"])
        await trio.sleep(5)
        busy = await sb.metrics()
        assert busy.pids == 2 and busy.memory_bytes == 2 << 20
        assert busy.uptime_s is not None and busy.uptime_s >= 5
        await sb.stop()
        with pytest.raises(SandboxNotRunning):
            await sb.metrics()


async def test_the_stream_samples_on_a_fixed_grid(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, _sup, sb):
        t0 = trio.current_time()
        times = []
        async for sample in sb.metrics_stream(interval=2.0):
            times.append(trio.current_time() - t0)
            assert sample.source == "fake"
            if len(times) == 2:
                await trio.sleep(0.7)  # a consumer that takes time: the grid does not move
            if len(times) == 3:
                await trio.sleep(5.1)  # slower than the interval: next sample at once
            if len(times) == 6:
                break
        assert times == pytest.approx([0, 2, 4, 9.1, 10, 12])


async def test_the_stream_ends_when_the_sandbox_stops_even_mid_wait(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (_driver, _sup, sb):
        samples = 0
        ended_at: list[float] = []
        async with trio.open_nursery() as nursery:

            async def consume() -> None:
                nonlocal samples
                async for _sample in sb.metrics_stream(interval=100):
                    samples += 1
                ended_at.append(trio.current_time())

            nursery.start_soon(consume)
            await trio.testing.wait_all_tasks_blocked()
            await sb.kill()
            stopped_at = trio.current_time()
        assert samples == 1 and ended_at == [stopped_at]
        assert [m async for m in sb.metrics_stream()] == []


@pytest.mark.parametrize("interval", [0, -1, float("inf"), float("nan"), "1", True])
async def test_bad_intervals(interval: object) -> None:
    async with harness() as (_driver, _sup, sb):
        with pytest.raises(InvalidConfig, match="interval"):
            sb.metrics_stream(interval)  # type: ignore[arg-type]

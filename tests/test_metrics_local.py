"""sb.metrics() and sb.metrics_stream() on real sandboxes (the driver's sampler)."""

from __future__ import annotations

import pytest
import trio

import corral
from corral.errors import SandboxNotRunning

pytestmark = pytest.mark.integration


async def test_metrics_of_a_running_sandbox(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("measured", memory_mib=128)
        first = await sb.metrics()
        assert first.memory_bytes is not None and first.memory_bytes > 0
        assert first.pids is not None and first.pids >= 1
        assert first.uptime_s is not None and 0 <= first.uptime_s < 60
        assert first.cpu_percent is not None and first.cpu_percent >= 0
        if first.source == "cgroup":
            assert first.memory_limit_bytes == 128 << 20
        jobs = [await sb.exec_detached("sleep", ["30"]) for _ in range(3)]
        busy = await sb.metrics()
        assert busy.pids is not None and busy.pids >= first.pids + 3
        spin = await sb.exec_detached("sh", ["-c", "while :; do :; done"])
        async for sample in sb.metrics_stream(interval=0.3):
            if sample.cpu_percent is not None and sample.cpu_percent > 50:
                break  # the spinning job shows up within a few samples
        for job in [*jobs, spin]:
            await job.kill()
        await sb.stop()
        with pytest.raises(SandboxNotRunning):
            await sb.metrics()


async def test_metrics_stream_keeps_its_grid_and_ends_with_the_sandbox(
    local_sup: corral.Supervisor,
) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("streamed")
        t0 = trio.current_time()
        times: list[float] = []
        async with trio.open_nursery() as nursery:

            async def consume() -> None:
                async for sample in sb.metrics_stream(interval=0.2):
                    assert sample.uptime_s is not None
                    times.append(trio.current_time() - t0)
                    if len(times) == 5:
                        nursery.start_soon(sb.kill)

            nursery.start_soon(consume)
        assert len(times) == 5
        for n, when in enumerate(times):
            assert n * 0.2 <= when < n * 0.2 + 0.19, times  # on the grid, no drift

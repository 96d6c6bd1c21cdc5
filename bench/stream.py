"""stdout streaming throughput (``exec_stream``) and the orchestrator's RSS meanwhile,
against the same bytes read from a host process through a trio pipe."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Awaitable, Callable

import trio

import corral

from .context import Context
from .procs import reset_peak_rss, self_peak_rss, self_rss
from .report import MIB, Row, Target, Unit, at_least
from .stat import Stat

__all__ = ["FLAT_RSS", "run_stream"]

FLAT_RSS = 32 * MIB
"""RSS growth while streaming that still counts as flat."""


class RssWatch:
    """Peak RSS over a block: VmHWM (reset first) and a 10 ms sampler, the larger."""

    def __init__(self) -> None:
        self.before = 0
        self.peak = 0

    async def during(self, fn: Callable[[], Awaitable[int]]) -> int:
        self.before = self_rss()
        hwm_ok = reset_peak_rss()
        self.peak = self.before
        async with trio.open_nursery() as nursery:

            async def sampler() -> None:
                while True:
                    self.peak = max(self.peak, self_rss())
                    await trio.sleep(0.01)

            nursery.start_soon(sampler)
            result = await fn()
            nursery.cancel_scope.cancel()
        if hwm_ok:
            self.peak = max(self.peak, self_peak_rss())
        return result

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.before)


async def _host_pipe(size: int) -> int:
    got = 0
    proc = await trio.lowlevel.open_process(
        ["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        async with proc.stdout:
            while chunk := await proc.stdout.receive_some(256 * 1024):
                got += len(chunk)
        await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return got


async def run_stream(ctx: Context) -> None:
    size = ctx.n(1 << 30, 64 << 20)
    label = f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"
    name = f"stdout streaming, {label}"
    if ctx.local_reason is not None:
        ctx.emit(Row("stream", name, Unit.BYTES_PER_SECOND, skipped=f"skipped: {ctx.local_reason}"))
        return
    runs = ctx.n(3, 2)
    rates: list[float] = []
    host_rates: list[float] = []
    peaks: list[float] = []
    growths: list[float] = []
    host_peaks: list[float] = []

    async with corral.open_supervisor(ctx.backend()) as sup:
        sb = await sup.create("stream")

        async def in_sandbox() -> int:
            got = 0
            async with sb.exec_stream("head", ["-c", str(size), "/dev/zero"]) as proc:
                async for event in proc:
                    if isinstance(event, corral.ExecStdout):
                        got += len(event.data)
            if proc.exit_code != 0:
                raise corral.Runtime(f"head exited {proc.exit_code} in the sandbox")
            return got

        async def measure(fn: Callable[[], Awaitable[int]]) -> tuple[float, RssWatch]:
            watch = RssWatch()
            start = time.perf_counter_ns()
            got = await watch.during(fn)
            elapsed = (time.perf_counter_ns() - start) / 1e9
            if got != size:
                raise corral.Runtime(f"streamed {got} bytes, expected {size}")
            return size / elapsed, watch

        for _ in range(runs):
            rate, watch = await measure(in_sandbox)
            rates.append(rate)
            peaks.append(watch.peak)
            growths.append(watch.growth)
            rate, watch = await measure(lambda: _host_pipe(size))
            host_rates.append(rate)
            host_peaks.append(watch.peak)

    worst_growth = max(growths)

    def flat(_row: Row) -> bool:
        return worst_growth <= FLAT_RSS

    ctx.emit(
        Row(
            "stream",
            name,
            Unit.BYTES_PER_SECOND,
            Stat.of(rates),
            "host `head -c` through a trio pipe",
            Stat.of(host_rates),
            at_least(500e6, Unit.BYTES_PER_SECOND, extra=flat, text="≥ 500 MB/s, flat RSS"),
            note=f"sb.exec_stream('head', ['-c', N, '/dev/zero']) consuming every event, "
            f"{runs} runs; MB = 10^6 bytes; RSS growth over the stream at most "
            f"{worst_growth / MIB:.1f} MiB (flat: ≤ {FLAT_RSS // MIB} MiB)",
        )
    )
    ctx.emit(
        Row(
            "stream",
            f"orchestrator peak RSS while streaming {label}",
            Unit.BYTES,
            Stat.of(peaks),
            "peak RSS, host pipe",
            Stat.of(host_peaks),
            Target(f"flat: +≤ {FLAT_RSS // MIB} MiB over the stream", flat),
            note="VmHWM (reset before each run) and a 10 ms sampler; growth = peak - RSS "
            f"before the stream, at most {worst_growth / MIB:.1f} MiB",
        )
    )

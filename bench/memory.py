"""Memory per live sandbox: host RSS and PSS of every process it runs (outer bwrap, the
pid-namespace init, the agent and whatever it started), from /proc/*/smaps_rollup."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass

import trio

import corral
from corral.drivers.local.launch import sandbox_pids

from .bare import BareDirs, BareSandbox, start_bare
from .context import Context
from .execs import CREATE_BATCH, create_many
from .procs import mem_available, tree_memory
from .report import MIB, Row, Unit, at_most
from .stat import Stat

__all__ = ["run_memory"]

GIB = 1024 * MIB
SETTLE = 0.5
"""Pause after the last create so every agent is idle when measured."""
TARGET = 4 * MIB
KERNEL_ALLOWANCE = 2 * MIB
"""Kernel memory per sandbox (namespaces, mounts, page tables; ~1 MiB measured)."""
GUESS = 32 * MIB
"""Host memory assumed per sandbox before any was measured (the free-memory check)."""


@dataclass
class Tally:
    pss: list[float]
    rss: list[float]
    processes: int
    orchestrator: float
    """Orchestrator (Python heap) bytes held per sandbox."""
    took: float
    """Seconds the creates took (tracemalloc on: slower than the create benchmark)."""
    host_drop: float
    """MemAvailable drop per sandbox (kernel memory included: namespaces, page tables)."""


def _tally(pids_of: list[list[int]]) -> tuple[list[float], list[float], int]:
    pss: list[float] = []
    rss: list[float] = []
    processes = 0
    for pids in pids_of:
        mem = tree_memory(pids)
        pss.append(mem.pss)
        rss.append(mem.rss)
        processes += mem.processes
    return pss, rss, processes


async def _sandboxes(ctx: Context, count: int) -> Tally:
    async with corral.open_supervisor(ctx.backend()) as sup:
        available = mem_available()
        # Our RSS does not shrink after earlier benchmarks' peaks, so the orchestrator's
        # share is what the Python heap holds on to (tracemalloc, on only while creating).
        tracemalloc.start()
        try:
            took = await create_many(sup, count, "mem")
            await trio.sleep(SETTLE)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        dropped = available - mem_available()
        roots = [info.pid for info in await sup.list() if info.pid is not None]
        pss, rss, processes = _tally([sandbox_pids(pid) for pid in roots])
    return Tally(pss, rss, processes, held / count, took, dropped / count)


async def _bare(ctx: Context, count: int) -> Tally:
    dirs = BareDirs(ctx.home)
    started: list[BareSandbox] = []
    try:
        available = mem_available()
        for _ in range(count):
            started.append(await start_bare(dirs, ["sleep", "infinity"]))
        await trio.sleep(SETTLE)
        dropped = available - mem_available()
        pss, rss, processes = _tally([sandbox_pids(bare.pid) for bare in started])
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for bare in started:
                    nursery.start_soon(bare.aclose)
        dirs.remove()
    return Tally(pss, rss, processes, 0.0, 0.0, dropped / count)


def _rows(ctx: Context, count: int, ours: Tally, bare: Tally) -> None:
    base = "bare bwrap, same flags, running sleep"
    per = ours.processes / count
    ctx.emit(
        Row(
            "memory",
            f"memory per live sandbox, PSS ({count} live)",
            Unit.BYTES,
            Stat.of(ours.pss),
            base,
            Stat.of(bare.pss),
            at_most(TARGET, Unit.BYTES),
            note=f"{per:.1f} processes per sandbox (outer bwrap, pid-namespace init, agent); "
            f"the orchestrator's Python heap holds {ours.orchestrator / 1024:.0f} KiB more "
            f"per sandbox; the {count} creates ({CREATE_BATCH} at a time, tracemalloc on) took "
            f"{ours.took:.1f} s",
        )
    )
    ctx.emit(
        Row(
            "memory",
            f"memory per live sandbox, RSS ({count} live)",
            Unit.BYTES,
            Stat.of(ours.rss),
            base,
            Stat.of(bare.rss),
            note="RSS counts shared pages (the interpreter, libraries) in full for every "
            "sandbox; PSS shares them out",
        )
    )
    ctx.emit(
        Row(
            "memory",
            f"host MemAvailable drop per sandbox ({count} live)",
            Unit.BYTES,
            Stat.single(ours.host_drop),
            base,
            Stat.single(bare.host_drop),
            note="everything a sandbox costs the host, kernel memory (namespaces, mounts, "
            "page tables) and the orchestrator included; one figure per run, noisy",
        )
    )


async def run_memory(ctx: Context) -> None:
    counts = [ctx.n(100, 10)]
    if ctx.big:
        counts.append(1000)
    if ctx.local_reason is not None:
        ctx.emit(
            Row(
                "memory",
                "memory per live sandbox",
                Unit.BYTES,
                skipped=f"skipped: {ctx.local_reason}",
            )
        )
        return
    estimate = float(GUESS)
    for count in counts:
        need = count * estimate * 1.25 + GIB
        free = mem_available()
        if need > free:
            ctx.emit(
                Row(
                    "memory",
                    f"memory per live sandbox, PSS ({count} live)",
                    Unit.BYTES,
                    target=at_most(TARGET, Unit.BYTES),
                    skipped=f"skipped: needs ~{need / GIB:.1f} GiB, {free / GIB:.1f} GiB available",
                )
            )
            continue
        ours = await _sandboxes(ctx, count)
        bare = await _bare(ctx, count)
        _rows(ctx, count, ours, bare)
        # what one more sandbox costs the host, from what these cost (the MemAvailable
        # drop moves with whatever else runs here: not a basis for the estimate)
        estimate = Stat.of(ours.pss).p50 + max(ours.orchestrator, 0.0) + KERNEL_ALLOWANCE

"""Sandbox start-up: cold create→ready against bare bwrap, its breakdown, the warm pool."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

import corral
from corral.drivers.local.runtime import PKG_DIR, agent_runtime

from .bare import BareDirs, plain_bwrap, run_bare
from .context import Context
from .report import Row, Unit, at_most, ratio_at_most
from .stat import Stat, sample, timed

__all__ = ["POOL_SIZE", "pool_supported", "run_create", "run_pool", "warm_creates"]

POOL_SIZE = 8
SAME_FLAGS = "bwrap, same flags, /bin/true"


async def _cold_create(sup: corral.Supervisor, name: str, **options: Any) -> float:
    """Seconds from ``create`` to a ready sandbox; the stop and remove are not timed."""
    start = time.perf_counter_ns()
    sb = await sup.create(name, **options)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    await sb.stop()
    await sup.remove(name)
    return elapsed


async def run_create(ctx: Context) -> None:
    name = "cold create→ready"
    if ctx.local_reason is not None:
        ctx.emit(Row("create", name, Unit.SECONDS, skipped=f"skipped: {ctx.local_reason}"))
        return
    n = ctx.n(40, 8)
    dirs = BareDirs(ctx.home)
    open_dirs = BareDirs(ctx.open_dir, reachable=True)
    try:
        creates: list[float] = []
        same: list[float] = []
        plain: list[float] = []
        async with corral.open_supervisor(ctx.backend()) as sup:
            await _cold_create(sup, "warm-up")
            await run_bare(dirs, ["/bin/true"])
            await plain_bwrap()
            for index in range(n):  # A B C A B C ...: drift hits all three alike
                creates.append(await _cold_create(sup, f"cold-{index}"))
                same.append(await timed(lambda: run_bare(dirs, ["/bin/true"])))
                plain.append(await timed(plain_bwrap))
        base = Stat.of(same)
        ctx.emit(
            Row(
                "create",
                name,
                Unit.SECONDS,
                Stat.of(creates),
                SAME_FLAGS,
                base,
                ratio_at_most(3.0),
                note="create() until the agent answered its handshake; "
                "the baseline is the local driver's own bwrap plan running /bin/true",
            )
        )
        ctx.emit(
            Row(
                "create",
                "cold create→ready vs plain bwrap",
                Unit.SECONDS,
                Stat.of(creates),
                "bwrap --ro-bind / / /bin/true",
                Stat.of(plain),
            )
        )
        await _breakdown(ctx, dirs, open_dirs, base, n)
    finally:
        dirs.remove()
        open_dirs.remove()


async def _breakdown(ctx: Context, dirs: BareDirs, open_dirs: BareDirs, base: Stat, n: int) -> None:
    """Where a cold create's time goes: each step added on the same-flags sandbox."""
    exe = agent_runtime().argv[0]
    py = [exe, "-I", "-S", "-B", "-c"]
    imports = f"import sys; sys.path.insert(0, {PKG_DIR!r}); import corral.agentd.main"

    async def plan_only() -> None:
        from corral.drivers.local.bwrap import plan_sandbox

        plan = plan_sandbox(
            name="bench",
            command=["/bin/true"],
            socket_dir=dirs.run,
            workdir_host=dirs.work,
            uid=dirs.uid,
            gid=dirs.gid,
            runtime=agent_runtime(),
        )
        plan.close()
        await trio.lowlevel.checkpoint()

    steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("  breakdown: plan_sandbox() only (in-process)", plan_only),
        (
            "  breakdown: bwrap, no staging hop, /bin/true",
            lambda: run_bare(open_dirs, ["/bin/true"], runtime=False),
        ),
        ("  breakdown: bwrap, same flags, python -c pass", lambda: run_bare(dirs, [*py, "pass"])),
        ("  breakdown: bwrap, same flags, agent imports", lambda: run_bare(dirs, [*py, imports])),
        (
            "  breakdown: host python -c 'import asyncio'",
            partial(trio.run_process, [*py, "import asyncio"]),
        ),
    ]
    for label, fn in steps:
        times = await sample(fn, max(5, n // 2), warmup=1)
        ctx.emit(Row("create", label, Unit.SECONDS, Stat.of(times), SAME_FLAGS, base))


def pool_supported() -> bool:
    """Whether ``open_supervisor`` takes ``pool=`` (the warm pool)."""
    try:
        return "pool" in inspect.signature(corral.open_supervisor).parameters
    except (TypeError, ValueError):
        return False


async def _pool_refilled(sup: Any, fallback: float) -> None:
    """Wait for the pool to be full again: its own signal if it has one, else a pause."""
    for attr in ("wait_pool_ready", "pool_ready", "wait_pool_full"):
        waiter = getattr(sup, attr, None)
        if callable(waiter):
            result = waiter()
            if inspect.isawaitable(result):
                await result
                return
    await trio.sleep(fallback)


async def warm_creates(ctx: Context, n: int, refill: float) -> tuple[list[float], list[float]]:
    """create→ready times with a warm pool of ``POOL_SIZE`` host sandboxes (the pool full
    before each), and cold ones in the same supervisor (``network=True``: no pool fits).

    Raises TypeError when ``open_supervisor`` has no ``pool=`` yet.
    """
    options: dict[str, Any] = {"pool": {"host": POOL_SIZE}}
    times: list[float] = []
    cold: list[float] = []
    async with corral.open_supervisor(ctx.backend(), **options) as sup:
        await _pool_refilled(sup, refill)
        await _cold_create(sup, "cold-warm-up", network=True)
        for index in range(n):
            start = time.perf_counter_ns()
            sb = await sup.create(f"warm-{index}")
            times.append((time.perf_counter_ns() - start) / 1e9)
            await sb.stop()
            await sup.remove(f"warm-{index}")
            await _pool_refilled(sup, refill)
            if index % 2 == 0:  # A B A B: the same drift for both
                cold.append(await _cold_create(sup, f"cold-{index}", network=True))
                await _pool_refilled(sup, refill)
    return times, cold


async def run_pool(ctx: Context) -> None:
    name = "warm create→ready (pool of 8)"
    target = at_most(1e-3, Unit.SECONDS)
    if ctx.local_reason is not None:
        ctx.emit(
            Row("pool", name, Unit.SECONDS, target=target, skipped=f"skipped: {ctx.local_reason}")
        )
        return
    if not pool_supported():
        ctx.emit(Row("pool", name, Unit.SECONDS, target=target, skipped="n/a (no pool yet)"))
        return
    n = ctx.n(40, 8)
    try:
        times, cold = await warm_creates(ctx, n, refill=1.0)
    except TypeError as exc:
        ctx.emit(
            Row("pool", name, Unit.SECONDS, target=target, skipped=f"n/a (no pool yet: {exc})")
        )
        return
    ctx.emit(
        Row(
            "pool",
            name,
            Unit.SECONDS,
            Stat.of(times),
            "cold create→ready, same supervisor",
            Stat.of(cold),
            target=target,
            note="create() returning a running sandbox claimed from a full pool "
            "(renamed: record, directory, hostname; its actor takes the create's options); "
            "the pool refills between samples; the baseline is a cold create "
            "(network=True, so no pool fits) alternating with them",
        )
    )

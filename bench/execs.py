"""Exec: one round trip against ``trio.run_process``, fan-out over many sandboxes, and
reference rows (``subprocess.run``, podman)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

import corral
from corral.errors import Runtime

from .context import Context
from .report import Row, Unit, at_least, ratio_at_most
from .stat import Stat, paired

__all__ = ["CREATE_BATCH", "create_many", "run_exec", "run_fanout", "run_reference"]

T = TypeVar("T")
CREATE_BATCH = 25
"""Sandboxes created at once when many are needed."""


async def _host_true() -> None:
    await trio.run_process(["true"])


async def run_exec(ctx: Context) -> None:
    name = "exec `true` round trip"
    if ctx.local_reason is not None:
        ctx.emit(Row("exec", name, Unit.SECONDS, skipped=f"skipped: {ctx.local_reason}"))
        return
    n = ctx.n(300, 60)
    async with corral.open_supervisor(ctx.backend()) as sup:
        sb = await sup.create("exec")

        async def in_sandbox() -> None:
            result = await sb.exec("true")
            if result.exit_code != 0:
                raise Runtime(f"true exited {result.exit_code} in the sandbox")

        ours, host = await paired(in_sandbox, _host_true, n, warmup=5)
    ctx.emit(
        Row(
            "exec",
            name,
            Unit.SECONDS,
            Stat.of(ours),
            "host trio.run_process(['true'])",
            Stat.of(host),
            ratio_at_most(1.5),
        )
    )


async def create_many(
    sup: corral.Supervisor, count: int, prefix: str, batch: int = CREATE_BATCH
) -> float:
    """Create ``count`` sandboxes, ``batch`` at a time; seconds it took."""
    start = time.perf_counter_ns()
    for first in range(0, count, batch):
        async with trio.open_nursery() as nursery:
            for index in range(first, min(first + batch, count)):
                nursery.start_soon(sup.create, f"{prefix}-{index}")
    return (time.perf_counter_ns() - start) / 1e9


async def _fan_out(runners: Sequence[T], per: int, one: Callable[[T], Awaitable[object]]) -> float:
    """Execs per second: every runner does ``per`` calls of ``one(runner)``, all at once."""

    async def worker(runner: T) -> None:
        for _ in range(per):
            await one(runner)

    start = time.perf_counter_ns()
    async with trio.open_nursery() as nursery:
        for runner in runners:
            nursery.start_soon(worker, runner)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    return len(runners) * per / elapsed


async def run_fanout(ctx: Context) -> None:
    count = ctx.n(100, 10)
    name = f"fan-out: execs/s over {count} sandboxes"
    target = at_least(1000, Unit.PER_SECOND)
    if ctx.local_reason is not None:
        ctx.emit(
            Row(
                "fanout",
                name,
                Unit.PER_SECOND,
                target=target,
                skipped=f"skipped: {ctx.local_reason}",
            )
        )
        return
    per = ctx.n(10, 5)
    rounds = ctx.n(5, 2)
    ours: list[float] = []
    host: list[float] = []

    async def sandbox_true(sb: corral.Sandbox) -> None:
        result = await sb.exec("true")
        if result.exit_code != 0:
            raise Runtime(f"true exited {result.exit_code} in the sandbox")

    async def host_true(_: int) -> None:
        await _host_true()

    async with corral.open_supervisor(ctx.backend()) as sup:
        took = await create_many(sup, count, "fan")
        sandboxes = [await sup.get(info.name) for info in await sup.list()]
        lanes = list(range(count))
        await _fan_out(sandboxes, 1, sandbox_true)  # warm-up
        await _fan_out(lanes, 1, host_true)
        for _ in range(rounds):
            ours.append(await _fan_out(sandboxes, per, sandbox_true))
            host.append(await _fan_out(lanes, per, host_true))
    ctx.emit(
        Row(
            "fanout",
            name,
            Unit.PER_SECOND,
            Stat.of(ours),
            f"host trio.run_process fan-out, {count} at once",
            Stat.of(host),
            target,
            note=f"{rounds} rounds of {count} x {per} execs of `true`; creating the {count} "
            f"sandboxes ({CREATE_BATCH} at a time) took {took:.2f} s",
        )
    )


async def run_reference(ctx: Context) -> None:
    n = ctx.n(100, 20)

    async def blocking_true() -> None:
        subprocess.run(["true"], check=True)  # noqa: ASYNC221 - it is the reference
        await trio.lowlevel.checkpoint()

    sync, host = await paired(blocking_true, _host_true, n, warmup=3)
    ctx.emit(
        Row(
            "reference",
            "reference: subprocess.run(['true'])",
            Unit.SECONDS,
            Stat.of(sync),
            "host trio.run_process(['true'])",
            Stat.of(host),
        )
    )
    podman = shutil.which("podman")
    name = "reference: podman run --rm IMAGE true"
    if podman is None:
        ctx.emit(Row("reference", name, Unit.SECONDS, skipped="skipped: podman is not installed"))
        return
    images = await trio.run_process(
        [podman, "images", "--format", "{{.Repository}}:{{.Tag}}"],
        capture_stdout=True,
        check=False,
    )
    listed = images.stdout.decode().split()
    image = next((line for line in listed if "<none>" not in line), None)
    if image is None:
        ctx.emit(
            Row(
                "reference",
                name,
                Unit.SECONDS,
                skipped="skipped: podman has no local image (no pulls here)",
            )
        )
        return

    async def podman_true() -> None:
        await trio.run_process([podman, "run", "--rm", "--network=none", image, "true"])

    times, host = await paired(podman_true, _host_true, ctx.n(10, 3), warmup=1)
    ctx.emit(
        Row(
            "reference",
            name.replace("IMAGE", image),
            Unit.SECONDS,
            Stat.of(times),
            "host trio.run_process(['true'])",
            Stat.of(host),
        )
    )

"""Exec round trip through ``corral serve`` on loopback against a local exec.

``corral serve`` runs in this process (hypercorn on 127.0.0.1, port 0) on its own local
supervisor. Two clients, each its own row, whichever are installed: the released
microsandbox client (PyPI ``microsandbox``, run in a worker thread with its own asyncio
loop) and corral's own cloud driver (``corral.drivers.cloud``; the row says n/a until it
exists). A failing client gives a "failed" row, not a failed family.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

import corral

from .context import Context
from .report import Row, Unit
from .stat import Stat, sample

__all__ = ["msb_client_execs", "run_cloud"]

NAME = "bench-cloud"
SHORT = {
    "released microsandbox client": "msb client",
    "corral cloud driver": "corral cloud driver",
}


def msb_client_execs(url: str, api_key: str, n: int, warmup: int) -> list[float]:
    """In a thread: the microsandbox SDK creates a sandbox, times ``n`` execs of
    ``true`` (after ``warmup``), then stops and removes it."""
    import microsandbox as msb  # an optional dependency (the test extra)

    msb.set_default_backend(msb.BackendKind.CLOUD, url=url, api_key=api_key)

    async def main() -> list[float]:
        sb = await msb.Sandbox.create(NAME, image="host")
        try:
            times: list[float] = []
            for index in range(warmup + n):
                start = time.perf_counter_ns()
                out = await sb.exec("true")
                elapsed = (time.perf_counter_ns() - start) / 1e9
                if out.exit_code != 0:
                    raise RuntimeError(f"true exited {out.exit_code} through corral serve")
                if index >= warmup:
                    times.append(elapsed)
            return times
        finally:
            handle = await msb.Sandbox.get(NAME)
            await handle.stop()
            await msb.Sandbox.remove(NAME)

    return asyncio.run(main())


async def _driver_execs(url: str, api_key: str, n: int, warmup: int) -> list[float]:
    backend = corral.CloudBackend(url, api_key)
    async with corral.open_supervisor(backend) as sup:
        sb = await sup.create(NAME)
        return await sample(lambda: sb.exec("true"), n, warmup=warmup)


def _cloud_driver_present() -> bool:
    try:
        return importlib.util.find_spec("corral.drivers.cloud") is not None
    except ImportError:
        return False


@asynccontextmanager
async def _server(ctx: Context) -> AsyncIterator[tuple[str, str]]:
    from corral.server.host import CorralHost
    from corral.server.run import ServeInfo, serve

    backend = corral.LocalBackend(home=ctx.root / "serve-home")

    @asynccontextmanager
    async def host() -> AsyncIterator[Any]:
        async with corral.open_supervisor(backend) as sup:
            yield CorralHost(sup)

    async with trio.open_nursery() as nursery:
        run = partial(
            serve,
            ctx.root / "serve-data",
            host="127.0.0.1",
            port=0,
            sandbox_host=host,
            announce=None,
        )
        info: ServeInfo = await nursery.start(run)
        assert info.first_key is not None
        try:
            yield info.url, info.first_key
        finally:
            nursery.cancel_scope.cancel()


async def run_cloud(ctx: Context) -> None:
    name = "cloud exec `true` via corral serve"
    if ctx.local_reason is not None:
        ctx.emit(Row("cloud", name, Unit.SECONDS, skipped=f"skipped: {ctx.local_reason}"))
        return
    n = ctx.n(200, 30)
    have_msb = importlib.util.find_spec("microsandbox") is not None
    have_driver = _cloud_driver_present()
    if not (have_msb or have_driver):
        ctx.emit(
            Row(
                "cloud",
                name,
                Unit.SECONDS,
                skipped="skipped: no corral cloud driver and no microsandbox client",
            )
        )
        return
    local: list[float] = []
    remote: dict[str, list[float] | str] = {}
    async with corral.open_supervisor(ctx.backend()) as sup:
        sb = await sup.create("local-exec")
        local += await sample(lambda: sb.exec("true"), n // 2, warmup=5)
        async with _server(ctx) as (url, key):
            if have_msb:
                remote["released microsandbox client"] = await trio.to_thread.run_sync(
                    msb_client_execs, url, key, n, 5
                )
            if have_driver:
                try:
                    remote["corral cloud driver"] = await _driver_execs(url, key, n, 5)
                except Exception as exc:
                    remote["corral cloud driver"] = f"failed: {type(exc).__name__}: {exc}"[:160]
        local += await sample(lambda: sb.exec("true"), n - n // 2, warmup=0)
    base = Stat.of(local)
    for path, got in remote.items():
        label = f"{name} ({SHORT[path]})"
        if isinstance(got, str):
            ctx.emit(Row("cloud", label, Unit.SECONDS, skipped=got))
            continue
        ctx.emit(
            Row(
                "cloud",
                label,
                Unit.SECONDS,
                Stat.of(got),
                "local exec `true` (same run)",
                base,
                note=f"client: the {path}, on 127.0.0.1; the local baseline was sampled before "
                "and after",
            )
        )
    if not have_driver:
        ctx.emit(
            Row(
                "cloud",
                f"{name}, corral cloud driver",
                Unit.SECONDS,
                skipped="n/a (no corral cloud driver yet)",
            )
        )

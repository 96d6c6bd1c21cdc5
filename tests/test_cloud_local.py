"""The cloud driver against ``corral serve`` on real bubblewrap sandboxes (integration).

corral serve runs in-process on 127.0.0.1 port 0 with corral's supervisor on the local
driver; the client is ``open_supervisor(CloudBackend(url, key))``. The last test
measures the exec round trip through corral serve next to a local exec in the same run.
"""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import corral
from corral.actors.state import SandboxStatus
from corral.backend import CloudBackend, LocalBackend
from corral.drivers.cloud import CloudDriver
from corral.errors import FsNotFound, SandboxNotFound
from corral.protocol import ExecStdout
from corral.server.host import CorralHost
from corral.server.run import ServeInfo, serve
from corral.testing import processes_matching, wait_until

pytestmark = pytest.mark.integration

ROUNDS = 200


@asynccontextmanager
async def local_serve(tmp_path: Path, backend: LocalBackend) -> AsyncIterator[ServeInfo]:
    @asynccontextmanager
    async def local_host() -> AsyncIterator[CorralHost]:
        async with corral.open_supervisor(backend) as sup:
            yield CorralHost(sup)

    async with trio.open_nursery() as nursery:
        info: ServeInfo = await nursery.start(
            partial(serve, tmp_path / "srv", port=0, sandbox_host=local_host, announce=None)
        )
        yield info
        nursery.cancel_scope.cancel()


def cloud(info: ServeInfo) -> CloudBackend:
    assert info.first_key is not None
    return CloudBackend(info.url, info.first_key)


async def test_real_sandbox_lifecycle_exec_stream_and_fs_over_cloud(
    tmp_path: Path, local_backend: LocalBackend
) -> None:
    marker = f"corral-cloud-{time.monotonic_ns()}"
    with trio.fail_after(120):
        async with local_serve(tmp_path, local_backend) as info:
            async with corral.open_supervisor(cloud(info)) as sup:
                sb = await sup.create("real", env={"A": "1"})
                out = await sb.exec("sh", ["-c", "echo $A; echo err >&2; exit 3"])
                assert (out.exit_code, out.stdout, out.stderr) == (3, b"1\n", b"err\n")
                assert (await sb.exec("cat", stdin=b"piped\n")).stdout == b"piped\n"
                assert (await sb.exec("id", ["-u"])).stdout != b"0\n"

                async with sb.exec_stream("cat") as proc:
                    await proc.send_stdin(b"through the relay\n")
                    await proc.close_stdin()
                    chunks = [ev.data async for ev in proc if isinstance(ev, ExecStdout)]
                assert b"".join(chunks) == b"through the relay\n"
                async with sb.exec_stream("sh", ["-c", f"sleep 30; : {marker}"]) as proc:
                    assert await wait_until(lambda: bool(processes_matching(marker)), timeout=5)
                    await proc.signal(signal.SIGTERM)
                    assert await proc.wait() != 0
                assert await wait_until(lambda: not processes_matching(marker), timeout=5)

                await sb.fs.write("/workspace/f.txt", b"x" * 3_000_000)  # several chunks
                assert await sb.fs.read("/workspace/f.txt") == b"x" * 3_000_000
                assert (await sb.exec("wc", ["-c", "/workspace/f.txt"])).stdout.startswith(
                    b"3000000"
                )
                await sb.fs.mkdir("/workspace/d")
                await sb.fs.rename("/workspace/f.txt", "/workspace/d/g.txt")
                assert [e.path.rsplit("/", 1)[-1] for e in await sb.fs.list("/workspace/d")] == [
                    "g.txt"
                ]
                with pytest.raises(FsNotFound):
                    await sb.fs.stat("/workspace/f.txt")

                driver = sup.driver
                assert isinstance(driver, CloudDriver)
                sid = (await driver.get_by_name("real")).id
                await sb.stop()
                assert sb.status is SandboxStatus.STOPPED
                with pytest.raises(SandboxNotFound):
                    await driver.get(sid)


async def test_a_sandbox_left_running_is_stopped_and_removed_on_exit(
    tmp_path: Path, local_backend: LocalBackend
) -> None:
    marker = f"corral-left-{time.monotonic_ns()}"
    with trio.fail_after(120):
        async with local_serve(tmp_path, local_backend) as info:
            with pytest.raises(RuntimeError, match="boom"):
                async with corral.open_supervisor(cloud(info)) as sup:
                    sb = await sup.create("left")
                    async with sb.exec_stream("sh", ["-c", f"sleep 300; : {marker}"]):
                        assert await wait_until(lambda: bool(processes_matching(marker)), timeout=5)
                        raise RuntimeError("boom")
            assert await wait_until(lambda: not processes_matching(marker), timeout=20)
            async with CloudDriver(cloud(info)) as driver:
                with pytest.raises(SandboxNotFound):
                    await driver.get_by_name("left")


async def median_rtt(run: Callable[[], Any], rounds: int = ROUNDS) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


async def test_exec_round_trip_over_cloud_next_to_local(
    tmp_path: Path, local_backend: LocalBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(300):
        async with corral.open_supervisor(local_backend) as sup:
            sb = await sup.create("rtt-local")
            await sb.exec("true")
            local_ms = await median_rtt(partial(sb.exec, "true"))
            await sb.stop()
        async with local_serve(tmp_path, local_backend) as info:
            async with corral.open_supervisor(cloud(info)) as sup:
                sb = await sup.create("rtt-cloud")
                await sb.exec("true")  # the agent socket is opened on first use
                cloud_ms = await median_rtt(partial(sb.exec, "true"))
                await sb.stop()
    with capsys.disabled():
        print(
            f"\nexec round trip, median of {ROUNDS} (/bin/true): local {local_ms:.2f} ms,"
            f" through corral serve on loopback {cloud_ms:.2f} ms"
        )
    assert cloud_ms < 100 and local_ms < 100

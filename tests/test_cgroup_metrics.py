"""metrics.py over fake cgroup files: arithmetic, file formats, the stream."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from corral.drivers.local.cgroup import CgroupLayout, Hierarchy, SandboxCgroup
from corral.drivers.local.metrics import (
    MetricsSampler,
    SandboxMetrics,
    parse_blkio,
    parse_io_stat,
    parse_net_dev,
)
from corral.errors import InvalidConfig

NET_DEV = (
    "Inter-|   Receive                        |  Transmit\n"
    " face |bytes packets errs drop fifo frame compressed multicast|bytes packets ...\n"
    "    lo: 5000 10 0 0 0 0 0 0 5000 10 0 0 0 0 0 0\n"
    "  eth0: 1200  3 0 0 0 0 0 0  800  2 0 0 0 0 0 0\n"
    " veth1:   34  1 0 0 0 0 0 0   66  1 0 0 0 0 0 0\n"
)


def test_parsers() -> None:
    io_stat = "8:0 rbytes=100 wbytes=20 rios=1 wios=1 dbytes=0 dios=0\n254:0 rbytes=5 wbytes=5\n"
    assert parse_io_stat(io_stat) == (105, 25)
    assert parse_io_stat("") == (0, 0) and parse_io_stat(None) is None
    blkio = "8:0 Read 4096\n8:0 Write 512\n8:0 Sync 0\n8:0 Total 4608\nTotal 4608\n"
    assert parse_blkio(blkio) == (4096, 512)
    assert parse_blkio("") is None
    assert parse_net_dev(NET_DEV) == (1234, 866)  # lo left out
    assert parse_net_dev(None) is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _fake_cgroup(tmp: Path, version: int) -> SandboxCgroup:
    controllers = frozenset({"cpu", "memory", "pids", "io" if version == 2 else "blkio"})
    if version == 1:
        controllers |= {"cpuacct"}
    h = Hierarchy(2 if version == 2 else 1, tmp, controllers, tmp)
    return SandboxCgroup(CgroupLayout((h,)), "leaf", {h: tmp})


def test_v2_sample_and_cpu_percent(tmp_path: Path) -> None:
    cg = _fake_cgroup(tmp_path, 2)
    (tmp_path / "cpu.stat").write_text("usage_usec 2000000\nuser_usec 1500000\n")
    (tmp_path / "memory.current").write_text("52428800\n")
    (tmp_path / "memory.max").write_text("67108864\n")
    (tmp_path / "pids.current").write_text("7\n")
    (tmp_path / "io.stat").write_text("8:0 rbytes=10 wbytes=20 rios=1 wios=1\n")
    clock = Clock()
    sampler = MetricsSampler(cgroup=cg, started_at=96.0, clock=clock)
    first = sampler.sample()
    assert first == SandboxMetrics(
        cpu_percent=50.0,  # 2 s of CPU over 4 s of life
        memory_bytes=50 << 20,
        memory_limit_bytes=64 << 20,
        pids=7,
        uptime_s=4.0,
        disk_read_bytes=10,
        disk_write_bytes=20,
    )
    clock.now += 0.5
    (tmp_path / "cpu.stat").write_text("usage_usec 2750000\n")
    second = sampler.sample()
    assert second.cpu_percent == pytest.approx(150.0)  # 0.75 s over 0.5 s: 1.5 CPUs
    assert second.uptime_s == pytest.approx(4.5)
    clock.now += 1.0
    (tmp_path / "memory.max").write_text("max\n")
    third = sampler.sample()
    assert third.cpu_percent == 0.0 and third.memory_limit_bytes is None


def test_v1_sample(tmp_path: Path) -> None:
    cg = _fake_cgroup(tmp_path, 1)
    (tmp_path / "cpuacct.usage").write_text("1000000000\n")
    (tmp_path / "memory.usage_in_bytes").write_text("4096\n")
    (tmp_path / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "pids.current").write_text("2\n")
    (tmp_path / "blkio.throttle.io_service_bytes_recursive").write_text("Total 0\n")
    (tmp_path / "blkio.io_service_bytes_recursive").write_text("8:0 Read 7\n8:0 Write 9\n")
    sampler = MetricsSampler(cgroup=cg, memory_limit_bytes=1 << 30, started_at=90.0, clock=Clock())
    got = sampler.sample()
    assert got.cpu_percent == pytest.approx(10.0)  # 1 s over 10 s
    assert got.memory_bytes == 4096 and got.pids == 2
    assert got.memory_limit_bytes == 1 << 30  # the cgroup has none: the configured one
    assert (got.disk_read_bytes, got.disk_write_bytes) == (0, 0)  # throttle file wins
    assert got.net_rx_bytes is None and got.source == "cgroup"


def test_missing_files_are_none(tmp_path: Path) -> None:
    got = MetricsSampler(cgroup=_fake_cgroup(tmp_path, 2), clock=Clock()).sample()
    assert got.cpu_percent is None and got.memory_bytes is None and got.pids is None
    assert got.disk_read_bytes is None and got.uptime_s == 0.0


def test_proc_fallback_for_this_process() -> None:
    got = MetricsSampler(init_pid=os.getpid()).sample()
    assert got.source == "proc"
    assert got.pids is not None and got.pids >= 1
    assert got.memory_bytes is not None and got.memory_bytes > 1 << 20
    assert got.uptime_s is not None and got.uptime_s > 0
    assert got.cpu_percent is not None and got.cpu_percent > 0
    assert got.net_rx_bytes is None  # our own netns is the host's: not reported
    gone = MetricsSampler(init_pid=99_999_999).sample()
    assert gone.pids == 0 and gone.memory_bytes is None and gone.cpu_percent is None


def test_sampler_needs_something_to_sample() -> None:
    with pytest.raises(InvalidConfig):
        MetricsSampler()


async def test_stream_samples_every_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cg = _fake_cgroup(tmp_path, 2)
    (tmp_path / "pids.current").write_text("1\n")
    sampler = MetricsSampler(cgroup=cg, clock=trio.current_time)
    times: list[float] = []
    seen: list[int | None] = []
    with trio.fail_after(60):
        stream = sampler.stream(interval=2.5)
        async for sample in stream:
            times.append(trio.current_time())
            seen.append(sample.pids)
            (tmp_path / "pids.current").write_text(f"{len(seen) + 1}\n")
            if len(seen) == 3:
                break
        await stream.aclose()
    assert seen == [1, 2, 3]
    assert [t - times[0] for t in times] == [0.0, 2.5, 5.0]
    with pytest.raises(InvalidConfig):
        await sampler.stream(interval=0).__anext__()

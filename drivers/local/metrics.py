"""Resource metrics of one local sandbox: from its cgroup, or from /proc as a fallback.

``cpu_percent`` is relative to one CPU (200.0 = two CPUs busy). The first sample of a
:class:`MetricsSampler` gives the average since the sandbox started; each later one the
average since the previous sample. ``memory_bytes`` is the cgroup's charge (anonymous
memory plus page cache) or, from /proc, the sum of the processes' PSS. ``pids`` counts
tasks (threads included) from ``pids.current``, processes from /proc. Disk counters are
bytes that reached block devices; net counters come from the sandbox's own network
namespace (``/proc/<init>/net/dev``, loopback excluded) and are None when it shares the
host's. Anything that cannot be read here is None.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from corral.errors import InvalidConfig

from .cgroup import SandboxCgroup, keyed
from .launch import sandbox_pids

__all__ = ["MetricsSampler", "SandboxMetrics", "parse_blkio", "parse_io_stat", "parse_net_dev"]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class SandboxMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """One sample; None where unknown. ``source`` is ``"cgroup"`` or ``"proc"``."""

    cpu_percent: float | None = None
    memory_bytes: int | None = None
    memory_limit_bytes: int | None = None
    pids: int | None = None
    uptime_s: float | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    source: str = "cgroup"


def parse_io_stat(text: str | None) -> tuple[int, int] | None:
    """(read, write) bytes summed over the devices of a v2 ``io.stat``."""
    if text is None:
        return None
    read = write = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key == "rbytes" and value.isdigit():
                read += int(value)
            elif key == "wbytes" and value.isdigit():
                write += int(value)
    return read, write


def parse_blkio(text: str | None) -> tuple[int, int] | None:
    """(read, write) bytes from a v1 ``blkio.*io_service_bytes*`` file."""
    if not text:
        return None
    read = write = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            if parts[1] == "Read":
                read += int(parts[2])
            elif parts[1] == "Write":
                write += int(parts[2])
    return read, write


def parse_net_dev(text: str | None) -> tuple[int, int] | None:
    """(rx, tx) bytes over the interfaces of a ``/proc/net/dev``, loopback excluded."""
    if text is None:
        return None
    rx = tx = 0
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or name.strip() == "lo" or len(fields) < 9:
            continue
        rx += int(fields[0])
        tx += int(fields[8])
    return rx, tx


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    text = _read(f"/proc/{pid}/stat")
    return None if text is None else text.rsplit(")", 1)[1].split()


def _pid_uptime(pid: int) -> float | None:
    fields, boot = _proc_stat(pid), _read("/proc/uptime")
    if fields is None or boot is None:
        return None
    return max(0.0, float(boot.split()[0]) - int(fields[19]) / _TICKS)


def _net(init_pid: int) -> tuple[int, int] | None:
    try:
        if os.stat(f"/proc/{init_pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            return None  # the host's network: its counters are not the sandbox's
    except OSError:
        return None
    return parse_net_dev(_read(f"/proc/{init_pid}/net/dev"))


def _pss(pid: int) -> int | None:
    rollup = _read(f"/proc/{pid}/smaps_rollup")
    for line in (rollup or "").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    statm = _read(f"/proc/{pid}/statm")
    return None if statm is None else int(statm.split()[1]) * _PAGE


@dataclass
class _Reading:
    cpu_s: float | None = None
    memory_bytes: int | None = None
    memory_limit_bytes: int | None = None
    pids: int | None = None
    disk: tuple[int, int] | None = None
    source: str = "cgroup"


def _int(text: str | None) -> int | None:
    raw = (text or "").strip()
    return int(raw) if raw.isdigit() else None


class MetricsSampler:
    """Samples one sandbox: from ``cgroup`` when given, else from /proc over the
    processes under ``init_pid`` (``launch.sandbox_pids``).

    ``init_pid`` (the sandbox's pid-namespace init, host pid) gives uptime and net
    counters; ``memory_limit_bytes`` is reported when the cgroup has no limit to read
    (the rlimit fallback). ``clock`` is for tests.
    """

    def __init__(
        self,
        *,
        cgroup: SandboxCgroup | None = None,
        init_pid: int | None = None,
        memory_limit_bytes: int | None = None,
        started_at: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cgroup is None and init_pid is None:
            raise InvalidConfig("MetricsSampler needs a cgroup or an init pid")
        self.cgroup = cgroup
        self.init_pid = init_pid
        self.memory_limit_bytes = memory_limit_bytes
        self._clock = clock
        self._started = clock() if started_at is None else started_at
        self._last: tuple[float, float] | None = None  # (wall, cpu seconds)

    def sample(self) -> SandboxMetrics:
        """Read every counter now (plain file reads: fast, no await needed)."""
        now = self._clock()
        uptime = None if self.init_pid is None else _pid_uptime(self.init_pid)
        if uptime is None:
            uptime = max(0.0, now - self._started)
        got = self._from_cgroup(self.cgroup) if self.cgroup is not None else self._from_proc()
        percent = None
        if got.cpu_s is not None:
            if self._last is None:
                percent = 100.0 * got.cpu_s / uptime if uptime > 0 else None
            elif now > self._last[0]:
                percent = 100.0 * max(0.0, got.cpu_s - self._last[1]) / (now - self._last[0])
            self._last = (now, got.cpu_s)
        net = None if self.init_pid is None else _net(self.init_pid)
        limit = got.memory_limit_bytes
        return SandboxMetrics(
            cpu_percent=percent,
            memory_bytes=got.memory_bytes,
            memory_limit_bytes=self.memory_limit_bytes if limit is None else limit,
            pids=got.pids,
            uptime_s=uptime,
            disk_read_bytes=None if got.disk is None else got.disk[0],
            disk_write_bytes=None if got.disk is None else got.disk[1],
            net_rx_bytes=None if net is None else net[0],
            net_tx_bytes=None if net is None else net[1],
            source=got.source,
        )

    def _from_cgroup(self, cg: SandboxCgroup) -> _Reading:
        got = _Reading()
        usage = keyed(cg.read("", "cpu.stat"), "usage_usec")
        if usage is None and cg.version_of("cpu") == 2:
            usage = keyed(cg.read("cpu", "cpu.stat"), "usage_usec")
        if usage is not None:
            got.cpu_s = usage / 1e6
        elif (nanos := _int(cg.read("cpuacct", "cpuacct.usage"))) is not None:
            got.cpu_s = nanos / 1e9
        v2_memory = cg.version_of("memory") == 2
        got.memory_bytes = _int(
            cg.read("memory", "memory.current" if v2_memory else "memory.usage_in_bytes")
        )
        got.memory_limit_bytes = cg.memory_limit_bytes()
        got.pids = _int(cg.read("pids", "pids.current"))
        if cg.version_of("io") == 2:
            got.disk = parse_io_stat(cg.read("io", "io.stat"))
        else:
            got.disk = parse_blkio(
                cg.read("blkio", "blkio.throttle.io_service_bytes_recursive")
            ) or parse_blkio(cg.read("blkio", "blkio.io_service_bytes_recursive"))
        return got

    def _from_proc(self) -> _Reading:
        assert self.init_pid is not None
        pids = sandbox_pids(self.init_pid)
        got = _Reading(pids=len(pids), source="proc")
        if not pids:
            return got
        ticks = memory = read = write = 0
        io_known = True
        for pid in pids:
            fields = _proc_stat(pid)
            if fields is not None:  # utime, stime, cutime, cstime
                ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
            memory += _pss(pid) or 0
            io: dict[str, int] = {}
            for line in (_read(f"/proc/{pid}/io") or "").splitlines():
                key, _, value = line.partition(": ")
                if value.strip().isdigit():
                    io[key] = int(value)
            io_known = io_known and "read_bytes" in io
            read += io.get("read_bytes", 0)
            write += io.get("write_bytes", 0)
        got.cpu_s = ticks / _TICKS
        got.memory_bytes = memory
        got.disk = (read, write) if io_known else None
        return got

    async def stream(self, interval: float = 1.0) -> AsyncGenerator[SandboxMetrics, None]:
        """A sample now, then one every ``interval`` seconds (for ``metrics_stream``)."""
        if not interval > 0:
            raise InvalidConfig(f"metrics interval must be > 0 seconds, got {interval!r}")
        while True:
            yield self.sample()
            await trio.sleep(interval)

"""Process facts from /proc: memory of a process tree, our own RSS, what is left over."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from corral.drivers.local.launch import sandbox_pids
from corral.testing import processes_matching

__all__ = [
    "Memory",
    "leftovers",
    "mem_available",
    "reset_peak_rss",
    "self_peak_rss",
    "self_rss",
    "tree_memory",
    "wait_no_leftovers",
]


@dataclass(frozen=True)
class Memory:
    rss: int
    pss: int
    processes: int


def _rollup(pid: int) -> tuple[int, int] | None:
    """(Rss, Pss) in bytes from /proc/PID/smaps_rollup; None if the process is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return rss, pss


def tree_memory(pids: Iterable[int]) -> Memory:
    """Summed Rss and Pss of ``pids`` (those still alive)."""
    rss = pss = count = 0
    for pid in pids:
        got = _rollup(pid)
        if got is None:
            continue
        rss += got[0]
        pss += got[1]
        count += 1
    return Memory(rss, pss, count)


def _status_kb(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def self_rss() -> int:
    return _status_kb("VmRSS")


def self_peak_rss() -> int:
    return _status_kb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset our VmHWM to the current RSS (``clear_refs`` 5); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def leftovers(marker: str) -> list[int]:
    """Our live descendants, and any process whose command line names ``marker``."""
    me = os.getpid()
    found = {pid for pid in sandbox_pids(me) if pid != me}
    found.update(processes_matching(marker))
    return sorted(found)


async def wait_no_leftovers(marker: str, timeout: float = 5.0) -> list[int]:
    """Wait (polling /proc: other processes give no event) until nothing is left."""
    with trio.move_on_after(timeout):
        while leftovers(marker):  # noqa: ASYNC110
            await trio.sleep(0.05)
    return leftovers(marker)

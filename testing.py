"""Helpers for tests of code that uses corral (and corral's own tests)."""

from __future__ import annotations

import os
from collections.abc import Callable

import trio


def local_unavailable() -> str | None:
    """Why real local sandboxes cannot run on this host (None when they can)."""
    from .drivers.local.launch import bwrap_available

    return bwrap_available()


def processes_matching(marker: str) -> list[int]:
    """Host pids (other than ours) whose command line contains ``marker``."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry))
    return found


def process_uids(pid: int) -> list[int]:
    """Real, effective, saved and fs uids of a host process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(u) for u in line.split()[1:]]
    raise LookupError(f"no Uid line for pid {pid}")


async def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.02
) -> bool:
    """Poll ``predicate`` until true or ``timeout``: for watching other processes, which
    give no event to wait on. Returns the last value."""
    with trio.move_on_after(timeout):
        while not predicate():  # noqa: ASYNC110 - another process's state has no event
            await trio.sleep(interval)
        return True
    return predicate()

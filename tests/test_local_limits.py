"""Resource limits on real sandboxes: memory, pids, cpu (cgroups, or rlimits without them)."""

from __future__ import annotations

import pytest
import trio

import corral
from corral.drivers.local import cgroup as cgroups

pytestmark = pytest.mark.integration

HOG = "b = bytearray(300 * 1024 * 1024); print(len(b))"
FORKS = """
import os, time
n = 0
try:
    for _ in range(200):
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        n += 1
except OSError as e:
    print("refused", e.errno, n)
else:
    print("forked", n)
"""


@pytest.fixture
def need_cgroups() -> None:
    if cgroups.detect() is None:
        pytest.skip(f"no per-sandbox cgroups here: {cgroups.why_unavailable()}")


async def test_memory_limit_kills_the_process_with_137(
    local_sup: corral.Supervisor, need_cgroups: None
) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("memcap", memory_mib=64)
        out = await sb.exec("python3", ["-c", HOG])
        assert out.exit_code == 137, out
        still = await sb.exec("echo", ["alive"])  # only the offender died
        assert still.stdout == b"alive\n"


async def test_pids_limit_stops_a_fork_bomb(
    local_sup: corral.Supervisor, need_cgroups: None
) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("pidcap", pids_limit=32)
        out = await sb.exec("python3", ["-c", FORKS])
        words = out.stdout.split()
        assert words[0] == b"refused", out
        assert int(words[2]) < 32


async def test_limits_out_of_range_are_invalid_config(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(30):
        for bad in ({"memory_mib": 1}, {"pids_limit": 0}, {"cpus": 0}, {"cpus": 10_000}):
            with pytest.raises(corral.InvalidConfig):
                await local_sup.create("badlimits", **bad)  # type: ignore[arg-type]
        assert "badlimits" not in local_sup

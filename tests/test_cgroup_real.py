"""cgroup.py and metrics.py on this host's real cgroupfs (we run as root).

Each test makes its cgroups under a parent of its own (``corral-test-<pid>``) and proves
that nothing is left behind. Without cgroup rights the module skips with the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trio

from corral.drivers.local import cgroup, launch
from corral.drivers.local.bwrap import plan_sandbox
from corral.drivers.local.cgroup import CgroupLayout, SandboxCgroup, reap_stale
from corral.drivers.local.metrics import MetricsSampler
from corral.errors import Runtime

PARENT = f"corral-test-{os.getpid()}"
_LAYOUT, _REASON = cgroup.probe(PARENT)
if _LAYOUT is None:
    print(f"cgroup tests skipped: {_REASON}")
pytestmark = pytest.mark.skipif(_LAYOUT is None, reason=f"no cgroup rights here: {_REASON}")
PY = sys.executable


def _sweep(layout: CgroupLayout) -> list[str]:
    """Kill and remove whatever a test left under its parent; say what there was."""
    left: list[str] = []
    for h in layout.hierarchies:
        if not h.parent.exists():
            continue
        left.append(str(h.parent))
        for sub in sorted((p for p in h.parent.rglob("*") if p.is_dir()), reverse=True):
            for pid in (sub / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
    for h in layout.hierarchies:
        for sub in sorted((p for p in h.parent.rglob("*") if p.is_dir()), reverse=True):
            sub.rmdir()
        if h.parent.exists():
            h.parent.rmdir()
    return left


@pytest.fixture
def layout() -> Iterator[CgroupLayout]:
    assert _LAYOUT is not None
    yield _LAYOUT
    left = _sweep(_LAYOUT)
    assert not left, f"cgroup dirs left behind: {left}"


@pytest.fixture
async def cg(layout: CgroupLayout) -> AsyncIterator[SandboxCgroup]:
    group = SandboxCgroup.create("t", cpus=1, memory_mib=64, pids_limit=32, layout=layout)
    try:
        yield group
    finally:
        with trio.fail_after(10):
            await group.remove()
    assert not any(d.exists() for d in group.dirs.values())


async def _close(process: trio.Process) -> None:
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            await stream.aclose()


async def _until(ready: Callable[[], bool]) -> None:
    """Poll kernel state (cgroup membership has no event to wait on); callers bound it."""
    while True:
        if ready():
            return
        await trio.sleep(0.01)


def _own_cgroups(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


async def test_memory_limit_kills_only_the_offender(cg: SandboxCgroup) -> None:
    hog = f"{PY} -c \"b = b'x' * (300 << 20); print('survived')\""
    script = f'{hog}; echo "rc=$?"'
    with trio.fail_after(30):
        done = await trio.run_process(cg.wrap_argv(["/bin/sh", "-c", script]), capture_stdout=True)
    assert done.stdout == b"rc=137\n"  # SIGKILLed by the OOM killer; the shell lived on
    assert cg.oom_kills() >= 1
    with trio.fail_after(30):
        direct = await trio.run_process(
            cg.wrap_argv([PY, "-c", "b = b'x' * (300 << 20)"]), check=False
        )
    assert direct.returncode == -signal.SIGKILL
    assert cg.oom_kills() >= 2
    report = cg.limit_report()
    assert report is not None and report.startswith("out of memory: the memory limit of 64 MiB")


async def test_limits_are_in_the_kernel(cg: SandboxCgroup) -> None:
    assert cg.memory_limit_bytes() == 64 << 20
    assert cg.read("pids", "pids.max") == "32\n"
    if cg.version_of("cpu") == 2:
        assert cg.read("cpu", "cpu.max") == "100000 100000\n"
    else:
        assert cg.read("cpu", "cpu.cfs_quota_us") == "100000\n"
        assert cg.read("cpu", "cpu.cfs_period_us") == "100000\n"


# Only the top process forks; children wait on a pipe and exit when it closes.
FORK_LOOP = """
import errno, os
hold_r, hold_w = os.pipe()
n = 0
try:
    for _ in range(100):
        if os.fork() == 0:
            os.close(hold_w); os.read(hold_r, 1); os._exit(0)
        n += 1
except OSError as exc:
    print(n, errno.errorcode[exc.errno], flush=True)
os.close(hold_w)
while True:
    try: os.wait()
    except ChildProcessError: break
"""


# Forks until the kernel refuses, then reports and blocks: every process of the tree
# does the same, so the tree grows to pids.max and stops. It refuses to start at all
# unless it is inside the test's cgroup, so it cannot escape.
FORK_BOMB = """
import errno, os, sys
if sys.argv[1] not in open('/proc/self/cgroup').read():
    sys.exit(3)
hold_r, hold_w = os.pipe()
for _ in range(500):
    try:
        os.fork()
    except OSError as exc:
        os.write(1, (errno.errorcode[exc.errno] + '\\n').encode())
        break
os.read(hold_r, 1)
"""


async def test_fork_bomb_stops_at_pids_limit_and_dies_with_kill_all(cg: SandboxCgroup) -> None:
    argv = cg.wrap_argv([PY, "-c", FORK_BOMB, cg.name])
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        assert process.stdout is not None
        seen = b""
        while seen.count(b"\n") < 32:  # each of the 32 processes hit the limit once
            chunk = await process.stdout.receive_some()
            assert chunk, f"bomb ended early: {seen!r}"
            seen += chunk
        assert set(seen.split()) == {b"EAGAIN"}
        assert len(cg.pids()) == 32
        assert cg.pids_limit_hits() >= 32
        await cg.kill_all()
        assert cg.pids() == []
        assert await process.wait() == -signal.SIGKILL
        await _close(process)


async def test_kill_all_without_cgroup_kill(layout: CgroupLayout) -> None:
    """The v1 loop (no cgroup.kill): SIGKILL every pid until none is left."""
    v1_only = CgroupLayout(tuple(h for h in layout.hierarchies if h.version == 1))
    if not v1_only.hierarchies:
        pytest.skip("no v1 hierarchies on this host")
    group = SandboxCgroup.create("v1", pids_limit=64, layout=v1_only)
    assert group.unified_dir is None
    with trio.fail_after(20):
        try:
            process = await trio.lowlevel.open_process(
                group.wrap_argv([PY, "-c", FORK_BOMB, group.name]), stdout=subprocess.PIPE
            )
            await _until(lambda: len(group.pids()) >= 64)
            await group.kill_all()
            assert group.pids() == []
            assert await process.wait() == -signal.SIGKILL
            await _close(process)
        finally:
            await group.remove()


async def test_v2_tracking_hierarchy_kills_with_cgroup_kill(layout: CgroupLayout) -> None:
    unified = layout.unified
    if unified is None:
        pytest.skip("no writable cgroup v2 hierarchy here")
    only_v2 = CgroupLayout((unified,))
    group = SandboxCgroup.create("v2", layout=only_v2)
    assert group.unified_dir is not None and (group.unified_dir / "cgroup.kill").exists()
    with trio.fail_after(20):
        try:
            process = await trio.lowlevel.open_process(
                group.wrap_argv(["/bin/sh", "-c", "sleep 60 & sleep 60 & wait"])
            )
            await _until(lambda: len(group.pids()) >= 3)
            sampler = MetricsSampler(cgroup=group)
            assert sampler.sample().cpu_percent is not None  # v2 cpu.stat without controllers
            await group.kill_all()
            assert await process.wait() == -signal.SIGKILL
            await _close(process)
        finally:
            await group.remove()
    assert not group.unified_dir.exists()


async def test_add_moves_a_running_process(cg: SandboxCgroup) -> None:
    with trio.fail_after(20):
        process = await trio.lowlevel.open_process(["sleep", "60"])
        try:
            assert cg.name not in _own_cgroups(process.pid)
            cg.add(process.pid)
            lines = [line for line in _own_cgroups(process.pid).splitlines() if cg.name in line]
            assert len(lines) == len(cg.dirs)  # in every hierarchy
            assert cg.pids() == [process.pid]
        finally:
            process.kill()
            await process.wait()
        with pytest.raises(Runtime, match="gone"):
            cg.add(process.pid)


async def test_metrics_from_the_cgroup_and_from_proc(cg: SandboxCgroup) -> None:
    script = (
        "import sys, time\n"
        "b = b'x' * (40 << 20)\n"
        "end = time.monotonic() + 0.3\n"
        "while time.monotonic() < end: pass\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            cg.wrap_argv([PY, "-c", script]), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            seen = b""
            while not seen.endswith(b"\n"):
                seen += await process.stdout.receive_some()
            assert seen == b"ready\n"
            sampler = MetricsSampler(cgroup=cg, init_pid=process.pid)
            first = sampler.sample()
            assert first.source == "cgroup"
            assert first.memory_bytes is not None and first.memory_bytes >= 40 << 20
            assert first.memory_limit_bytes == 64 << 20
            assert first.pids == 1
            assert first.cpu_percent is not None and first.cpu_percent > 5  # busy 0.3 s
            assert first.uptime_s is not None and first.uptime_s >= 0.3
            assert first.net_rx_bytes is None  # the host's network: not the sandbox's
            await trio.sleep(0.2)
            second = sampler.sample()
            assert second.cpu_percent is not None and second.cpu_percent < 50  # idle now
            proc = MetricsSampler(init_pid=process.pid, memory_limit_bytes=64 << 20).sample()
            assert proc.source == "proc" and proc.pids == 1
            assert proc.memory_bytes is not None and proc.memory_bytes >= 40 << 20
            assert proc.memory_limit_bytes == 64 << 20
            assert proc.disk_read_bytes is not None
        finally:
            assert process.stdin is not None
            await process.stdin.aclose()
            assert await process.wait() == 0
            await _close(process)


async def test_remove_kills_what_runs_and_is_idempotent(layout: CgroupLayout) -> None:
    group = SandboxCgroup.create("rm", memory_mib=64, layout=layout)
    with trio.fail_after(20):
        process = await trio.lowlevel.open_process(
            group.wrap_argv(["/bin/sh", "-c", "sleep 60 & sleep 60 & wait"])
        )
        await _until(lambda: len(group.pids()) >= 3)
        await group.remove()
        await group.remove()
        assert await process.wait() == -signal.SIGKILL
        await _close(process)
    assert group.removed
    assert not any(d.exists() for d in group.dirs.values())
    assert not any(h.parent.exists() for h in layout.hierarchies)  # emptied parents go too


async def test_reap_stale_removes_only_dead_owners_empty_groups(layout: CgroupLayout) -> None:
    dead = 99_999_999  # above pid_max: never a live process
    made: list[Path] = []
    for h in layout.hierarchies:
        h.parent.mkdir(exist_ok=True)
        for name in (f"old-{dead}-abcdef", f"old-{os.getpid()}-abcdef", f"other-{dead}-abcdef"):
            (h.parent / name).mkdir()
            made.append(h.parent / name)
    busy = SandboxCgroup(layout, f"old-{dead}-123456", {})
    for h in layout.hierarchies:
        (h.parent / busy.name).mkdir()
        busy.dirs[h] = h.parent / busy.name
    with trio.fail_after(20):
        sleeper = await trio.lowlevel.open_process(["sleep", "60"])
        # in one hierarchy only: the name is busy, so it is kept in all of them
        (busy.dirs[layout.hierarchies[-1]] / "cgroup.procs").write_text(str(sleeper.pid))
        try:
            removed = reap_stale("old-", layout=layout)
            assert sorted(removed) == sorted(p for p in made if p.name.startswith(f"old-{dead}"))
            assert all(d.exists() for d in busy.dirs.values())  # has a process: kept
            assert (layout.hierarchies[0].parent / f"old-{os.getpid()}-abcdef").exists()
        finally:
            await busy.remove()
            await sleeper.wait()
            await _close(sleeper)
    others = sorted(p for p in made if p.name.startswith("other-"))
    assert sorted(reap_stale("", layout=layout)) == others
    assert reap_stale("", layout=layout) == []
    for h in layout.hierarchies:  # only ours (a live owner pid) are left
        assert [p.name for p in h.parent.iterdir() if p.is_dir()] == [f"old-{os.getpid()}-abcdef"]
        (h.parent / f"old-{os.getpid()}-abcdef").rmdir()
        h.parent.rmdir()


@pytest.mark.skipif(launch.bwrap_available() is not None, reason="bwrap cannot run here")
async def test_bubblewrap_sandbox_inside_the_cgroup(cg: SandboxCgroup, tmp_path: Path) -> None:
    """The driver's way: wrap bwrap's argv, so the whole tree starts inside the cgroup."""
    uid, gid = launch.sandbox_credentials()
    for sub in ("run", "work"):
        (tmp_path / sub).mkdir()
        os.chown(tmp_path / sub, uid, gid)
    hog = "/usr/bin/python3 -c \"b = b'x' * (300 << 20)\"; echo rc=$?"
    inner = f"{hog}; /usr/bin/python3 -c '{FORK_LOOP}'; exec sleep 60"
    plan = plan_sandbox(
        name="cg",
        command=["/bin/sh", "-c", inner],
        socket_dir=tmp_path / "run",
        workdir_host=tmp_path / "work",
        uid=uid,
        gid=gid,
    )
    plan.argv = cg.wrap_argv(plan.argv)
    with trio.fail_after(30):
        try:
            process = await launch.start_bwrap(plan, stdout=subprocess.PIPE)
            init_pid = await launch.read_info(plan.info_fd, process=process)
            assert process.stdout is not None
            seen = b""
            while seen.count(b"\n") < 2:
                seen += await process.stdout.receive_some()
            rc, forks = seen.decode().splitlines()
            assert rc == "rc=137"
            assert cg.oom_kills() >= 1
            count, name = forks.split()
            assert name == "EAGAIN" and 20 < int(count) < 32
            assert cg.pids_limit_hits() >= 1
            assert {process.pid, init_pid} <= set(cg.pids())
            metrics = MetricsSampler(cgroup=cg, init_pid=init_pid).sample()
            assert metrics.pids is not None and metrics.pids >= 3  # bwrap, init, sleep
            assert (metrics.net_rx_bytes, metrics.net_tx_bytes) == (0, 0)  # own netns: lo only
            await cg.remove()
            assert await process.wait() == -signal.SIGKILL
            assert launch.sandbox_pids(init_pid) == []
            await _close(process)
        finally:
            plan.close()

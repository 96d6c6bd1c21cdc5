"""cgroup.py without the real cgroupfs: layout planning, limits, file formats, rlimits.

Hierarchies here are plain directories under tmp_path; the real cgroupfs is exercised
in test_cgroup_real.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.drivers.local import cgroup
from corral.drivers.local.cgroup import (
    CgroupLayout,
    Hierarchy,
    SandboxCgroup,
    apply_rlimits,
    keyed,
    plan_layout,
    rlimit_prefix,
    validate_limits,
)
from corral.errors import InvalidConfig, Runtime, Unsupported

OWN_HYBRID = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
7:blkio:/
0::/
"""


def _mountinfo(tmp: Path, *entries: tuple[str, str, str]) -> str:
    """(fstype, mount dir name, super options) -> mountinfo lines rooted at tmp."""
    lines = [f"31 23 0:28 / {tmp} rw,relatime - tmpfs tmpfs rw,mode=755"]
    for index, (fstype, name, opts) in enumerate(entries):
        (tmp / name).mkdir(exist_ok=True)
        lines.append(f"{40 + index} 31 0:{40 + index} / {tmp / name} rw - {fstype} cgroup {opts}")
    return "\n".join(lines) + "\n"


def test_hybrid_host_uses_v1_controllers_and_v2_for_tracking(tmp_path: Path) -> None:
    info = _mountinfo(
        tmp_path,
        ("cgroup", "cpu", "rw,cpu"),
        ("cgroup", "cpuacct", "rw,cpuacct"),
        ("cgroup", "cpuset", "rw,cpuset"),
        ("cgroup", "memory", "rw,memory"),
        ("cgroup", "blkio", "rw,blkio"),
        ("cgroup", "pids", "rw,pids"),
        ("cgroup", "systemd", "rw,name=systemd"),
        ("cgroup2", "unified", "rw"),
    )
    (tmp_path / "unified" / "cgroup.controllers").write_text("\n")
    layout, reason = plan_layout(info, OWN_HYBRID)
    assert reason is None and layout is not None
    assert layout.version == "v1"
    by_name = {c: layout.for_controller(c) for c in ("cpu", "cpuacct", "memory", "pids", "blkio")}
    parents = {c: h.parent for c, h in by_name.items() if h is not None}
    assert parents == {
        "cpu": tmp_path / "cpu/corral",
        "cpuacct": tmp_path / "cpuacct/corral",
        # under our own memory cgroup: we stay inside the caller's budget
        "memory": tmp_path / "memory/process_api/abc/corral",
        "pids": tmp_path / "pids/corral",
        "blkio": tmp_path / "blkio/corral",
    }
    assert layout.for_controller("cpuset") is None
    unified = layout.unified
    assert unified is not None and unified.controllers == frozenset()
    assert unified.parent == tmp_path / "unified/corral"
    assert "v2(no controllers)" in layout.describe()


def test_pure_v2_host(tmp_path: Path) -> None:
    info = _mountinfo(tmp_path, ("cgroup2", "cg", "rw,nsdelegate"))
    (tmp_path / "cg" / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    own = "0::/user.slice/user-0.slice/session-3.scope\n"
    layout, reason = plan_layout(info, own)
    assert reason is None and layout is not None
    assert layout.version == "v2" and len(layout.hierarchies) == 1
    h = layout.hierarchies[0]
    assert h.controllers == {"cpu", "io", "memory", "pids"}
    assert h.parent == tmp_path / "cg/corral"  # from the root, not under the session scope


def test_comounted_v1_and_parent_override(tmp_path: Path) -> None:
    info = _mountinfo(
        tmp_path,
        ("cgroup", "cpu,cpuacct", "rw,cpu,cpuacct"),
        ("cgroup", "memory", "rw,memory"),
        ("cgroup", "pids", "rw,pids"),
    )
    own = "3:cpu,cpuacct:/job\n4:memory:/job\n5:pids:/job\n"
    layout, _ = plan_layout(info, own, parent="/ci/corral")
    assert layout is not None
    cpu = layout.for_controller("cpu")
    assert cpu is layout.for_controller("cpuacct")
    assert cpu is not None and cpu.parent == tmp_path / "cpu,cpuacct/ci/corral"
    layout, _ = plan_layout(info, own, parent="sub")
    memory = layout.for_controller("memory") if layout else None
    assert memory is not None and memory.parent == tmp_path / "memory/job/sub"


def test_container_mount_root_maps_our_path(tmp_path: Path) -> None:
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "cgroup.controllers").write_text("cpu memory pids\n")
    info = f"50 1 0:50 /docker/abc {tmp_path / 'cg'} rw - cgroup2 cgroup2 rw\n"
    layout, _ = plan_layout(info, "0::/docker/abc/init\n", parent="sub")
    assert layout is not None
    assert layout.hierarchies[0].parent == tmp_path / "cg/init/sub"


def test_missing_controllers_give_a_reason(tmp_path: Path) -> None:
    info = _mountinfo(tmp_path, ("cgroup", "cpu", "rw,cpu"), ("cgroup2", "unified", "rw"))
    (tmp_path / "unified" / "cgroup.controllers").write_text("io\n")
    layout, reason = plan_layout(info, OWN_HYBRID)
    assert layout is None
    assert reason is not None and "memory, pids" in reason
    assert plan_layout("", "") == (None, "no cgroup filesystem is mounted")


def test_unwritable_hierarchy_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = _mountinfo(tmp_path, ("cgroup2", "cg", "rw"))
    (tmp_path / "cg" / "cgroup.controllers").write_text("cpu memory pids\n")
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    layout, reason = plan_layout(info, "0::/\n")
    assert layout is None and reason is not None
    assert f"no write access to {tmp_path / 'cg/corral'}" in reason
    assert "CORRAL_CGROUP_PARENT" in reason


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_CGROUPS", "off")
    assert cgroup.probe() == (None, "cgroups are disabled by CORRAL_CGROUPS")


@pytest.mark.parametrize(
    ("cpus", "memory_mib", "pids_limit", "message"),
    [
        (0, None, None, "cpus must be between 0.01"),
        (float("nan"), None, None, "cpus must be a number"),
        (True, None, None, "cpus must be a number"),
        (10_000, None, None, "cpus must be between"),
        (None, 15, None, "memory_mib must be between 16"),
        (None, 64.0, None, "memory_mib must be an integer"),
        (None, None, 7, "pids_limit must be between 8"),
        (None, None, "32", "pids_limit must be an integer"),
    ],
)
def test_limits_are_validated(
    cpus: object, memory_mib: object, pids_limit: object, message: str
) -> None:
    with pytest.raises(InvalidConfig, match=message):
        validate_limits(cpus, memory_mib, pids_limit)  # type: ignore[arg-type]


def test_limits_at_the_edges_are_accepted() -> None:
    validate_limits(0.01, 16, 8)
    validate_limits(len(os.sched_getaffinity(0)), 1 << 20, 4_194_304)
    validate_limits(None, None, None)


def _fake(tmp: Path, version: int) -> CgroupLayout:
    mount = tmp / f"v{version}"
    mount.mkdir()
    controllers = frozenset({"cpu", "memory", "pids"})
    return CgroupLayout(
        (Hierarchy(2 if version == 2 else 1, mount, controllers, mount / "corral"),)
    )


def test_v2_limits_and_subtree_control(tmp_path: Path) -> None:
    layout = _fake(tmp_path, 2)
    cg = SandboxCgroup.create("job/1", cpus=1.5, memory_mib=64, pids_limit=32, layout=layout)
    leaf = cg.path
    assert leaf.parent == tmp_path / "v2/corral"
    assert leaf.name.startswith(f"job_1-{os.getpid()}-")  # '/' cannot be in a dir name
    assert (leaf / "memory.max").read_text() == str(64 << 20)
    assert (leaf / "cpu.max").read_text() == "150000 100000"
    assert (leaf / "pids.max").read_text() == "32"
    # controllers were switched on from the root down to the corral parent
    assert (tmp_path / "v2/cgroup.subtree_control").read_text().startswith("+")
    assert (tmp_path / "v2/corral/cgroup.subtree_control").read_text().startswith("+")
    assert cg.memory_limit_bytes() == 64 << 20
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n")
    (leaf / "pids.events").write_text("max 5\n")
    assert cg.oom_kills() == 2 and cg.pids_limit_hits() == 5
    assert cg.limit_report() == (
        "out of memory: the memory limit of 64 MiB made the kernel kill 2 processes "
        "(SIGKILL, exit 137); pids limit 32 refused 5 forks"
    )
    (leaf / "memory.max").write_text("max\n")
    assert cg.memory_limit_bytes() is None


def test_v1_limits(tmp_path: Path) -> None:
    cg = SandboxCgroup.create("j", cpus=0.001 * 10, memory_mib=16, layout=_fake(tmp_path, 1))
    leaf = cg.path
    assert (leaf / "memory.limit_in_bytes").read_text() == str(16 << 20)
    assert (leaf / "cpu.cfs_period_us").read_text() == "100000"
    assert (leaf / "cpu.cfs_quota_us").read_text() == "1000"
    assert not (leaf / "pids.max").exists()
    (leaf / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert cg.oom_kills() == 3
    assert "limit of 16 MiB made the kernel kill 3 processes" in str(cg.limit_report())
    (leaf / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert cg.limit_report() is None
    (leaf / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cg.memory_limit_bytes() is None


def test_create_without_layout_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_CGROUPS", "0")
    cgroup.reset_detection()
    try:
        with pytest.raises(Unsupported, match="disabled by CORRAL_CGROUPS"):
            SandboxCgroup.create("x", memory_mib=64)
        assert cgroup.why_unavailable() == "cgroups are disabled by CORRAL_CGROUPS"
    finally:
        cgroup.reset_detection()


def test_failed_limit_write_undoes_the_directory(tmp_path: Path) -> None:
    layout = _fake(tmp_path, 2)
    (tmp_path / "v2/corral").mkdir()
    (tmp_path / "v2/corral/keep").mkdir()  # keeps the parent: only the leaf must go
    with pytest.raises(InvalidConfig):
        SandboxCgroup.create("x", memory_mib=8, layout=layout)
    no_limits = CgroupLayout((Hierarchy(1, tmp_path / "v2", frozenset(), tmp_path / "v2/corral"),))
    with pytest.raises(Runtime, match="no memory controller"):
        SandboxCgroup.create("x", memory_mib=64, layout=no_limits)
    assert [p.name for p in (tmp_path / "v2/corral").iterdir()] == ["keep"]


def test_wrap_argv_joins_every_hierarchy_before_exec(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    layout = CgroupLayout(
        (Hierarchy(1, a, frozenset({"memory"}), a), Hierarchy(2, b, frozenset(), b))
    )
    cg = SandboxCgroup(layout, "leaf", {layout.hierarchies[0]: a, layout.hierarchies[1]: b})
    done = subprocess.run(
        cg.wrap_argv(["/bin/sh", "-c", 'echo "$$ $0 $1"', "name with space", "x"]),
        capture_output=True,
        check=True,
    )
    pid, rest = done.stdout.decode().split(" ", 1)
    assert rest == "name with space x\n"  # argv passes through untouched
    assert (a / "cgroup.procs").read_text().strip() == pid  # the exec'd process itself
    assert (b / "cgroup.procs").read_text().strip() == pid
    cg.dirs[layout.hierarchies[1]] = tmp_path / "missing"
    failed = subprocess.run(cg.wrap_argv(["/bin/true"]), capture_output=True, check=False)
    assert failed.returncode == 125 and b"missing/cgroup.procs" in failed.stderr


def test_keyed() -> None:
    assert keyed("usage_usec 12\nuser_usec 3\n", "usage_usec") == 12
    assert keyed("usage_usec x\n", "usage_usec") is None
    assert keyed(None, "a") is None


_SHOW_LIMITS = (
    "import resource as r;print(r.getrlimit(r.RLIMIT_DATA)[0], r.getrlimit(r.RLIMIT_NPROC)[0])"
)


@pytest.mark.parametrize("tool", ["prlimit", "python shim"])
def test_rlimit_prefix_sets_limits_before_exec(
    tool: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cgroup, "_warned", False)
    if tool != "prlimit":
        monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with caplog.at_level(logging.WARNING, logger="corral.drivers.local.cgroup"):
        prefix = rlimit_prefix(64, 40, cpus=1)
        assert rlimit_prefix(None, None) == []
        again = rlimit_prefix(64, None)
    assert prefix[0] == (shutil.which("prlimit") if tool == "prlimit" else sys.executable)
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _SHOW_LIMITS], capture_output=True, check=True
    )
    assert done.stdout.split() == [str(64 << 20).encode(), b"40"]
    done = subprocess.run(
        [*again, sys.executable, "-c", "b = b'x' * (300 << 20)"], capture_output=True, check=False
    )
    assert done.returncode == 1 and b"MemoryError" in done.stderr  # weaker: no OOM kill
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per process
    assert "weaker" in warnings[0].getMessage() and "cpus is not enforced" in warnings[0].message


def test_apply_rlimits_on_a_running_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup, "_warned", True)
    child = subprocess.Popen(["sleep", "30"])
    try:
        apply_rlimits(child.pid, 32, 16)
        limits = Path(f"/proc/{child.pid}/limits").read_text()
    finally:
        child.kill()
        child.wait()
    assert f"Max data size             {32 << 20}" in limits
    assert "Max processes             16" in limits
    with pytest.raises(Runtime, match="gone"):
        apply_rlimits(child.pid, 32, None)

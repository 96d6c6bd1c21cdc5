"""The rlimit fallback for hosts without cgroup rights, on real processes.

Each test runs its processes as a uid of its own: RLIMIT_NPROC counts every process of
the real uid on the host, so sharing the sandbox uid with other tests would be flaky.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from corral.drivers.local import cgroup, launch
from corral.drivers.local.bwrap import plan_sandbox

# Forks (only the top process) until refused, then lets the children go; then allocates.
SCRIPT = """
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
b = b"x" * (300 << 20)
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroup, "_warned", True)  # the warning is tested elsewhere


def test_nproc_and_data_limits_as_an_unprivileged_uid() -> None:
    uid = 64_123
    argv = [*cgroup.rlimit_prefix(64, 16), "setpriv", f"--reuid={uid}", f"--regid={uid}"]
    argv += ["--clear-groups", "--", "/usr/bin/python3", "-c", SCRIPT]
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False, cwd="/")
    assert done.stdout == b"15 EAGAIN\n"  # 16 processes of that uid in all
    assert done.returncode == 1 and b"MemoryError" in done.stderr  # not an OOM kill


@pytest.mark.skipif(launch.bwrap_available() is not None, reason="bwrap cannot run here")
def test_limits_hold_inside_bubblewrap(tmp_path: Path) -> None:
    uid = 64_124
    for sub in ("run", "work"):
        (tmp_path / sub).mkdir()
        os.chown(tmp_path / sub, uid, uid)
    plan = plan_sandbox(
        name="fallback",
        command=["/usr/bin/python3", "-c", SCRIPT],
        socket_dir=tmp_path / "run",
        workdir_host=tmp_path / "work",
        uid=uid,
        gid=uid,
    )
    try:
        argv = cgroup.rlimit_prefix(64, 16) + plan.argv
        done = subprocess.run(
            argv, pass_fds=plan.pass_fds, capture_output=True, timeout=60, check=False, cwd="/"
        )
    finally:
        plan.close()
    count, name = done.stdout.split()
    assert name == b"EAGAIN" and 8 < int(count) < 16  # bwrap's own processes count too
    assert done.returncode == 1 and b"MemoryError" in done.stderr

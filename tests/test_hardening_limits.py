"""Size-capped tmpfs mounts and the backend's default limits, on real sandboxes.

- ``/tmp``, ``/dev/shm`` and ``/run`` are tmpfs mounts of the sizes the backend (or
  ``create(tmp_size_mib=)``) gives; writing past one is ENOSPC inside, and ``/dev``
  itself (an unsized tmpfs made by bwrap) is read-only.
- ``LocalBackend.default_memory_mib``, ``default_cpus`` and ``default_pids_limit`` are
  the cgroup limits of a sandbox created without them; explicit values win.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

import corral
from corral.actors.sandbox import SandboxActor
from corral.backend import LocalBackend
from corral.drivers.base import SandboxSpec
from corral.drivers.local import cgroup as cgroups
from corral.drivers.local.bwrap import plan_sandbox
from corral.drivers.local.driver import LocalDriver, LocalSandbox
from corral.drivers.local.launch import sandbox_credentials
from corral.errors import InvalidConfig

pytestmark = pytest.mark.integration

STEP = 60
MIB = 1 << 20

SIZES = """
import os, sys
for path in sys.argv[1:]:
    st = os.statvfs(path)
    print(path, st.f_blocks * st.f_frsize // (1 << 20))
"""

FILL = """
import errno, os, sys
path, size = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
chunk = b"x" * (1 << 20)
written = 0
try:
    while written < size:
        written += os.write(fd, chunk)
    print("wrote", written)
except OSError as exc:
    print("refused", errno.errorcode[exc.errno], written)
finally:
    os.close(fd)
    os.unlink(path)
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def local(sb: corral.Sandbox) -> LocalSandbox:
    actor = sb._actor
    assert isinstance(actor, SandboxActor) and isinstance(actor.proc, LocalSandbox)
    return actor.proc


@pytest.fixture
def small_backend(corral_home: Path, local_backend: LocalBackend) -> LocalBackend:
    """Small tmpfs sizes (filling them is quick) and odd defaults, to tell them apart."""
    return LocalBackend(
        home=corral_home,
        default_tmp_size_mib=8,
        shm_size_mib=4,
        run_size_mib=2,
        default_memory_mib=200,
        default_pids_limit=300,
    )


@pytest.fixture
async def small_sup(small_backend: LocalBackend) -> AsyncIterator[corral.Supervisor]:
    async with corral.open_supervisor(small_backend) as sup:
        yield sup


@pytest.fixture
def need_cgroups() -> None:
    if cgroups.detect() is None:
        pytest.skip(f"no per-sandbox cgroups here: {cgroups.why_unavailable()}")


async def sizes(sb: corral.Sandbox) -> dict[str, int]:
    out = await sb.exec("python3", ["-c", SIZES, "/tmp", "/dev/shm", "/run"], timeout=30)
    assert out.exit_code == 0, out
    return {
        path: int(mib) for path, mib in (line.split() for line in out.stdout.decode().splitlines())
    }


# -- tmpfs -----------------------------------------------------------------------------------


async def test_the_tmpfs_mounts_have_the_backend_sizes_by_default(
    local_sup: corral.Supervisor, local_backend: LocalBackend
) -> None:
    with trio.fail_after(STEP):
        sb = await local_sup.create(unique("tmpsz"))
        assert await sizes(sb) == {
            "/tmp": local_backend.default_tmp_size_mib,
            "/dev/shm": local_backend.shm_size_mib,
            "/run": local_backend.run_size_mib,
        }
        assert (local_backend.default_tmp_size_mib, local_backend.run_size_mib) == (256, 16)


@pytest.mark.parametrize(("where", "size"), [("/tmp", 8), ("/dev/shm", 4), ("/run", 2)])
async def test_writing_past_a_tmpfs_size_is_enospc(
    small_sup: corral.Supervisor, where: str, size: int
) -> None:
    with trio.fail_after(STEP):
        sb = await small_sup.create(unique("fill"))
        out = await sb.exec("python3", ["-c", FILL, f"{where}/fill", str((size + 4) * MIB)])
        words = out.stdout.split()
        assert words[:2] == [b"refused", b"ENOSPC"], out
        assert int(words[2]) <= size * MIB
        assert (await sb.exec("echo", ["alive"])).stdout == b"alive\n"  # still works


async def test_create_tmp_size_mib_overrides_the_default(small_sup: corral.Supervisor) -> None:
    with trio.fail_after(STEP):
        sb = await small_sup.create(unique("tmp24"), tmp_size_mib=24)
        assert (await sizes(sb))["/tmp"] == 24
        out = await sb.exec("python3", ["-c", FILL, "/tmp/fill", str(16 * MIB)])
        assert out.stdout.split()[0] == b"wrote", out  # more than the backend's 8 MiB
        with pytest.raises(InvalidConfig, match="tmp_size_mib"):
            await small_sup.create(unique("tmp0"), tmp_size_mib=0)


async def test_dev_is_read_only_but_its_devices_and_shm_work(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(STEP):
        sb = await local_sup.create(unique("devro"))
        out = await sb.exec("sh", ["-c", "touch /dev/x 2>&1; mkdir /dev/d 2>&1; echo done"])
        assert out.stdout.count(b"Read-only file system") == 2, out
        script = (
            "echo hi > /dev/null && head -c 4 /dev/zero | wc -c && "
            "echo shm > /dev/shm/a && cat /dev/shm/a"
        )
        out = await sb.exec("sh", ["-c", script])
        assert (out.exit_code, out.stdout) == (0, b"4\nshm\n"), out
        async with sb.exec_stream("sh", ["-c", "tty"], tty=True) as proc:
            assert await proc.wait() == 0  # /dev/pts still works


def test_the_plan_sizes_each_tmpfs_and_remounts_dev_read_only(tmp_path: Path) -> None:
    socket_dir, work = tmp_path / "run", tmp_path / "work"
    socket_dir.mkdir()
    work.mkdir()
    uid, gid = sandbox_credentials()
    with plan_sandbox(
        name="box",
        command=["/bin/true"],
        socket_dir=socket_dir,
        workdir_host=work,
        uid=uid,
        gid=gid,
        tmp_size_mib=3,
        shm_size_mib=2,
        run_size_mib=1,
    ) as plan:
        args = plan.argv
    sized = {args[i + 3]: int(args[i + 1]) for i, a in enumerate(args) if a == "--size"}
    assert sized == {"/tmp": 3 * MIB, "/dev/shm": 2 * MIB, "/run": 1 * MIB}
    assert all(args[i + 2] == "--tmpfs" for i, a in enumerate(args) if a == "--size")
    assert args.index("--dev") < args.index("/dev/shm")  # mounted on bwrap's /dev
    remounts = [args[i + 1] for i, a in enumerate(args) if a == "--remount-ro"]
    assert remounts == ["/dev", "/"]
    with pytest.raises(InvalidConfig):
        plan_sandbox(
            name="box",
            command=["/bin/true"],
            socket_dir=socket_dir,
            workdir_host=work,
            uid=uid,
            gid=gid,
            tmp_size_mib=0,
        )


# -- default limits ----------------------------------------------------------------------------


def cgroup_limits(sb: corral.Sandbox) -> tuple[int | None, float | None, int | None]:
    """(memory bytes, cpus, pids) as the sandbox's cgroup has them (None: unlimited)."""
    cgroup = local(sb).cgroup
    assert cgroup is not None
    if cgroup.version_of("memory") == 2:
        memory = cgroup.read("memory", "memory.max") or "max"
    else:
        memory = cgroup.read("memory", "memory.limit_in_bytes") or "max"
    if cgroup.version_of("cpu") == 2:
        quota, _, period = (cgroup.read("cpu", "cpu.max") or "max 100000").partition(" ")
    else:
        quota = cgroup.read("cpu", "cpu.cfs_quota_us") or "-1"
        period = cgroup.read("cpu", "cpu.cfs_period_us") or "100000"
    pids = cgroup.read("pids", "pids.max") or "max"
    mem = None if memory == "max" or int(memory) >= 1 << 60 else int(memory)
    cpus = None if quota in ("max", "-1") else int(quota) / int(period)
    return mem, cpus, None if pids == "max" else int(pids)


async def test_the_backend_defaults_are_the_cgroup_limits(
    small_sup: corral.Supervisor, small_backend: LocalBackend, need_cgroups: None
) -> None:
    with trio.fail_after(STEP):
        sb = await small_sup.create(unique("defaults"))
        assert cgroup_limits(sb) == (200 * MIB, 1.0, 300)
        assert local(sb).spec.memory_mib == 200  # what metrics() measures against
        hog = f"b = bytearray({260 * MIB}); print(len(b))"
        assert (await sb.exec("python3", ["-c", hog])).exit_code == 137
        explicit = await small_sup.create(
            unique("explicit"), memory_mib=300, cpus=0.5, pids_limit=50
        )
        assert cgroup_limits(explicit) == (300 * MIB, 0.5, 50)
        assert (await explicit.exec("python3", ["-c", hog])).exit_code == 0


async def test_the_stock_backend_limits_a_sandbox_created_without_limits(
    local_sup: corral.Supervisor, need_cgroups: None
) -> None:
    with trio.fail_after(STEP):
        sb = await local_sup.create(unique("stock"))
        assert cgroup_limits(sb) == (512 * MIB, 1.0, 1024)


async def test_without_cgroups_the_pids_default_is_left_out(local_backend: LocalBackend) -> None:
    """The rlimit fallback's RLIMIT_NPROC counts every process of the sandbox uid on the
    host: a default there would cap all sandboxes together, so only explicit values go."""
    await trio.lowlevel.checkpoint()
    driver = LocalDriver(local_backend)
    driver.cgroups = None
    spec = driver.with_defaults(SandboxSpec(name="x"))
    assert (spec.memory_mib, spec.cpus, spec.pids_limit, spec.tmp_size_mib) == (512, 1, None, 256)
    assert driver.with_defaults(SandboxSpec(name="x", pids_limit=40)).pids_limit == 40
    big = LocalDriver(LocalBackend(home=local_backend.home, default_cpus=255))
    assert big.with_defaults(SandboxSpec(name="x")).cpus == len(os.sched_getaffinity(0))

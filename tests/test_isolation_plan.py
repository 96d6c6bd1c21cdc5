"""plan_sandbox, the agent runtime view and the credentials, without starting anything."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.drivers.local import bwrap as bwrap_mod
from corral.drivers.local.bwrap import (
    SOCKET_DIR,
    STAGE_DIR,
    BwrapPlan,
    can_reach,
    plan_sandbox,
)
from corral.drivers.local.launch import sandbox_credentials
from corral.drivers.local.runtime import PKG_DIR, agent_runtime
from corral.drivers.local.seccomp import build_filter
from corral.errors import InvalidConfig, Unsupported

ROOT = os.geteuid() == 0


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory every uid can reach (/tmp is 1777; pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="corral-plan-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A socket dir and a workdir (under pytest's tmp dir, which is 0700)."""
    run, work = tmp_path / "run", tmp_path / "work"
    run.mkdir()
    work.mkdir()
    yield run, work


def make(dirs: tuple[Path, Path], **kwargs: object) -> BwrapPlan:
    uid, gid = sandbox_credentials()
    options: dict[str, object] = {
        "name": "box",
        "command": ["/bin/true"],
        "socket_dir": dirs[0],
        "workdir_host": dirs[1],
        "uid": uid,
        "gid": gid,
    }
    options.update(kwargs)
    return plan_sandbox(**options)  # type: ignore[arg-type]


def inner(argv: list[str]) -> list[str]:
    """The sandbox bwrap's own arguments (after any staging/setpriv hop)."""
    return argv[argv.index("--unshare-all") - 1 :]


def pairs(argv: list[str], flag: str, width: int) -> list[tuple[str, ...]]:
    return [tuple(argv[i + 1 : i + 1 + width]) for i, arg in enumerate(argv) if arg == flag]


def test_hardened_flags_and_layout(dirs: tuple[Path, Path]) -> None:
    with make(dirs, command=["/bin/sh", "-c", "echo hi"]) as plan:
        args = inner(plan.argv)
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"):
        assert flag in args
    assert "--new-session" in args and "--clearenv" in args
    assert pairs(args, "--cap-drop", 1) == [("ALL",)]
    assert pairs(args, "--hostname", 1) == [("box",)]
    uid, gid = sandbox_credentials()
    assert pairs(args, "--uid", 1) == [(str(uid),)] and pairs(args, "--gid", 1) == [(str(gid),)]
    assert "--share-net" not in args
    assert ("/usr", "/usr") in pairs(args, "--ro-bind", 2)
    assert ("/proc",) in pairs(args, "--proc", 1) and ("/dev",) in pairs(args, "--dev", 1)
    assert {("/tmp",), ("/run",)} <= set(pairs(args, "--tmpfs", 1))
    binds = pairs(args, "--bind", 2)
    assert [dest for _, dest in binds] == [SOCKET_DIR, "/workspace"]
    assert pairs(args, "--chdir", 1) == [("/workspace",)]
    # read-only root after every mount, then the command
    end = args.index("--")
    assert args[end + 1 :] == ["/bin/sh", "-c", "echo hi"]
    mounts = [i for i, a in enumerate(args[:end]) if a in ("--bind", "--ro-bind", "--tmpfs")]
    assert args.index("--remount-ro") > max(mounts)
    assert pairs(args, "--remount-ro", 1) == [("/dev",), ("/",)]  # /dev: an unsized tmpfs


def test_network_only_on_request(dirs: tuple[Path, Path]) -> None:
    with make(dirs, network=True) as plan:
        assert "--share-net" in inner(plan.argv)


def test_etc_is_a_safe_subset(dirs: tuple[Path, Path]) -> None:
    with make(dirs) as plan:
        args = inner(plan.argv)
        copied = {dest: int(fd) for fd, dest in pairs(args, "--file", 2)}
        for dest, fd in copied.items():  # the fds bwrap copies /etc files from
            if dest.startswith("/etc/"):
                assert os.pread(fd, 1 << 20, 0) == Path(dest).read_bytes()
    dests = {dest for _, dest in pairs(args, "--ro-bind", 2)} | set(copied)
    etc = {d for d in dests if d.startswith("/etc/")}
    for present in ("/etc/passwd", "/etc/group", "/etc/ld.so.cache", "/etc/nsswitch.conf"):
        if os.path.exists(present):
            assert present in etc
    for secret in ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh", "/etc/pip.conf"):
        assert secret not in etc
    assert all(not d.startswith("/root") and not d.startswith("/home") for d in dests)


def test_merged_usr_links_are_mirrored(dirs: tuple[Path, Path]) -> None:
    with make(dirs) as plan:
        args = inner(plan.argv)
    links = dict((dest, target) for target, dest in pairs(args, "--symlink", 2))
    ro = {dest for _, dest in pairs(args, "--ro-bind", 2)}
    for name in ("/bin", "/lib", "/sbin", "/lib64"):
        if os.path.islink(name):
            assert links[name] == os.readlink(name)
        elif os.path.isdir(name):
            assert name in ro


def test_environment(dirs: tuple[Path, Path]) -> None:
    with make(dirs, env={"A": "1", "LANG": "en_US.UTF-8"}, workdir="/w") as plan:
        env = {key: value for key, value in pairs(inner(plan.argv), "--setenv", 2)}
    assert env == {"PATH": bwrap_mod.DEFAULT_PATH, "HOME": "/w", "LANG": "en_US.UTF-8", "A": "1"}
    for bad in ({"A=B": "1"}, {"": "x"}, {"A": "nul\0"}):
        before = open_fds()
        with pytest.raises(InvalidConfig):
            make(dirs, env=bad)
        assert open_fds() == before  # a failed plan leaks no fd


def test_fds_are_child_only_and_closed(dirs: tuple[Path, Path]) -> None:
    before = open_fds()
    plan = make(dirs, runtime=agent_runtime())
    if ROOT:  # the staging fstab is read through /proc/<pid>/fd, not passed
        assert len(plan.staged) > 0
    seccomp_fd, info_write, init_file = plan.pass_fds[:3]
    args = inner(plan.argv)
    assert pairs(args, "--seccomp", 1) == [(str(seccomp_fd),)]
    assert pairs(args, "--info-fd", 1) == [(str(info_write),)]
    files = {dest: fd for fd, dest in pairs(args, "--file", 2)}
    assert files[f"{PKG_DIR}/corral/__init__.py"] == str(init_file)
    # every other fd bwrap gets is an /etc file it copies in
    assert {int(fd) for dest, fd in files.items() if dest.startswith("/etc/")} == set(
        plan.pass_fds[3:]
    )
    for fd in (*plan.pass_fds, plan.info_fd):
        assert not os.get_inheritable(fd)
    assert os.pread(seccomp_fd, 1 << 16, 0) == build_filter()
    assert os.pread(init_file, 10, 0) == b""
    assert plan.startable
    plan.release_child_fds()
    assert (plan.startable, plan.closed) == (False, False)
    kept = open_fds() - before  # the info pipe's read end (+ the staging fstab)
    assert plan.info_fd in kept and len(kept) == (2 if plan.staged else 1)
    plan.close()
    plan.close()
    assert plan.closed and open_fds() == before
    with make(dirs):
        pass
    assert open_fds() == before


def test_extra_fds_pass_through_and_stay_the_callers(dirs: tuple[Path, Path]) -> None:
    read_end, write_end = os.pipe()
    try:
        with make(dirs, extra_fds=[write_end]) as plan:
            assert write_end in plan.pass_fds
            assert plan.startable
        os.fstat(write_end)  # still open
    finally:
        os.close(read_end)
        os.close(write_end)


def test_adopted_fds_are_closed_once_bwrap_runs(dirs: tuple[Path, Path]) -> None:
    before = open_fds()
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        with make(dirs) as plan:
            plan.adopt_child_fd(write_end)
            plan.adopt_child_fd(write_end)
            assert plan.pass_fds.count(write_end) == 1 and plan.startable
            plan.release_child_fds()
            with pytest.raises(OSError):
                os.fstat(write_end)
            os.fstat(read_end)
    finally:
        os.close(read_end)
    assert open_fds() == before


def test_extra_binds(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with make(dirs, extra_ro_binds={str(data): "/data"}, extra_binds={str(data): "/rw"}) as p:
        args = inner(p.argv)
        spots = [spot for src, spot in p.staged if src == str(data)]
    ro = {dest: src for src, dest in pairs(args, "--ro-bind", 2)}
    rw = {dest: src for src, dest in pairs(args, "--bind", 2)}
    if spots:  # root: data sits under pytest's 0700 tmp dir, so it is staged (twice)
        assert ro["/data"] in spots and rw["/rw"] in spots
    else:
        assert ro["/data"] == rw["/rw"] == str(data)
    with pytest.raises(InvalidConfig, match="does not exist"):
        make(dirs, extra_ro_binds={str(tmp_path / "nope"): "/x"})
    with pytest.raises(InvalidConfig, match="absolute"):
        make(dirs, extra_ro_binds={str(data): "relative"})
    with pytest.raises(InvalidConfig, match="absolute"):
        make(dirs, workdir="/a/../etc")


def test_bad_requests(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(Unsupported):
        make(dirs, image="docker.io/library/alpine")
    with pytest.raises(InvalidConfig):
        make(dirs, command=[])
    with pytest.raises(InvalidConfig):
        make(dirs, name="")
    with pytest.raises(InvalidConfig, match="not a directory"):
        make((tmp_path / "missing", dirs[1]))


@pytest.mark.skipif(not ROOT, reason="the root path: setpriv and staging")
def test_root_switches_uid_through_setpriv(open_tmp: Path) -> None:
    run, work = open_tmp / "run", open_tmp / "work"
    run.mkdir()
    work.mkdir()
    with make((run, work)) as plan:
        assert plan.staged == ()
        assert os.path.basename(plan.argv[0]) == "setpriv"
        uid, gid = sandbox_credentials()
        assert f"--reuid={uid}" in plan.argv and f"--regid={gid}" in plan.argv
        assert "--clear-groups" in plan.argv and "--bounding-set=-all" in plan.argv
        assert plan.argv.index("--") < plan.argv.index("--unshare-all")
    with pytest.raises(InvalidConfig, match="root"):
        make((run, work), uid=0)


@pytest.mark.skipif(not ROOT, reason="staging only happens as root")
def test_root_stages_what_the_sandbox_uid_cannot_reach(dirs: tuple[Path, Path]) -> None:
    run, work = dirs  # under pytest's 0700 tmp dir
    uid, gid = sandbox_credentials()
    with make(dirs, runtime=agent_runtime()) as plan:
        staged = dict(plan.staged)
        args = inner(plan.argv)
        prefix = plan.argv[: plan.argv.index("--unshare-all") - 1]
        fstab_path = prefix[prefix.index("corral-stage") + 2]
        fstab = Path(fstab_path).read_text()  # /proc/<our pid>/fd/N: not passed down
        assert int(fstab_path.rsplit("/", 1)[1]) not in plan.pass_fds
    assert [os.path.basename(a) for a in prefix[:1]] == ["unshare"]
    assert prefix[1:4] == ["--mount", "--propagation", "slave"]
    assert os.path.basename(prefix[prefix.index("--reuid=" + str(uid)) - 1]) == "setpriv"
    assert str(run) in staged and str(work) in staged
    assert all(spot.startswith(STAGE_DIR + "/") for spot in staged.values())
    lines = [line.split() for line in fstab.splitlines()]
    assert lines[0][:3] == ["corral-stage", STAGE_DIR, "tmpfs"]
    options = {src: (spot, opts) for src, spot, _, opts, *_ in lines[1:]}
    assert options[str(run)] == (staged[str(run)], "bind,X-mount.mkdir")
    assert options[str(work)] == (staged[str(work)], "bind,X-mount.mkdir")
    # the sandbox bwrap binds the staged spots, never the unreachable host paths
    binds = {dest: src for src, dest in pairs(args, "--bind", 2)}
    assert binds[SOCKET_DIR] == staged[str(run)] and binds["/workspace"] == staged[str(work)]
    prefix_dir = os.path.realpath(sys.base_prefix)
    if not can_reach(prefix_dir, uid, gid):
        assert options[prefix_dir] == (staged[prefix_dir], "bind,X-mount.mkdir,ro")
        ro = {dest: src for src, dest in pairs(args, "--ro-bind", 2)}
        assert ro[prefix_dir] == staged[prefix_dir]


def test_fstab_escaping() -> None:
    assert bwrap_mod._fstab_escape("/a b\tc\\d\ne") == "/a\\040b\\011c\\134d\\012e"


def test_can_reach(open_tmp: Path) -> None:
    top = open_tmp / "top"
    leaf = top / "a" / "b"
    leaf.mkdir(parents=True)
    st = os.stat(top)
    stranger = (st.st_uid + 4321, st.st_gid + 4321)
    os.chmod(top, 0o700)
    assert not can_reach(str(leaf), *stranger)
    assert can_reach(str(top), *stranger)  # only the parents count
    assert can_reach(str(leaf), st.st_uid, stranger[1])  # the owner may
    os.chmod(top, 0o710)
    assert can_reach(str(leaf), stranger[0], st.st_gid)  # so may the group
    assert not can_reach(str(leaf), *stranger)
    os.chmod(top, 0o711)
    assert can_reach(str(leaf), *stranger)
    os.chmod(top / "a", 0o700)
    assert not can_reach(str(leaf), *stranger)


def test_runtime_view() -> None:
    view = agent_runtime(args=["--socket", "/run/agent/agent.sock"])
    repo = Path(corral.__file__).parent
    binds = dict((dest, src) for src, dest in view.ro_binds)
    assert binds[f"{PKG_DIR}/corral/protocol"] == str((repo / "protocol").resolve())
    assert binds[f"{PKG_DIR}/corral/agentd"] == str((repo / "agentd").resolve())
    assert binds[f"{PKG_DIR}/corral/errors.py"] == str((repo / "errors.py").resolve())
    assert Path(binds[f"{PKG_DIR}/msgspec"], "__init__.py").exists()
    assert view.empty_files == (f"{PKG_DIR}/corral/__init__.py",)
    exe = os.path.realpath(sys.executable)
    assert view.argv[:5] == (exe, "-I", "-S", "-B", "-c")
    assert "from corral.agentd.main import main" in view.argv[5]
    assert view.argv[6:] == ("--socket", "/run/agent/agent.sock")
    prefix = os.path.realpath(sys.base_prefix)
    if prefix == "/usr" or prefix.startswith("/usr/"):
        assert prefix not in binds
    else:
        assert binds[prefix] == prefix  # same absolute path inside
        assert exe.startswith(prefix + "/")
    # nothing else of the repo (the root package would import trio)
    assert not any(dest == f"{PKG_DIR}/corral" for dest in binds)


def test_runtime_view_reports_missing_files(tmp_path: Path) -> None:
    from corral.errors import Runtime

    with pytest.raises(Runtime, match="missing"):
        agent_runtime(repo=tmp_path)


@pytest.mark.skipif(not ROOT, reason="root picks a dedicated uid")
def test_sandbox_credentials_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_SANDBOX_UID", raising=False)
    monkeypatch.delenv("CORRAL_SANDBOX_GID", raising=False)
    assert sandbox_credentials() == (65534, 65534)
    monkeypatch.setenv("CORRAL_SANDBOX_UID", "1234")
    monkeypatch.setenv("CORRAL_SANDBOX_GID", "2345")
    assert sandbox_credentials() == (1234, 2345)
    for bad in ("0", "-3", "abc", str(2**32)):
        monkeypatch.setenv("CORRAL_SANDBOX_UID", bad)
        with pytest.raises(InvalidConfig):
            sandbox_credentials()


@pytest.mark.skipif(ROOT, reason="only without root")
def test_sandbox_credentials_not_root() -> None:
    assert sandbox_credentials() == (os.geteuid(), os.getegid())

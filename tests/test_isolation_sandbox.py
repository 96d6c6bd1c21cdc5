"""Real bubblewrap sandboxes started through plan_sandbox + start_bwrap, probed with sh.

Two layouts of host dirs: ``open_dirs`` (under /tmp, reachable by the sandbox uid) and
``closed_dirs`` (under pytest's 0700 tmp dir: as root this goes through the staging hop).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from corral.drivers.local.bwrap import plan_sandbox
from corral.drivers.local.launch import (
    bwrap_available,
    read_info,
    sandbox_credentials,
    sandbox_pids,
    start_bwrap,
)
from corral.drivers.local.runtime import agent_runtime
from corral.drivers.local.seccomp import SECCOMP_RET_ALLOW

pytestmark = pytest.mark.integration

ROOT = os.geteuid() == 0
ZERO_CAPS = "0000000000000000"
HOST_PYTHON = "/usr/bin/python3"


@pytest.fixture(autouse=True)
def _need_bwrap() -> None:
    reason = bwrap_available()
    if reason is not None:
        pytest.skip(reason)


def _dirs(base: Path) -> tuple[Path, Path]:
    uid, gid = sandbox_credentials()
    made = []
    for sub in ("run", "work"):
        path = base / sub
        path.mkdir(mode=0o700)
        if ROOT:
            os.chown(path, uid, gid)
        made.append(path)
    return made[0], made[1]


@pytest.fixture
def closed_dirs(tmp_path: Path) -> tuple[Path, Path]:
    return _dirs(tmp_path)


@pytest.fixture
def open_dirs() -> Iterator[tuple[Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="corral-box-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield _dirs(base)
    finally:
        shutil.rmtree(base)


@pytest.fixture(params=["open", "closed"])
def any_dirs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if request.param == "closed":
        yield _dirs(tmp_path)
        return
    base = Path(tempfile.mkdtemp(prefix="corral-box-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield _dirs(base)
    finally:
        shutil.rmtree(base)


@dataclass
class Result:
    code: int
    out: str
    err: str
    init_pid: int


async def run_box(dirs: tuple[Path, Path], command: list[str], **kwargs: Any) -> Result:
    """Run ``command`` in a sandbox to completion, collecting its output."""
    uid, gid = sandbox_credentials()
    options: dict[str, Any] = {"name": "probe", "uid": uid, "gid": gid}
    options.update(kwargs)
    with plan_sandbox(command=command, socket_dir=dirs[0], workdir_host=dirs[1], **options) as plan:
        process = await start_bwrap(plan, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            init_pid = await read_info(plan.info_fd, process=process)
            chunks: dict[str, bytes] = {"out": b"", "err": b""}

            async def drain(key: str, stream: trio.abc.ReceiveStream) -> None:
                async with stream:
                    while data := await stream.receive_some(65536):
                        chunks[key] += data

            assert process.stdout is not None and process.stderr is not None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, "out", process.stdout)
                nursery.start_soon(drain, "err", process.stderr)
            code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    return Result(code, chunks["out"].decode(), chunks["err"].decode(), init_pid)


def status_fields(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def read_text(path: str) -> str:
    """A small /proc read (sync on purpose: /proc does not block)."""
    return Path(path).read_text()


def host_python_is(machine: str | None = None) -> bool:
    return os.path.exists(HOST_PYTHON) and machine in (None, os.uname().machine)


async def test_no_privileges_inside(any_dirs: tuple[Path, Path]) -> None:
    script = "cat /proc/self/status; echo; id -u; id -g; cat /proc/sys/kernel/hostname"
    with trio.fail_after(30):
        result = await run_box(any_dirs, ["/bin/sh", "-c", script], name="box-7")
    assert result.code == 0, result.err
    status_text, ids = result.out.split("\n\n")
    fields = status_fields(status_text)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[cap] == ZERO_CAPS, cap
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    uid, gid = sandbox_credentials()
    assert ids.split() == [str(uid), str(gid), "box-7"]


def _interfaces(text: str) -> set[str]:
    return {line.split(":")[0].strip() for line in text.splitlines()[2:] if ":" in line}


async def test_network_only_when_asked(open_dirs: tuple[Path, Path]) -> None:
    with trio.fail_after(30):
        closed = await run_box(open_dirs, ["/bin/cat", "/proc/net/dev"])
        shared = await run_box(open_dirs, ["/bin/cat", "/proc/net/dev"], network=True)
    assert closed.code == 0 and shared.code == 0
    assert _interfaces(closed.out) == {"lo"}
    host = _interfaces(read_text("/proc/net/dev"))
    assert _interfaces(shared.out) == host
    if host == {"lo"}:
        pytest.skip("the host itself has only lo: cannot tell the network apart")


async def test_host_pids_are_invisible(open_dirs: tuple[Path, Path]) -> None:
    with trio.fail_after(30):
        result = await run_box(open_dirs, ["/bin/ls", "/proc"])
    assert result.code == 0, result.err
    pids = sorted(int(name) for name in result.out.split() if name.isdigit())
    assert pids == [1, 2]  # bwrap's init and ls itself
    assert result.init_pid != 1


FS_SCRIPT = r"""
for p in /usr/probe /probe /etc/probe /bin/probe /.corral-probe; do
  if touch "$p" 2>/dev/null; then echo "rw $p"; else echo "ro $p"; fi
done
for p in /tmp/probe /workspace/probe /run/agent/probe /var/tmp/probe2; do
  if echo x > "$p"; then echo "rw $p"; else echo "ro $p"; fi
done
for p in /etc/shadow /etc/gshadow /etc/sudoers /etc/ssh /root /home /etc/passwd /usr/bin/sh; do
  if [ -e "$p" ]; then echo "present $p"; else echo "absent $p"; fi
done
ls /proc/self/fd
"""


async def test_filesystem_view(any_dirs: tuple[Path, Path]) -> None:
    run, work = any_dirs
    with trio.fail_after(30):
        result = await run_box(any_dirs, ["/bin/sh", "-c", FS_SCRIPT])
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    facts = {path: fact for fact, path in (line.split(" ", 1) for line in lines if " " in line)}
    for path in ("/usr/probe", "/probe", "/etc/probe", "/bin/probe", "/.corral-probe"):
        assert facts[path] == "ro", path
    for path in ("/tmp/probe", "/workspace/probe", "/run/agent/probe", "/var/tmp/probe2"):
        assert facts[path] == "rw", path
    for path in ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh", "/root", "/home"):
        assert facts[path] == "absent", path
    assert facts["/etc/passwd"] == facts["/usr/bin/sh"] == "present"
    fds = [line for line in lines if line.isdigit()]
    assert fds == ["0", "1", "2", "3"]  # stdio + ls's own dir fd: nothing leaked in
    uid, _ = sandbox_credentials()
    assert os.stat(work / "probe").st_uid == uid
    assert os.stat(run / "probe").st_uid == uid


async def test_environment_is_clean(open_dirs: tuple[Path, Path]) -> None:
    os.environ["CORRAL_SECRET_PROBE"] = "leak"
    try:
        with trio.fail_after(30):
            result = await run_box(open_dirs, ["/usr/bin/env"], env={"A": "1"}, workdir="/w")
    finally:
        del os.environ["CORRAL_SECRET_PROBE"]
    env = dict(line.split("=", 1) for line in result.out.splitlines())
    # bwrap's --chdir sets PWD; nothing of ours (CORRAL_SECRET_PROBE) gets in
    assert env == {"PATH": env["PATH"], "HOME": "/w", "LANG": "C.UTF-8", "A": "1", "PWD": "/w"}


@pytest.mark.skipif(not ROOT, reason="the dedicated uid is only used when we are root")
async def test_sandbox_runs_as_the_unprivileged_uid_on_the_host(
    any_dirs: tuple[Path, Path],
) -> None:
    uid, gid = sandbox_credentials()
    assert uid != 0
    with (
        trio.fail_after(30),
        plan_sandbox(
            name="uidcheck",
            command=["/bin/sh", "-c", "sleep 60 & echo up; wait"],
            socket_dir=any_dirs[0],
            workdir_host=any_dirs[1],
            uid=uid,
            gid=gid,
        ) as plan,
    ):
        process = await start_bwrap(plan, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert process.stdout is not None
        async with process.stdout:
            try:
                init_pid = await read_info(plan.info_fd, process=process)
                assert await process.stdout.receive_some(100) == b"up\n"
                pids = sandbox_pids(init_pid)
                assert len(pids) == 3  # init, sh, sleep
                for pid in pids:
                    fields = status_fields(read_text(f"/proc/{pid}/status"))
                    assert fields["Uid"].split() == [str(uid)] * 4, pid
                    assert fields["Gid"].split() == [str(gid)] * 4, pid
                    assert fields["Groups"].strip() == "", pid
                os.kill(init_pid, signal.SIGKILL)  # the pid namespace goes with it
                await process.wait()
                assert sandbox_pids(init_pid) == []
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()


RUNTIME_PROBE = """
import sys
sys.path.insert(0, "/.corral/pkg")
import msgspec, corral, corral.errors, corral.protocol
assert corral.__file__ == "/.corral/pkg/corral/__init__.py", corral.__file__
assert msgspec.__file__.startswith("/.corral/pkg/msgspec/"), msgspec.__file__
for name in ("trio", "httpx"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(name + " is importable in the sandbox")
try:
    open("/.corral/pkg/corral/new.py", "w")
except OSError:
    pass
else:
    raise SystemExit("the runtime view is writable")
print("runtime ok", sys.executable)
"""


async def test_runtime_view_runs_the_host_python(any_dirs: tuple[Path, Path]) -> None:
    view = agent_runtime()
    command = [*view.argv[:4], "-c", RUNTIME_PROBE]
    with trio.fail_after(30):
        result = await run_box(any_dirs, command, runtime=view)
    assert result.code == 0, result.err
    assert result.out.split() == ["runtime", "ok", view.argv[0]]


SECCOMP_PROBE = r"""
import ctypes, errno, json, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def err(ret):
    return 0 if ret != -1 else ctypes.get_errno()
def sys_(nr, *args):
    ctypes.set_errno(0)
    return err(libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args]))
out = {}
ctypes.set_errno(0); out["unshare_user"] = err(libc.unshare(0x10000000))
ctypes.set_errno(0); out["unshare_net"] = err(libc.unshare(0x40000000))
ctypes.set_errno(0)
out["mount"] = err(libc.mount(b"none", b"/tmp", b"tmpfs", ctypes.c_ulong(0), None))
pid = os.fork()
if pid == 0:  # PTRACE_TRACEME in a child: its parent (this probe) becomes the tracer
    os._exit(sys_(101, 0, 0, 0, 0))
out["ptrace_traceme"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
out["personality_query"] = sys_(135, 0xFFFFFFFF)
out["personality_norandom"] = sys_(135, 0x0040000)
out["clone3"] = sys_(435, 0, 0)
out["keyctl"] = sys_(250, 0, -1, 0, 0)  # KEYCTL_GET_KEYRING_ID
fd = os.open("/dev/null", os.O_RDONLY)
c = ctypes.c_char(b"x")
out["tiocsti"] = sys_(16, fd, 0x5412, ctypes.addressof(c))
out["tcgets"] = sys_(16, fd, 0x5401, ctypes.addressof(ctypes.create_string_buffer(64)))
out["x32_getpid"] = sys_(0x40000000 | 39)
box = []
t = threading.Thread(target=lambda: box.append(threading.get_ident())); t.start(); t.join()
out["thread"] = len(box)
def run(script):
    return subprocess.run(["sh", "-c", script], capture_output=True)
out["subprocess"] = run("echo a | cat").stdout.decode()
out["shell_unshare"] = run("unshare -U true").returncode
print(json.dumps(out))
"""


async def test_seccomp_filter_in_bwrap(open_dirs: tuple[Path, Path]) -> None:
    if not host_python_is("x86_64"):
        pytest.skip("the probe uses x86_64 syscall numbers and the host's /usr/bin/python3")
    allow_all = struct.pack("=HBBI", 0x06, 0, 0, SECCOMP_RET_ALLOW)
    command = [HOST_PYTHON, "-I", "-S", "-c", SECCOMP_PROBE]
    with trio.fail_after(60):
        filtered = await run_box(open_dirs, command)
        permissive = await run_box(open_dirs, command, seccomp=allow_all)
    assert filtered.code == 0, filtered.err
    assert permissive.code == 0, permissive.err
    got = json.loads(filtered.out)
    without = json.loads(permissive.out)
    eperm, enosys = 1, 38
    assert got["unshare_user"] == eperm and got["unshare_net"] == eperm
    assert got["mount"] == eperm and got["ptrace_traceme"] == eperm
    assert got["personality_norandom"] == eperm and got["personality_query"] == 0
    assert got["keyctl"] == eperm and got["tiocsti"] == eperm
    assert got["clone3"] == enosys and got["x32_getpid"] == enosys
    assert got["tcgets"] == 25  # ENOTTY: ioctl itself still works
    assert got["thread"] == 1 and got["subprocess"] == "a\n"
    assert got["shell_unshare"] != 0
    # the same probe without the filter: these answers come from the filter alone
    assert without["ptrace_traceme"] == 0
    assert without["personality_norandom"] == 0
    assert without["tiocsti"] == 25
    assert without["clone3"] != enosys
    assert without["unshare_user"] != eperm  # --disable-userns answers ENOSPC instead
    assert without["keyctl"] != eperm


async def test_socket_dir_reaches_the_host(any_dirs: tuple[Path, Path]) -> None:
    if not host_python_is():
        pytest.skip("needs the host's /usr/bin/python3")
    run, _ = any_dirs
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(str(run / "host.sock"))
        os.chmod(run / "host.sock", 0o777)
        listener.listen(1)
        client = (
            "import socket; s = socket.socket(socket.AF_UNIX); "
            "s.connect('/run/agent/host.sock'); s.sendall(b'ping'); print(s.recv(4).decode())"
        )
        received: list[bytes] = []

        async def serve() -> None:
            conn, _ = await listener.accept()
            with conn:
                received.append(await conn.recv(4))
                await conn.send(b"pong")

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                result = await run_box(any_dirs, [HOST_PYTHON, "-I", "-S", "-c", client])
    assert result.code == 0, result.err
    assert received == [b"ping"] and result.out == "pong\n"


HELPER = r"""
import subprocess, sys, trio
from corral.drivers.local.bwrap import plan_sandbox
from corral.drivers.local.launch import read_info, sandbox_credentials, start_bwrap

async def main() -> None:
    uid, gid = sandbox_credentials()
    plan = plan_sandbox(
        name="orphan", command=["/bin/sh", "-c", "sleep 300 & echo ready; exec sleep 300"],
        socket_dir=sys.argv[1], workdir_host=sys.argv[2], uid=uid, gid=gid,
    )
    process = await start_bwrap(plan, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    init_pid = await read_info(plan.info_fd, process=process)
    assert await process.stdout.receive_some(100) == b"ready\n"
    print(init_pid, process.pid, flush=True)
    await trio.sleep_forever()

trio.run(main)
"""


async def test_killing_the_parent_leaves_no_sandbox_behind(any_dirs: tuple[Path, Path]) -> None:
    run, work = any_dirs
    with trio.fail_after(30):
        helper = await trio.lowlevel.open_process(
            [sys.executable, "-c", HELPER, str(run), str(work)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert helper.stdout is not None and helper.stderr is not None
        try:
            line = b""
            while not line.endswith(b"\n"):
                chunk = await helper.stdout.receive_some(100)
                if not chunk:
                    err = await helper.stderr.receive_some(65536)
                    raise AssertionError(f"helper died: {err.decode(errors='replace')}")
                line += chunk
            init_pid, bwrap_pid = map(int, line.split())
            assert len(sandbox_pids(init_pid)) == 3  # init, sh (now sleep), sleep
            helper.send_signal(signal.SIGKILL)
            await helper.wait()
            # observing other processes die: a bounded poll is the only way to see it
            for _ in range(100):
                if not sandbox_pids(init_pid) and not sandbox_pids(bwrap_pid):
                    break
                await trio.sleep(0.02)
            assert sandbox_pids(init_pid) == [], "sandbox processes outlived their parent"
            assert sandbox_pids(bwrap_pid) == [], "bwrap outlived its parent"
        finally:
            if helper.returncode is None:
                helper.kill()
                await helper.wait()
            await helper.stdout.aclose()
            await helper.stderr.aclose()

"""Start a planned bwrap sandbox from trio, learn its init pid, find its processes.

**Why not ``trio.lowlevel.open_process``.** trio runs ``Popen`` in a worker thread, and
``PR_SET_PDEATHSIG`` (bwrap's ``--die-with-parent``) fires when the parent *thread*
exits: trio's idle worker threads exit after 10 s, and the sandbox is SIGKILLed with
them (measured: exit -9 after 10.0 s). :func:`start_bwrap` therefore calls ``Popen`` in
the trio thread itself; with no ``user=``/``preexec_fn`` that is a ``vfork``, about
1 ms of blocked event loop. The sandbox dies when the thread running ``trio.run``
does, i.e. with the orchestrator, which is what ``--die-with-parent`` is for.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import IO

import trio

from corral.errors import InvalidConfig, Runtime

from .bwrap import BwrapPlan, find_tool

__all__ = [
    "DEFAULT_SANDBOX_ID",
    "bwrap_available",
    "read_info",
    "sandbox_credentials",
    "sandbox_pids",
    "start_bwrap",
]

DEFAULT_SANDBOX_ID = 65534  # nobody / nogroup
_SPAWN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_STDERR_LIMIT = 64 * 1024

_Redirect = int | IO[bytes] | None


def _env_id(name: str) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return DEFAULT_SANDBOX_ID
    try:
        value = int(raw)
    except ValueError:
        raise InvalidConfig(f"{name}={raw!r} is not a number") from None
    if not 0 < value < 2**32 - 1:
        raise InvalidConfig(f"{name}={value} is not an unprivileged id")
    return value


def sandbox_credentials() -> tuple[int, int]:
    """The (uid, gid) sandboxes run as.

    As root: a dedicated unprivileged id, ``CORRAL_SANDBOX_UID``/``CORRAL_SANDBOX_GID``
    (default 65534, never 0). Otherwise our own effective ids.
    """
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    return _env_id("CORRAL_SANDBOX_UID"), _env_id("CORRAL_SANDBOX_GID")


def _pipe_from_child() -> tuple[trio.lowlevel.FdStream, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    return trio.lowlevel.FdStream(read_end), write_end


async def start_bwrap(
    plan: BwrapPlan,
    *,
    uid: int | None = None,
    gid: int | None = None,
    stdin: _Redirect = subprocess.DEVNULL,
    stdout: _Redirect = subprocess.DEVNULL,
    stderr: _Redirect = subprocess.PIPE,
) -> trio.Process:
    """Start ``plan`` (its own session, no inherited fds but ``plan.pass_fds``).

    ``uid``/``gid``, when given, must be what the plan was made for (the plan already
    switches to them through ``setpriv`` when we are root). ``stdout``/``stderr`` take
    ``subprocess.PIPE``, ``DEVNULL``, an fd or a file; bwrap's stderr becomes the
    sandbox command's too, so for a long-lived sandbox pass a log file rather than a
    pipe nobody reads. Releases the plan's child-side fds once bwrap runs; the caller
    still closes the plan (it holds ``info_fd``).
    """
    if (uid is not None and uid != plan.uid) or (gid is not None and gid != plan.gid):
        raise InvalidConfig(f"plan is for {plan.uid}:{plan.gid}, not {uid}:{gid}")
    if not plan.startable:
        raise Runtime("this bwrap plan was already started or closed; plan again")
    await trio.lowlevel.checkpoint()
    ours: list[int] = []
    streams: list[trio.lowlevel.FdStream | None] = [None, None]
    redirects: list[_Redirect] = [stdout, stderr]
    try:
        for index, target in enumerate(redirects):
            if target == subprocess.PIPE:
                streams[index], write_end = _pipe_from_child()
                redirects[index] = write_end
                ours.append(write_end)
        # In this thread on purpose: see the module docstring (PR_SET_PDEATHSIG).
        popen = subprocess.Popen(  # noqa: ASYNC220
            plan.argv,
            stdin=stdin,
            stdout=redirects[0],
            stderr=redirects[1],
            pass_fds=plan.pass_fds,
            close_fds=True,
            start_new_session=True,
            cwd="/",
            env=_SPAWN_ENV,
        )
    except BaseException:
        for stream in streams:
            if stream is not None:
                stream.close()
        raise
    finally:
        for fd in ours:
            os.close(fd)
    plan.release_child_fds()
    return trio.Process._create(popen, None, streams[0], streams[1])


def _parse_info(data: bytes) -> int | None:
    if b"}" not in data:
        return None
    try:
        info = json.loads(data)
    except ValueError:
        return None
    pid = info.get("child-pid") if isinstance(info, dict) else None
    if not isinstance(pid, int) or pid <= 0:
        raise Runtime(f"bwrap wrote unexpected info: {data[:200]!r}")
    return pid


async def _failure_detail(process: trio.Process | None) -> str:
    if process is None:
        return ""
    with trio.move_on_after(2):
        await process.wait()
    text = b""
    if process.stderr is not None and process.returncode is not None:
        with trio.move_on_after(1):
            while len(text) < _STDERR_LIMIT:
                chunk = await process.stderr.receive_some(_STDERR_LIMIT)
                if not chunk:
                    break
                text += chunk
    status = "still running" if process.returncode is None else f"exit {process.returncode}"
    message = text.decode(errors="replace").strip()
    return f" ({status})" + (f": {message}" if message else "")


async def read_info(fd: int, *, timeout: float = 10.0, process: trio.Process | None = None) -> int:
    """Read bwrap's ``--info-fd`` JSON and return the sandbox init's host pid.

    bwrap reports right after it cloned the sandbox, before the mounts are made: a pid
    here does not mean the sandbox set-up succeeded (wait for the command's own sign of
    life for that; a failed set-up ends bwrap with exit status 1 and a message).

    Raises :class:`corral.errors.Runtime` if bwrap closes the pipe without reporting
    (it died: the message carries its exit status and stderr when ``process`` is given
    and its stderr is a pipe) or reports nothing within ``timeout`` seconds.
    """
    os.set_blocking(fd, False)
    data = b""
    with trio.move_on_after(timeout) as scope:
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                break
            data += chunk
            pid = _parse_info(data)
            if pid is not None:
                return pid
    detail = await _failure_detail(process)
    if scope.cancelled_caught:
        raise Runtime(f"bwrap did not report its sandbox within {timeout:g}s{detail}")
    raise Runtime(f"bwrap failed to start the sandbox{detail}")


def sandbox_pids(init_pid: int) -> list[int]:
    """``init_pid`` and its live descendants (from ``/proc/PID/task/*/children``).

    Zombies (exited, not yet reaped) are left out; an empty list means nothing of the
    sandbox runs any more.
    """
    found: list[int] = []
    todo = [init_pid]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            tasks = os.listdir(f"/proc/{pid}/task")
        except (OSError, IndexError):
            continue
        if state in ("Z", "X"):
            continue
        found.append(pid)
        for tid in tasks:
            try:
                children = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            except OSError:
                continue
            todo.extend(int(child) for child in children.split())
    return found


def _sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


@functools.cache
def bwrap_available() -> str | None:
    """None when sandboxes can start here, else why not (cached; ``.cache_clear()``)."""
    bwrap = find_tool("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    if _sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return "unprivileged user namespaces are off (sysctl kernel.unprivileged_userns_clone=0)"
    if _sysctl("/proc/sys/user/max_user_namespaces") == "0":
        return "user namespaces are off (sysctl user.max_user_namespaces=0)"
    try:
        uid, gid = sandbox_credentials()
    except InvalidConfig as exc:
        return str(exc)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = find_tool("setpriv")
        if setpriv is None:
            return "setpriv (util-linux) is missing; it starts sandboxes as an unprivileged uid"
        prefix = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    probe = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    probe += ["--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc", "--", "true"]
    try:
        done = subprocess.run(
            prefix + probe, capture_output=True, timeout=20, cwd="/", env=_SPAWN_ENV, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap probe failed: {exc}"
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        hint = ""
        if _sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
            hint = " (AppArmor restricts unprivileged user namespaces on this host)"
        return f"bwrap cannot make a sandbox as uid {uid}: {err or done.returncode}{hint}"
    return None

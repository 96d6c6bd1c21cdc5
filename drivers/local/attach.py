"""Local sandboxes that are not this process's own children.

- A *detached* sandbox runs under a keeper (:mod:`.keeper`): :func:`open_keeper` starts
  one with the bwrap plan's fds and returns a :class:`HeldProcess` (it stands in for
  bwrap's ``trio.Process`` in :class:`~.driver.LocalSandbox`); :meth:`HeldProcess.hand_over`
  gives it bwrap's final argv once the sandbox's cgroup (named after the keeper) exists.
- A sandbox found in the state db (another process's, or a detached one) is attached to
  with :func:`attach_local`: a :class:`KeptSandbox` reaches its agent through its socket
  dir and signals its processes by pid, after checking their start times (a recycled
  pid is never signalled).

Either way the sandbox is over when the process *watched* is gone: the keeper (it exits
right after bwrap, once it has cleaned up and recorded the exit status in the db), or
bwrap itself when there is no keeper. Waiting uses a pidfd, so it needs no polling and
works for processes that are not our children.
"""

from __future__ import annotations

import marshal
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ...actors.registry import process_alive, signal_process
from ...errors import Runtime
from ..base import ExitStatus, ProcessIds, SandboxProcess, SandboxSpec
from . import launch
from .keeper import process_start, read_exit
from .metrics import MetricsSampler, SandboxMetrics

if TYPE_CHECKING:
    from .bwrap import BwrapPlan
    from .cgroup import SandboxCgroup

__all__ = ["HeldProcess", "KeptSandbox", "attach_local", "connect_agent", "open_keeper"]

KEEPER = Path(__file__).with_name("keeper.py")
REPORT_TIMEOUT = 15.0
_SPAWN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_held: set[HeldProcess] = set()
"""Keepers started here and not reaped yet (a released one is reaped by a later start)."""


async def _wait_gone(pid: int, start: int | None) -> None:
    """Wait (no polling) until ``pid`` is no longer the recorded process."""
    while True:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            if not process_alive(pid, start):
                return
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)


def _decode(code: int) -> tuple[int | None, int | None]:
    """A keeper's exit status: bwrap's exit code, or 128 + its signal (or the keeper's own
    signal, negative)."""
    if code < 0:
        return None, -code
    if code >= 128:
        return None, code - 128
    return code, None


class HeldProcess:
    """The ``trio.Process`` part LocalSandbox uses, for a sandbox held by a keeper (or by
    another process): ``pid`` is bwrap's, the sandbox ends when the watched process does."""

    def __init__(
        self,
        *,
        pid: int,
        pid_start: int | None,
        keeper_pid: int | None,
        keeper_start: int | None,
        popen: subprocess.Popen[bytes] | None,
        db_path: Path | None,
        name: str,
        state_id: str,
        pass_fds: tuple[int, ...] = (),
        root: Path | None = None,
        spec: SandboxSpec | None = None,
    ) -> None:
        self._pass_fds = pass_fds
        self._root = root
        self._spec = spec
        self.pid = pid
        self.pid_start = pid_start
        self.keeper_pid = keeper_pid
        self.keeper_start = keeper_start
        self._popen = popen
        self._db_path = db_path
        self._name = name
        self._state_id = state_id
        self._exit: tuple[int | None, int | None] | None = None

    def _watched(self) -> tuple[int, int | None]:
        if self.keeper_pid is not None:
            return self.keeper_pid, self.keeper_start
        return self.pid, self.pid_start

    def ended(self) -> tuple[int | None, int | None] | None:
        """None while the sandbox runs; then (exit code, signal), both None if unknown."""
        if self._exit is not None:
            return self._exit
        if self._popen is not None:
            code = self._popen.poll()
            if code is None:
                return None
            _held.discard(self)
        elif process_alive(*self._watched()):
            return None
        else:
            code = None
        recorded: tuple[int | None, int | None] = (None, None)
        if self._db_path is not None:
            recorded = read_exit(self._db_path, self._name, self._state_id)
        if recorded == (None, None) and code is not None:
            recorded = _decode(code)
        self._exit = recorded
        return recorded

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        ended = self.ended()
        if ended is None:
            return None
        code, sig = ended
        if sig is not None:
            return -sig
        return 0 if code is None else code

    async def wait(self) -> int:
        while self.poll() is None:
            await _wait_gone(*self._watched())
        code = self.poll()
        assert code is not None
        return code

    async def hand_over(
        self,
        argv: list[str],
        cgroup: SandboxCgroup | None,
        *,
        stop_timeout: float = 10.0,
        kill_timeout: float = 5.0,
    ) -> None:
        """Give the keeper bwrap's argv and the rest of its config; return once bwrap
        runs (its pid is then ``self.pid``). The caller kills the keeper on failure."""
        popen, spec, root = self._popen, self._spec, self._root
        assert popen is not None and popen.stdin is not None and popen.stdout is not None
        assert spec is not None and root is not None
        config: dict[str, Any] = {
            "argv": argv,
            "pass_fds": list(self._pass_fds),
            "env": _SPAWN_ENV,
            "log": str(root / "agent.log"),
            "db": str(self._db_path),
            "name": spec.name,
            "id": spec.state_id,
            "root": str(root),
            "cgroup_dirs": [] if cgroup is None else [str(d) for d in cgroup.dirs.values()],
            "max_duration": spec.max_duration,
            "ephemeral": spec.ephemeral,
            "stop_timeout": stop_timeout,
            "kill_timeout": kill_timeout,
        }
        await trio.lowlevel.checkpoint()
        with popen.stdin:
            popen.stdin.write(marshal.dumps(config))  # a few KiB: fits the pipe
        with popen.stdout:
            report = await _read_report(popen.stdout.fileno())
        if report is None:
            tail = (root / "agent.log").read_bytes()[-2000:].decode(errors="replace").strip()
            raise Runtime(f"sandbox {spec.name!r}: its keeper failed: {tail or 'no report'}")
        self.pid, start = report
        self.pid_start = None if start < 0 else start
        _held.add(self)

    def kill(self) -> None:
        """SIGKILL the keeper (bwrap dies with it), else bwrap."""
        if self._popen is not None:
            if self._popen.poll() is None:
                self._popen.kill()
            for pipe in (self._popen.stdin, self._popen.stdout):  # a hand-over cut short
                if pipe is not None:
                    pipe.close()
        elif not signal_process(self.keeper_pid, self.keeper_start, signal.SIGKILL):
            signal_process(self.pid, self.pid_start, signal.SIGKILL)


def _prune() -> None:
    for held in list(_held):
        held.ended()


def open_keeper(plan: BwrapPlan, *, spec: SandboxSpec, root: Path, db_path: Path) -> HeldProcess:
    """Start a keeper for ``plan`` (it gets the plan's fds now, and bwrap's final argv with
    :meth:`HeldProcess.hand_over`): its pid is known before the sandbox's cgroup is made,
    so the cgroup is named after the keeper, which outlives the caller."""
    if not plan.startable:
        raise Runtime("this bwrap plan was already started or closed; plan again")
    _prune()
    err = os.open(root / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        popen = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(KEEPER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            pass_fds=plan.pass_fds,
            close_fds=True,
            start_new_session=True,
            cwd="/",
            env=_SPAWN_ENV,
        )
    finally:
        os.close(err)
    plan.release_child_fds()
    return HeldProcess(
        pid=0,
        pid_start=None,
        keeper_pid=popen.pid,
        keeper_start=process_start(popen.pid),
        popen=popen,
        db_path=db_path,
        name=spec.name,
        state_id=spec.state_id,
        pass_fds=plan.pass_fds,
        root=root,
        spec=spec,
    )


async def _read_report(fd: int) -> tuple[int, int] | None:
    """The keeper's ``"<bwrap pid> <start time>"`` line (None if it ended without one)."""
    stream = trio.lowlevel.FdStream(os.dup(fd))
    data = b""
    async with stream:
        with trio.move_on_after(REPORT_TIMEOUT):
            while b"\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
    try:
        pid, start = (int(field) for field in data.split(b"\n", 1)[0].split())
    except ValueError:
        return None
    return (pid, start) if pid > 0 else None


async def connect_agent(root: Path, name: str) -> trio.abc.Stream:
    """A new connection to the agent socket under ``root/run``.

    Through an O_PATH fd of the socket dir: the full path may exceed the 108-byte
    AF_UNIX limit (long homes, 128-character names).
    """
    try:
        fd = os.open(root / "run", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise Runtime(f"sandbox {name!r}: its socket dir is gone: {exc}") from exc
    try:
        return await trio.open_unix_socket(f"/proc/self/fd/{fd}/agent.sock")
    except OSError as exc:
        raise Runtime(f"sandbox {name!r}: cannot reach its agent: {exc}") from exc
    finally:
        os.close(fd)


class KeptSandbox(SandboxProcess):
    """A running local sandbox found in the state db (started by another process, or held
    by a keeper). Stopping it from here is the usual ladder: Shutdown over a connection of
    our own, then SIGTERM and SIGKILL by pid (start times checked). Its keeper or owner
    cleans up its cgroup and socket dir."""

    def __init__(self, spec: SandboxSpec, root: Path, ids: ProcessIds, db_path: Path) -> None:
        assert ids.pid is not None
        self.name = spec.name
        self.spec = spec
        self.root = root
        self.pid = ids.pid
        self.init_pid = ids.init_pid
        self._ids = ids
        self._process = HeldProcess(
            pid=ids.pid,
            pid_start=ids.pid_start,
            keeper_pid=ids.keeper_pid,
            keeper_start=ids.keeper_start,
            popen=None,
            db_path=db_path,
            name=spec.name,
            state_id=spec.state_id,
        )
        self._cleaned = False

    def process_ids(self) -> ProcessIds:
        return self._ids

    async def connect(self) -> trio.abc.Stream:
        return await connect_agent(self.root, self.name)

    async def metrics(self) -> SandboxMetrics:
        limit = self.spec.memory_mib
        sampler = MetricsSampler(
            init_pid=self.init_pid, memory_limit_bytes=None if limit is None else limit << 20
        )
        await trio.lowlevel.checkpoint()
        return sampler.sample()

    async def terminate(self) -> None:
        if self.init_pid is not None and process_alive(self.init_pid, self._ids.init_start):
            for pid in launch.sandbox_pids(self.init_pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        await trio.lowlevel.checkpoint()

    async def kill(self) -> None:
        ids = self._ids
        if not signal_process(ids.init_pid, ids.init_start, signal.SIGKILL):
            signal_process(ids.pid, ids.pid_start, signal.SIGKILL)
        await trio.lowlevel.checkpoint()

    @property
    def exit_status(self) -> ExitStatus | None:
        ended = self._process.ended()
        return None if ended is None else ExitStatus(*ended)

    async def wait(self) -> ExitStatus:
        await self._process.wait()
        status = self.exit_status
        assert status is not None
        return status

    async def cleanup(self) -> None:
        if self._cleaned:
            return
        with trio.CancelScope(shield=True):
            if self.exit_status is None:
                await self.kill()
                with trio.move_on_after(2.0):
                    await self.wait()
            if self.exit_status is None:
                signal_process(self._ids.pid, self._ids.pid_start, signal.SIGKILL)
                with trio.move_on_after(3.0):
                    await self.wait()
        self._cleaned = True


async def attach_local(
    spec: SandboxSpec, root: Path, ids: ProcessIds, db_path: Path
) -> KeptSandbox:
    """The running sandbox the record describes; Runtime when it is not there any more."""
    await trio.lowlevel.checkpoint()
    if ids.pid is None or not process_alive(ids.pid, ids.pid_start):
        raise Runtime(f"sandbox {spec.name!r} is not running any more (pid {ids.pid} is gone)")
    if ids.keeper_pid is not None and not process_alive(ids.keeper_pid, ids.keeper_start):
        raise Runtime(f"sandbox {spec.name!r}: its keeper (pid {ids.keeper_pid}) is gone")
    return KeptSandbox(spec, root, ids, db_path)

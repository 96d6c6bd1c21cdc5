"""Bare bubblewrap sandboxes (no agent): the baselines for create and memory.

"The same flags" means the local driver's own plan (``plan_sandbox`` with the agent
runtime view, the root staging hop when the binds need it) started with
``launch.start_bwrap``, running another command instead of the agent.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from corral.drivers.local import launch
from corral.drivers.local.bwrap import BwrapPlan, plan_sandbox
from corral.drivers.local.runtime import agent_runtime
from corral.errors import Runtime

__all__ = ["BareDirs", "BareSandbox", "plain_bwrap", "run_bare", "start_bare"]


class BareDirs:
    """Host dirs laid out like the local driver's (``run/``, ``work/``) under ``base``.

    ``reachable=True`` makes them searchable by the sandbox uid (``base`` must be too: then
    no staging hop is needed for them); otherwise they sit in a 0700 dir, as under the
    default ``~/.corral``.
    """

    def __init__(self, base: Path, *, reachable: bool = False) -> None:
        self.uid, self.gid = launch.sandbox_credentials()
        base.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="bare-", dir=base))
        os.chmod(self.root, 0o755 if reachable else 0o700)
        self.run = self.root / "run"
        self.work = self.root / "work"
        for path in (self.run, self.work):
            path.mkdir(mode=0o700)
            if os.geteuid() == 0:
                os.chown(path, self.uid, self.gid)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _plan(dirs: BareDirs, command: Sequence[str], *, runtime: bool) -> BwrapPlan:
    return plan_sandbox(
        name="bench",
        command=command,
        socket_dir=dirs.run,
        workdir_host=dirs.work,
        uid=dirs.uid,
        gid=dirs.gid,
        workdir="/workspace",
        env={},
        runtime=agent_runtime() if runtime else None,
    )


async def _reap(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()


async def run_bare(dirs: BareDirs, command: Sequence[str], *, runtime: bool = True) -> None:
    """Plan, start and wait for one bare sandbox running ``command`` to its end."""
    with _plan(dirs, command, runtime=runtime) as plan:
        process = await launch.start_bwrap(plan, stderr=subprocess.DEVNULL)
        try:
            code = await process.wait()
        finally:
            await _reap(process)
    if code != 0:
        raise Runtime(f"bare bwrap sandbox {list(command)} exited {code}")


class BareSandbox:
    """A long-lived bare sandbox (for memory baselines)."""

    def __init__(self, process: trio.Process, plan: BwrapPlan, init_pid: int) -> None:
        self.process = process
        self.plan = plan
        self.init_pid = init_pid

    @property
    def pid(self) -> int:
        return self.process.pid

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                try:
                    os.kill(self.init_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                with trio.move_on_after(3):
                    await self.process.wait()
            await _reap(self.process)
            self.plan.close()


async def start_bare(dirs: BareDirs, command: Sequence[str]) -> BareSandbox:
    """Start a bare sandbox running ``command`` and return once bwrap reported its init."""
    plan = _plan(dirs, command, runtime=True)
    process: trio.Process | None = None
    try:
        process = await launch.start_bwrap(plan, stderr=subprocess.DEVNULL)
        init_pid = await launch.read_info(plan.info_fd, process=process)
    except BaseException:
        if process is not None:
            await _reap(process)
        plan.close()
        raise
    return BareSandbox(process, plan, init_pid)


async def plain_bwrap() -> None:
    """``bwrap --ro-bind / / /bin/true``: the least bwrap can do."""
    bwrap = shutil.which("bwrap") or "bwrap"
    await trio.run_process([bwrap, "--ro-bind", "/", "/", "/bin/true"], stderr=subprocess.DEVNULL)

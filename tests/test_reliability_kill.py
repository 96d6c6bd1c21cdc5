"""Killing things abruptly, on real sandboxes.

- The orchestrator SIGKILLed while 50 sandboxes run commands: 2 s later not one process
  of any of them is left (``--die-with-parent``), and the next supervisor on the same
  home reaps what the dead one could not clean (cgroups, records, sandbox dirs).
- The agent SIGKILLed in the middle of an exec, an exec stream, a file write and a file
  read: the caller gets a typed error (``AgentGone``) within 100 ms, and the sandbox is
  ``crashed``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

import corral
from corral.actors.sandbox import SandboxActor
from corral.backend import LocalBackend
from corral.drivers.local import cgroup as cgroups
from corral.drivers.local.driver import LocalSandbox
from corral.drivers.local.launch import sandbox_pids
from corral.testing import processes_matching, wait_until

pytestmark = pytest.mark.integration

SANDBOXES = 50
DEATH_BOUND = 2.0
ERROR_BOUND = 0.1

OWNER = textwrap.dedent(
    """
    import sys, trio, corral
    from corral.backend import LocalBackend

    async def main():
        home, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
        async with corral.open_supervisor(LocalBackend(home=home)) as sup:
            limit = trio.Semaphore(8)
            streams = []

            async def one(i):
                async with limit:
                    sb = await sup.create(f"{tag}-{i}")
                    ctx = sb.exec_stream("sh", ["-c", "sleep 300; : " + tag])
                    streams.append(ctx)
                    await ctx.__aenter__()

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, i)
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(procs: dict[int, int | None]) -> list[int]:
    """Which of ``pid -> start time`` still run (same pid, same start, not a zombie)."""
    left = []
    for pid, started in procs.items():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X") and start_time(pid) == started:
            left.append(pid)
    return left


def cgroups_of(owner: int) -> list[Path]:
    layout = cgroups.detect()
    found: list[Path] = []
    for h in layout.hierarchies if layout is not None else ():
        if h.parent.exists():
            found += [p for p in h.parent.iterdir() if f"-{owner}-" in p.name]
    return found


async def test_sigkilled_orchestrator_with_fifty_sandboxes_leaves_nothing_running(
    local_backend: LocalBackend, tmp_path: Path
) -> None:
    tag = f"k{uuid.uuid4().hex[:10]}"
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    with trio.fail_after(120):
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(script), str(local_backend.home), tag, str(SANDBOXES)],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = await proc.stdout.receive_some(100)
            assert line.startswith(b"ready"), line
            tree = {pid: start_time(pid) for pid in sandbox_pids(proc.pid) if pid != proc.pid}
            # per sandbox: the cgroup shim's bwrap, its pid-1, the agent, the sleeper
            assert len(tree) >= 3 * SANDBOXES, len(tree)
            assert len(processes_matching(tag)) >= 2 * SANDBOXES
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            killed = time.monotonic()
            gone = await wait_until(lambda: not alive(tree), timeout=DEATH_BOUND)
            took = time.monotonic() - killed
            assert gone, f"{len(alive(tree))} sandbox processes outlived the orchestrator"
            assert not processes_matching(tag)
            assert took <= DEATH_BOUND
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for pid in alive(tree) if "tree" in locals() else []:
                os.kill(pid, signal.SIGKILL)
        owner = proc.pid
        # What only the dead owner could have cleaned is reaped by the next supervisor.
        async with corral.open_supervisor(local_backend) as sup:
            names = [info.name for info in (await sup.list()).sandboxes]
            assert not [n for n in names if n.startswith(tag)], names
        assert cgroups_of(owner) == []
        left = [p.name for p in local_backend.sandboxes_dir.iterdir() if p.name.startswith(tag)]
        assert left == []


# -- the agent dies mid-operation ------------------------------------------------------------


def agent_pid(sb: corral.Sandbox) -> int:
    actor = sb._actor
    assert isinstance(actor, SandboxActor)
    proc = actor.proc
    assert isinstance(proc, LocalSandbox) and proc.init_pid is not None
    for pid in sandbox_pids(proc.init_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        argv = cmdline.split(b"\0")
        if b"corral.agentd" in cmdline and b"bwrap" not in argv[0]:
            return pid
    raise AssertionError("the sandbox's agent was not found")


def workdir_on_host(sb: corral.Sandbox) -> Path:
    actor = sb._actor
    assert isinstance(actor, SandboxActor) and isinstance(actor.proc, LocalSandbox)
    return actor.proc.root / "work"


def read_bytes_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def kill_agent_during(
    sb: corral.Sandbox,
    operation: Callable[[], Awaitable[object]],
    started: Callable[[int], bool],
) -> tuple[BaseException, float]:
    """Run ``operation``; once ``started(agent_pid)`` holds, SIGKILL the agent. Returns
    the error the operation raised and how long after the kill it came."""
    pid = agent_pid(sb)
    outcome: list[BaseException] = []
    done_at: list[float] = []

    async def run() -> None:
        try:
            await operation()
        except BaseException as exc:
            done_at.append(time.monotonic())
            outcome.append(exc)
            if isinstance(exc, trio.Cancelled):
                raise
        else:
            done_at.append(time.monotonic())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        assert await wait_until(lambda: started(pid) or bool(done_at), timeout=10, interval=0.005)
        assert not done_at, "the operation ended before the agent was killed"
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
    assert outcome, "the operation succeeded although its agent was killed"
    return outcome[0], done_at[0] - killed


async def assert_crashed(sb: corral.Sandbox) -> None:
    with trio.fail_after(5):
        assert await sb.wait_until_stopped() is corral.SandboxStatus.CRASHED


async def test_agent_killed_mid_exec(local_sup: corral.Supervisor) -> None:
    tag = f"me{uuid.uuid4().hex[:8]}"
    with trio.fail_after(60):
        sb = await local_sup.create(tag)

        async def run() -> None:
            await sb.exec("sh", ["-c", f"echo started; sleep 30; : {tag}-sleeper"])

        error, took = await kill_agent_during(
            sb, run, lambda _: bool(processes_matching(f"{tag}-sleeper"))
        )
        assert isinstance(error, corral.AgentGone), repr(error)
        assert took < ERROR_BOUND, took
        await assert_crashed(sb)
        assert await wait_until(lambda: not processes_matching(tag), timeout=2)


async def test_agent_killed_mid_exec_stream(local_sup: corral.Supervisor) -> None:
    tag = f"ms{uuid.uuid4().hex[:8]}"
    with trio.fail_after(60):
        sb = await local_sup.create(tag)
        chunks: list[bytes] = []

        async def stream() -> None:
            async with sb.exec_stream("sh", ["-c", "while :; do echo tick; sleep 0.01; done"]) as p:
                async for event in p:
                    if isinstance(event, corral.protocol.ExecStdout):
                        chunks.append(event.data)

        error, took = await kill_agent_during(sb, stream, lambda _: len(chunks) >= 3)
        assert isinstance(error, corral.AgentGone), repr(error)
        assert took < ERROR_BOUND, took
        await assert_crashed(sb)


async def test_agent_killed_mid_file_write(local_sup: corral.Supervisor) -> None:
    tag = f"mw{uuid.uuid4().hex[:8]}"
    with trio.fail_after(60):
        sb = await local_sup.create(tag)
        target = workdir_on_host(sb) / "big.bin"
        payload = b"\xa5" * (512 << 20)  # 512 chunks of 1 MiB: seconds of streaming

        def growing(_: int) -> bool:
            try:
                return target.stat().st_size >= 8 << 20
            except OSError:
                return False

        error, took = await kill_agent_during(
            sb, lambda: sb.fs.write("/workspace/big.bin", payload), growing
        )
        assert isinstance(error, corral.AgentGone), repr(error)
        assert took < ERROR_BOUND, took
        await assert_crashed(sb)


async def test_agent_killed_mid_file_read(local_sup: corral.Supervisor) -> None:
    tag = f"mr{uuid.uuid4().hex[:8]}"
    with trio.fail_after(60):
        sb = await local_sup.create(tag)
        source = workdir_on_host(sb) / "big.bin"
        with source.open("wb") as f:
            f.truncate(1 << 30)  # sparse 1 GiB: 1024 read requests
        os.chown(source, *(lambda st: (st.st_uid, st.st_gid))(source.parent.stat()))
        before = read_bytes_of(agent_pid(sb))

        error, took = await kill_agent_during(
            sb,
            lambda: sb.fs.read("/workspace/big.bin"),
            lambda pid: read_bytes_of(pid) - before >= 8 << 20,
        )
        assert isinstance(error, corral.AgentGone), repr(error)
        assert took < ERROR_BOUND, took
        await assert_crashed(sb)

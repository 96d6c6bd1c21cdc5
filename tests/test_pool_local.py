"""The warm pool on real sandboxes: warm creates, what a claimed sandbox looks like from
inside and outside, stop/remove of claimed ones, other supervisors and processes, an
idle sandbox that dies, an owner that dies, and nothing left after the block."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio
import trio.testing

import corral
from corral.actors.pool import POOL_PREFIX
from corral.actors.registry import Registry, SandboxRecord
from corral.backend import LocalBackend
from corral.drivers.local.driver import LocalSandbox
from corral.testing import processes_matching, wait_until

pytestmark = pytest.mark.integration

AS_ROOT = os.geteuid() == 0
PROBE = (
    "echo host=$(hostname); echo pwd=$PWD; echo home=$HOME; echo a=$A; "
    "ls -A /workspace /tmp /run /dev/shm | tr '\\n' ' '; echo; "
    "ls /proc | grep -c '^[0-9]'"
)


def pooled(sup: corral.Supervisor) -> list[SandboxRecord]:
    return [r for r in sup.registry.unsettled() if r.name.startswith(POOL_PREFIX)]


def proc_of(sb: corral.Sandbox) -> LocalSandbox:
    proc = sb._actor.proc
    assert isinstance(proc, LocalSandbox)
    return proc


async def leftovers(backend: LocalBackend) -> tuple[list[int], list[str], list[str]]:
    """Processes naming the home, sandbox dirs, records: all empty once a block is left
    (processes get a moment: the kernel may still be reaping a pid namespace)."""
    await wait_until(lambda: not processes_matching(str(backend.home)), timeout=5)
    dirs = sorted(os.listdir(backend.sandboxes_dir)) if backend.sandboxes_dir.exists() else []
    db = Registry(backend.db_path)
    try:
        names = [r.name for r in db.unsettled()] + [r.name for r in db.page()[0]]
    finally:
        db.close()
    return processes_matching(str(backend.home)), dirs, names


async def test_four_creates_in_a_row_are_warm(
    local_backend: LocalBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(120):
        async with corral.open_supervisor(local_backend, pool={"host": 4}) as sup:
            await sup.wait_pool_ready()
            ready_pids = {r.pid for r in pooled(sup)}
            assert len(ready_pids) == 4
            warm: list[float] = []
            sbs = []
            for index in range(4):
                start = time.perf_counter()
                sb = await sup.create(f"warm-{index}")
                warm.append(time.perf_counter() - start)
                sbs.append(sb)
            assert {proc_of(sb).pid for sb in sbs} == ready_pids  # all four from the pool
            start = time.perf_counter()
            cold_sb = await sup.create("cold-4")  # the pool is empty: cold, no waiting
            cold = time.perf_counter() - start
            assert proc_of(cold_sb).pid not in ready_pids
            for sb in [*sbs, cold_sb]:
                host = (await sb.exec("hostname")).stdout.decode().strip()
                assert host == sb.name or (not AS_ROOT and host.startswith(POOL_PREFIX))
            # a claim is far below a spawn, even on a loaded machine
            assert sorted(warm)[1] < cold / 4 and max(warm) < cold, (warm, cold)
            await sup.wait_pool_ready()
            assert {r.pid for r in pooled(sup)}.isdisjoint(ready_pids)  # new ones
        with capsys.disabled():
            ms = ", ".join(f"{t * 1e3:.2f}" for t in warm)
            print(f"\nwarm creates: {ms} ms; cold: {cold * 1e3:.1f} ms", file=sys.stderr)
    assert await leftovers(local_backend) == ([], [], [])


async def test_a_claimed_sandbox_looks_fresh(local_backend: LocalBackend) -> None:
    """Same as a cold one from inside (hostname, dirs, env, processes), and found under
    its own name outside (dir, record, logs, another supervisor)."""
    with trio.fail_after(120):
        async with corral.open_supervisor(local_backend, pool={"host": 1}) as sup:
            await sup.wait_pool_ready()
            [idle] = pooled(sup)
            warm_sb = await sup.create("fresh-warm", env={"A": "1"})
            assert proc_of(warm_sb).pid == idle.pid
            cold_sb = await sup.create("fresh-cold", env={"A": "1"})  # the pool is empty
            assert proc_of(cold_sb).pid != idle.pid
            warm_out = (await warm_sb.exec("sh", ["-c", PROBE])).stdout.decode()
            cold_out = (await cold_sb.exec("sh", ["-c", PROBE])).stdout.decode()
            expect_host = "fresh-warm" if AS_ROOT else warm_out.split()[0][5:]
            assert warm_out.split("\n")[0] == f"host={expect_host}"
            # apart from the hostname, a claimed sandbox and a cold one look the same
            assert warm_out.split("\n")[1:] == cold_out.split("\n")[1:], (warm_out, cold_out)
            assert "a=1" in warm_out and "pwd=/workspace" in warm_out
            job = await warm_sb.exec_detached("sh", ["-c", "echo job=$A"])
            await job.wait()
            async with warm_sb.exec_stream("sh", ["-c", "echo stream=$A"]) as proc:
                assert await proc.wait() == 0
            # outside: directory, record, log under the new name; nothing of the old one
            sandboxes = local_backend.sandboxes_dir
            assert (sandboxes / "fresh-warm" / "run" / "agent.sock").exists()
            assert proc_of(warm_sb).root == sandboxes / "fresh-warm"
            record = sup.registry.get("fresh-warm")
            assert record is not None and record.pid == proc_of(warm_sb).pid
            assert record.spec.env == {"A": "1"} and sup.registry.get(idle.name) is None
            logs = [entry.data for entry in await warm_sb.logs()]
            assert b"job=1\n" in logs
            assert (sandboxes / "fresh-warm" / "logs").is_dir()
            assert [i.name for i in await sup.list()] == ["fresh-cold", "fresh-warm"]
            # another supervisor on the same home sees it (and no pooled one), and attaches
            async with corral.open_supervisor(local_backend) as other:
                assert [i.name for i in await other.list()] == ["fresh-cold", "fresh-warm"]
                theirs = await other.get("fresh-warm")
                assert (await theirs.exec("sh", ["-c", "echo $A"])).stdout == b"1\n"
                for hidden in pooled(sup):
                    with pytest.raises(corral.SandboxNotFound):
                        await other.get(hidden.name)
            await warm_sb.fs.write("/workspace/left", b"x")
            await warm_sb.stop()
            await sup.remove("fresh-warm")
            assert not (sandboxes / "fresh-warm").exists()
            again = await sup.create("fresh-warm")
            assert not await again.fs.exists("/workspace/left")
            assert proc_of(again).pid != idle.pid
    assert await leftovers(local_backend) == ([], [], [])


async def test_stop_kill_remove_of_claimed_sandboxes(local_backend: LocalBackend) -> None:
    with trio.fail_after(120):
        async with corral.open_supervisor(local_backend, pool={"host": 3}) as sup:
            await sup.wait_pool_ready()
            a, b, c = [await sup.create(name) for name in ("sa", "sb", "sc")]
            await a.stop(timeout=5)
            await b.kill()
            assert a.status is corral.SandboxStatus.STOPPED
            assert b.status is corral.SandboxStatus.STOPPED
            with pytest.raises(corral.SandboxStillRunning):
                await sup.remove("sc")
            await sup.remove("sa")
            await sup.remove("sb")
            for name in ("sa", "sb"):
                assert not (local_backend.sandboxes_dir / name).exists()
                assert sup.registry.get(name) is None
            assert [i.name for i in await sup.list()] == ["sc"]
            assert (await c.exec("true")).exit_code == 0
    assert await leftovers(local_backend) == ([], [], [])


async def test_an_idle_sandbox_that_dies_is_replaced(local_backend: LocalBackend) -> None:
    with trio.fail_after(120):
        async with corral.open_supervisor(local_backend, pool={"host": 1}) as sup:
            assert sup.pool is not None
            await sup.wait_pool_ready()
            warm = sup.pool.entries[0].ready[0]
            proc = warm.actor.proc
            assert isinstance(proc, LocalSandbox) and proc.init_pid is not None
            os.kill(proc.init_pid, signal.SIGKILL)
            await warm.actor.status.wait_for(lambda s: s.terminal)
            await trio.testing.wait_all_tasks_blocked()
            await sup.wait_pool_ready()
            assert sup.pool.entries[0].ready[0] is not warm
            assert sup.registry.get(warm.name) is None
            assert await wait_until(
                lambda: not (local_backend.sandboxes_dir / warm.name).exists(), timeout=10
            )
            sb = await sup.create("after")
            assert (await sb.exec("true")).exit_code == 0
    assert await leftovers(local_backend) == ([], [], [])


OWNER = textwrap.dedent(
    """
    import sys, trio, corral
    from corral.backend import LocalBackend

    async def main():
        async with corral.open_supervisor(LocalBackend(home=sys.argv[1]), pool={"host": 2}) as sup:
            await sup.wait_pool_ready()
            await sup.create("claimed")
            await sup.wait_pool_ready()
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_the_pool_of_a_dead_owner_is_reaped(
    local_backend: LocalBackend, tmp_path: Path
) -> None:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            run = functools.partial(
                trio.run_process,
                [sys.executable, str(script), str(local_backend.home)],
                stdout=subprocess.PIPE,
                check=False,
            )
            proc: trio.Process = await nursery.start(run)
            assert proc.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(64)
                assert chunk, "the owner exited early"
                line += chunk
            assert line == b"ready\n"
            db = Registry(local_backend.db_path)
            names = sorted(r.name for r in db.unsettled())
            db.close()
            assert len(names) == 3 and names[-1] == "claimed"
            assert all(n.startswith(POOL_PREFIX) for n in names[:-1])
            proc.kill()
        # its sandboxes die with it (--die-with-parent); a new supervisor reaps the rest
        assert await wait_until(lambda: not processes_matching(str(local_backend.home)), timeout=10)
        async with corral.open_supervisor(local_backend) as sup:
            assert list(await sup.list()) == [] and sup.registry.unsettled() == []
    assert await leftovers(local_backend) == ([], [], [])

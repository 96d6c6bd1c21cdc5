"""Persistent state with real sandboxes: supervisors and processes sharing a CORRAL_HOME,
detached sandboxes that outlive their creator, owners that die, names raced across
processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import trio

import corral
from corral.actors.registry import Registry, process_alive
from corral.backend import LocalBackend
from corral.testing import processes_matching, wait_until

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import sys, json, trio, corral
    from corral.backend import LocalBackend

    async def main():
        home, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
        async with corral.open_supervisor(LocalBackend(home=home)) as sup:
            if mode == "detached":
                sb = await sup.create(name, detached=True, labels={"by": "child"})
                await sb.fs.write("/workspace/note", b"left behind")
                await sb.exec("sh", ["-c", "sleep 300 >/dev/null 2>&1 & : " + name])
                print(json.dumps({"ready": True}), flush=True)
            elif mode == "detached-timed":
                await sup.create(name, detached=True, max_duration=float(sys.argv[4]))
                print(json.dumps({"ready": True}), flush=True)
            elif mode == "detached-ephemeral":
                sb = await sup.create(name, detached=True, ephemeral=True)
                print(json.dumps({"ready": True}), flush=True)
            elif mode == "owner":
                sb = await sup.create(name)
                await sb.exec("sh", ["-c", "sleep 300 >/dev/null 2>&1 & : " + name])
                print(json.dumps({"ready": True}), flush=True)
                await trio.sleep_forever()
            elif mode == "race":
                print("up", flush=True)
                sys.stdin.readline()
                try:
                    await sup.create(name)
                    print(json.dumps({"won": True}), flush=True)
                except corral.SandboxAlreadyExists:
                    print(json.dumps({"won": False}), flush=True)
                sys.stdin.readline()

    trio.run(main)
    """
)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(SCRIPT)
    return path


async def run_child(script: Path, backend: LocalBackend, *args: str) -> bytes:
    """Run the child to its end (it creates, prints, leaves its supervisor and exits)."""
    done = await trio.run_process(
        [sys.executable, str(script), str(backend.home), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


async def readline(proc: trio.Process) -> bytes:
    assert proc.stdout is not None
    data = b""
    while not data.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(1)
        if not chunk:
            break
        data += chunk
    return data.strip()


async def test_two_supervisors_in_one_process_share_a_home(local_backend: LocalBackend) -> None:
    with trio.fail_after(60):
        async with (
            corral.open_supervisor(local_backend) as a,
            corral.open_supervisor(local_backend) as b,
        ):
            mine = await a.create("shared-a")
            assert [info.name for info in await b.list()] == ["shared-a"]
            with pytest.raises(corral.SandboxAlreadyExists):
                await b.create("shared-a")
            theirs = await b.get("shared-a")
            await theirs.fs.write("/workspace/x", b"from b")
            assert (await mine.fs.read("/workspace/x")) == b"from b"
            out = await theirs.exec("cat", ["/workspace/x"])
            assert out.stdout == b"from b"
            await theirs.stop(timeout=5)
            await mine.wait_until_stopped()
            assert mine.status is corral.SandboxStatus.STOPPED  # stopped elsewhere
            await a.remove("shared-a")
            assert list(await b.list()) == []


async def test_a_detached_sandbox_outlives_its_creator(
    local_backend: LocalBackend, script: Path
) -> None:
    name = f"kept-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(90):
        await run_child(script, local_backend, name, "detached")  # the creator has exited
        assert len(processes_matching(name)) >= 1  # its sleeper still runs
        async with corral.open_supervisor(local_backend) as sup:
            (info,) = await sup.list()
            assert info.name == name and info.detached and info.labels == {"by": "child"}
            assert info.status is corral.SandboxStatus.RUNNING
            record = sup.registry.get(name)
            assert record is not None and record.keeper_pid is not None
            assert process_alive(record.keeper_pid, record.keeper_start)
            assert not process_alive(record.owner_pid, record.owner_start)  # the creator
            sb = await sup.get(name)
            assert await sb.fs.read("/workspace/note") == b"left behind"
            out = await sb.exec("sh", ["-c", "echo attached; id -u"])
            assert out.stdout.split()[0] == b"attached"
            with pytest.raises(corral.SandboxStillRunning):
                await sup.remove(name)
            await sb.stop(timeout=5)
            assert sb.status is corral.SandboxStatus.STOPPED
            assert await wait_until(lambda: not processes_matching(name), timeout=5)
            assert await wait_until(
                lambda: not process_alive(record.keeper_pid, record.keeper_start), timeout=5
            )
            (info,) = await sup.list()
            assert info.status is corral.SandboxStatus.STOPPED and info.exit_code == 0
            await sup.remove(name)
            assert list(await sup.list()) == []
            assert not (local_backend.sandboxes_dir / name).exists()


async def test_a_detached_sandbox_can_be_stopped_without_attaching_first(
    local_backend: LocalBackend, script: Path
) -> None:
    name = f"kept-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(90):
        await run_child(script, local_backend, name, "detached")
        async with corral.open_supervisor(local_backend) as sup:
            await sup.kill(name)
            (info,) = await sup.list()
            assert info.status is corral.SandboxStatus.STOPPED
            await sup.remove(name)
        assert await wait_until(lambda: not processes_matching(name), timeout=5)


async def test_the_keeper_enforces_max_duration_and_ephemeral(
    local_backend: LocalBackend, script: Path
) -> None:
    timed, gone = (f"{kind}-{uuid.uuid4().hex[:8]}" for kind in ("timed", "eph"))
    with trio.fail_after(90):
        await run_child(script, local_backend, timed, "detached-timed", "3.0")
        await run_child(script, local_backend, gone, "detached-ephemeral")
        db = Registry(local_backend.db_path)

        def timed_status() -> str:
            record = db.get(timed)
            return "" if record is None else str(record.status)

        assert await wait_until(lambda: timed_status() == "stopped", timeout=30)
        record = db.get(timed)
        assert record is not None and "max_duration" in (record.last_error or "")
        assert db.get(gone) is not None
        async with corral.open_supervisor(local_backend) as sup:
            sb = await sup.get(gone)
            await sb.stop(timeout=5)
            await trio.testing.wait_all_tasks_blocked()
            assert [info.name for info in await sup.list()] == [timed]
        assert not (local_backend.sandboxes_dir / gone).exists()


async def test_a_sigkilled_keeper_leaves_a_crashed_record(
    local_backend: LocalBackend, script: Path
) -> None:
    name = f"kept-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(90):
        await run_child(script, local_backend, name, "detached")
        record = Registry(local_backend.db_path).get(name)
        assert record is not None and record.keeper_pid is not None
        os.kill(record.keeper_pid, signal.SIGKILL)
        assert await wait_until(lambda: not processes_matching(name), timeout=5)
        async with corral.open_supervisor(local_backend) as sup:
            (info,) = await sup.list()
            assert info.status is corral.SandboxStatus.CRASHED
            assert "keeper" in (info.last_error or "")
            sb = await sup.get(name)
            await sb.start()  # started again, now by this process (and its own keeper)
            assert (await sb.exec("echo", ["back"])).stdout == b"back\n"
            await sb.stop(timeout=5)
            await sup.remove(name)


async def test_the_record_of_a_sigkilled_owner_is_reaped(
    local_backend: LocalBackend, script: Path
) -> None:
    name = f"owned-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(60):
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(script), str(local_backend.home), name, "owner"],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await proc.stdout.receive_some(100)
        assert b"ready" in line, line
        assert Registry(local_backend.db_path).get(name) is not None
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await proc.stdout.aclose()
        assert await wait_until(lambda: not processes_matching(name), timeout=5)
        async with corral.open_supervisor(local_backend) as sup:
            assert list(await sup.list()) == []
            assert not (local_backend.sandboxes_dir / name).exists()
            sb = await sup.create(name)  # the name is free
            assert (await sb.exec("echo", ["mine"])).stdout == b"mine\n"


async def test_one_name_raced_by_two_processes(local_backend: LocalBackend, script: Path) -> None:
    name = f"race-{uuid.uuid4().hex[:8]}"
    procs: list[trio.Process] = []
    try:
        with trio.fail_after(60):
            for _ in range(2):
                procs.append(
                    await trio.lowlevel.open_process(
                        [sys.executable, str(script), str(local_backend.home), name, "race"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                    )
                )
            for proc in procs:  # both supervisors are open before the go
                assert await readline(proc) == b"up"
            for proc in procs:
                assert proc.stdin is not None
                await proc.stdin.send_all(b"go\n")
            answers = sorted([await readline(proc) for proc in procs])
            assert answers == [b'{"won": false}', b'{"won": true}']
            for proc in procs:
                assert proc.stdin is not None
                await proc.stdin.send_all(b"done\n")
                await proc.wait()
                assert proc.returncode == 0
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs:  # a failed run must not leak children or pipes
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        await pipe.aclose()
    assert not processes_matching(name)


def our_keepers() -> list[int]:
    """Keeper processes that are children of this process (not reaped yet)."""
    found = []
    for pid in processes_matching("drivers/local/keeper.py"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rfind(b")") + 2 :].split()[1]) == os.getpid():
            found.append(pid)
    return found


async def test_a_cancelled_detached_create_leaves_nothing(local_backend: LocalBackend) -> None:
    with trio.fail_after(120):
        async with corral.open_supervisor(local_backend) as sup:
            before = our_keepers()
            landed = 0
            for delay in (0.0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.5, 1.0):
                name = f"cut-{uuid.uuid4().hex[:8]}"
                with trio.move_on_after(delay) as scope:
                    await sup.create(name, detached=True)
                if not scope.cancelled_caught:  # it was quicker than the deadline
                    await sup.kill(name)
                    await sup.remove(name)
                else:
                    landed += 1
                assert name not in sup and sup.registry.get(name) is None, delay
                assert await wait_until(lambda: our_keepers() == before, timeout=5), delay
                assert not (local_backend.sandboxes_dir / name).exists(), delay
            assert landed >= 3

"""The foundation, end to end on real bubblewrap sandboxes with the real agent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import trio

import corral
from corral.backend import LocalBackend
from corral.testing import process_uids, processes_matching, wait_until

pytestmark = pytest.mark.integration


async def test_hardening_inside_and_outside(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(30):
        sb = await local_sup.create("hardened")
        out = await sb.exec("cat", ["/proc/self/status"])
        status = dict(
            line.split(":", 1) for line in out.stdout.decode().splitlines() if ":" in line
        )
        assert int(status["CapEff"].strip(), 16) == 0
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"

        net = await sb.exec("cat", ["/proc/net/dev"])
        ifaces = [ln.split(":")[0].strip() for ln in net.stdout.decode().splitlines()[2:]]
        assert ifaces == ["lo"]

        pids = await sb.exec("sh", ["-c", "ls /proc | grep -E '^[0-9]+$'"])
        inside = [int(p) for p in pids.stdout.split()]
        assert max(inside) < 100 and len(inside) < 10, inside  # host pids are invisible

        usr = await sb.exec("sh", ["-c", "touch /usr/corral-probe; echo rc=$?"])
        assert b"rc=1" in usr.stdout and b"Read-only" in usr.stderr
        root = await sb.exec("sh", ["-c", "touch /corral-probe 2>/dev/null; echo rc=$?"])
        assert root.stdout == b"rc=1\n"
        ok = await sb.exec("sh", ["-c", "echo x > /tmp/a && echo y > /workspace/b && echo ok"])
        assert ok.stdout == b"ok\n"

        me = await sb.exec("id", ["-u"])
        assert me.stdout.strip() != b"0"


async def test_sandbox_processes_run_as_unprivileged_uid_on_host(
    local_sup: corral.Supervisor,
) -> None:
    with trio.fail_after(30):
        sb = await local_sup.create("uidcheck")
        marker = f"uid-probe-{uuid.uuid4().hex}"
        async with sb.exec_stream("sh", ["-c", f"sleep 30; : {marker}"]) as proc:
            assert await wait_until(lambda: bool(processes_matching(marker)), timeout=5)
            for pid in processes_matching(marker):
                assert 0 not in process_uids(pid)
            await proc.kill()


async def test_exit_codes_and_binary_output(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(30):
        sb = await local_sup.create("binary")
        for code in (0, 1, 42, 255):
            out = await sb.exec("sh", ["-c", f"exit {code}"])
            assert out.exit_code == code
        blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
        script = "import sys; d=sys.stdin.buffer.read(); sys.stdout.buffer.write(d); "
        script += "sys.stderr.buffer.write(d[::-1])"
        out = await sb.exec("python3", ["-c", script], stdin=blob)
        assert out.exit_code == 0
        assert out.stdout == blob
        assert out.stderr == blob[::-1]
        killed = await sb.exec("sh", ["-c", "kill -9 $$"])
        assert killed.exit_code == 128 + 9 and killed.signal == 9


async def test_exec_past_its_timeout_is_killed(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(30):
        sb = await local_sup.create("timeout")
        start = time.monotonic()
        with pytest.raises(corral.ExecTimeout) as info:
            await sb.exec("sh", ["-c", "echo started; sleep 60 & sleep 60"], timeout=0.5)
        assert time.monotonic() - start < 5
        assert info.value.stdout == b"started\n"
        left = await sb.exec("sh", ["-c", "ps -eo comm | grep -c sleep || true"])
        assert left.stdout.strip() == b"0"


async def test_fs_read_write(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(30):
        sb = await local_sup.create("files")
        data = os.urandom(3 * 1024 * 1024 + 17)  # several protocol chunks
        await sb.fs.write("/workspace/blob.bin", data)
        assert await sb.fs.read("/workspace/blob.bin") == data
        out = await sb.exec("sha256sum", ["/workspace/blob.bin"])
        import hashlib

        assert out.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
        reply = await local_sup.ask("files", corral.FsRead(path="/etc/passwd"))
        assert isinstance(reply.data, bytes)
        with pytest.raises(corral.FsNotFound):
            await sb.fs.read("/workspace/missing")
        with pytest.raises(corral.FsError):
            await sb.fs.write("/usr/evil", b"x")


async def test_stop_kills_a_process_that_ignores_sigterm(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(30):
        sb = await local_sup.create("stubborn")
        marker = f"stubborn-{uuid.uuid4().hex}"
        async with sb.exec_stream(
            "sh", ["-c", f"trap '' TERM; echo armed; while :; do sleep 0.1; done; : {marker}"]
        ) as proc:
            async for event in proc:
                if isinstance(event, corral.protocol.ExecStdout):
                    break
            start = time.monotonic()
            await sb.stop(timeout=1)
            elapsed = time.monotonic() - start
        assert sb.status == corral.SandboxStatus.STOPPED
        assert elapsed < 1.6, elapsed
        assert processes_matching(marker) == []


async def test_remove_running_sandbox_is_refused(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(30):
        await local_sup.create("busy")
        with pytest.raises(corral.SandboxStillRunning):
            await local_sup.remove("busy")
        await local_sup.stop("busy", timeout=2)
        await local_sup.remove("busy")
        with pytest.raises(corral.SandboxNotFound):
            await local_sup.get("busy")


async def test_fifty_sandboxes_concurrently(local_sup: corral.Supervisor) -> None:
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        sb = await local_sup.create(f"many-{i}")
        out = await sb.exec("sh", ["-c", f"echo {i}"])
        results[i] = out.stdout

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    assert results == {i: f"{i}\n".encode() for i in range(50)}


OWNER = textwrap.dedent(
    """
    import sys, trio, corral
    from corral.backend import LocalBackend

    async def main():
        async with corral.open_supervisor(LocalBackend(home=sys.argv[1])) as sup:
            for i in range(3):
                sb = await sup.create(f"{sys.argv[2]}-{i}")
                await sb.exec("true")
                ctx = sb.exec_stream("sh", ["-c", "sleep 300; : " + sys.argv[2]])
                await ctx.__aenter__()
            print("ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_sigkilled_owner_leaves_no_sandbox_behind(
    local_backend: LocalBackend, tmp_path: Path
) -> None:
    marker = f"owner{uuid.uuid4().hex[:12]}"
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    with trio.fail_after(60):
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(script), str(local_backend.home), marker],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await proc.stdout.receive_some(100)
        assert line.startswith(b"ready"), line
        assert len(processes_matching(marker)) >= 6  # bwrap + sleepers, three sandboxes
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert await wait_until(lambda: not processes_matching(marker), timeout=2.0)

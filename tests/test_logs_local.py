"""The sandbox log on real sandboxes: host-owned files, rotation, following, reading
after the stop and from another process."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import trio

import corral
from corral.actors.logfiles import LOG_FILE, read_log
from corral.backend import LocalBackend

pytestmark = pytest.mark.integration


def logs_dir(backend: LocalBackend, name: str) -> Path:
    path: Path = backend.sandboxes_dir / name / "logs"
    return path


async def test_the_log_is_in_host_owned_files_readable_after_the_stop_and_elsewhere(
    local_backend: LocalBackend,
) -> None:
    with trio.fail_after(60):
        async with corral.open_supervisor(local_backend) as sup:
            sb = await sup.create("logged")
            job = await sb.exec_detached("sh", ["-c", "echo from-the-job; echo oops >&2"])
            assert await job.wait() == 0
            # Nothing of the log is reachable from inside the sandbox.
            probe = await sb.exec("sh", ["-c", "ls -a /workspace /run/agent; cat /proc/mounts"])
            assert b"sandbox.log" not in probe.stdout and b"/logs" not in probe.stdout
            await sb.stop()
            records = await sb.logs()
            where = logs_dir(local_backend, "logged")
            assert stat.S_IMODE(where.stat().st_mode) == 0o700
            info = (where / LOG_FILE).stat()
            assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
            texts = [r.text for r in records]
            assert "from-the-job\n" in texts and "oops\n" in texts
            assert texts[0].startswith("sandbox started") and texts[-1] == "sandbox stopped"
            assert read_log(where) == records
            code = (
                "import sys; from corral.actors.logfiles import read_log; "
                "print('|'.join(r.text.strip() for r in read_log(sys.argv[1], tail=3)))"
            )
            out = await trio.run_process(
                [sys.executable, "-c", code, str(where)], capture_stdout=True
            )
            assert out.stdout.decode().strip() == "|".join(t.strip() for t in texts[-3:])


async def test_logs_rotate_within_the_configured_cap(
    local_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_LOG_FILE_BYTES", "16384")
    monkeypatch.setenv("CORRAL_LOG_FILES", "3")
    with trio.fail_after(60):
        async with corral.open_supervisor(local_backend) as sup:
            sb = await sup.create("rotating")
            script = "for i in $(seq 1 3000); do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"
            job = await sb.exec_detached("sh", ["-c", script])
            assert await job.wait() == 0
            async for record in sb.log_stream(tail=1):
                if record.text.startswith(f"job {job.id} exited"):
                    break
            where = logs_dir(local_backend, "rotating")
            files = sorted(p.name for p in where.iterdir())
            assert files == [LOG_FILE, f"{LOG_FILE}.1", f"{LOG_FILE}.2"]
            sizes = {p.name: p.stat().st_size for p in where.iterdir()}
            assert sum(sizes.values()) <= 3 * 16384, sizes
            out = b"".join(r.data for r in await sb.logs() if r.stream == "stdout")
            assert out.endswith(b"line-3000-" + b"x" * 30 + b"\n")
            assert b"line-1-" not in out  # rotated away
            assert [r.seq for r in await sb.logs(tail=5)] == [r.seq for r in read_log(where)[-5:]]


async def test_log_stream_follows_a_running_job_and_ends_with_the_sandbox(
    local_sup: corral.Supervisor,
) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("following")
        seen: list[str] = []
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                async for record in sb.log_stream():
                    seen.append(record.text)
                    if record.text == "tick 3\n":
                        await sb.stop()

            nursery.start_soon(follow)
            await sb.exec_detached(
                "sh", ["-c", "for i in 1 2 3 4 5 6 7 8 9; do echo tick $i; sleep 0.1; done"]
            )
        ticks = [t for t in seen if t.startswith("tick")]
        assert ticks[:3] == ["tick 1\n", "tick 2\n", "tick 3\n"] and len(ticks) < 9
        assert seen[-1] == "sandbox stopped"

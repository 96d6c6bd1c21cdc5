"""launch.py: read_info, sandbox_pids, bwrap_available and how start_bwrap spawns."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from corral.drivers.local import launch
from corral.drivers.local.bwrap import BwrapPlan, plan_sandbox
from corral.drivers.local.launch import (
    bwrap_available,
    read_info,
    sandbox_credentials,
    sandbox_pids,
    start_bwrap,
)
from corral.errors import InvalidConfig, Runtime

INFO = {"child-pid": 4242, "cgroup-namespace": 1, "ipc-namespace": 2, "mnt-namespace": 3}


class Pipe:
    """A pipe whose ends are closed once, by the test or at teardown."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_CLOEXEC)
        self.open = {self.read_end, self.write_end}

    def close_write(self) -> None:
        self.open.discard(self.write_end)
        os.close(self.write_end)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    for fd in p.open:
        os.close(fd)


async def test_read_info_assembles_chunks(
    pipe: Pipe, autojump_clock: trio.testing.MockClock
) -> None:
    read_end, write_end = pipe.read_end, pipe.write_end
    text = json.dumps(INFO, indent=4).encode() + b"\n"

    async def writer() -> None:
        for start in range(0, len(text), 7):
            os.write(write_end, text[start : start + 7])
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        assert await read_info(read_end, timeout=60) == 4242


async def test_read_info_times_out(pipe: Pipe, autojump_clock: trio.testing.MockClock) -> None:
    read_end, write_end = pipe.read_end, pipe.write_end
    os.write(write_end, b'{\n    "child-pid": 7')  # never finished
    start = trio.current_time()
    with pytest.raises(Runtime, match="did not report its sandbox within 5s"):
        await read_info(read_end, timeout=5)
    assert trio.current_time() - start == pytest.approx(5)


async def test_read_info_eof_without_report(pipe: Pipe) -> None:
    read_end = pipe.read_end
    pipe.close_write()
    with trio.fail_after(5), pytest.raises(Runtime, match="failed to start"):
        await read_info(read_end)


async def test_read_info_rejects_garbage(pipe: Pipe) -> None:
    read_end, write_end = pipe.read_end, pipe.write_end
    os.write(write_end, b'{"child-pid": "x"}\n')
    with trio.fail_after(5), pytest.raises(Runtime, match="unexpected info"):
        await read_info(read_end)


async def test_read_info_failure_carries_status_and_stderr(pipe: Pipe) -> None:
    read_end = pipe.read_end
    pipe.close_write()
    with trio.fail_after(10):
        process = await trio.lowlevel.open_process(
            ["sh", "-c", "echo 'bwrap: Can not mount tmpfs' >&2; exit 3"],
            stderr=subprocess.PIPE,
        )
        with pytest.raises(Runtime) as caught:
            await read_info(read_end, process=process)
        assert process.stderr is not None
        await process.stderr.aclose()
    assert "exit 3" in str(caught.value)
    assert "bwrap: Can not mount tmpfs" in str(caught.value)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


async def test_sandbox_pids_walks_the_tree() -> None:
    with trio.fail_after(10):
        process = await trio.lowlevel.open_process(
            ["sh", "-c", "sleep 60 & sleep 60 & echo ready; wait"], stdout=subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            assert await process.stdout.receive_some(100) == b"ready\n"
            pids = sandbox_pids(process.pid)
            assert pids[0] == process.pid and len(pids) == 3
            for pid in pids[1:]:  # children of the shell
                assert parent_of(pid) == process.pid
        finally:
            for pid in sandbox_pids(process.pid)[::-1]:
                os.kill(pid, 9)
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()
    assert sandbox_pids(process.pid) == []


def test_sandbox_pids_of_nothing() -> None:
    assert sandbox_pids(2**22 + 12345) == []


def test_bwrap_available_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    check = bwrap_available.__wrapped__
    monkeypatch.setattr(launch, "find_tool", lambda name: None)
    assert "not installed" in (check() or "")
    monkeypatch.undo()
    if check() is None:
        assert bwrap_available() is None
    monkeypatch.setattr(launch, "_sysctl", lambda path: "0")
    assert "user namespaces are off" in (check() or "")


def _plan(tmp_path: Path, **kwargs: Any) -> BwrapPlan:
    uid, gid = sandbox_credentials()
    for sub in ("run", "work"):
        (tmp_path / sub).mkdir(exist_ok=True)
    options: dict[str, Any] = {
        "name": "t",
        "command": ["/bin/true"],
        "socket_dir": tmp_path / "run",
        "workdir_host": tmp_path / "work",
        "uid": uid,
        "gid": gid,
    }
    options.update(kwargs)
    return plan_sandbox(**options)


async def test_start_bwrap_spawns_from_the_trio_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PR_SET_PDEATHSIG follows the parent *thread*: spawning from one of trio's worker
    threads would kill the sandbox when that thread idles out (10 s)."""
    seen: list[int] = []
    real = subprocess.Popen

    def spy(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        seen.append(threading.get_ident())
        assert "user" not in kwargs and "preexec_fn" not in kwargs  # keeps vfork
        assert kwargs["start_new_session"] and kwargs["close_fds"]
        return real(["true"], **{k: v for k, v in kwargs.items() if k != "pass_fds"})

    monkeypatch.setattr(subprocess, "Popen", spy)
    with trio.fail_after(10), _plan(tmp_path) as plan:
        process = await start_bwrap(plan, stderr=subprocess.DEVNULL)
        assert await process.wait() == 0
        assert (plan.startable, plan.closed) == (False, False)  # child fds released
        with pytest.raises(Runtime, match="already started"):
            await start_bwrap(plan)
    assert seen == [threading.get_ident()]


async def test_start_bwrap_checks_credentials(tmp_path: Path) -> None:
    with _plan(tmp_path) as plan:
        with pytest.raises(InvalidConfig):
            await start_bwrap(plan, uid=plan.uid + 1)
        assert plan.startable


async def test_start_bwrap_failure_reports_bwrap_stderr(tmp_path: Path) -> None:
    reason = bwrap_available()
    if reason is not None:
        pytest.skip(reason)
    with trio.fail_after(20), _plan(tmp_path) as plan:
        plan.argv.insert(plan.argv.index("--unshare-all"), "--no-such-option")
        process = await start_bwrap(plan)
        with pytest.raises(Runtime) as caught:
            await read_info(plan.info_fd, process=process)
        assert await process.wait() == 1
        assert process.stderr is not None
        await process.stderr.aclose()
    assert "exit 1" in str(caught.value)
    assert "Unknown option --no-such-option" in str(caught.value)

"""SandboxActor over the fake driver: execs, fs, typed failures, never a hang."""

from __future__ import annotations

import errno
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import corral
from corral.actors.execs import EXEC_TIMEOUT_MARGIN, ExecResult
from corral.actors.sandbox import Describe, SandboxInfo
from corral.actors.state import SandboxStatus
from corral.actors.supervisor import Supervisor, open_supervisor
from corral.drivers.fake import FakeDriver
from corral.errors import (
    AgentGone,
    ExecFailed,
    ExecTimeout,
    FsAlreadyExists,
    FsIsADirectory,
    FsNotFound,
    InvalidConfig,
    SandboxNotRunning,
)
from corral.protocol import EXEC_WINDOW, FS_CHUNK, Exec, FsData, FsRead, FsWrite, Ping, Pong
from corral.sandbox import Sandbox


@asynccontextmanager
async def harness(**behaviour: Any) -> AsyncIterator[tuple[FakeDriver, Supervisor]]:
    with trio.fail_after(120):
        async with FakeDriver(**behaviour) as driver, open_supervisor(driver=driver) as sup:
            yield driver, sup


def status(sb: Sandbox) -> SandboxStatus:
    return sb.status  # a call: no type narrowing across awaits


# -- exec --------------------------------------------------------------------------------


async def test_exec_collects_output_and_exit_code() -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a", env={"FROM_SPEC": "1"})
        result = await sb.exec("echo", ["hello", "world"])
        assert result.stdout == b"hello world\n" and result.exit_code == 0 and result.success
        assert result.pid is not None
        failed = await sb.exec("stderr", ["oops"])
        assert failed.stderr == b"oops\n" and failed.exit_code == 1 and not failed.success
        assert (await sb.exec("exit", ["7"])).exit_code == 7
        assert (await sb.exec("printenv", ["FROM_SPEC"])).stdout == b"1\n"
        assert (await sb.exec("printenv", ["X"], env={"X": "y"})).stdout == b"y\n"
        assert (await sb.exec("pwd")).stdout == b"/workspace\n"
        assert (await sb.exec("pwd", cwd="/tmp")).stdout == b"/tmp\n"
        assert (await sb.exec("cat", stdin=b"piped")).stdout == b"piped"


async def test_exec_of_an_unknown_command_raises_exec_failed() -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        with pytest.raises(ExecFailed) as info:
            await sb.exec("no-such-command")
        assert info.value.kind == "not_found" and info.value.errno == errno.ENOENT


async def test_exec_rejects_a_string_for_args() -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        with pytest.raises(InvalidConfig, match="not a single string"):
            await sb.exec("echo", "hi")
        with pytest.raises(InvalidConfig, match="timeout"):
            await sb.exec("echo", timeout=0)
        with pytest.raises(InvalidConfig, match="window"):
            await sb.ask(Exec(cmd="echo", window=0))


async def test_many_concurrent_execs_get_their_own_output() -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        results: dict[int, ExecResult] = {}

        async def one(n: int) -> None:
            results[n] = await sb.exec("echo", [f"out-{n}"])

        async with trio.open_nursery() as nursery:
            for n in range(300):
                nursery.start_soon(one, n)
        assert {n: r.stdout for n, r in results.items()} == {
            n: f"out-{n}\n".encode() for n in range(300)
        }


async def test_large_output_flows_under_credit() -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        size = 5 * EXEC_WINDOW + 123
        result = await sb.exec("bytes", [str(size)])
        assert len(result.stdout) == size
        assert result.stdout[:256] == bytes(range(256))
        (session,) = driver.processes["a"].execs
        assert 0 < session.max_in_flight <= EXEC_WINDOW


async def test_a_small_window_still_moves_everything() -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        result = await sb.ask(Exec(cmd="bytes", args=["1000"], window=10))
        assert isinstance(result, ExecResult) and len(result.stdout) == 1000
        assert driver.processes["a"].execs[0].max_in_flight <= 10


async def test_a_burst_of_tiny_frames_is_not_an_overrun() -> None:
    # Credit counts bytes: far more than 64 one-line frames may be in flight at once.
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        result = await sb.exec("burst", ["20000"])  # 20000 frames in one read
        assert result.stdout.splitlines()[-1] == b"19999"
        result = await sb.exec("lines", ["20000"])
        assert result.stdout.splitlines()[-1] == b"19999"


async def test_exec_timeout_reported_by_the_agent_keeps_partial_output(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        t0 = trio.current_time()
        with pytest.raises(ExecTimeout) as info:
            await sb.exec("tick", ["10", "1"], timeout=3.5)
        assert trio.current_time() - t0 == pytest.approx(3.5)
        assert info.value.stdout == b"0\n1\n2\n3\n"
        assert driver.processes["a"].execs[0].finished.is_set()
        assert (await sb.exec("echo", ["after"])).stdout == b"after\n"


async def test_exec_host_guard_fires_when_the_agent_is_wedged(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        result = await sb.exec("echo", ["before"])
        assert result.exit_code == 0
        driver.processes["a"].agents[0].wedged = True
        t0 = trio.current_time()
        with pytest.raises(ExecTimeout, match="host margin"):
            await sb.exec("echo", ["never"], timeout=1)
        assert trio.current_time() - t0 == pytest.approx(1 + EXEC_TIMEOUT_MARGIN)
        await sb.kill()


async def test_agent_death_mid_exec_fails_at_once_with_agent_gone(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        async with trio.open_nursery() as nursery:
            failures: list[BaseException] = []

            async def run(cmd: str, *args: str) -> None:
                try:
                    await sb.exec(cmd, list(args))
                except AgentGone as exc:
                    failures.append(exc)

            for _ in range(5):
                nursery.start_soon(run, "sleep", "1000")
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            driver.processes["a"].crash()
        assert trio.current_time() == t0
        assert len(failures) == 5
        assert await sb.wait_until_stopped() is SandboxStatus.CRASHED


async def test_an_agent_that_dies_during_an_exec_crashes_the_sandbox(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        with pytest.raises(AgentGone):
            await sb.exec("agent-die")
        assert await sb.wait_until_stopped() is SandboxStatus.CRASHED
        assert driver.processes["a"].cleaned_up


async def test_a_dropped_agent_connection_crashes_the_sandbox(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        proc = driver.processes["a"]
        proc.drop_connections()
        assert await sb.wait_until_stopped() is SandboxStatus.CRASHED
        # The process was still running: the actor's clean-up ended it.
        assert proc.cleaned_up and proc.exit_status is not None


async def test_execs_in_flight_when_the_sandbox_is_killed_get_sandbox_not_running(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        errors: list[BaseException] = []

        async def run() -> None:
            try:
                await sb.exec("sleep", ["1000"])
            except SandboxNotRunning as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            await sb.kill()
        assert trio.current_time() == t0
        assert len(errors) == 3


async def test_stop_sigterms_running_commands(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        results: list[ExecResult] = []

        async def run() -> None:
            results.append(await sb.exec("sleep", ["1000"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            await sb.stop()
        assert [(r.exit_code, r.signal) for r in results] == [(143, 15)]


async def test_a_cancelled_exec_is_abandoned_in_the_sandbox(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        with trio.move_on_after(2):
            await sb.exec("sleep", ["1000"])
        await trio.testing.wait_all_tasks_blocked()
        (session,) = driver.processes["a"].execs
        assert session.finished.is_set() and session.killed_by == 9
        assert sup._actors["a"].active.value == 0


# -- fs ------------------------------------------------------------------------------------


async def test_fs_round_trip_small_and_large() -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        assert await sb.fs.write("/workspace/a.txt", "hi") == 2
        assert await sb.fs.read("/workspace/a.txt") == b"hi"
        big = bytes(range(256)) * (3 * FS_CHUNK // 256 + 7)
        assert await sb.fs.write("big.bin", big) == len(big)
        assert bytes(driver.processes["a"].fs.files["/workspace/big.bin"]) == big
        assert await sb.fs.read("/workspace/big.bin") == big
        await sb.fs.write("a.txt", b"!", append=True)
        assert await sb.fs.read_text("a.txt") == "hi!"


@pytest.mark.parametrize("behaviour", [{"fs_chunk": 1000}, {"read_per_request": True}])
async def test_fs_read_loops_over_chunks(behaviour: dict[str, Any]) -> None:
    async with harness(**behaviour) as (_driver, sup):
        sb = await sup.create("a")
        data = bytes(range(256)) * 4000 + b"tail"
        await sb.fs.write("f", data)
        assert await sb.fs.read("f") == data
        await sb.fs.write("empty", b"")
        assert await sb.fs.read("empty") == b""
        part = await sup.ask("a", FsRead(path="f", offset=10, length=5000))
        assert isinstance(part, FsData) and part.data == data[10:5010] and not part.eof
        rest = await sup.ask("a", FsRead(path="f", offset=len(data) - 3))
        assert rest == FsData(data=b"ail", eof=True)


async def test_fs_operations_and_typed_errors() -> None:
    async with harness() as (_driver, sup):
        fs = (await sup.create("a")).fs
        await fs.mkdir("/data/x/y", parents=True)
        await fs.write("/data/x/y/f", b"1")
        assert [e.name for e in await fs.list("/data/x")] == ["y"]
        entry = await fs.stat("/data/x/y/f")
        assert entry.kind == "file" and entry.size == 1
        assert (await fs.stat("/data")).kind == "dir"
        await fs.copy("/data/x/y/f", "/data/g")
        await fs.rename("/data/g", "/data/h")
        assert not await fs.exists("/data/g") and await fs.exists("/data/h")
        with pytest.raises(FsNotFound) as info:
            await fs.read("/nope")
        assert isinstance(info.value, FileNotFoundError) and info.value.errno == errno.ENOENT
        with pytest.raises(FsIsADirectory):
            await fs.read("/data")
        with pytest.raises(FsAlreadyExists):
            await fs.mkdir("/data")
        with pytest.raises(corral.FsNotEmpty):
            await fs.remove("/data/x")
        await fs.remove("/data/x", recursive=True)
        assert not await fs.exists("/data/x/y/f")
        with pytest.raises(FsNotFound):
            await fs.write("/missing/dir/f", b"")


async def test_fs_write_of_more_than_a_frame_is_chunked() -> None:
    async with harness() as (driver, sup):
        sb = await sup.create("a")
        data = b"z" * (5 * 1024 * 1024)  # more than the 4 MiB frame limit
        written = await sup.ask("a", FsWrite(path="/tmp/z", data=data))
        assert written.written == len(data)
        writes = [m for m in driver.processes["a"].agents[0].received if isinstance(m, FsWrite)]
        assert [len(w.data) for w in writes] == [FS_CHUNK] * 5
        assert [w.truncate for w in writes] == [True, False, False, False, False]
        assert await sb.fs.read("/tmp/z") == data


# -- misc ----------------------------------------------------------------------------------


async def test_ping_and_unknown_messages() -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        await sb.ping()
        assert isinstance(await sup.ask("a", Ping()), Pong)
        with pytest.raises(InvalidConfig, match="does not handle str"):
            await sup.ask("a", "hello")


async def test_requests_on_a_stopped_sandbox_are_refused() -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        await sb.stop()
        for call in (sb.exec("echo"), sb.fs.read("/x"), sb.ping()):
            with pytest.raises(SandboxNotRunning, match="is stopped"):
                await call


async def test_drain_lets_running_work_finish_then_stops(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        results: list[ExecResult] = []

        async def run() -> None:
            results.append(await sb.exec("sleep", ["3"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            nursery.start_soon(sb.drain)
            await trio.testing.wait_all_tasks_blocked()
            assert status(sb) is SandboxStatus.DRAINING
            with pytest.raises(SandboxNotRunning):
                await sb.exec("echo")
        assert [r.exit_code for r in results] == [0]
        assert status(sb) is SandboxStatus.STOPPED
        assert trio.current_time() - t0 == pytest.approx(3.1)


async def test_describe_and_ask_cost() -> None:
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        info = await sup.ask("a", Describe())
        assert isinstance(info, SandboxInfo) and info.status is SandboxStatus.RUNNING
        actor = sup._actors["a"]
        samples = []
        for _ in range(10_000):
            t0 = time.perf_counter()
            await actor.ask(Describe())
            samples.append(time.perf_counter() - t0)
        ask_us = statistics.median(samples) * 1e6
        samples = []
        for _ in range(2_000):
            t0 = time.perf_counter()
            await actor.ask(Ping())
            samples.append(time.perf_counter() - t0)
        ping_us = statistics.median(samples) * 1e6
        exec_samples = []
        for _ in range(500):
            t0 = time.perf_counter()
            await sb.exec("exit", ["0"])
            exec_samples.append(time.perf_counter() - t0)
        exec_us = statistics.median(exec_samples) * 1e6
    print(
        f"\nSandboxActor ask round trip, no I/O (Describe): median {ask_us:.1f} us over 10k"
        f"\nPing through the fake agent: median {ping_us:.1f} us"
        f"\nexec('exit 0') through the fake agent: median {exec_us:.1f} us"
    )
    assert ask_us < 500


async def test_exec_request_struct_via_ask() -> None:
    async with harness() as (_driver, sup):
        await sup.create("a")
        result = await sup.ask("a", Exec(cmd="echo", args=["low", "level"]))
        assert result == ExecResult(exit_code=0, stdout=b"low level\n", pid=result.pid)


async def test_kill_is_not_stuck_behind_a_flood_of_execs(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    from corral.actors.sandbox import SandboxActor

    monkeypatch.setattr(SandboxActor, "max_concurrency", 2)
    async with harness() as (_driver, sup):
        sb = await sup.create("a")
        errors: list[BaseException] = []

        async def run() -> None:
            try:
                await sb.exec("sleep", ["1000"])
            except SandboxNotRunning as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(5):  # 2 run, the mailbox loop waits for a slot for the 3rd
                nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            t0 = trio.current_time()
            await sb.kill()
            assert trio.current_time() == t0
        assert len(errors) == 5

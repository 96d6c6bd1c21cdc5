"""Sandbox.exec_stream: stdin, events, credit, signals, and kill on early exit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from corral.actors.supervisor import Supervisor, open_supervisor
from corral.drivers.fake import FakeDriver, FakeExec
from corral.errors import ExecFailed, ExecTimeout, Runtime, SandboxNotRunning
from corral.protocol import EXEC_WINDOW, ExecExited, ExecStarted, ExecStdout, Message
from corral.sandbox import Sandbox


@asynccontextmanager
async def harness(**behaviour: Any) -> AsyncIterator[tuple[FakeDriver, Supervisor, Sandbox]]:
    with trio.fail_after(120):
        async with FakeDriver(**behaviour) as driver, open_supervisor(driver=driver) as sup:
            yield driver, sup, await sup.create("a")


def only_exec(driver: FakeDriver) -> FakeExec:
    (session,) = driver.processes["a"].execs
    return session


async def test_stdin_to_stdout_and_the_event_order() -> None:
    async with harness() as (driver, _sup, sb):
        events: list[Message] = []
        async with sb.exec_stream("cat") as proc:
            await proc.send_stdin(b"hello ")
            await proc.send_stdin("world\n")
            await proc.close_stdin()
            async for event in proc:
                events.append(event)
            assert await proc.wait() == 0
            assert proc.exit_code == 0 and proc.pid is not None
        assert isinstance(events[0], ExecStarted)
        assert isinstance(events[-1], ExecExited) and events[-1].exit_code == 0
        out = b"".join(e.data for e in events if isinstance(e, ExecStdout))
        assert out == b"hello world\n"
        assert only_exec(driver).request.interactive


async def test_large_stdin_is_chunked() -> None:
    async with harness() as (_driver, _sup, sb):
        data = bytes(range(256)) * 4096 * 3  # 3 MiB
        got = bytearray()
        async with sb.exec_stream("cat") as proc, trio.open_nursery() as nursery:

            async def feed() -> None:
                await proc.send_stdin(data)
                await proc.close_stdin()

            nursery.start_soon(feed)
            async for event in proc:
                if isinstance(event, ExecStdout):
                    got += event.data
        assert bytes(got) == data


async def test_output_waits_for_the_reader(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, _sup, sb):
        size = 3 * EXEC_WINDOW
        async with sb.exec_stream("bytes", [str(size)]) as proc:
            await trio.testing.wait_all_tasks_blocked()
            session = only_exec(driver)
            # Nobody reads: the command is held at one window of output.
            assert session.sent == EXEC_WINDOW and not session.finished.is_set()
            got = 0
            async for event in proc:
                if isinstance(event, ExecStdout):
                    got += len(event.data)
            assert got == size and proc.exit_code == 0
            assert session.max_in_flight <= EXEC_WINDOW


async def test_leaving_the_block_early_kills_the_process() -> None:
    async with harness() as (driver, sup, sb):
        async with sb.exec_stream("sleep", ["1000"]) as proc:
            async for event in proc:
                assert isinstance(event, ExecStarted)
                break
        session = only_exec(driver)
        await trio.testing.wait_all_tasks_blocked()
        assert session.finished.is_set() and session.killed_by == 9
        assert sup._actors["a"].active.value == 0
        with pytest.raises(Runtime, match="closed"):
            await proc.__anext__()


async def test_cancellation_kills_the_process(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (driver, _sup, sb):
        with trio.move_on_after(2):
            async with sb.exec_stream("sleep", ["1000"]) as proc:
                await proc.wait()
        await trio.testing.wait_all_tasks_blocked()
        session = only_exec(driver)
        assert session.finished.is_set() and session.killed_by == 9


async def test_an_exception_in_the_block_kills_the_process() -> None:
    async with harness() as (driver, _sup, sb):
        with pytest.raises(KeyError):
            async with sb.exec_stream("ignore-term"):
                await trio.testing.wait_all_tasks_blocked()
                raise KeyError("x")
        await trio.testing.wait_all_tasks_blocked()
        assert only_exec(driver).killed_by == 9


async def test_signals_and_resize() -> None:
    async with harness() as (driver, _sup, sb):
        async with sb.exec_stream("ignore-term", tty=True, rows=10, cols=20) as proc:
            await proc.resize(40, 100)
            await proc.signal(15)  # ignored by this command
            await trio.testing.wait_all_tasks_blocked()
            session = only_exec(driver)
            assert not session.finished.is_set()
            await proc.kill()
            assert await proc.wait() == 137
            assert proc.exited is not None and proc.exited.signal == 9
        assert session.resizes == [(40, 100)] and session.signals == [15, 9]
        assert (session.request.tty, session.request.rows, session.request.cols) == (True, 10, 20)
        async with sb.exec_stream("sleep", ["1000"]) as proc:
            await proc.signal(15)
            assert await proc.wait() == 143


async def test_sending_after_the_end_is_refused() -> None:
    async with harness() as (_driver, _sup, sb):
        async with sb.exec_stream("exit", ["3"]) as proc:
            assert await proc.wait() == 3
            with pytest.raises(Runtime, match="has ended"):
                await proc.send_stdin(b"late")


async def test_a_command_that_cannot_start_raises_exec_failed() -> None:
    async with harness() as (_driver, _sup, sb):
        async with sb.exec_stream("no-such-command") as proc:
            with pytest.raises(ExecFailed, match="command not found"):
                await proc.wait()


async def test_timeout_is_raised_by_wait(autojump_clock: trio.abc.Clock) -> None:
    async with harness() as (_driver, _sup, sb):
        async with sb.exec_stream("sleep", ["1000"], timeout=2) as proc:
            t0 = trio.current_time()
            with pytest.raises(ExecTimeout):
                await proc.wait()
            assert trio.current_time() - t0 == pytest.approx(2)
            assert proc.exited is not None and proc.exited.timed_out


async def test_a_stream_whose_sandbox_is_killed_ends_with_sandbox_not_running(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with harness() as (_driver, _sup, sb):
        async with sb.exec_stream("sleep", ["1000"]) as proc:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sb.kill)
                with pytest.raises(SandboxNotRunning):
                    await proc.wait()
        with pytest.raises(SandboxNotRunning):
            async with sb.exec_stream("echo"):
                pass


async def test_many_streams_at_once() -> None:
    async with harness() as (_driver, _sup, sb):
        outputs: dict[int, bytes] = {}

        async def one(n: int) -> None:
            async with sb.exec_stream("cat") as proc:
                await proc.send_stdin(f"{n}".encode())
                await proc.close_stdin()
                out = b""
                async for event in proc:
                    if isinstance(event, ExecStdout):
                        out += event.data
                outputs[n] = out

        async with trio.open_nursery() as nursery:
            for n in range(100):
                nursery.start_soon(one, n)
        assert outputs == {n: f"{n}".encode() for n in range(100)}

"""The fake driver itself: real protocol frames, knobs, the in-memory fs."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
import trio
import trio.testing

from corral.actors.channel import AgentChannel
from corral.drivers.base import ExitStatus, SandboxProcess, SandboxSpec
from corral.drivers.fake import FakeDriver
from corral.drivers.fake_fs import FakeFs
from corral.errors import AgentError, Runtime
from corral.protocol import (
    FsCopy,
    FsList,
    FsRemove,
    FsRename,
    FsWrite,
    Ping,
    Pong,
    Ready,
)


def exit_of(proc: SandboxProcess) -> ExitStatus | None:
    return proc.exit_status  # a call: no type narrowing across awaits


def spec(name: str = "a", **kw: object) -> SandboxSpec:
    return SandboxSpec(name=name, **kw)  # type: ignore[arg-type]


async def test_spawn_requires_the_context_manager() -> None:
    with pytest.raises(Runtime, match="async with"):
        await FakeDriver().spawn(spec())


async def test_the_agent_speaks_the_real_protocol() -> None:
    async with FakeDriver() as driver:
        proc = await driver.spawn(spec())
        stream = await proc.connect()
        async with AgentChannel.open(stream, label="t") as channel:
            assert isinstance(channel.ready, Ready) and channel.ready.pid == proc.pid
            assert isinstance(await channel.request(Ping()), Pong)
        await proc.cleanup()
        assert proc.cleaned_up and proc.exit_status == ExitStatus(None, 9)


async def test_spawn_delay_and_error(autojump_clock: trio.abc.Clock) -> None:
    async with FakeDriver(spawn_delay=2.0) as driver:
        t0 = trio.current_time()
        await driver.spawn(spec())
        assert trio.current_time() - t0 == pytest.approx(2.0)
        driver.configure("bad", spawn_error=OSError("boom"))
        with pytest.raises(OSError, match="boom"):
            await driver.spawn(spec("bad"))
        assert driver.processes["bad"].cleaned_up
        assert driver.overrides["bad"].spawn_delay == 2.0


async def test_signals_and_knobs() -> None:
    async with FakeDriver(ignore_sigterm=True) as driver:
        proc = await driver.spawn(spec())
        await proc.terminate()
        assert exit_of(proc) is None
        await proc.kill()
        assert exit_of(proc) == ExitStatus(None, 9)
        assert [what for _, what in proc.events] == ["spawn", "SIGTERM", "SIGKILL", "exit:SIGKILL"]
        driver.configure("b", ignore_sigkill=True)
        stuck = await driver.spawn(spec("b"))
        await stuck.kill()
        assert exit_of(stuck) is None
        await stuck.cleanup()  # the last resort always ends it
        assert exit_of(stuck) is not None


async def test_a_wedged_agent_answers_only_the_handshake() -> None:
    async with FakeDriver(wedged=True) as driver:
        proc = await driver.spawn(spec())
        async with AgentChannel.open(await proc.connect()) as channel:
            with pytest.raises(AgentError, match="no reply"):
                await channel.request(Ping(), timeout=0.05)


async def test_closing_the_driver_ends_every_process() -> None:
    async with FakeDriver() as driver:
        procs = [await driver.spawn(spec(f"p{n}")) for n in range(3)]
        detached = await driver.spawn(spec("d", detached=True))
    assert all(p.exit_status is not None for p in [*procs, detached])
    assert [p.name for p in driver.leaked] == ["p0", "p1", "p2"]  # nobody cleaned them up


async def test_crash_closes_the_agent_connection() -> None:
    async with FakeDriver() as driver:
        proc = await driver.spawn(spec())
        async with AgentChannel.open(await proc.connect()) as channel:
            proc.crash(code=4)
            with trio.fail_after(1):
                await channel.closed.wait()
        assert await proc.wait() == ExitStatus(4)


def test_fake_fs_write_semantics() -> None:
    fs = FakeFs("/w")
    assert fs.write(FsWrite(path="f", data=b"hello")) == 5
    fs.write(FsWrite(path="f", data=b"J", offset=0, truncate=False))
    assert fs.read("/w/f") == b"Jello"
    fs.write(FsWrite(path="f", data=b"!", offset=7, truncate=False))
    assert fs.read("f") == b"Jello\0\0!"
    fs.write(FsWrite(path="f", data=b"XY", offset=2))  # truncate at the offset
    assert fs.read("f") == b"JeXY"
    fs.write(FsWrite(path="f", data=b"+", append=True))
    assert fs.read("f", offset=1, length=2) == b"eX" and fs.size("f") == 5


def test_fake_fs_errors_carry_real_errnos() -> None:
    fs = FakeFs("/w")
    fs.write(FsWrite(path="/w/file", data=b""))
    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: fs.read("/nope"), errno.ENOENT),
        (lambda: fs.read("/w"), errno.EISDIR),
        (lambda: fs.handle(FsList(path="/w/file")), errno.ENOTDIR),
        (lambda: fs.handle(FsWrite(path="/w/file/x", data=b"")), errno.ENOTDIR),
        (lambda: fs.handle(FsRemove(path="/")), errno.EPERM),
        (lambda: fs.handle(FsRemove(path="/w")), errno.ENOTEMPTY),
        (lambda: fs.handle(FsRename(src="/w", dst="/w/inner")), errno.EINVAL),
        (lambda: fs.handle(FsCopy(src="/none", dst="/x")), errno.ENOENT),
    ]
    for call, code in cases:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == code


def test_fake_fs_copy_and_rename_directories() -> None:
    fs = FakeFs("/w")
    fs.dirs.add("/w/d")
    fs.write(FsWrite(path="/w/d/f", data=b"1"))
    fs.handle(FsCopy(src="/w/d", dst="/w/e"))
    assert fs.read("/w/e/f") == b"1" and fs.read("/w/d/f") == b"1"
    fs.handle(FsRename(src="/w/e", dst="/tmp"))  # into an existing directory
    assert fs.read("/tmp/e/f") == b"1" and "/w/e" not in fs.dirs

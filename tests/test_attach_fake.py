"""cli.attach on the fake driver, driven through a real pty pair (and pipes) on the host."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import termios
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from corral.actors.supervisor import open_supervisor
from corral.cli.attach import attach, terminal_size
from corral.drivers.fake import FakeDriver, FakeExec
from corral.errors import ExecFailed, SandboxNotRunning
from corral.sandbox import Sandbox
from corral.testing import wait_until


@asynccontextmanager
async def harness() -> AsyncIterator[tuple[FakeDriver, Sandbox]]:
    with trio.fail_after(30):
        async with FakeDriver() as driver, open_supervisor(driver=driver) as sup:
            yield driver, await sup.create("a")


@contextmanager
def pty_pair(rows: int = 30, cols: int = 90) -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    set_size(slave, rows, cols)
    os.set_blocking(master, False)
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def raw(fd: int) -> bool:
    lflag = termios.tcgetattr(fd)[3]
    return not lflag & (termios.ECHO | termios.ICANON | termios.ISIG)


async def read_until(fd: int, needle: bytes) -> bytes:
    got = b""
    while needle not in got:
        await trio.lowlevel.wait_readable(fd)
        try:
            got += os.read(fd, 4096)
        except BlockingIOError:
            continue
    return got


def only_exec(driver: FakeDriver) -> FakeExec:
    (session,) = driver.processes["a"].execs
    return session


async def test_tty_mode_raw_size_bytes_resize_signals_and_restore() -> None:
    async with harness() as (driver, sb):
        with pty_pair() as (master, slave):
            before = termios.tcgetattr(slave)
            flags = fcntl.fcntl(slave, fcntl.F_GETFL)
            assert not raw(slave)
            codes: list[int] = []
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    codes.append(
                        await attach(
                            sb, "cat", [], tty=True, stdin=slave, stdout=slave, stderr=slave
                        )
                    )

                nursery.start_soon(run)
                await trio.testing.wait_all_tasks_blocked()
                assert raw(slave)
                session = only_exec(driver)
                assert session.request.tty and session.request.interactive
                assert (session.request.rows, session.request.cols) == (30, 90)
                os.write(master, b"hi \x03 there\r")  # Ctrl-C is a byte in raw mode
                assert await read_until(master, b"there\r") == b"hi \x03 there\r"
                set_size(slave, 40, 100)
                os.kill(os.getpid(), signal.SIGWINCH)
                assert await wait_until(lambda: session.resizes == [(40, 100)], timeout=5)
                os.kill(os.getpid(), signal.SIGTERM)  # passed on to the command
            assert codes == [128 + signal.SIGTERM]
            assert session.signals == [signal.SIGTERM]
            assert termios.tcgetattr(slave) == before
            assert fcntl.fcntl(slave, fcntl.F_GETFL) == flags


async def test_pipe_mode_copies_stdin_to_eof_and_both_outputs() -> None:
    async with harness() as (_driver, sb):
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        fds = (in_r, in_w, out_r, out_w, err_r, err_w)
        try:
            os.write(in_w, b"piped bytes\n")
            os.close(in_w)
            with trio.fail_after(10):
                code = await attach(
                    sb, "cat", [], tty=False, stdin=in_r, stdout=out_w, stderr=err_w
                )
                assert code == 0
                assert os.read(out_r, 100) == b"piped bytes\n"
                code = await attach(
                    sb, "stderr", ["oops"], tty=False, stdin=in_r, stdout=out_w, stderr=err_w
                )
                assert code == 1 and os.read(err_r, 100) == b"oops\n"
            assert os.get_blocking(out_w) and os.get_blocking(in_r)
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


async def test_stdin_from_a_regular_file(tmp_path: Path) -> None:
    source = tmp_path / "input"
    source.write_bytes(b"from a file\n" * 1000)
    async with harness() as (_driver, sb):
        out_r, out_w = os.pipe()
        os.set_blocking(out_r, False)
        in_fd = -1
        try:
            in_fd = os.open(source, os.O_RDONLY)
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    codes: list[int] = []

                    async def run() -> None:
                        codes.append(await attach(sb, "cat", tty=False, stdin=in_fd, stdout=out_w))

                    nursery.start_soon(run)
                    got = await read_until(out_r, b"from a file\n" * 1000)
            assert codes == [0] and len(got) == 12_000
        finally:
            for fd in (out_r, out_w, in_fd):
                if fd >= 0:
                    os.close(fd)


async def test_a_command_that_cannot_start_leaves_the_terminal_alone() -> None:
    async with harness() as (_driver, sb):
        with pty_pair() as (_master, slave):
            before = termios.tcgetattr(slave)
            with pytest.raises(ExecFailed):
                await attach(sb, "no-such", tty=True, stdin=slave, stdout=slave, stderr=slave)
            assert termios.tcgetattr(slave) == before


@pytest.mark.parametrize("how", ["sandbox killed", "cancelled"])
async def test_the_terminal_is_restored_when_the_attach_is_cut_short(how: str) -> None:
    async with harness() as (_driver, sb):
        with pty_pair() as (_master, slave):
            before = termios.tcgetattr(slave)
            flags = fcntl.fcntl(slave, fcntl.F_GETFL)
            errors: list[BaseException] = []
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    try:
                        await attach(sb, "cat", tty=True, stdin=slave, stdout=slave, stderr=slave)
                    except SandboxNotRunning as exc:
                        errors.append(exc)

                nursery.start_soon(run)
                await trio.testing.wait_all_tasks_blocked()
                assert raw(slave)
                if how == "cancelled":
                    nursery.cancel_scope.cancel()
                else:
                    await sb.kill()
            assert len(errors) == (how == "sandbox killed")
            assert termios.tcgetattr(slave) == before
            assert fcntl.fcntl(slave, fcntl.F_GETFL) == flags


def test_terminal_size() -> None:
    with pty_pair(33, 77) as (_master, slave):
        assert terminal_size(slave) == (33, 77)
    r, w = os.pipe()
    try:
        assert terminal_size(r) is None
    finally:
        os.close(r)
        os.close(w)

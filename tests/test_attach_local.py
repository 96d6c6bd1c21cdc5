"""cli.attach on a real sandbox, driven through a real pty pair on the host: the command
runs under a pty of our size, resizes follow SIGWINCH, Ctrl-C interrupts it."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import termios
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

import corral
from corral.cli.attach import attach

pytestmark = pytest.mark.integration


@contextmanager
def pty_pair(rows: int, cols: int) -> Iterator[tuple[int, int]]:
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


class Screen:
    """What the sandbox has written to our terminal so far."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.text = b""

    async def until(self, needle: bytes) -> None:
        while needle not in self.text:
            await trio.lowlevel.wait_readable(self.master)
            try:
                self.text += os.read(self.master, 4096)
            except BlockingIOError:
                continue

    def type(self, data: bytes) -> None:
        os.write(self.master, data)


async def test_an_interactive_shell_sizes_resizes_and_ctrl_c(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("attach-tty")
        script = (
            'stty size; echo ready; read line; echo "line=$line"; '
            "stty size; "
            "trap 'echo interrupted; exit 7' INT; echo waiting; "
            "while :; do sleep 0.05; done"
        )
        with pty_pair(30, 90) as (master, slave):
            before = termios.tcgetattr(slave)
            screen = Screen(master)
            codes: list[int] = []
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    codes.append(
                        await attach(sb, "sh", ["-c", script], tty=True, stdin=slave, stdout=slave)
                    )

                nursery.start_soon(run)
                await screen.until(b"ready")
                assert b"30 90\r\n" in screen.text  # a pty of our size (\r\n: the pty's)
                set_size(slave, 40, 100)
                os.kill(os.getpid(), signal.SIGWINCH)
                await trio.testing.wait_all_tasks_blocked(0.05)
                screen.type(b"typed\r")
                await screen.until(b"line=typed")
                await screen.until(b"waiting")
                assert b"40 100\r\n" in screen.text
                screen.type(b"\x03")  # Ctrl-C: a byte here, SIGINT in the sandbox
                await screen.until(b"interrupted")
            assert codes == [7]
            assert termios.tcgetattr(slave) == before


async def test_pipes_without_a_tty(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("attach-pipe")
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            os.write(in_w, b"one\ntwo\n")
            os.close(in_w)
            in_w = -1
            code = await attach(
                sb,
                "sh",
                ["-c", "tr a-z A-Z; echo err >&2; [ -t 0 ] || exit 3"],
                tty=False,
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
            )
            assert code == 3  # stdin is not a terminal
            assert os.read(out_r, 100) == b"ONE\nTWO\n"
            assert os.read(err_r, 100) == b"err\n"
        finally:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                if fd >= 0:
                    os.close(fd)


async def test_tty_exec_stream_is_stdout_only_and_resizable(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("tty-stream")
        script = "[ -t 0 ] && [ -t 1 ] && echo on-a-tty; echo err >&2; stty size; read x; stty size"
        events: list[object] = []
        async with sb.exec_stream("sh", ["-c", script], tty=True, rows=20, cols=70) as proc:
            out = b""
            async for event in proc:
                events.append(event)
                if isinstance(event, corral.ExecStdout):
                    out += event.data
                    if out.endswith(b"20 70\r\n"):
                        await proc.resize(50, 120)
                        await proc.send_stdin(b"\r")
            assert proc.exit_code == 0
        assert not any(isinstance(e, corral.ExecStderr) for e in events)
        assert out == b"on-a-tty\r\nerr\r\n20 70\r\n\r\n50 120\r\n"

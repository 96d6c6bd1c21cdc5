"""``corral exec -it``: attach this process's terminal to a command in a sandbox.

:func:`attach` runs the command with ``sb.exec_stream`` and wires it to the host's file
descriptors (0, 1, 2 unless given):

- ``tty=True``: the command gets a pty of the host terminal's size; the host terminal
  goes to raw mode (no echo, no line editing, no signal keys: Ctrl-C travels as the
  byte ``\\x03`` and the sandbox's pty turns it into SIGINT for its foreground job), and
  SIGWINCH resizes the sandbox's pty. The terminal settings and the fds' blocking mode
  are restored on every way out (exit, error, cancellation, Ctrl-C).
- ``tty=False``: stdin is copied to the command (EOF closes its stdin), its stdout and
  stderr to ours.

In both modes SIGINT, SIGTERM and SIGHUP that reach this process are passed on to the
command. The command's exit code is returned.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
import struct
import termios
import tty as _tty
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import trio

from ..errors import CorralError, ExecTimeout
from ..protocol import ExecExited, ExecStderr, ExecStdout

if TYPE_CHECKING:
    from ..sandbox import ExecProcess, Sandbox

__all__ = ["FORWARDED_SIGNALS", "attach", "raw_mode", "terminal_size"]

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
READ_SIZE = 64 * 1024
DEFAULT_SIZE = (24, 80)


def terminal_size(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on ``fd``; None when it is not one (or reports 0)."""
    try:
        raw = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None
    rows, cols = struct.unpack("HHHH", raw)[:2]
    return (rows, cols) if rows and cols else None


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[bool]:
    """Put the terminal on ``fd`` in raw mode for the block (False: not a terminal)."""
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield False
        return
    try:
        _tty.setraw(fd, termios.TCSANOW)
        yield True
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def nonblocking(fds: Sequence[int]) -> Iterator[None]:
    """O_NONBLOCK on ``fds`` for the block; their flags as they were afterwards."""
    saved: list[tuple[int, int]] = []
    try:
        for fd in dict.fromkeys(fds):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            saved.append((fd, flags))
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        yield
    finally:
        for fd, flags in reversed(saved):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        view = view[n:]
    await trio.lowlevel.checkpoint()


async def _copy_stdin(fd: int, proc: ExecProcess) -> None:
    regular = stat.S_ISREG(os.fstat(fd).st_mode)  # epoll cannot wait on a plain file
    while True:
        try:
            if regular:
                data = await trio.to_thread.run_sync(os.read, fd, READ_SIZE)
            else:
                await trio.lowlevel.wait_readable(fd)
                data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            continue
        except OSError as exc:  # EIO: the terminal hung up
            if exc.errno != errno.EIO:
                raise
            data = b""
        try:
            if not data:
                await proc.close_stdin()
                return
            await proc.send_stdin(data)
        except CorralError:
            return  # the command has ended: the events tell the rest


async def _copy_output(proc: ExecProcess, stdout: int, stderr: int) -> ExecExited:
    exited: ExecExited | None = None
    async for event in proc:
        if isinstance(event, ExecStdout):
            await _write_all(stdout, event.data)
        elif isinstance(event, ExecStderr):
            await _write_all(stderr, event.data)
        elif isinstance(event, ExecExited):
            exited = event
    assert exited is not None  # the events end with ExecExited, or raise
    return exited


async def _forward_signals(proc: ExecProcess, size_fd: int | None) -> None:
    wanted = [*FORWARDED_SIGNALS] + ([signal.SIGWINCH] if size_fd is not None else [])
    try:
        receiver = trio.open_signal_receiver(*wanted)
    except (RuntimeError, ValueError):  # not the main thread: nothing to catch here
        return
    with receiver as signals:
        async for signum in signals:
            try:
                if signum == signal.SIGWINCH:
                    assert size_fd is not None
                    size = terminal_size(size_fd)
                    if size is not None:
                        await proc.resize(*size)
                else:
                    await proc.signal(signum)
            except CorralError:
                return


async def attach(
    sb: Sandbox,
    cmd: str,
    args: Sequence[str] = (),
    *,
    tty: bool,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: int = 0,
    stdout: int = 1,
    stderr: int = 2,
) -> int:
    """Run ``cmd args`` in ``sb`` attached to this process's terminal; its exit code.

    See the module docstring. Errors starting the command (ExecFailed,
    SandboxNotRunning...) are raised before the terminal is touched; the sandbox going
    away mid-way raises its typed error after the terminal is restored.
    """
    size_fd = None
    rows, cols = DEFAULT_SIZE
    if tty:
        for fd in (stdout, stdin):
            size = terminal_size(fd)
            if size is not None:
                size_fd = fd
                rows, cols = size
                break
    async with sb.exec_stream(cmd, args, env=env, cwd=cwd, tty=tty, rows=rows, cols=cols) as proc:
        await proc.__anext__()  # ExecStarted, or the reason it did not start
        raw = raw_mode(stdin) if tty else contextlib.nullcontext(False)
        error: CorralError | None = None
        with raw, nonblocking([stdin, stdout, stderr]):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy_stdin, stdin, proc)
                nursery.start_soon(_forward_signals, proc, size_fd)
                try:
                    exited = await _copy_output(proc, stdout, stderr)
                except CorralError as exc:  # raised below, not wrapped in a group
                    error = exc
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
    if exited.timed_out:
        raise ExecTimeout(f"{cmd}: timed out")
    return exited.exit_code

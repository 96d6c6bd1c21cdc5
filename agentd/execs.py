"""One exec conversation: spawn, stream output under flow control, feed stdin, end.

The command runs in its own session (so its pid is also its process-group id) with
pipes, or with a pty when ``tty`` is set. Output is read straight from the pipe fds
with ``add_reader`` and only while the exec has credit and the connection is not
paused for writing, so a slow consumer leaves the data in the command's pipe.

The exec ends (``ExecExited``, TERMINAL) once the command has been reaped and its
output pipes hit EOF, or its process group is gone (a process that escaped the group
may hold the pipe open forever: what is readable then is sent, the rest is dropped).
"""

from __future__ import annotations

import errno as _errno
import os
import signal as _signal
import stat as _stat
import subprocess
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

from ..protocol.framing import TERMINAL
from ..protocol.messages import (
    EXEC_CHUNK,
    Cancel,
    ErrorReply,
    Exec,
    ExecCredit,
    ExecExited,
    ExecResize,
    ExecSignal,
    ExecStarted,
    ExecStartFailed,
    ExecStderr,
    ExecStdin,
    ExecStdout,
)
from .oomscore import oom_score

if TYPE_CHECKING:
    import asyncio

    from ..protocol.messages import Message
    from .agent import Agent

STDIN_EOF_TTY = b"\x04"
"""What "closing" stdin means on a terminal: the VEOF character."""

_POLL_FIRST = 0.01
_POLL_MAX = 0.2


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pending(fd: int) -> int:
    """Bytes waiting in a pipe or pty (FIONREAD); 0 when none or unknown."""
    import array
    import fcntl
    import termios

    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    except OSError:
        return 0
    return buf[0]


def _failure_kind(exc: OSError, cwd: str | None) -> str:
    if cwd is not None and exc.filename == cwd:
        return "bad_cwd"
    if exc.errno in (_errno.ENOENT, _errno.ENOTDIR):
        return "not_found"
    if exc.errno in (_errno.EACCES, _errno.EPERM):
        return "permission_denied"
    if exc.errno == _errno.ENOEXEC:
        return "not_executable"
    return "other"


def _current_user(user: str) -> bool:
    uid = os.getuid()
    if user == str(uid):
        return True
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name == user
    except KeyError:
        return False


class Sink(Protocol):
    """Where a session's frames go: a host connection, or a detached job (jobs.py)."""

    @property
    def paused(self) -> bool: ...

    @property
    def convs(self) -> MutableMapping[int, Any]: ...

    def send(self, id: int, msg: Message, flags: int = 0) -> None: ...


class ExecSession:
    """The agent side of one ``Exec`` request id."""

    def __init__(self, agent: Agent, conn: Sink, id: int, req: Exec) -> None:
        self.agent = agent
        self.loop = agent.loop
        self.conn = conn
        self.id = id
        self.req = req
        self.pid = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.credit = max(0, req.window)
        self.outs: dict[int, bool] = {}  # open output fd -> is stderr
        self.reading: set[int] = set()
        self.stalled: set[int] = set()  # fds with data waiting for credit
        self.master = -1
        self.stdin_fd = -1
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.stdin_waiting = False
        self.status: int | None = None
        self.timed_out = False
        self.cancelled = False
        self.group_gone = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.poller: asyncio.TimerHandle | None = None
        self.poll_delay = _POLL_FIRST

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        req = self.req
        if req.user and not _current_user(req.user):
            msg = f"exec as user {req.user!r} is not supported (the agent is uid {os.getuid()})"
            self.agent.logs.append("system", f"exec failed to start: {msg}")
            self.conn.send(self.id, ErrorReply(code="unsupported", message=msg), TERMINAL)
            return
        env = dict(self.agent.base_env)
        env.update(req.env)
        cwd = req.cwd
        try:
            if cwd is not None and not _stat.S_ISDIR(os.stat(cwd).st_mode):
                raise NotADirectoryError(_errno.ENOTDIR, os.strerror(_errno.ENOTDIR), cwd)
            if req.tty:
                env.setdefault("TERM", "xterm")
                self._spawn_tty(env)
            else:
                self._spawn_pipes(env)
        except OSError as exc:
            kind = _failure_kind(exc, cwd)
            if kind == "bad_cwd":
                text = f"bad working directory {cwd!r}: {exc.strerror}"
            elif kind == "not_found":
                text = f"{req.cmd}: command not found"
            else:
                text = f"{req.cmd}: {exc.strerror or exc}"
            self._start_failed(kind, text, exc.errno)
            return
        except (ValueError, TypeError, subprocess.SubprocessError) as exc:
            self._start_failed("other", f"{req.cmd}: {exc}", None)
            return
        assert self.popen is not None
        self.pid = self.popen.pid
        self.agent.children[self.pid] = self
        self.agent.sessions.add(self)
        self.conn.convs[self.id] = self
        self.conn.send(self.id, ExecStarted(pid=self.pid))
        if not req.interactive:
            self.stdin_eof = True
            if req.tty:
                self.stdin_buf += (req.stdin or b"") + STDIN_EOF_TTY
            elif req.stdin:
                self.stdin_buf += req.stdin
        elif req.stdin:
            self.stdin_buf += req.stdin
        self._flush_stdin()
        self._update_readers()
        if req.timeout is not None:
            self.timer = self.loop.call_later(max(0.0, req.timeout), self._on_timeout)

    def _start_failed(self, kind: str, message: str, errno: int | None) -> None:
        self.agent.logs.append("system", f"exec failed to start: {message}")
        reply = ExecStartFailed(kind=kind, message=message, errno=errno)
        self.conn.send(self.id, reply, TERMINAL)

    def _argv(self) -> list[str]:
        return [self.req.cmd, *self.req.args]

    def _spawn_pipes(self, env: dict[str, str]) -> None:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ours = (in_w, out_r, err_r)
        try:
            with oom_score.for_command():  # the command starts at 500: see oomscore.py
                self.popen = subprocess.Popen(
                    self._argv(),
                    stdin=in_r,
                    stdout=out_w,
                    stderr=err_w,
                    cwd=self.req.cwd,
                    env=env,
                    start_new_session=True,
                )
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        for fd in ours:
            os.set_blocking(fd, False)
        self.stdin_fd = in_w
        self.outs = {out_r: False, err_r: True}

    def _spawn_tty(self, env: dict[str, str]) -> None:
        import fcntl
        import termios

        def make_controlling_tty() -> None:  # runs in the child, after setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        master, slave = os.openpty()
        try:
            self.master = master
            self._set_winsize(self.req.rows, self.req.cols)
            with oom_score.for_command():
                self.popen = subprocess.Popen(
                    self._argv(),
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=self.req.cwd,
                    env=env,
                    start_new_session=True,
                    preexec_fn=make_controlling_tty,
                )
        except BaseException:
            os.close(master)
            self.master = -1
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.stdin_fd = os.dup(master)
        self.outs = {master: False}

    def _set_winsize(self, rows: int, cols: int) -> None:
        import fcntl
        import struct
        import termios

        size = struct.pack("HHHH", max(0, min(rows, 0xFFFF)), max(0, min(cols, 0xFFFF)), 0, 0)
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)

    # -- follow-ups from the host --------------------------------------------------------------

    def follow_up(self, msg: Message) -> None:
        if self.done:
            return
        if isinstance(msg, ExecCredit):
            self.credit += max(0, msg.bytes)
            if self.credit > 0:
                self.stalled.clear()
            self.flow_changed()
        elif isinstance(msg, ExecStdin):
            if self.stdin_eof or self.stdin_fd < 0:
                return
            self.stdin_buf += msg.data
            if msg.eof:
                self.stdin_eof = True
                if self.req.tty:
                    self.stdin_buf += STDIN_EOF_TTY
            self._flush_stdin()
        elif isinstance(msg, ExecSignal):
            try:
                killpg(self.pid, msg.signal)
            except (ValueError, OSError):
                pass
        elif isinstance(msg, ExecResize):
            if self.master >= 0:
                try:
                    self._set_winsize(msg.rows, msg.cols)
                except OSError:
                    pass
        elif isinstance(msg, Cancel):
            self.cancelled = True
            killpg(self.pid, _signal.SIGKILL)
            if self.status is not None:
                self._finish()

    def flow_changed(self) -> None:
        """Credit arrived or the connection paused/resumed writing."""
        if self.group_gone:
            self._drain_gone()
        else:
            self._update_readers()

    # -- stdin -------------------------------------------------------------------------------

    def _flush_stdin(self) -> None:
        fd = self.stdin_fd
        buf = self.stdin_buf
        while buf and fd >= 0:
            try:
                n = os.write(fd, buf[:65536])
            except BlockingIOError:
                if not self.stdin_waiting:
                    self.loop.add_writer(fd, self._flush_stdin)
                    self.stdin_waiting = True
                return
            except OSError:  # EPIPE: the command stopped reading; EIO: the tty is gone
                buf.clear()
                self._close_stdin()
                return
            del buf[:n]
        if self.stdin_waiting:
            self.loop.remove_writer(fd)
            self.stdin_waiting = False
        if self.stdin_eof and not self.req.tty:
            self._close_stdin()

    def _close_stdin(self) -> None:
        fd = self.stdin_fd
        if fd < 0:
            return
        if self.stdin_waiting:
            self.loop.remove_writer(fd)
            self.stdin_waiting = False
        self.stdin_fd = -1
        self.stdin_buf.clear()
        os.close(fd)

    # -- output ------------------------------------------------------------------------------

    def _update_readers(self) -> None:
        # Without credit a fd stays watched until it shows data, so EOF is still seen.
        active = not self.done and not self.conn.paused
        for fd in self.outs:
            want = active and fd not in self.stalled
            if want and fd not in self.reading:
                self.loop.add_reader(fd, self._on_readable, fd)
                self.reading.add(fd)
            elif not want and fd in self.reading:
                self.loop.remove_reader(fd)
                self.reading.discard(fd)

    def _read(self, fd: int) -> bytes | None:
        """One chunk within the credit; b"" at EOF; None when nothing is ready."""
        try:
            return os.read(fd, min(EXEC_CHUNK, self.credit))
        except BlockingIOError:
            return None
        except OSError:  # EIO: the pty's other side is closed
            return b""

    def _on_readable(self, fd: int) -> None:
        if self.done:
            return
        if self.credit <= 0:
            if _pending(fd):
                self.stalled.add(fd)
                self._update_readers()
            else:  # readable with nothing in it: the writers are gone
                self._close_out(fd)
                self._maybe_finish()
            return
        data = self._read(fd)
        if data is None:
            return
        if data:
            self._emit(fd, data)
        else:
            self._close_out(fd)
            self._maybe_finish()

    def _emit(self, fd: int, data: bytes) -> None:
        self.credit -= len(data)
        msg = ExecStderr(data=data) if self.outs[fd] else ExecStdout(data=data)
        self.conn.send(self.id, msg)

    def _close_out(self, fd: int) -> None:
        if fd in self.reading:
            self.loop.remove_reader(fd)
            self.reading.discard(fd)
        del self.outs[fd]
        self.stalled.discard(fd)
        if fd == self.master:
            self.master = -1
        os.close(fd)

    def _drain_gone(self) -> None:
        """The group is gone: send what is readable now (within credit), then end."""
        for fd in list(self.outs):
            while not self.done:
                if self.credit <= 0:
                    if not _pending(fd):
                        self._close_out(fd)
                    break
                data = self._read(fd)
                if not data:
                    self._close_out(fd)
                    break
                self._emit(fd, data)
        if not self.outs:
            self._finish()

    # -- process end ---------------------------------------------------------------------------

    def on_exit(self, status: int) -> None:
        """Called by the agent's reaper with the waitpid status."""
        self.status = status
        if self.popen is not None:
            self.popen.returncode = os.waitstatus_to_exitcode(status)
        if self.done:
            return
        if self.cancelled or not self.outs:
            self._finish()
        else:
            self._schedule_poll()

    def _schedule_poll(self) -> None:
        self.poller = self.loop.call_later(self.poll_delay, self._poll_group)
        self.poll_delay = min(self.poll_delay * 2, _POLL_MAX)

    def _poll_group(self) -> None:
        self.poller = None
        if self.done:
            return
        if group_alive(self.pid):
            self._schedule_poll()
            return
        self.group_gone = True
        self._drain_gone()

    def _maybe_finish(self) -> None:
        if not self.done and self.status is not None and not self.outs:
            self._finish()

    def _on_timeout(self) -> None:
        self.timer = None
        self.timed_out = True
        killpg(self.pid, _signal.SIGKILL)

    def kill(self, sig: int) -> None:
        killpg(self.pid, sig)

    def end_now(self) -> None:
        """Kill the group and end at once, dropping unread output (connection gone, shutdown)."""
        killpg(self.pid, _signal.SIGKILL)
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        for handle in (self.timer, self.poller):
            if handle is not None:
                handle.cancel()
        self.timer = self.poller = None
        for fd in list(self.outs):
            self._close_out(fd)
        self._close_stdin()
        if self.status is None:
            exit_code, sig = 128 + _signal.SIGKILL, int(_signal.SIGKILL)
        else:
            code = os.waitstatus_to_exitcode(self.status)
            exit_code, sig = (128 - code, -code) if code < 0 else (code, 0)
        self.agent.session_finished(self, lingering=not self.group_gone)
        if self.conn.convs.get(self.id) is self:
            del self.conn.convs[self.id]
        reply = ExecExited(exit_code=exit_code, signal=sig or None, timed_out=self.timed_out)
        self.conn.send(self.id, reply, TERMINAL)

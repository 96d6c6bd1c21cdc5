"""Scripted commands run by the fake agent (see drivers/fake.py for the list)."""

from __future__ import annotations

import errno as _errno
import signal as _signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ..protocol import (
    EXEC_CHUNK,
    TERMINAL,
    Cancel,
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
    Message,
    encode,
)

if TYPE_CHECKING:
    from .fake import FakeAgent

__all__ = ["COMMANDS", "FakeExec"]

SIGTERM = int(_signal.SIGTERM)
SIGKILL = int(_signal.SIGKILL)


class FakeExec:
    """One scripted command of a fake agent (see the module docstring)."""

    def __init__(self, agent: FakeAgent, id: int, request: Exec) -> None:
        self.agent = agent
        self.id = id
        self.request = request
        self.window = request.window
        self.credit = request.window
        self.max_in_flight = 0
        self.sent = 0
        self.stdin = bytearray(b"" if request.stdin is None else request.stdin)
        self.stdin_eof = not request.interactive
        self.signals: list[int] = []
        self.resizes: list[tuple[int, int]] = []
        self.ignores_term = False
        self.killed_by: int | None = None
        self.exited: ExecExited | None = None
        self.finished = trio.Event()
        self._lot = trio.lowlevel.ParkingLot()
        self._scope = trio.CancelScope()

    @property
    def in_flight(self) -> int:
        return self.window - self.credit

    def control(self, msg: Message) -> None:
        if isinstance(msg, ExecStdin):
            self.stdin += msg.data
            self.stdin_eof = self.stdin_eof or msg.eof
        elif isinstance(msg, ExecCredit):
            self.credit += msg.bytes
        elif isinstance(msg, ExecSignal):
            self.deliver(msg.signal)
        elif isinstance(msg, ExecResize):
            self.resizes.append((msg.rows, msg.cols))
        elif isinstance(msg, Cancel):
            self.deliver(SIGKILL)
        self._lot.unpark_all()

    def deliver(self, signum: int) -> None:
        self.signals.append(signum)
        if self.finished.is_set() or (signum == SIGTERM and self.ignores_term):
            return
        if self.killed_by is None:
            self.killed_by = signum
        self._scope.cancel()

    async def run(self) -> None:
        req = self.request
        handler = COMMANDS.get(req.cmd)
        try:
            if handler is None:
                failed = ExecStartFailed(
                    kind="not_found", message=f"{req.cmd}: command not found", errno=_errno.ENOENT
                )
                await self.agent.send(self.id, failed, TERMINAL)
                return
            await self.agent.send(self.id, ExecStarted(pid=self.agent.proc.pid + 1 + self.id))
            code = 0
            timed_out = False
            with self._scope:
                limit = float("inf") if req.timeout is None else req.timeout
                with trio.move_on_after(limit) as guard:
                    code = await handler(self, req.args)
                if guard.cancelled_caught:
                    timed_out = True
                    self.killed_by = SIGKILL
            if self.killed_by is not None:
                sig = self.killed_by
                exited = ExecExited(exit_code=128 + sig, signal=sig, timed_out=timed_out)
            else:
                exited = ExecExited(exit_code=code)
            self.exited = exited
            await self.agent.send(self.id, exited, TERMINAL)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.finished.set()
            self.agent.sessions.pop(self.id, None)

    async def write(self, data: bytes, *, err: bool = False) -> None:
        view = memoryview(data)
        while view:
            while self.credit <= 0:
                await self._lot.park()
            n = min(len(view), EXEC_CHUNK, self.credit)
            chunk = bytes(view[:n])
            view = view[n:]
            self.credit -= n
            self.sent += n
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            msg = ExecStderr(data=chunk) if err else ExecStdout(data=chunk)
            await self.agent.send(self.id, msg)

    async def read_stdin(self) -> bytes:
        """Whatever stdin holds (waiting for some); b"" at EOF."""
        while not self.stdin and not self.stdin_eof:
            await self._lot.park()
        data = bytes(self.stdin)
        self.stdin.clear()
        return data


async def _echo(ex: FakeExec, args: list[str]) -> int:
    await ex.write((" ".join(args) + "\n").encode())
    return 0


async def _cat(ex: FakeExec, args: list[str]) -> int:
    while data := await ex.read_stdin():
        await ex.write(data)
    return 0


async def _sleep(ex: FakeExec, args: list[str]) -> int:
    await trio.sleep(float(args[0]) if args else 0.0)
    return 0


async def _exit(ex: FakeExec, args: list[str]) -> int:
    await trio.lowlevel.checkpoint()
    return int(args[0]) if args else 0


async def _ignore_term(ex: FakeExec, args: list[str]) -> int:
    ex.ignores_term = True
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def _bytes(ex: FakeExec, args: list[str]) -> int:
    size = int(args[0])
    pattern = bytes(range(256)) * (size // 256 + 1)
    await ex.write(pattern[:size], err=len(args) > 1 and args[1] == "stderr")
    return 0


async def _lines(ex: FakeExec, args: list[str]) -> int:
    for n in range(int(args[0])):
        await ex.write(f"{n}\n".encode())
    return 0


async def _burst(ex: FakeExec, args: list[str]) -> int:
    lines = [f"{n}\n".encode() for n in range(int(args[0]))]
    total = sum(map(len, lines))
    if total > ex.credit:
        raise ValueError(f"burst of {total} bytes exceeds the credit window")
    ex.credit -= total
    ex.sent += total
    ex.max_in_flight = max(ex.max_in_flight, ex.in_flight)
    await ex.agent.send_raw(b"".join(encode(ex.id, ExecStdout(data=line)) for line in lines))
    return 0


async def _tick(ex: FakeExec, args: list[str]) -> int:
    count, interval = int(args[0]), float(args[1])
    for n in range(count):
        await ex.write(f"{n}\n".encode())
        await trio.sleep(interval)
    return 0


async def _stderr(ex: FakeExec, args: list[str]) -> int:
    await ex.write((" ".join(args) + "\n").encode(), err=True)
    return 1


async def _printenv(ex: FakeExec, args: list[str]) -> int:
    env = {**ex.agent.proc.spec.env, **ex.request.env}
    if args[0] not in env:
        return 1
    await ex.write((env[args[0]] + "\n").encode())
    return 0


async def _pwd(ex: FakeExec, args: list[str]) -> int:
    await ex.write(((ex.request.cwd or ex.agent.proc.spec.workdir) + "\n").encode())
    return 0


async def _agent_die(ex: FakeExec, args: list[str]) -> int:
    await trio.lowlevel.checkpoint()
    ex.agent.proc.crash(int(args[0]) if args else 1)
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def _wedge(ex: FakeExec, args: list[str]) -> int:
    ex.agent.wedged = True
    await trio.sleep_forever()
    raise AssertionError("unreachable")


COMMANDS: dict[str, Callable[[FakeExec, list[str]], Awaitable[int]]] = {
    "echo": _echo,
    "cat": _cat,
    "sleep": _sleep,
    "exit": _exit,
    "ignore-term": _ignore_term,
    "bytes": _bytes,
    "lines": _lines,
    "burst": _burst,
    "tick": _tick,
    "stderr": _stderr,
    "printenv": _printenv,
    "pwd": _pwd,
    "agent-die": _agent_die,
    "wedge": _wedge,
}

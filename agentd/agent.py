"""The agent: connections, the child reaper and the shutdown ladder."""

from __future__ import annotations

import asyncio
import os
import signal as _signal
import sys
from typing import TYPE_CHECKING

from ..protocol.framing import TERMINAL
from ..protocol.messages import Ok
from .conn import AGENT_VERSION, Connection
from .execs import group_alive, killpg
from .jobs import JobTable
from .logring import RING_BYTES, LogRing

__all__ = ["AGENT_VERSION", "Agent"]

if TYPE_CHECKING:
    import socket

    from .execs import ExecSession

SIGNAL_GRACE = 1.0
"""Grace given to running commands when the agent itself gets SIGTERM/SIGINT."""

KILL_WAIT = 1.0
"""How long to wait for SIGKILLed groups to vanish before replying anyway."""

FLUSH_WAIT = 2.0
"""How long shutdown waits for connections to take their last frames."""

_LINGER_PRUNE = 64


class Agent:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        base_env: dict[str, str],
        *,
        log_bytes: int = RING_BYTES,
    ) -> None:
        self.loop = loop
        self.base_env = base_env
        self.logs = LogRing(log_bytes)
        self.jobs = JobTable(self)
        self.children: dict[int, ExecSession] = {}  # pid -> session, until reaped
        self.sessions: set[ExecSession] = set()  # execs not yet ended
        self.lingering: set[int] = set()  # groups of ended execs that still had members
        self.connections: set[Connection] = set()
        self.shutting_down = False
        self.shutdown_waiters: list[tuple[Connection, int]] = []
        self.threads_busy = 0
        self.server: asyncio.AbstractServer | None = None
        self.done: asyncio.Future[None] = loop.create_future()

    async def serve(self, sock: socket.socket, ready_fd: int | None) -> None:
        loop = self.loop
        loop.add_signal_handler(_signal.SIGCHLD, self.reap)
        for sig in (_signal.SIGTERM, _signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown, SIGNAL_GRACE, None)
        self.server = await loop.create_unix_server(lambda: Connection(self), sock=sock)
        if ready_fd is not None:
            try:
                os.write(ready_fd, b"R")
                os.close(ready_fd)
            except OSError as exc:
                print(f"corral-agentd: ready fd {ready_fd}: {exc}", file=sys.stderr)
        self.reap()  # children that ended before the handler was installed (none, normally)
        await self.done

    # -- children ----------------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child: our execs and any orphan reparented to us."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            session = self.children.pop(pid, None)
            if session is not None:
                session.on_exit(status)

    def session_finished(self, session: ExecSession, lingering: bool) -> None:
        self.sessions.discard(session)
        if lingering and session.pid:
            try:
                os.killpg(session.pid, 0)
            except OSError:
                return
            self.lingering.add(session.pid)
            if len(self.lingering) > _LINGER_PRUNE:
                self.lingering = {g for g in self.lingering if group_alive(g)}

    # -- shutdown -----------------------------------------------------------------------------

    def request_shutdown(self, grace: float, reply_to: tuple[Connection, int] | None) -> None:
        if reply_to is not None:
            self.shutdown_waiters.append(reply_to)
        if self.shutting_down:
            return
        self.shutting_down = True
        self.logs.append("system", f"agent shutting down (grace {grace:g}s)")
        self.loop.create_task(self._shutdown(max(0.0, grace)))

    def _groups(self) -> set[int]:
        return {s.pid for s in self.sessions if s.pid} | set(self.children) | self.lingering

    async def _wait_groups(self, groups: set[int], timeout: float) -> set[int]:
        """Wait until the groups are gone (and our children reaped); return what is left."""
        deadline = self.loop.time() + timeout
        delay = 0.005
        while True:
            self.reap()
            groups = {g for g in groups if group_alive(g)}
            if not groups and not self.children:
                return groups
            left = deadline - self.loop.time()
            if left <= 0:
                return groups
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)

    async def _shutdown(self, grace: float) -> None:
        try:
            if self.server is not None:
                self.server.close()
            groups = self._groups()
            for g in groups:
                killpg(g, _signal.SIGTERM)
            left = await self._wait_groups(groups, grace)
            left |= self._groups()
            for g in left:
                killpg(g, _signal.SIGKILL)
            await self._wait_groups(left, KILL_WAIT)
            for session in list(self.sessions):
                session.end_now()
            for conn, id in self.shutdown_waiters:
                if conn.convs.get(id) is not None:
                    del conn.convs[id]
                conn.send(id, Ok(), TERMINAL)
            await self._flush(FLUSH_WAIT)
            for conn in list(self.connections):
                conn.transport_close()
        finally:
            if not self.done.done():
                self.done.set_result(None)

    async def _flush(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        while True:
            busy = self.logs.unsent() or any(c.buffered() for c in self.connections)
            if not busy or self.loop.time() >= deadline:
                return
            await asyncio.sleep(0.005)

"""The server's sandboxes run on corral's own supervisor: the adapter.

Each API sandbox is a supervisor sandbox named by its record id (``sb_…``), so two orgs
may use the same name and a restart of a stopped sandbox never collides with a name in
use. File contents move through the low-level ``sup.ask`` messages in chunks (never a
whole file in memory); exec goes through ``Sandbox.exec_stream``.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from ..errors import SandboxNotFound, SandboxNotRunning
from ..protocol import (
    FsCopy,
    FsData,
    FsEntry,
    FsList,
    FsListReply,
    FsMkdir,
    FsRead,
    FsRemove,
    FsRename,
    FsStat,
    FsStatReply,
    FsWrite,
)
from .msb_session import AgentTarget, ExecProcess
from .spec import CreatePlan

STOP_TIMEOUT = 10.0


class CorralTarget:
    """One running supervisor sandbox as an :class:`AgentTarget`."""

    def __init__(self, sup: Any, sandbox: Any) -> None:
        self._sup = sup
        self._sb = sandbox
        self._name: str = sandbox.name

    def exec_stream(
        self,
        cmd: str,
        args: list[str],
        *,
        env: dict[str, str],
        cwd: str | None,
        tty: bool,
        rows: int,
        cols: int,
    ) -> AbstractAsyncContextManager[ExecProcess]:
        cm: AbstractAsyncContextManager[ExecProcess] = self._sb.exec_stream(
            cmd, args, env=env, cwd=cwd, tty=tty, rows=rows, cols=cols, timeout=None
        )
        return cm

    async def _ask(self, msg: Any) -> Any:
        return await self._sup.ask(self._name, msg)

    async def read_chunk(self, path: str, offset: int, length: int) -> tuple[bytes, bool]:
        reply = await self._ask(FsRead(path=path, offset=offset, length=length))
        assert isinstance(reply, FsData)
        return reply.data, reply.eof

    async def write_chunk(
        self, path: str, data: bytes, offset: int, *, truncate: bool, append: bool
    ) -> None:
        await self._ask(
            FsWrite(path=path, data=data, offset=offset, truncate=truncate, append=append)
        )

    async def stat(self, path: str, follow_symlinks: bool = True) -> FsEntry:
        reply = await self._ask(FsStat(path=path, follow_symlinks=follow_symlinks))
        assert isinstance(reply, FsStatReply)
        return reply.entry

    async def list(self, path: str) -> list[FsEntry]:
        reply = await self._ask(FsList(path=path))
        assert isinstance(reply, FsListReply)
        return reply.entries

    async def mkdir(self, path: str) -> None:
        await self._ask(FsMkdir(path=path, parents=True))

    async def remove(self, path: str, recursive: bool) -> None:
        await self._ask(FsRemove(path=path, recursive=recursive))

    async def copy(self, src: str, dst: str) -> None:
        await self._ask(FsCopy(src=src, dst=dst))

    async def rename(self, src: str, dst: str) -> None:
        await self._ask(FsRename(src=src, dst=dst))


class CorralHost:
    """:class:`corral.server.service.SandboxHost` over ``corral.open_supervisor()``."""

    def __init__(self, sup: Any, *, stop_timeout: float = STOP_TIMEOUT) -> None:
        self._sup = sup
        self._sandboxes: dict[str, Any] = {}
        self._stop_timeout = stop_timeout

    async def start(self, sid: str, plan: CreatePlan) -> None:
        kwargs: dict[str, Any] = {
            "image": plan.image,
            "env": dict(plan.env),
            "network": plan.network,
            "cpus": plan.cpus,
            "memory_mib": plan.memory_mib,
            "labels": dict(plan.labels),
        }
        if plan.workdir is not None:
            kwargs["workdir"] = plan.workdir
        self._sandboxes[sid] = await self._sup.create(sid, **kwargs)

    async def stop(self, sid: str) -> None:
        sb = self._sandboxes.get(sid)
        if sb is not None:
            await sb.stop(timeout=self._stop_timeout)

    async def wait(self, sid: str) -> str | None:
        sb = self._sandboxes.get(sid)
        if sb is None:
            return None
        status = await sb.wait_until_stopped()
        if str(status) == "crashed":
            return "the sandbox crashed (its agent or top process died)"
        return None

    async def remove(self, sid: str) -> None:
        self._sandboxes.pop(sid, None)
        try:
            await self._sup.remove(sid)
        except SandboxNotFound:
            pass

    async def connect_agent(self, sid: str) -> trio.abc.Stream:
        """A fresh raw stream to the sandbox's agent (the ``/corral`` relay)."""
        if sid not in self._sandboxes:
            raise SandboxNotRunning(f"sandbox {sid} is not running")
        stream: trio.abc.Stream = await self._sup.connect_agent(sid)
        return stream

    def target(self, sid: str) -> AgentTarget:
        sb = self._sandboxes.get(sid)
        if sb is None:
            raise SandboxNotRunning(f"sandbox {sid} is not running")
        return CorralTarget(self._sup, sb)

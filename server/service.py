"""The control plane: sandbox records, their lifecycle, and what each org may touch.

:class:`ControlPlane` owns every state change of a sandbox record. A start runs in the
background (a *lifecycle task* per running sandbox, in the server's nursery), so a
request that stops waiting (``wait_timeout``, a client that hangs up) never stops the
sandbox half-way. The lifecycle task starts the sandbox on the host, marks it running,
enforces ``max_duration_secs`` and ``idle_timeout_secs``, waits for the sandbox to end
(asked to, or crashed), records how, and removes ephemeral sandboxes.

Remove of a sandbox that is not stopped is a 409 (``sandbox_still_running``), the same
rule as microsandbox's local backend: nothing is ever stopped or lost as a side effect.
Every lookup is scoped to the caller's org; another org's sandbox is a plain 404.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ..errors import CorralError, InvalidConfig, Runtime, Unsupported
from .http import ApiError, not_found
from .logs import LogRing
from .models import TERMINAL_STATUSES
from .msb_session import AgentTarget
from .spec import CreatePlan
from .store import SandboxRecord, Store, now_rfc3339

log = logging.getLogger("corral.server")

MAX_SANDBOXES_PER_ORG = 1000
AGENT_WAIT = 8.0
"""How long an agent WebSocket waits for a ``starting`` sandbox (the client allows 10 s)."""


class SandboxHost(Protocol):
    """Where sandboxes really run (corral's supervisor; see :mod:`.host`)."""

    async def start(self, sid: str, plan: CreatePlan) -> None:
        """Start sandbox ``sid``; return once it runs."""

    async def stop(self, sid: str) -> None:
        """Stop it (graceful, then killed); return once it is gone."""

    async def wait(self, sid: str) -> str | None:
        """Wait until it is gone: None if it ended cleanly or as asked, else why."""

    async def remove(self, sid: str) -> None:
        """Forget a stopped sandbox and free what it held (idempotent)."""

    def target(self, sid: str) -> AgentTarget:
        """Its agent, for exec and fs (raises a CorralError when not running)."""


@dataclass
class Live:
    """Runtime state of a started sandbox (not persisted)."""

    plan: CreatePlan
    running: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    start_error: CorralError | None = None
    stop_requested: bool = False
    stop_reason: str | None = None
    sessions: int = 0
    last_activity: float = 0.0


class Session:
    """One agent connection: keeps its sandbox run from counting as idle."""

    def __init__(self, live: Live | None) -> None:
        self._live = live
        self._open = live is not None
        if live is not None:
            live.sessions += 1
            live.last_activity = trio.current_time()

    def touch(self) -> None:
        if self._live is not None:
            self._live.last_activity = trio.current_time()

    def end(self) -> None:
        if self._open and self._live is not None:
            self._open = False
            self._live.sessions -= 1
            self._live.last_activity = trio.current_time()


class ControlPlane:
    def __init__(
        self,
        store: Store,
        host: SandboxHost,
        nursery: trio.Nursery,
        *,
        allow_network: bool = False,
        max_per_org: int = MAX_SANDBOXES_PER_ORG,
        log_factory: Callable[[], LogRing] = LogRing,
    ) -> None:
        self.store = store
        self.host = host
        self.allow_network = allow_network
        self.max_per_org = max_per_org
        self._nursery = nursery
        self._live: dict[str, Live] = {}
        self._logs: dict[str, LogRing] = {}
        self._log_factory = log_factory
        self._recover()

    def _recover(self) -> None:
        """Records left by a previous server run: nothing of theirs runs any more."""
        self.store.load_sandboxes()
        self._settle_all("the server restarted while the sandbox ran")

    def close(self) -> None:
        """The server is going away and its sandboxes with it: record that."""
        self._settle_all("the server shut down while the sandbox ran")

    def _settle_all(self, why: str) -> None:
        for rec in self.store.all():
            if rec.out.status in TERMINAL_STATUSES or rec.out.status == "created":
                continue
            if rec.out.ephemeral:
                self.store.delete(rec)
                continue
            rec.out.status = "stopped"
            rec.out.status_reason = None
            rec.out.stopped_at = now_rfc3339()
            rec.out.last_failure_message = why
            self.store.save(rec)

    # -- lookups ------------------------------------------------------------------------------

    def get(self, org_id: str, sid: str) -> SandboxRecord:
        rec = self.store.get(org_id, sid)
        if rec is None:
            raise not_found()
        return rec

    def get_by_name(self, org_id: str, name: str) -> SandboxRecord:
        rec = self.store.get_by_name(org_id, name)
        if rec is None:
            raise not_found()
        return rec

    def logs(self, rec: SandboxRecord) -> LogRing:
        ring = self._logs.get(rec.id)
        if ring is None:
            ring = self._logs[rec.id] = self._log_factory()
        return ring

    # -- commands -----------------------------------------------------------------------------

    async def create(
        self, org_id: str, plan: CreatePlan, *, start: bool, wait: bool, wait_timeout: float
    ) -> SandboxRecord:
        if self.store.get_by_name(org_id, plan.name) is not None:
            raise ApiError(409, "sandbox_already_exists", f"sandbox {plan.name!r} already exists")
        if self.store.count(org_id) >= self.max_per_org:
            raise ApiError(
                429, "quota_exceeded", f"at most {self.max_per_org} sandboxes per organisation"
            )
        rec = self.store.new_sandbox(
            org_id, plan.name, plan.spec_out(), ephemeral=plan.ephemeral, shell=plan.shell
        )
        self.logs(rec).append("system", f"created sandbox {plan.name} (image {plan.image})")
        if not start:
            return rec
        live = self._begin(rec, plan)
        if wait:
            with trio.move_on_after(wait_timeout):
                await live.running.wait()
            if live.start_error is not None:
                # Nothing was created: the caller may fix the request and retry the name.
                self._forget(rec)
                raise start_error(live.start_error)
        return rec

    async def start(self, rec: SandboxRecord, *, wait: bool, wait_timeout: float) -> SandboxRecord:
        status = rec.out.status
        if status == "stopping":
            raise ApiError(
                409, "sandbox_stopping", f"sandbox {rec.name!r} is stopping; start it once stopped"
            )
        if status in ("created", "stopped", "failed"):
            plan = CreatePlan.from_spec(rec.name, rec.out.spec, rec.shell, rec.out.ephemeral)
            self._begin(rec, plan)
        live = self._live.get(rec.id)
        if wait and live is not None:
            with trio.move_on_after(wait_timeout):
                await live.running.wait()
        return rec

    async def stop(self, rec: SandboxRecord) -> SandboxRecord:
        status = rec.out.status
        if status in TERMINAL_STATUSES or status == "stopping":
            return rec
        if status == "created":
            self._set(rec, "stopped", stopped_at=now_rfc3339())
            return rec
        self._request_stop(rec, "stop requested")
        return rec

    async def remove(self, rec: SandboxRecord) -> str:
        if rec.out.status not in TERMINAL_STATUSES and rec.out.status != "created":
            raise ApiError(
                409,
                "sandbox_still_running",
                f"cannot remove sandbox {rec.name!r}: it is {rec.out.status};"
                " stop it first (POST /v1/sandboxes/{id}/stop)",
            )
        self._forget(rec)
        return f"sandbox {rec.name!r} removed"

    # -- agent sessions -----------------------------------------------------------------------

    async def agent_target(self, rec: SandboxRecord) -> AgentTarget:
        live = self._live.get(rec.id)
        if live is not None and rec.out.status == "starting":
            with trio.move_on_after(AGENT_WAIT):
                await live.running.wait()
        if live is None or rec.out.status != "running":
            raise ApiError(
                409, "sandbox_not_running", f"sandbox {rec.name!r} is {rec.out.status}, not running"
            )
        return self.host.target(rec.id)

    def session_started(self, rec: SandboxRecord) -> Session:
        """Count an agent session against the sandbox's current run (idle timeout)."""
        return Session(self._live.get(rec.id))

    # -- lifecycle ----------------------------------------------------------------------------

    def _begin(self, rec: SandboxRecord, plan: CreatePlan) -> Live:
        live = Live(plan, last_activity=trio.current_time())
        self._live[rec.id] = live
        self._set(rec, "starting", status_reason="scheduling", last_failure_message=None)
        self._nursery.start_soon(self._lifecycle, rec, live)
        return live

    async def _lifecycle(self, rec: SandboxRecord, live: Live) -> None:
        ring = self.logs(rec)
        ring.append("system", "starting")
        try:
            await self.host.remove(rec.id)  # a previous run's leftovers, if any
            await self.host.start(rec.id, live.plan)
        except Exception as exc:
            if not isinstance(exc, CorralError):
                log.exception("starting sandbox %s", rec.id)
                exc = Runtime(f"{type(exc).__name__}: {exc}")
            live.start_error = exc
            ring.append("system", f"start failed: {exc}")
            self._set(rec, "failed", last_failure_message=str(exc), stopped_at=now_rfc3339())
            live.running.set()
            live.done.set()
            return
        self._set(rec, "running", started_at=now_rfc3339(), stopped_at=None)
        ring.append("system", "running")
        live.running.set()
        if live.stop_requested:
            self._nursery.start_soon(self._stop_on_host, rec)
        failure: str | None = None
        async with trio.open_nursery() as watchdogs:
            if live.plan.max_duration_secs:
                watchdogs.start_soon(self._max_duration, rec, live, live.plan.max_duration_secs)
            if live.plan.idle_timeout_secs:
                watchdogs.start_soon(self._idle, rec, live, live.plan.idle_timeout_secs)
            try:
                failure = await self.host.wait(rec.id)
            except Exception as exc:
                if not isinstance(exc, CorralError):
                    log.exception("watching sandbox %s", rec.id)
                failure = str(exc) or type(exc).__name__
            watchdogs.cancel_scope.cancel()
        if live.stop_requested or failure is None:
            ring.append("system", f"stopped ({live.stop_reason or 'exited'})")
            self._set(rec, "stopped", stopped_at=now_rfc3339())
        else:
            ring.append("system", f"failed: {failure}")
            self._set(rec, "failed", last_failure_message=failure, stopped_at=now_rfc3339())
        live.done.set()
        if rec.out.ephemeral and self.store.get(rec.org_id, rec.id) is rec:
            self._forget(rec)

    def _request_stop(self, rec: SandboxRecord, reason: str) -> None:
        live = self._live.get(rec.id)
        if live is None or live.stop_requested:
            return
        live.stop_requested = True
        live.stop_reason = reason
        self.logs(rec).append("system", f"stopping: {reason}")
        self._set(rec, "stopping")
        if live.running.is_set():
            self._nursery.start_soon(self._stop_on_host, rec)

    async def _stop_on_host(self, rec: SandboxRecord) -> None:
        try:
            await self.host.stop(rec.id)
        except Exception as exc:
            if not isinstance(exc, CorralError):
                log.exception("stopping sandbox %s", rec.id)
            self.logs(rec).append("system", f"stop failed: {exc}")

    async def _max_duration(self, rec: SandboxRecord, live: Live, secs: int) -> None:
        await trio.sleep(secs)
        self._request_stop(rec, f"max_duration_secs={secs} reached")

    async def _idle(self, rec: SandboxRecord, live: Live, secs: int) -> None:
        while True:
            await trio.sleep_until(live.last_activity + secs)
            if live.sessions > 0:
                live.last_activity = trio.current_time()
            elif trio.current_time() >= live.last_activity + secs:
                self._request_stop(rec, f"idle_timeout_secs={secs} reached")
                return

    def _forget(self, rec: SandboxRecord) -> None:
        self.store.delete(rec)
        self._live.pop(rec.id, None)
        ring = self._logs.pop(rec.id, None)
        if ring is not None:
            ring.close()
        self._nursery.start_soon(self._remove_on_host, rec.id)

    async def _remove_on_host(self, sid: str) -> None:
        try:
            await self.host.remove(sid)
        except Exception as exc:
            if not isinstance(exc, CorralError):
                log.exception("removing sandbox %s", sid)

    def _set(self, rec: SandboxRecord, status: str, **changes: str | None) -> None:
        out = rec.out
        out.status = status  # type: ignore[assignment]
        if status != "starting":
            out.status_reason = None
        for key, value in changes.items():
            setattr(out, key, value)
        self.store.save(rec)


def start_error(exc: CorralError) -> ApiError:
    """A failed start, as the HTTP error a create answers with."""
    if isinstance(exc, InvalidConfig | Unsupported):
        return ApiError(400, exc.code, str(exc))
    return ApiError(500, "start_failed", f"the sandbox failed to start: {exc}")

"""Keeping the state db in step with the actors, and reaping records of dead sandboxes.

Each actor a supervisor holds is :class:`Tracked`: its status changes are written to its
record as they happen (synchronously, inside ``Watch.set``, so ``stop_requested`` is in
the db before the Shutdown goes out). A supervisor *owns* the sandboxes it created or
started; it writes their whole life (starting, running with pids, draining, the end).
An actor merely attached to a sandbox owned elsewhere writes only ``draining`` (a stop
it asked for) and the end it saw.

Reaping (:func:`reap`, on ``open_supervisor`` and when a lookup meets a record whose
processes are gone): a record is *stale* when what keeps its sandbox alive is gone
(pid dead, or alive with another start time: a recycled pid). That is the keeper for a
detached sandbox (the creator while it has no keeper yet) and the owning process for
any other. A stale non-detached record is deleted with its directory: its sandbox died
with its owner. A stale detached one becomes ``crashed`` (kept, so it can be looked at,
started again or removed). Stray processes of a stale record are SIGKILLed, but only
after checking their start time.
"""

from __future__ import annotations

import logging
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..drivers.base import Driver, SandboxSpec
from .lifecycle import RestartPolicy, RestartTracker
from .registry import (
    Registry,
    SandboxRecord,
    now_us,
    own_identity,
    signal_process,
)
from .sandbox import SandboxActor
from .state import SandboxStatus

__all__ = ["Tracked", "is_stale", "new_record", "reap", "reap_record"]

logger = logging.getLogger("corral.supervisor")


def new_record(
    spec: SandboxSpec, policy: RestartPolicy, driver_kind: str, status: SandboxStatus
) -> SandboxRecord:
    pid, start = own_identity()
    now = now_us()
    return SandboxRecord(
        name=spec.name,
        id=spec.state_id or uuid.uuid4().hex,
        driver=driver_kind,
        status=status,
        spec=spec,
        policy=policy,
        detached=spec.detached,
        ephemeral=spec.ephemeral,
        owner_pid=pid,
        owner_start=start,
        created_at=now,
        updated_at=now,
    )


@dataclass(eq=False)
class Tracked:
    """One actor a supervisor holds, and how it maps to its record."""

    actor: SandboxActor
    registry: Registry
    record_id: str
    owned: bool
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    on_end: Callable[[Tracked], None] | None = None
    """Called (synchronously) when the sandbox reaches stopped or crashed."""
    fresh: bool = False
    """Its record was inserted as ``starting``: the first ``starting`` needs no write."""
    gave_up: bool = False
    tracker: RestartTracker = field(init=False)
    _unsubscribe: Callable[[], None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tracker = RestartTracker(self.policy)

    @property
    def name(self) -> str:
        return self.actor.name

    def attach(self) -> None:
        """Start writing the actor's status changes to the record."""
        self._unsubscribe = self.actor.status.observe(self._on_status)
        self.actor.stopped_elsewhere = self.stopped_elsewhere

    def detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.actor.stopped_elsewhere = None

    def stopped_elsewhere(self) -> bool:
        """Was the sandbox stopped by someone else (its record says so, or is gone)?"""
        record = self.registry.get(self.name)
        if record is None or record.id != self.record_id:
            return True
        return record.stop_requested or record.status is SandboxStatus.STOPPED

    def _on_status(self, status: SandboxStatus) -> None:
        try:
            self._write(status)
        except Exception:
            logger.exception("sandbox %r: recording status %s failed", self.name, status)
        if status.terminal and self.on_end is not None:
            self.on_end(self)

    def _write(self, status: SandboxStatus) -> None:
        actor = self.actor
        fields: dict[str, Any] = {"status": status}
        if status is SandboxStatus.STARTING:
            if self.fresh or not self.owned:
                self.fresh = False
                return
            pid, start = own_identity()
            fields.update(
                stop_requested=False,
                owner_pid=pid,
                owner_start=start,
                exit_code=None,
                exit_signal=None,
                stopped_at=None,
                last_error=None,
            )
        elif status is SandboxStatus.RUNNING:
            if not self.owned or actor.proc is None:
                return
            ids = actor.proc.process_ids()
            fields.update(ids._asdict(), started_at=now_us())
        elif status is SandboxStatus.DRAINING:
            fields["stop_requested"] = True
        elif status.terminal:
            exit_status = actor.exit_status
            fields.update(
                stopped_at=now_us(),
                exit_code=None if exit_status is None else exit_status.code,
                exit_signal=None if exit_status is None else exit_status.signal,
                last_error=actor.last_error,
            )
        else:
            return
        self.registry.update(self.name, self.record_id, **fields)


def is_stale(record: SandboxRecord) -> bool:
    """Is what keeps this record's sandbox alive gone? (Never for our own records.)"""
    if record.status.terminal:
        return False
    if record.detached:
        if record.status is SandboxStatus.CREATED:
            return False
        if record.keeper_pid is not None:
            return not record.keeper_alive()
    return not record.owner_alive()


async def reap_record(registry: Registry, driver: Driver | None, record: SandboxRecord) -> bool:
    """Settle one record if it is stale (see the module docstring); True if it was."""
    if record.detached and record.status is SandboxStatus.STARTING and record.keeper_alive():
        # its creator died while the keeper was starting it: the keeper holds it now
        registry.update(record.name, record.id, where="status = 'starting'", status="running")
        return False
    if not is_stale(record):
        return False
    if record.driver == "local":
        for pid, start in ((record.init_pid, record.init_start), (record.pid, record.pid_start)):
            if signal_process(pid, start, signal.SIGKILL):
                logger.warning("sandbox %r: killed stray process %d", record.name, pid)
    if record.detached:
        who = f"its keeper (pid {record.keeper_pid})" if record.keeper_pid else "its creator"
        registry.update(
            record.name,
            record.id,
            status=SandboxStatus.CRASHED,
            stopped_at=now_us(),
            last_error=record.last_error or f"{who} is gone",
        )
        logger.info("sandbox %r: %s is gone; marked crashed", record.name, who)
        return True
    if registry.delete(record.name, record.id) and driver is not None:
        if driver.kind == record.driver:
            await driver.remove(record.name)
        logger.info("sandbox %r: its owner (pid %s) is gone; reaped", record.name, record.owner_pid)
    return True


async def reap(registry: Registry, driver: Driver | None) -> list[str]:
    """Settle every stale record; the names reaped."""
    reaped = []
    for record in registry.unsettled():
        if await reap_record(registry, driver, record):
            reaped.append(record.name)
    return reaped

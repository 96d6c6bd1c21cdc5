"""CloudSandbox: one remote sandbox as the actor sees it (status, stop, agent socket).

See :mod:`corral.drivers.cloud.driver` for how the stop ladder and clean-up run over
cloud. The status comes from a poller task per sandbox (in the driver's nursery):
every ``poll_interval`` while the sandbox runs, every 100 ms once a stop was asked or
while it starts, and at once when its agent WebSocket drops.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from ...errors import (
    CorralError,
    Runtime,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxStillRunning,
    Unsupported,
)
from ..base import ExitStatus, SandboxProcess, SandboxSpec
from .wire import SandboxWire

if TYPE_CHECKING:
    from .driver import CloudDriver

__all__ = ["ABANDON_TIMEOUT", "POLL_INTERVAL", "REAP_TIMEOUT", "CloudSandbox"]

log = logging.getLogger("corral.drivers.cloud")

POLL_INTERVAL = 0.1
"""Status polling while a stop is in progress (the seed's 100 ms)."""
ABANDON_TIMEOUT = 5.0
"""Bound on the remote clean-up done inline (a stop, a DELETE)."""
REAP_TIMEOUT = 30.0
LOST_FAST_POLL = 2.0
"""After the agent WebSocket drops, poll every 100 ms for this long."""
"""How long a reaper waits for a stopping sandbox before removing its record."""


class CloudSandbox(SandboxProcess):
    """One remote sandbox as the actor sees it."""

    reconnectable = True

    def __init__(self, driver: CloudDriver, spec: SandboxSpec, wire: SandboxWire) -> None:
        self.driver = driver
        self.spec = spec
        self.name = spec.name
        self.id = wire.id
        self.wire = wire
        self._exit: ExitStatus | None = None
        self._exited = trio.Event()
        self._kick = trio.Event()
        self._changed = trio.Event()
        self._fast = False
        self._fast_until = 0.0
        self._cleaned = False
        self._observe(wire)

    def __repr__(self) -> str:
        return f"<CloudSandbox {self.name!r} id={self.id} {self.wire.status}>"

    @property
    def status(self) -> str:
        """The last status the control plane reported (its words: stopping, failed…)."""
        return self.wire.status

    @property
    def exit_status(self) -> ExitStatus | None:
        return self._exit

    async def wait(self) -> ExitStatus:
        await self._exited.wait()
        assert self._exit is not None
        return self._exit

    # -- status ---------------------------------------------------------------------------
    def _observe(self, wire: SandboxWire) -> None:
        self.wire = wire
        if wire.status == "stopped":
            self._end(ExitStatus(0), wire.last_failure_message)
        elif wire.status == "failed":
            self._end(ExitStatus(1), wire.last_failure_message or "the sandbox failed")
        self._changed.set()
        self._changed = trio.Event()

    def _gone(self) -> None:
        if getattr(self.spec, "ephemeral", False):  # removed by the server once stopped
            self._end(ExitStatus(0), "stopped (ephemeral: removed by the control plane)")
        else:
            self._end(ExitStatus(1), "the sandbox was removed from the control plane")

    def _end(self, status: ExitStatus, reason: str | None) -> None:
        if self._exit is None:
            self._exit = status
            self.exit_reason = reason
            self._exited.set()

    def kick(self) -> None:
        """Check the status now (a stop was sent, a connect was refused)."""
        self._kick.set()

    def connection_lost(self) -> None:
        """The agent WebSocket dropped: check now, and every 100 ms for a while (the
        server may record the sandbox's end a moment after it closed the socket)."""
        self._fast_until = trio.current_time() + LOST_FAST_POLL
        self._kick.set()

    async def refresh(self) -> SandboxWire:
        try:
            wire = await self.driver.get(self.id)
        except SandboxNotFound:
            self._gone()
            raise
        self._observe(wire)
        return wire

    async def _poll_loop(self) -> None:
        while self._exit is None:
            fast = self._fast or trio.current_time() < self._fast_until
            interval = POLL_INTERVAL if fast else self.driver.poll_interval
            with trio.move_on_after(interval):
                await self._kick.wait()
            self._kick = trio.Event()
            try:
                await self.refresh()
            except SandboxNotFound:
                break
            except CorralError as exc:
                log.debug("sandbox %r: status poll failed: %s", self.name, exc)
        self.driver.sandboxes.pop(self.id, None)

    async def wait_running(self, timeout: float) -> None:
        """After create: until ``running`` (Runtime when it failed or took too long)."""
        self._fast = True
        with trio.move_on_after(timeout):
            while self.wire.status != "running" and self._exit is None:
                self.kick()
                await self._changed.wait()
        self._fast = False
        if self._exit is not None:
            raise Runtime(
                f"sandbox {self.name!r} did not start: {self.exit_reason or self.wire.status}"
            )
        if self.wire.status != "running":
            raise Runtime(f"sandbox {self.name!r} is still {self.wire.status} after {timeout:g}s")

    # -- lifecycle ------------------------------------------------------------------------
    async def _post_stop(self) -> None:
        self._fast = True
        if self._exit is not None:
            await trio.lowlevel.checkpoint()
            return
        try:
            self._observe(await self.driver.stop_sandbox(self.id))
        except SandboxNotFound:
            self._gone()
        self.kick()

    async def request_stop(self, grace: float) -> bool:
        """The graceful stop goes through the control plane's lifecycle: ``POST …/stop``."""
        await self._post_stop()
        return True

    async def terminate(self) -> None:
        """The ladder's second rung over cloud: send the stop again."""
        await self._post_stop()

    async def kill(self) -> None:
        """No forced stop on the wire: send the stop again (see the module docstring)."""
        await self._post_stop()

    async def connect(self) -> trio.abc.Stream:
        if self._exit is not None:
            raise SandboxNotRunning(f"sandbox {self.name!r} has ended ({self.wire.status})")
        try:
            return await self.driver.connect_agent(self.id, on_lost=self.connection_lost)
        except (SandboxNotRunning, SandboxNotFound):
            self.kick()
            raise

    async def metrics(self) -> Any:
        raise Unsupported("metrics over cloud", "when the control plane serves metrics")

    async def cleanup(self) -> None:
        """Stop it if it runs; remove the record unless detached. Idempotent, bounded."""
        if self._cleaned:
            await trio.lowlevel.checkpoint()
            return
        self._cleaned = True
        with trio.move_on_after(ABANDON_TIMEOUT):
            try:
                if self._exit is None:
                    await self._post_stop()
                if self._exit is not None:
                    if not self.spec.detached:
                        await self._delete()
                    return
            except CorralError as exc:
                log.warning("sandbox %r: clean-up: %s", self.name, exc)
        if not self.spec.detached:
            self.driver._reapers += 1
            self.driver._start_soon(self._reap)

    async def _delete(self) -> None:
        try:
            await self.driver.delete_sandbox(self.id)
        except SandboxNotFound:
            pass

    async def _reap(self) -> None:
        """Remove the record once the stop has gone through (bounded)."""
        try:
            with trio.move_on_after(REAP_TIMEOUT):
                while True:
                    if self._exit is None:
                        self._fast = True
                        if self.id not in self.driver.sandboxes:
                            self.driver._track(self)
                        await self._exited.wait()
                    try:
                        await self._delete()
                        return
                    except SandboxStillRunning:
                        await trio.sleep(POLL_INTERVAL)
                    except CorralError as exc:
                        log.warning("sandbox %r: remove: %s", self.name, exc)
                        return
            log.warning(
                "sandbox %r: not stopped after %gs; its record stays", self.name, REAP_TIMEOUT
            )
        finally:
            self.driver._reapers -= 1
            if self.driver._reapers == 0:
                self.driver._reaped.set()
                self.driver._reaped = trio.Event()

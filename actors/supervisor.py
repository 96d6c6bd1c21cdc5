"""Supervisor: name → SandboxActor, and ``open_supervisor``, the scope every sandbox lives in.

``create`` starts the actor with ``nursery.start``: until the sandbox is running, the
start-up runs under the caller's cancellation, and an error or a cancellation at any
await leaves nothing behind (the actor's own shielded, bounded clean-up has run before
``create`` returns or raises, and the name is free again).

State lives in the state db (:mod:`corral.actors.registry`): the LocalBackend's
``state.db`` under ``CORRAL_HOME``, or a private in-memory db when the supervisor has
no local backend. Every supervisor on one db sees every sandbox: ``get`` of a sandbox
another supervisor or process runs attaches to it (a new agent connection);
``list`` pages through all of them. Records whose sandboxes died with their owner are
reaped when a supervisor opens (:mod:`corral.actors.tracking`).

Leaving ``open_supervisor`` stops the sandboxes this supervisor owns (created or
started) concurrently: the normal stop ladder when the block ends normally; when it
ends with an exception, a cancellation or KeyboardInterrupt, a fast bounded shutdown (a
short grace, then SIGKILL), shielded. Their records go with them. Sandboxes created
``detached=True``, and sandboxes only attached to, are let go, still running.

Lifecycle policies (:mod:`corral.actors.lifecycle`): a crashed sandbox is restarted
according to its restart policy; an ``ephemeral`` one is removed once it has ended for
good; ``idle_timeout`` and ``max_duration`` are timers in the actor.

The warm pool (``open_supervisor(pool={"host": 8})``, :mod:`corral.actors.pool`): a
create that fits a pool takes one of its started, idle sandboxes instead of spawning.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Mapping
from typing import Any

import trio

from ..drivers.base import DEFAULT_IMAGE, Driver
from ..errors import (
    CorralError,
    InvalidConfig,
    Runtime,
    SandboxAlreadyExists,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxStillRunning,
    Unsupported,
)
from ..sandbox import Sandbox
from .lifecycle import DEFAULT_MAX_RESTARTS, DEFAULT_RESTART_WINDOW, Restart, RestartPolicy
from .options import build_spec
from .pool import Claim, Pool
from .registry import (
    INTERNAL_PREFIX,
    Registry,
    SandboxList,
    SandboxRecord,
    from_us,
    now_us,
    own_identity,
)
from .sandbox import (
    CLEANUP_TIMEOUT,
    DEFAULT_KILL_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    POLL_INTERVAL,
    Kill,
    SandboxActor,
    Start,
    Stop,
)
from .state import SandboxStatus
from .tracking import Tracked, new_record, reap_record

__all__ = ["FAST_STOP_TIMEOUT", "Supervisor", "open_supervisor"]

logger = logging.getLogger("corral.supervisor")

FAST_STOP_TIMEOUT = 1.0
"""Grace on an abnormal exit: Shutdown, up to 1 s, then SIGKILL (no SIGTERM rung)."""
FAST_SHUTDOWN_BOUND = FAST_STOP_TIMEOUT + 2 * DEFAULT_KILL_TIMEOUT + CLEANUP_TIMEOUT
STARTING_WAIT = 30.0
"""How long ``get`` waits for a sandbox another process is starting."""


class Supervisor:
    """Owns the sandboxes of one ``open_supervisor`` block; sees every sandbox of its db."""

    def __init__(
        self, driver: Driver, nursery: trio.Nursery, registry: Registry | None = None
    ) -> None:
        self.driver = driver
        self.registry = Registry() if registry is None else registry
        self._nursery = nursery
        self._actors: dict[str, SandboxActor] = {}
        self._tracked: dict[str, Tracked] = {}
        self._reserved: set[str] = set()
        self._closing = False
        self.pool: Pool | None = None
        """The warm pool (``open_supervisor(pool=...)``), if any: see actors/pool.py."""

    def __repr__(self) -> str:
        return f"<Supervisor driver={self.driver.kind} sandboxes={len(self._actors)}>"

    def __contains__(self, name: object) -> bool:
        """Does this supervisor hold an actor for ``name`` (created, started or attached)?"""
        return name in self._actors

    def __len__(self) -> int:
        return len(self._actors)

    # -- create --------------------------------------------------------------------------
    async def create(
        self,
        name: str,
        *,
        image: str = DEFAULT_IMAGE,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        network: bool = False,
        cpus: float | None = None,
        memory_mib: int | None = None,
        pids_limit: int | None = None,
        tmp_size_mib: int | None = None,
        detached: bool = False,
        labels: Mapping[str, str] | None = None,
        start: bool = True,
        ephemeral: bool = False,
        idle_timeout: float | None = None,
        max_duration: float | None = None,
        restart: Restart | str = Restart.TEMPORARY,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        restart_window: float = DEFAULT_RESTART_WINDOW,
        **future: Any,
    ) -> Sandbox:
        """Create a sandbox and (unless ``start=False``) start it: the handle comes back
        once its agent answers. ``start=False`` records it as ``created``; ``sb.start()``
        starts it. See the module docstring for ``detached`` and the lifecycle options.
        Limits left None (``cpus``, ``memory_mib``, ``pids_limit``, ``tmp_size_mib``: the
        size of ``/tmp``) take the driver's defaults (the LocalBackend's)."""
        if future:
            raise Unsupported(
                f"sandbox option {', '.join(sorted(future))}", "in a later corral version"
            )
        spec = build_spec(
            name,
            image=image,
            env=env,
            workdir=workdir,
            network=network,
            cpus=cpus,
            memory_mib=memory_mib,
            pids_limit=pids_limit,
            tmp_size_mib=tmp_size_mib,
            detached=detached,
            labels=labels,
            ephemeral=ephemeral,
            idle_timeout=idle_timeout,
            max_duration=max_duration,
        )
        policy = RestartPolicy.build(restart, max_restarts, restart_window)
        if self._closing:
            raise Runtime("the supervisor is shutting down")
        if name in self._actors or name in self._reserved:
            raise SandboxAlreadyExists(f"sandbox {name!r} already exists")
        status = SandboxStatus.STARTING if start else SandboxStatus.CREATED
        if self.pool is not None and start:
            claim = await self.pool.claim(spec, policy)
            if claim is not None:
                sandbox = self._hold(claim)
                await trio.lowlevel.cancel_shielded_checkpoint()  # too late to cancel
                return sandbox
        record = new_record(spec, policy, self.driver.kind, status)
        await self._claim(record)
        actor = SandboxActor(spec, self.driver, created_at=from_us(record.created_at))
        tracked = self._track(actor, record, owned=True)
        tracked.fresh = start
        self._reserved.add(name)
        try:
            await self._nursery.start(functools.partial(self._run_actor, tracked, start))
        except BaseException:
            # Normally the actor has cleaned up already (it ran under this call). Only
            # an exception after it reported ready could leave it running: stop it.
            if self._actors.get(name) is actor:
                with trio.CancelScope(shield=True), trio.move_on_after(FAST_SHUTDOWN_BOUND):
                    try:
                        await actor.ask(Kill())
                    except CorralError:
                        pass
            self._drop(tracked)
            self.registry.delete(name, record.id)
            # No record refers to its directory any more (workdir, agent.log): remove it.
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await self.driver.remove(name)
            raise
        finally:
            self._reserved.discard(name)
        return Sandbox(actor)

    def _hold(self, claim: Claim) -> Sandbox:
        """A warm pool's sandbox, claimed for a create (renamed, running, its record
        written): this supervisor's from now on, as if it had created it."""
        actor = claim.actor
        tracked = self._track(actor, claim.record, owned=True)
        claim.warm.tracked = tracked
        self._actors[actor.name] = actor
        self._tracked[actor.name] = tracked
        return Sandbox(actor)

    async def _claim(self, record: SandboxRecord) -> None:
        """Take the name in the db (atomic across processes): SandboxAlreadyExists if taken."""
        for _ in range(2):
            existing = self.registry.claim(record)
            if existing is None:
                return
            if not await reap_record(self.registry, self.driver, existing):
                break
            if self.registry.get(record.name) is not None:
                break  # a stale detached record stays (crashed) until removed
        raise SandboxAlreadyExists(f"sandbox {record.name!r} already exists")

    def _track(self, actor: SandboxActor, record: SandboxRecord, *, owned: bool) -> Tracked:
        tracked = Tracked(
            actor=actor,
            registry=self.registry,
            record_id=record.id,
            owned=owned,
            policy=record.policy,
            on_end=self._on_end,
        )
        tracked.attach()
        actor.before_start = functools.partial(self._before_start, tracked)
        return tracked

    async def _run_actor(
        self,
        tracked: Tracked,
        start: bool,
        *,
        task_status: trio.TaskStatus[SandboxActor],
    ) -> None:
        actor = tracked.actor

        def register() -> None:
            self._actors[actor.name] = actor
            self._tracked[actor.name] = tracked

        try:
            await actor.run(start=start, on_ready=register, task_status=task_status)
        except Exception:
            if not actor.started:
                raise
            logger.exception("the actor of sandbox %r failed", actor.name)
        finally:
            tracked.detach()

    def _drop(self, tracked: Tracked) -> None:
        """Forget an actor (its record stays unless the caller deletes it)."""
        if self._actors.get(tracked.name) is tracked.actor:
            del self._actors[tracked.name]
            del self._tracked[tracked.name]
        tracked.detach()
        tracked.actor.close()

    # -- lifecycle policies ----------------------------------------------------------------
    def _before_start(self, tracked: Tracked) -> None:
        """A (re)start: take the record back to ``starting`` unless someone else runs it."""
        pid, start = own_identity()
        if not self.registry.update(
            tracked.name,
            tracked.record_id,
            where="status IN ('created', 'stopped', 'crashed')",
            status=SandboxStatus.STARTING,
            owner_pid=pid,
            owner_start=start,
            stop_requested=False,
        ):
            record = self.registry.get(tracked.name)
            if record is None or record.id != tracked.record_id:
                raise SandboxNotFound(f"sandbox {tracked.name!r} was removed")
            raise SandboxAlreadyExists(
                f"sandbox {tracked.name!r} is {record.status} (started elsewhere)"
            )
        tracked.owned = True
        tracked.fresh = True

    def _on_end(self, tracked: Tracked) -> None:
        if not self._closing:
            self._nursery.start_soon(self._after_end, tracked)

    async def _after_end(self, tracked: Tracked) -> None:
        """Restart a crashed sandbox per its policy; remove an ephemeral one."""
        actor = tracked.actor
        if self._tracked.get(tracked.name) is not tracked:
            return
        if actor.status.value is SandboxStatus.CRASHED and tracked.owned:
            exit_status = actor.exit_status
            clean = exit_status is not None and exit_status.clean
            policy = tracked.policy
            if policy.wants_restart(clean):
                if tracked.tracker.allow(trio.current_time()):
                    self.registry.update(
                        tracked.name, tracked.record_id, restarts=tracked.tracker.total
                    )
                    logger.warning("sandbox %r crashed; restarting it", tracked.name)
                    try:
                        await actor.ask(Start())
                    except Exception as exc:
                        logger.warning("sandbox %r: restart failed: %s", tracked.name, exc)
                    return
                tracked.gave_up = True
                self.registry.update(
                    tracked.name,
                    tracked.record_id,
                    last_error=(
                        f"gave up after {policy.max_restarts} restarts in "
                        f"{policy.restart_window:g}s; last: {actor.last_error}"
                    ),
                )
                logger.error("sandbox %r keeps crashing; not restarting it", tracked.name)
        if actor.spec.ephemeral and actor.status.value.terminal:
            self._drop(tracked)
            self.registry.delete(tracked.name, tracked.record_id)
            await self.driver.remove(tracked.name)

    # -- look up ---------------------------------------------------------------------------
    async def get(self, name: str) -> Sandbox:
        """The sandbox called ``name``: held here, or found in the db (then attached to when
        it runs elsewhere, or a handle on its record when it is not running)."""
        return Sandbox(await self._resolve(name))

    async def _resolve(self, name: str) -> SandboxActor:
        if not isinstance(name, str):
            raise InvalidConfig(f"sandbox name must be a string, got {type(name).__name__}")
        if name.startswith(INTERNAL_PREFIX):  # a warm pool's idle sandbox: nobody's yet
            raise SandboxNotFound(f"sandbox {name!r} not found")
        actor = self._actors.get(name)
        if actor is not None and not self._outdated(name):
            return actor
        if name in self._reserved:
            raise SandboxNotRunning(f"sandbox {name!r} is starting")
        record = self.registry.get(name)
        if record is not None and await reap_record(self.registry, self.driver, record):
            record = self.registry.get(name)
        if record is None:
            raise SandboxNotFound(f"sandbox {name!r} not found")
        if record.status is SandboxStatus.STARTING:
            record = await self._wait_started(record)
        actor = self._actors.get(name)  # adopted by a concurrent lookup meanwhile
        if actor is not None:
            return actor
        return await self._adopt(record)

    async def wait_pool_ready(self) -> None:
        """Wait until the warm pool is full (at once without one); bound it yourself."""
        if self.pool is None:
            await trio.lowlevel.checkpoint()
            return
        await self.pool.wait_ready()

    def _outdated(self, name: str) -> bool:
        """Is the actor held for ``name`` idle while another one runs its sandbox now? Then
        it is dropped (a lookup attaches afresh)."""
        tracked = self._tracked[name]
        status = tracked.actor.status.value
        if status is not SandboxStatus.CREATED and not status.terminal:
            return False
        record = self.registry.get(name)
        if record is None or record.id != tracked.record_id:
            return False
        if record.status is SandboxStatus.CREATED or record.status.terminal:
            return False
        self._drop(tracked)
        return True

    async def _wait_started(self, record: SandboxRecord) -> SandboxRecord:
        with trio.move_on_after(STARTING_WAIT):
            while record.status is SandboxStatus.STARTING:  # another process: no event
                await trio.sleep(POLL_INTERVAL)
                fresh = self.registry.get(record.name)
                if fresh is None or fresh.id != record.id:
                    raise SandboxNotFound(f"sandbox {record.name!r} not found")
                record = fresh
            return record
        raise SandboxNotRunning(f"sandbox {record.name!r} is still starting")

    async def _adopt(self, record: SandboxRecord) -> SandboxActor:
        """An actor for a sandbox of the db this supervisor does not hold yet."""
        if record.driver != self.driver.kind:
            raise Unsupported(
                f"sandbox {record.name!r} of the {record.driver} driver from a supervisor "
                f"on the {self.driver.kind} driver"
            )
        running = record.status in (SandboxStatus.RUNNING, SandboxStatus.DRAINING)
        created_at = from_us(record.created_at)
        if running:
            spec, ids = record.spec, record.ids
            started = record.started_at or record.created_at
            actor = SandboxActor(
                spec,
                self.driver,
                opener=lambda: self.driver.attach(spec, ids),
                created_at=created_at,
                elapsed=max(0.0, (now_us() - started) / 1e6),
            )
        else:
            actor = SandboxActor(
                record.spec, self.driver, status=record.status, created_at=created_at
            )
        tracked = self._track(actor, record, owned=False)
        self._reserved.add(record.name)
        try:
            await self._nursery.start(functools.partial(self._run_actor, tracked, running))
        except CorralError as exc:
            tracked.detach()
            fresh = self.registry.get(record.name)
            if fresh is not None and await reap_record(self.registry, self.driver, fresh):
                fresh = self.registry.get(record.name)
            if fresh is None:
                raise SandboxNotFound(f"sandbox {record.name!r} not found") from exc
            if fresh.status.terminal or fresh.id != record.id:
                self._reserved.discard(record.name)
                return await self._adopt(fresh)
            raise
        finally:
            self._reserved.discard(record.name)
        return actor

    async def list(self, cursor: str | None = None, limit: int | None = None) -> SandboxList:
        """Every sandbox of the db, by name, a page at a time (``limit`` per page; pass
        the page's ``next_cursor`` for the next one)."""
        records, next_cursor = self.registry.page(cursor, limit)
        infos = []
        for record in records:
            if not record.status.terminal:
                if await reap_record(self.registry, self.driver, record):
                    fresh = self.registry.get(record.name)
                    if fresh is None:
                        continue
                    record = fresh
            infos.append(record.info())
        return SandboxList(infos, next_cursor)

    # -- lifecycle -----------------------------------------------------------------------
    async def stop(self, name: str, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        await (await self._resolve(name)).ask(Stop(timeout=timeout))

    async def kill(self, name: str, timeout: float = DEFAULT_KILL_TIMEOUT) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise InvalidConfig(f"timeout must be a number above 0, got {timeout!r}")
        await (await self._resolve(name)).ask(Kill(timeout=timeout))

    async def start(self, name: str) -> None:
        await (await self._resolve(name)).ask(Start())

    async def remove(self, name: str) -> None:
        """Delete a sandbox that is not running (created, stopped or crashed): its record
        and its directory. SandboxStillRunning while it starts, runs or drains."""
        if name in self._reserved:
            raise SandboxStillRunning(f"cannot remove sandbox {name!r}: it is starting")
        if isinstance(name, str) and name.startswith(INTERNAL_PREFIX):
            raise SandboxNotFound(f"sandbox {name!r} not found")
        tracked = self._tracked.get(name)
        if tracked is not None and self._outdated(name):
            tracked = None
        if tracked is not None:
            status = tracked.actor.status.value
            if status.active or status is SandboxStatus.STARTING:
                raise SandboxStillRunning(f"cannot remove sandbox {name!r}: still {status}")
            self._drop(tracked)
            with trio.move_on_after(CLEANUP_TIMEOUT):
                await tracked.actor.finished.wait()
            self.registry.delete(name, tracked.record_id)
            await self.driver.remove(name)
            return
        record = self.registry.get(name)
        if record is None:
            raise SandboxNotFound(f"sandbox {name!r} not found")
        if not record.status.terminal and record.status is not SandboxStatus.CREATED:
            if await reap_record(self.registry, self.driver, record):
                return await self.remove(name)
            raise SandboxStillRunning(f"cannot remove sandbox {name!r}: still {record.status}")
        if self.registry.delete(name, record.id) and record.driver == self.driver.kind:
            await self.driver.remove(name)

    async def connect_agent(self, name: str) -> trio.abc.Stream:
        """A new raw byte stream to the agent of a running sandbox, for relays (``corral
        serve``'s ``/corral`` WebSocket). The caller speaks the protocol (its own
        handshake) and closes the stream; the sandbox's lifecycle stays with its actor."""
        actor = await self._resolve(name)
        proc = actor.proc
        if proc is None or actor.status.value != "running":
            raise SandboxNotRunning(f"sandbox {name!r} is {actor.status.value}")
        return await proc.connect()

    async def ask(self, name: str, msg: object) -> Any:
        """Low level: send a message (Exec, FsRead, ... or a control message), get the reply."""
        return await (await self._resolve(name)).ask(msg)

    async def tell(self, name: str, msg: object) -> None:
        await (await self._resolve(name)).tell(msg)


def _import_attr(module: str, attr: str) -> Any:
    """``module.attr``, or None when the module (not one of its imports) is missing."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return None
        raise
    return getattr(mod, attr, None)


def driver_for(backend: object | None) -> Driver:
    """The driver a backend calls for (the ambient default backend when None)."""
    if backend is None:
        default_backend = _import_attr("corral.backend", "default_backend")
        if default_backend is not None:
            backend = default_backend()
    kind = "local" if backend is None else str(getattr(backend, "kind", ""))
    if kind == "local":
        local_driver = _import_attr("corral.drivers.local", "LocalDriver")
        if local_driver is None:
            raise Unsupported("the local backend", "when the local driver lands")
        driver: Driver = local_driver(backend)
        return driver
    if kind == "cloud":
        cloud_driver = _import_attr("corral.drivers.cloud", "CloudDriver")
        if cloud_driver is None:
            raise Unsupported("cloud backend", "when the cloud driver lands")
        driver = cloud_driver(backend)
        return driver
    raise InvalidConfig(f"unknown backend {backend!r}: expected a LocalBackend or CloudBackend")


from .scope import open_supervisor  # noqa: E402 - re-exported; it builds on Supervisor

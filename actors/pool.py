"""The warm pool: sandboxes started ahead of time, handed to ``create`` in well under a ms.

``open_supervisor(pool={"host": 8})`` keeps 8 ``host`` sandboxes started and idle. A
pool is described per image (``{"host": 8, "python:3.12": 2}``), with options
(``{"host": {"size": 4, "network": True, "memory_mib": 256}}``), or as a list of
option dicts each with a ``size`` (several pools of one image)::

    pool=[{"image": "host", "size": 4}, {"image": "host", "network": True, "size": 2}]

**Which creates are warm.** A create takes a pooled sandbox when everything fixed at
spawn time is the same as the pool's: image, workdir, network, the limits (every field
of the spec but the ones below). What is applied when it is claimed: the name, the
labels, ``ephemeral``, ``idle_timeout``, ``max_duration``, the restart policy, and
``env``: the pooled sandbox was started with the pool's env (none by default), so the
create's env must contain it, and the actor adds the create's env to every exec, job
and exec stream (under the request's own env; the same environment a sandbox started
with that env gives its commands). ``start=False`` and ``detached=True`` creates are
always cold. Otherwise, when the matching pool has no sandbox ready the create is cold
at once (a refill is on its way for the next one: waiting for it would be no faster).

**Never reused.** A claimed sandbox leaves the pool for good; the pool starts a new one
in the background. So nothing of an earlier claim can be seen in a claimed sandbox.

**Names.** A pooled sandbox runs under an internal name, ``_pool-<hex>`` (user names
start with a letter or a digit, so it never collides). It is a running
:class:`SandboxActor` (booted as for a cold create: spawned, agent connected, log pump
running) in the supervisor's nursery, with a record in the state db under that name
(so a crashed owner's pooled sandboxes are reaped like any other), which ``list``
leaves out and ``get`` does not find. On claim, one UPDATE gives the record the
create's name, id and spec (the atomic name claim, as a create's INSERT); the driver
renames the sandbox (the local driver renames its directory, and as root sets its
hostname from outside, so ``hostname`` inside says the new name; without root the
hostname stays ``_pool-<hex>``); the actor takes the create's spec (name, env, labels,
timers, log directory); the supervisor tracks it like a created one. Its cgroup keeps
the internal name.

**Claim.** In memory, one db write, a rename(2) and (as root) a hostname change; no
spawn, no connect, no new task. A pooled sandbox whose actor is not running, whose
process ended or whose agent closed its connection is never handed out (checked at
claim; an idle one that ends is dropped and replaced at once). The claim's only await
is reaping a stale record that holds the name; cancelled there (or the name taken), the
sandbox goes back to the pool, or is destroyed if it died meanwhile.

**Refill.** In the supervisor's nursery, at most ``concurrency`` spawns at a time over
all pools. A failed spawn is logged and retried after a back-off (0.1 s doubling up to
30 s, reset by a success); it never ends the supervisor. Leaving ``open_supervisor``
cancels the refills and destroys the idle sandboxes (process, record, directory).
"""

from __future__ import annotations

import dataclasses
import logging
import select
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from ..drivers.base import DEFAULT_IMAGE, Driver, ProcessIds, SandboxSpec
from ..errors import (
    CorralError,
    InvalidConfig,
    Runtime,
    SandboxAlreadyExists,
    SandboxNotFound,
    Unsupported,
)
from .lifecycle import RestartPolicy
from .options import build_spec
from .registry import INTERNAL_PREFIX, Registry, SandboxRecord, from_us, now_us
from .sandbox import CLEANUP_TIMEOUT, SandboxActor
from .state import SandboxStatus
from .tracking import Tracked, new_record, reap_record

__all__ = [
    "APPLIED_AT_CLAIM",
    "POOL_PREFIX",
    "REFILL_CONCURRENCY",
    "Claim",
    "Pool",
    "PoolEntry",
    "Warm",
    "parse_pool",
    "spawn_key",
]

logger = logging.getLogger("corral.pool")

POOL_PREFIX = f"{INTERNAL_PREFIX}pool-"
REFILL_CONCURRENCY = 2
"""Spawns at a time, over all pools of a supervisor."""
BACKOFF_START = 0.1
BACKOFF_MAX = 30.0
REFILL_QUIET = 0.01
"""A refill starts once no claim happened for this long: a spawn's synchronous steps
(planning the sandbox, ~1 ms) would otherwise run in the middle of the claims of a burst
of creates, on the same event loop."""

APPLIED_AT_CLAIM = frozenset(
    {"name", "env", "labels", "ephemeral", "idle_timeout", "max_duration", "state_id"}
)
"""Spec fields a claim sets; every other field must be the pool's (``spawn_key``)."""
_KEY_FIELDS = tuple(
    f.name for f in dataclasses.fields(SandboxSpec) if f.name not in APPLIED_AT_CLAIM
)
_SPAWN_DEFAULTS: dict[str, Any] = {
    "image": DEFAULT_IMAGE,
    "env": None,
    "workdir": None,
    "network": False,
    "cpus": None,
    "memory_mib": None,
    "pids_limit": None,
}

Key = tuple[tuple[str, object], ...]


def _freeze(value: object) -> object:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(_freeze(v) for v in value)
    return value


def spawn_key(spec: SandboxSpec) -> Key:
    """What a pooled sandbox and a create must agree on (everything fixed at spawn)."""
    return tuple((name, _freeze(getattr(spec, name))) for name in _KEY_FIELDS)


# -- configuration ---------------------------------------------------------------------------


def _template(options: Mapping[str, Any], where: str) -> SandboxSpec:
    fixed = sorted(set(options) & (APPLIED_AT_CLAIM - {"env"} | {"detached"}))
    if fixed:
        raise InvalidConfig(
            f"warm pool {where}: {', '.join(fixed)} cannot be set per pool "
            "(set per create, or never pooled)"
        )
    try:
        return build_spec(
            "pool",
            **{**_SPAWN_DEFAULTS, **options},
            detached=False,
            labels=None,
            ephemeral=False,
            idle_timeout=None,
            max_duration=None,
        )
    except TypeError as exc:
        raise InvalidConfig(f"warm pool {where}: unknown option ({exc})") from None


def _size(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidConfig(f"warm pool {where}: size must be a whole number >= 1, got {value!r}")
    return value


def parse_pool(config: object) -> list[tuple[SandboxSpec, int]]:
    """``open_supervisor``'s ``pool=`` as (template spec, size) pairs (see the module
    docstring for the forms); InvalidConfig for anything else."""
    if config is None:
        return []
    items: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(config, Mapping):
        for image, value in config.items():
            if not isinstance(image, str) or not image:
                raise InvalidConfig(f"warm pool: image must be a non-empty string, got {image!r}")
            if isinstance(value, Mapping):
                items.append((image, {"image": image, **value}))
            else:
                items.append((image, {"image": image, "size": value}))
    elif isinstance(config, Sequence) and not isinstance(config, str | bytes):
        for index, value in enumerate(config):
            if not isinstance(value, Mapping):
                raise InvalidConfig(f"warm pool #{index}: expected a dict of options")
            items.append((f"#{index}", value))
    else:
        raise InvalidConfig(
            "pool must map images to sizes (or option dicts), or be a list of option dicts"
        )
    pools: list[tuple[SandboxSpec, int]] = []
    seen: set[tuple[Key, object]] = set()
    for where, options in items:
        opts = dict(options)
        size = _size(opts.pop("size", None), where)
        spec = _template(opts, where)
        ident = (spawn_key(spec), _freeze(spec.env))
        if ident in seen:
            raise InvalidConfig(f"warm pool {where}: the same pool is given twice")
        seen.add(ident)
        pools.append((spec, size))
    return pools


# -- the pool ------------------------------------------------------------------------------


@dataclass(eq=False)
class PoolEntry:
    """One pool: its template spec, its size and its idle sandboxes."""

    spec: SandboxSpec
    size: int
    key: Key = field(init=False)
    ready: deque[Warm] = field(default_factory=deque)
    pending: int = 0
    failures: int = 0
    """Spawns that failed in a row."""
    last_error: str | None = None
    delay: float = 0.0
    retry_at: float = -float("inf")

    def __post_init__(self) -> None:
        self.key = spawn_key(self.spec)

    def fits(self, env: Mapping[str, str]) -> bool:
        """Does a create with ``env`` see the environment it asked for?"""
        return all(env.get(k) == v for k, v in self.spec.env.items())

    @property
    def wants_more(self) -> bool:
        return len(self.ready) + self.pending < self.size


@dataclass(eq=False)
class Warm:
    """One idle sandbox: a running actor under an internal name, and its record."""

    name: str
    record_id: str
    actor: SandboxActor
    entry: PoolEntry
    ids: ProcessIds = field(default_factory=ProcessIds)
    state: str = "ready"
    """ready (in the pool), taken (a claim holds it), claimed, gone."""
    tracked: Tracked | None = None
    """Set when claimed: the supervisor's view of it (detached when the actor ends)."""
    unobserve: Callable[[], None] | None = None


@dataclass(eq=False)
class Claim:
    """A claimed sandbox: its record (renamed, running) and its actor (renamed)."""

    record: SandboxRecord
    actor: SandboxActor
    warm: Warm


def _peer_closed(actor: SandboxActor) -> bool:
    """Has the agent closed its end of the connection (not yet seen by the reader)?"""
    sock = getattr(getattr(actor.channel, "_stream", None), "socket", None)
    if sock is None:
        return False
    try:
        fd = sock.fileno()
    except OSError:
        return True
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return bool(poller.poll(0))


class Pool:
    """The warm pools of one supervisor (see the module docstring). Pooled actors run
    in ``actors`` (the supervisor's nursery: a claimed one outlives the pool); the
    refills and watchers in the pool's own."""

    def __init__(
        self,
        pools: Sequence[tuple[SandboxSpec, int]],
        driver: Driver,
        registry: Registry,
        *,
        concurrency: int = REFILL_CONCURRENCY,
    ) -> None:
        if not driver.can_rename:
            raise Unsupported(f"a warm pool on the {driver.kind} driver", "")
        self.driver = driver
        self.registry = registry
        self.concurrency = max(1, concurrency)
        self.entries = [PoolEntry(spec, size) for spec, size in pools]
        self._by_key: dict[Key, list[PoolEntry]] = {}
        for entry in self.entries:
            self._by_key.setdefault(entry.key, []).append(entry)
        for group in self._by_key.values():  # the most specific env first
            group.sort(key=lambda e: -len(e.spec.env))
        self._limiter = trio.CapacityLimiter(self.concurrency)
        self._changed = trio.lowlevel.ParkingLot()
        self._actors: trio.Nursery | None = None
        self._nursery: trio.Nursery | None = None
        self._orphans: list[Warm] = []
        """Found dead when the pool's nursery was gone: destroyed on the way out."""
        self._done = trio.Event()
        self._closed = False
        self._last_take = -float("inf")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{e.spec.image}: {len(e.ready)}/{e.size}" for e in self.entries)
        return f"<Pool {sizes}>"

    @property
    def full(self) -> bool:
        return all(len(e.ready) >= e.size for e in self.entries)

    def ready_count(self, image: str | None = None) -> int:
        """Idle sandboxes ready to be claimed (of one image, or all)."""
        return sum(len(e.ready) for e in self.entries if image in (None, e.spec.image))

    async def wait_ready(self) -> None:
        """Wait until every pool is full (a pool whose spawns keep failing never is:
        bound this with a timeout)."""
        while not self.full:
            if self._closed:
                raise Runtime("the warm pool is closed")
            await self._changed.park()
        await trio.lowlevel.checkpoint()

    # -- running -------------------------------------------------------------------------
    async def run(
        self, actors: trio.Nursery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The refills; on the way out (cancelled, or :meth:`aclose`) the idle sandboxes
        go. ``actors``: where the pooled actors run (the supervisor's nursery)."""
        self._actors = actors
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for entry in self.entries:
                    for _ in range(min(entry.size, self.concurrency)):
                        nursery.start_soon(self._worker, entry)
                task_status.started()
        finally:
            self._closed = True
            self._nursery = None
            self._changed.unpark_all()
            with trio.CancelScope(shield=True):
                await self._destroy_idle()
            self._done.set()

    async def aclose(self) -> None:
        """Stop refilling and destroy the idle sandboxes (claimed ones are not the pool's)."""
        self._closed = True
        if self._nursery is None:
            await trio.lowlevel.checkpoint()
            return
        self._nursery.cancel_scope.cancel()
        await self._done.wait()

    async def _destroy_idle(self) -> None:
        idle = [warm for entry in self.entries for warm in entry.ready] + self._orphans
        self._orphans = []
        for entry in self.entries:
            entry.ready.clear()
        async with trio.open_nursery() as nursery:
            for warm in idle:
                warm.state = "gone"
                nursery.start_soon(self._destroy, warm)

    async def _worker(self, entry: PoolEntry) -> None:
        while True:
            while not entry.wants_more:
                await self._changed.park()
            start_at = max(entry.retry_at, self._last_take + REFILL_QUIET)
            if trio.current_time() < start_at:
                await trio.sleep_until(start_at)
                continue
            entry.pending += 1
            try:
                async with self._limiter:
                    warm = await self._spawn(entry)
                    entry.ready.append(warm)
                    warm.unobserve = warm.actor.status.observe(partial(self._on_status, warm))
            except Exception as exc:
                entry.failures += 1
                entry.last_error = str(exc) or type(exc).__name__
                entry.delay = min(BACKOFF_MAX, max(BACKOFF_START, entry.delay * 2))
                entry.retry_at = trio.current_time() + entry.delay
                logger.warning(
                    "warm pool %s: starting a sandbox failed (%d in a row): %s; retrying in %gs",
                    entry.spec.image,
                    entry.failures,
                    entry.last_error,
                    entry.delay,
                )
            else:
                entry.failures, entry.delay, entry.retry_at = 0, 0.0, -float("inf")
            finally:
                entry.pending -= 1
                self._changed.unpark_all()

    async def _spawn(self, entry: PoolEntry) -> Warm:
        """Start one pooled sandbox: its record (starting), its actor (spawn, connect,
        handshake), its record (running, with its pids). A failure or a cancellation
        leaves nothing (the actor cleans up as for a cold create)."""
        name = f"{POOL_PREFIX}{uuid.uuid4().hex[:16]}"
        spec = dataclasses.replace(entry.spec, name=name, state_id=uuid.uuid4().hex)
        record = new_record(spec, RestartPolicy(), self.driver.kind, SandboxStatus.STARTING)
        if self.registry.claim(record) is not None:
            raise SandboxAlreadyExists(f"internal name {name!r} is taken")
        actor = SandboxActor(spec, self.driver, created_at=from_us(record.created_at))
        warm = Warm(name, record.id, actor, entry)
        try:
            assert self._actors is not None
            await self._actors.start(self._run_actor, warm)
            assert actor.proc is not None
            warm.ids = actor.proc.process_ids()
            self.registry.update(
                name,
                record.id,
                status=SandboxStatus.RUNNING,
                started_at=now_us(),
                **warm.ids._asdict(),
            )
        except BaseException:
            warm.state = "gone"
            await self._destroy(warm)
            raise
        return warm

    async def _run_actor(self, warm: Warm, *, task_status: trio.TaskStatus[SandboxActor]) -> None:
        """A pooled actor's task, in the supervisor's nursery: the same task once it is
        claimed (then the claim's Tracked is detached when it ends)."""
        actor = warm.actor
        try:
            await actor.run(start=True, task_status=task_status)
        except Exception:
            if not actor.started:
                raise
            logger.exception("the actor of sandbox %r failed", actor.name)
        finally:
            if warm.tracked is not None:
                warm.tracked.detach()

    def _on_status(self, warm: Warm, status: SandboxStatus) -> None:
        """An idle sandbox ended (its agent died, or someone killed it): drop it."""
        if not status.terminal or warm.state in ("claimed", "gone"):
            return
        logger.warning("warm pool: idle sandbox %s %s; replacing it", warm.name, status)
        if warm.state == "ready":
            warm.entry.ready.remove(warm)
            self._destroy_soon(warm)
            self._changed.unpark_all()
        else:  # taken: the claim in progress sees it and destroys it
            warm.state = "gone"

    async def _destroy(self, warm: Warm) -> None:
        """Kill a pooled sandbox nobody claimed; delete its record and directory."""
        if warm.unobserve is not None:
            warm.unobserve()
            warm.unobserve = None
        actor = warm.actor
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                await actor.kill()
            except CorralError as exc:
                logger.warning("warm pool: killing idle sandbox %s: %s", warm.name, exc)
            actor.close()
            if actor.started:  # else its task never ran, or ran and ended
                await actor.finished.wait()
        try:
            self.registry.delete(warm.name, warm.record_id)
        except CorralError as exc:
            logger.warning("warm pool: deleting the record of %s: %s", warm.name, exc)
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            await self.driver.remove(warm.name)

    def _destroy_soon(self, warm: Warm) -> None:
        warm.state = "gone"
        if self._nursery is not None:
            self._nursery.start_soon(self._destroy, warm)
        else:
            self._orphans.append(warm)

    # -- claiming ------------------------------------------------------------------------
    @staticmethod
    def alive(warm: Warm) -> bool:
        return warm.actor.usable() and not _peer_closed(warm.actor)

    def take(self, spec: SandboxSpec) -> Warm | None:
        """A live idle sandbox for ``spec``, out of its pool (None: no pool fits, or none
        is ready). Synchronous."""
        if self._closed or spec.detached:
            return None
        self._last_take = trio.current_time()
        for entry in self._by_key.get(spawn_key(spec), ()):
            if not entry.fits(spec.env):
                continue
            while entry.ready:
                warm = entry.ready.popleft()
                self._changed.unpark_all()
                if self.alive(warm):
                    warm.state = "taken"
                    return warm
                logger.warning("warm pool: idle sandbox %s is gone; not handing it out", warm.name)
                self._destroy_soon(warm)
        return None

    def _requeue(self, warm: Warm) -> bool:
        """A claim did not go through: back to its pool (first in line), unless it died
        or the pool closed meanwhile (False: the caller destroys it)."""
        if warm.state == "taken" and not self._closed and self.alive(warm):
            warm.state = "ready"
            warm.entry.ready.appendleft(warm)
            self._changed.unpark_all()
            return True
        warm.state = "gone"
        return False

    async def claim(self, spec: SandboxSpec, policy: RestartPolicy) -> Claim | None:
        """Take a pooled sandbox for a create of ``spec``: its record, the driver's view
        and its actor get the create's name and options. None when the create must be
        cold; SandboxAlreadyExists when the name is taken (the sandbox goes back)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        warm = self.take(spec)
        if warm is None:
            return None
        record = new_record(spec, policy, self.driver.kind, SandboxStatus.RUNNING)
        for key, value in warm.ids._asdict().items():
            setattr(record, key, value)
        record.started_at = record.created_at
        try:
            await self._take_name(warm, record)
        except SandboxNotFound:  # its record was removed under us: not usable
            logger.warning("warm pool: the record of %s is gone; dropping it", warm.name)
            await self._destroy(warm)
            return None
        except BaseException:
            if not self._requeue(warm):
                await self._destroy(warm)
            raise
        if warm.state != "taken" or self._closed or not self.alive(warm):
            # it ended (or the pool closed) while a stale record was reaped: go cold
            self.registry.delete(spec.name, record.id)
            await self._destroy(warm)
            return None
        actor = warm.actor
        assert actor.proc is not None
        try:
            self.driver.rename(actor.proc, spec)
        except Exception as exc:
            logger.warning("warm pool: renaming %s to %r failed: %s", warm.name, spec.name, exc)
            self.registry.delete(spec.name, record.id)
            await self._destroy(warm)
            return None
        warm.state = "claimed"
        if warm.unobserve is not None:
            warm.unobserve()
            warm.unobserve = None
        actor.claimed(spec, from_us(record.created_at))
        return Claim(record, actor, warm)

    async def _take_name(self, warm: Warm, record: SandboxRecord) -> None:
        """The record of ``warm`` becomes ``record`` (an atomic name claim); a stale
        record holding the name is reaped first, as for a cold create."""
        for attempt in range(2):
            existing = self.registry.rename(warm.name, warm.record_id, record)
            if existing is None:
                return
            if attempt or not await reap_record(self.registry, self.driver, existing):
                break
            if self.registry.get(record.name) is not None:
                break  # a stale detached record stays (crashed) until removed
        raise SandboxAlreadyExists(f"sandbox {record.name!r} already exists")

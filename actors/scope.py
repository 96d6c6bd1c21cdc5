"""``open_supervisor``: the scope sandboxes live in (see :mod:`.supervisor`).

It picks the driver (from the backend, unless one is given) and the state db (the
driver's local backend's ``state.db``, else the backend's, else a private in-memory
one), reaps stale records, runs the block, and on the way out stops what the
supervisor owns: the normal ladder after a normal end, a fast bounded shutdown after an
exception, a cancellation or KeyboardInterrupt (shielded), then the records of what it
owned go too.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from ..drivers.base import Driver
from ..errors import ActorDead, CorralError, Runtime
from .pool import Pool, parse_pool
from .registry import Registry
from .sandbox import CLEANUP_TIMEOUT, DEFAULT_STOP_TIMEOUT, POLL_INTERVAL, Kill, Release, Stop
from .state import SandboxStatus
from .supervisor import FAST_SHUTDOWN_BOUND, FAST_STOP_TIMEOUT, Supervisor, driver_for
from .tracking import Tracked, reap

logger = logging.getLogger("corral.supervisor")

__all__ = ["open_supervisor"]


def _leaves(exc: BaseException) -> builtins.list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _only(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """Does ``group`` hold exactly ``exc`` (compared leaf by leaf: trio re-creates groups)?"""
    mine, theirs = _leaves(exc), _leaves(group)
    return len(mine) == len(theirs) and all(a is b for a, b in zip(mine, theirs, strict=True))


@asynccontextmanager
async def open_supervisor(
    backend: object | None = None, *, driver: Driver | None = None, pool: object = None
) -> AsyncIterator[Supervisor]:
    """The scope sandboxes live in; none outlives it unless created ``detached``.

    With ``driver=`` that driver is used as given (and not closed). Otherwise the
    driver comes from ``backend`` (or ``corral.default_backend()``) and is closed on exit.
    ``pool={"host": 8}`` (per image, or option dicts: see :mod:`corral.actors.pool`)
    keeps that many sandboxes started and idle for ``create`` to claim; none by default.
    """
    pools = parse_pool(pool)
    async with AsyncExitStack() as stack:
        if driver is None:
            owned = driver_for(backend)
            entered: object = owned
            if hasattr(owned, "__aenter__"):
                entered = await stack.enter_async_context(owned)  # type: ignore[arg-type]
            else:
                stack.push_async_callback(_close_driver, owned)
            driver = entered if isinstance(entered, Driver) else owned
        path = _db_path(backend, driver)
        if path is None:
            registry = Registry()
        else:  # creating the file may take a few ms of fsync: not on the event loop
            registry = await trio.to_thread.run_sync(Registry, path)
        stack.callback(registry.close)
        await reap(registry, driver)
        warm = Pool(pools, driver, registry) if pools else None
        async with _supervised(driver, registry, warm) as sup:
            yield sup


def _db_path(backend: object | None, driver: Driver) -> Path | None:
    """The db of the driver's local backend, else of ``backend``, else None (private)."""
    for source in (getattr(driver, "backend", None), backend):
        path = getattr(source, "db_path", None)
        if isinstance(path, Path):
            return path
    return None


async def _close_driver(driver: Driver) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
        await driver.aclose()


@asynccontextmanager
async def _supervised(
    driver: Driver, registry: Registry, pool: Pool | None = None
) -> AsyncIterator[Supervisor]:
    body_exc: BaseException | None = None
    unwrap: BaseException | None = None
    errors: list[tuple[str, BaseException]] = []
    try:
        async with trio.open_nursery() as nursery:
            sup = Supervisor(driver, nursery, registry)
            if pool is not None:
                sup.pool = pool
                await nursery.start(pool.run, nursery)
            try:
                try:
                    yield sup
                except BaseException:
                    with trio.CancelScope(shield=True), trio.move_on_after(FAST_SHUTDOWN_BOUND):
                        await shutdown(sup, fast=True)
                    raise
                try:
                    errors = await shutdown(sup, fast=False)
                except BaseException:
                    with trio.CancelScope(shield=True), trio.move_on_after(FAST_SHUTDOWN_BOUND):
                        await shutdown(sup, fast=True)
                    raise
            except BaseException as exc:
                body_exc = exc
                raise
            finally:
                with trio.CancelScope(shield=True):
                    await forget_owned(sup)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps what the block raised; give the caller its own exception back.
        if body_exc is None or not _only(group, body_exc):
            raise
        unwrap = body_exc
    if unwrap is not None:
        raise unwrap
    if errors:
        names = ", ".join(name for name, _ in errors)
        raise Runtime(f"could not stop every sandbox cleanly ({names}): {errors[0][1]}")


async def shutdown(sup: Supervisor, *, fast: bool) -> list[tuple[str, BaseException]]:
    """Stop what this supervisor owns (let go of the rest), concurrently."""
    sup._closing = True
    errors: list[tuple[str, BaseException]] = []

    async def one(tracked: Tracked) -> None:
        actor = tracked.actor
        try:
            if actor.spec.detached or not tracked.owned:
                await actor.ask(Release())
            elif fast:
                # A ladder already running holds the lifecycle lock; kill does not
                # wait for it, so a short grace then Kill always ends it quickly.
                with trio.move_on_after(FAST_STOP_TIMEOUT + POLL_INTERVAL):
                    await actor.ask(Stop(timeout=FAST_STOP_TIMEOUT, sigterm=False))
                if not actor.status.value.terminal:
                    await actor.ask(Kill())
            else:
                await actor.ask(Stop(timeout=DEFAULT_STOP_TIMEOUT))
        except ActorDead:
            pass
        except CorralError as exc:
            logger.warning("stopping sandbox %r: %s", actor.name, exc)
            errors.append((actor.name, exc))
        finally:
            actor.close()

    async with trio.open_nursery() as nursery:
        if sup.pool is not None:  # stop refilling; the idle ones go
            nursery.start_soon(sup.pool.aclose)
        for tracked in list(sup._tracked.values()):
            nursery.start_soon(one, tracked)
    return errors


async def forget_owned(sup: Supervisor) -> None:
    """After the shutdown: delete the records (and directories) of what it owned."""
    for tracked in list(sup._tracked.values()):
        tracked.detach()
        actor = tracked.actor
        if tracked.owned and not actor.spec.detached and actor.status.value.terminal:
            sup.registry.delete(tracked.name, tracked.record_id)
            with trio.move_on_after(CLEANUP_TIMEOUT):
                await sup.driver.remove(tracked.name)
        elif tracked.owned and actor.status.value is SandboxStatus.CREATED:
            if not actor.spec.detached:
                sup.registry.delete(tracked.name, tracked.record_id)

"""Supervisor: name → SandboxActor, and ``open_supervisor``, the scope every sandbox lives in.

``create`` starts the actor with ``nursery.start``: until the sandbox is running, the
start-up runs under the caller's cancellation, and an error or a cancellation at any
await leaves nothing behind (the actor's own shielded, bounded clean-up has run before
``create`` returns or raises, and the name is free again).

Leaving ``open_supervisor`` stops every sandbox concurrently: the normal stop ladder
when the block ends normally; when it ends with an exception, a cancellation or
KeyboardInterrupt, a fast bounded shutdown (a short grace, then SIGKILL), shielded.
Sandboxes created ``detached=True`` are let go, still running.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from ..drivers.base import DEFAULT_IMAGE, DEFAULT_WORKDIR, Driver, SandboxSpec
from ..errors import (
    ActorDead,
    CorralError,
    InvalidConfig,
    Runtime,
    SandboxAlreadyExists,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxStillRunning,
    Unsupported,
)
from ..names import validate_sandbox_name
from ..sandbox import Sandbox
from .sandbox import (
    CLEANUP_TIMEOUT,
    DEFAULT_KILL_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    POLL_INTERVAL,
    Kill,
    Release,
    SandboxActor,
    SandboxInfo,
    Stop,
)

__all__ = ["FAST_STOP_TIMEOUT", "Supervisor", "open_supervisor"]

logger = logging.getLogger("corral.supervisor")

FAST_STOP_TIMEOUT = 1.0
"""Grace on an abnormal exit: Shutdown, up to 1 s, then SIGKILL (no SIGTERM rung)."""
FAST_SHUTDOWN_BOUND = FAST_STOP_TIMEOUT + 2 * DEFAULT_KILL_TIMEOUT + CLEANUP_TIMEOUT


def _check_positive(name: str, value: float | None, *, integer: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidConfig(f"{name} must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise InvalidConfig(f"{name} must be a whole number, got {value!r}")
    if not value > 0:
        raise InvalidConfig(f"{name} must be greater than 0, got {value!r}")


class Supervisor:
    """Owns the sandboxes of one ``open_supervisor`` block."""

    def __init__(self, driver: Driver, nursery: trio.Nursery) -> None:
        self.driver = driver
        self._nursery = nursery
        self._actors: dict[str, SandboxActor] = {}
        self._reserved: set[str] = set()
        self._closing = False

    def __repr__(self) -> str:
        return f"<Supervisor driver={self.driver.kind} sandboxes={len(self._actors)}>"

    def __contains__(self, name: object) -> bool:
        return name in self._actors

    def __len__(self) -> int:
        return len(self._actors)

    # -- create / look up ----------------------------------------------------------------
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
        detached: bool = False,
        labels: Mapping[str, str] | None = None,
        **future: Any,
    ) -> Sandbox:
        """Start a sandbox and return its handle once its agent answers."""
        if future:
            raise Unsupported(
                f"sandbox option {', '.join(sorted(future))}", "in a later corral version"
            )
        validate_sandbox_name(name)
        _check_positive("cpus", cpus, integer=False)
        _check_positive("memory_mib", memory_mib, integer=True)
        _check_positive("pids_limit", pids_limit, integer=True)
        if not isinstance(image, str) or not image:
            raise InvalidConfig("image must be a non-empty string")
        workdir = DEFAULT_WORKDIR if workdir is None else workdir
        if not workdir.startswith("/"):
            raise InvalidConfig(f"workdir must be an absolute path, got {workdir!r}")
        env = dict(env or {})
        for key, value in env.items():
            if not isinstance(key, str) or not key or "=" in key or "\0" in key:
                raise InvalidConfig(f"invalid environment variable name {key!r}")
            if not isinstance(value, str) or "\0" in value:
                raise InvalidConfig(f"environment variable {key} must be a string without NUL")
        spec = SandboxSpec(
            name=name,
            image=image,
            env=env,
            workdir=workdir,
            network=bool(network),
            cpus=cpus,
            memory_mib=memory_mib,
            pids_limit=pids_limit,
            detached=bool(detached),
            labels=dict(labels or {}),
        )
        if self._closing:
            raise Runtime("the supervisor is shutting down")
        if name in self._actors or name in self._reserved:
            raise SandboxAlreadyExists(f"sandbox {name!r} already exists")
        actor = SandboxActor(spec, self.driver)
        self._reserved.add(name)
        try:
            await self._nursery.start(functools.partial(self._run_actor, actor))
        except BaseException:
            # Normally the actor has cleaned up already (it ran under this call). Only
            # an exception after it reported ready could leave it running: stop it.
            if self._actors.get(name) is actor:
                del self._actors[name]
                with trio.CancelScope(shield=True), trio.move_on_after(FAST_SHUTDOWN_BOUND):
                    try:
                        await actor.ask(Kill())
                    except CorralError:
                        pass
                actor.close()
            raise
        finally:
            self._reserved.discard(name)
        return Sandbox(actor)

    async def _run_actor(
        self, actor: SandboxActor, *, task_status: trio.TaskStatus[SandboxActor]
    ) -> None:
        def register() -> None:
            self._actors[actor.name] = actor

        try:
            await actor.run(on_ready=register, task_status=task_status)
        except Exception:
            if not actor.started:
                raise
            logger.exception("the actor of sandbox %r failed", actor.name)

    def _actor(self, name: str) -> SandboxActor:
        actor = self._actors.get(name)
        if actor is None:
            raise SandboxNotFound(f"sandbox {name!r} not found")
        return actor

    def get(self, name: str) -> Sandbox:
        return Sandbox(self._actor(name))

    def list(self) -> list[SandboxInfo]:
        return [actor.info() for actor in self._actors.values()]

    # -- lifecycle -----------------------------------------------------------------------
    async def stop(self, name: str, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        await self._actor(name).ask(Stop(timeout=timeout))

    async def kill(self, name: str) -> None:
        await self._actor(name).ask(Kill())

    async def remove(self, name: str) -> None:
        """Forget a stopped (or crashed) sandbox; SandboxStillRunning otherwise."""
        if name in self._reserved:
            raise SandboxStillRunning(f"cannot remove sandbox {name!r}: it is starting")
        actor = self._actor(name)
        status = actor.status.value
        if not status.terminal:
            raise SandboxStillRunning(f"cannot remove sandbox {name!r}: still {status}")
        del self._actors[name]
        actor.close()
        with trio.move_on_after(CLEANUP_TIMEOUT):
            await actor.finished.wait()

    async def connect_agent(self, name: str) -> trio.abc.Stream:
        """A new raw byte stream to the agent of a running sandbox, for relays (``corral
        serve``'s ``/corral`` WebSocket). The caller speaks the protocol (its own
        handshake) and closes the stream; the sandbox's lifecycle stays with its actor."""
        actor = self._actor(name)
        proc = actor.proc
        if proc is None or actor.status.value != "running":
            raise SandboxNotRunning(f"sandbox {name!r} is {actor.status.value}")
        return await proc.connect()

    async def ask(self, name: str, msg: object) -> Any:
        """Low level: send a message (Exec, FsRead, ... or a control message), get the reply."""
        return await self._actor(name).ask(msg)

    async def tell(self, name: str, msg: object) -> None:
        await self._actor(name).tell(msg)

    async def _shutdown(self, *, fast: bool) -> builtins.list[tuple[str, BaseException]]:
        """Stop (or let go of, if detached) every sandbox, concurrently."""
        self._closing = True
        errors: builtins.list[tuple[str, BaseException]] = []

        async def one(actor: SandboxActor) -> None:
            try:
                if actor.spec.detached:
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
            for actor in list(self._actors.values()):
                nursery.start_soon(one, actor)
        return errors


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
    backend: object | None = None, *, driver: Driver | None = None
) -> AsyncIterator[Supervisor]:
    """The scope sandboxes live in; none outlives it unless created ``detached``.

    With ``driver=`` that driver is used as given (and not closed). Otherwise the
    driver comes from ``backend`` (or ``corral.default_backend()``) and is closed on exit.
    """
    async with AsyncExitStack() as stack:
        if driver is None:
            owned = driver_for(backend)
            entered: object = owned
            if hasattr(owned, "__aenter__"):
                entered = await stack.enter_async_context(owned)  # type: ignore[arg-type]
            else:
                stack.push_async_callback(_close_driver, owned)
            driver = entered if isinstance(entered, Driver) else owned
        async with _supervised(driver) as sup:
            yield sup


async def _close_driver(driver: Driver) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
        await driver.aclose()


@asynccontextmanager
async def _supervised(driver: Driver) -> AsyncIterator[Supervisor]:
    body_exc: BaseException | None = None
    unwrap: BaseException | None = None
    errors: list[tuple[str, BaseException]] = []
    try:
        async with trio.open_nursery() as nursery:
            sup = Supervisor(driver, nursery)
            try:
                try:
                    yield sup
                except BaseException:
                    with trio.CancelScope(shield=True), trio.move_on_after(FAST_SHUTDOWN_BOUND):
                        await sup._shutdown(fast=True)
                    raise
                try:
                    errors = await sup._shutdown(fast=False)
                except BaseException:
                    with trio.CancelScope(shield=True), trio.move_on_after(FAST_SHUTDOWN_BOUND):
                        await sup._shutdown(fast=True)
                    raise
            except BaseException as exc:
                body_exc = exc
                raise
            finally:
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

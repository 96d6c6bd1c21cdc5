"""The actor base: a bounded mailbox, ``ask``/``tell`` and a run loop.

An actor is one trio task reading its mailbox (a bounded memory channel). ``ask`` posts
a message with a one-shot :class:`Reply` (a ``trio.Event`` plus a slot; no channel per
ask) and waits for it; the handler's return value comes back, or the exception the
handler raised is raised in the asker. ``tell`` posts without a reply.

Each message type maps to a :class:`Handler`. A handler runs inline in its loop (the
messages it handles are serialised) or, when ``concurrent``, as its own task in the
actor's nursery (at most ``max_concurrency`` at once; the loop then stops reading, so
the bounded mailbox pushes back on senders). A concurrent ``cancellable`` handler is
cancelled when its asker stops waiting (the asker was cancelled): work nobody waits
for stops.

Message types listed in ``priority`` (control messages: stop, kill, ...) go to a second
mailbox with its own loop and no concurrency limit, so they are never stuck behind a
flood of ordinary requests.

No reply is ever left hanging: when the actor ends, queued and in-flight asks fail with
:class:`ActorDead`, and asks made afterwards fail with it at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import trio

from ..errors import ActorDead, Runtime

__all__ = ["Actor", "Discardable", "Handler", "Reply"]

logger = logging.getLogger("corral.actors")

R = TypeVar("R")


class Handler(NamedTuple):
    fn: Callable[[Any], Awaitable[object]]
    concurrent: bool = False
    """Run as its own task (handlers of one actor then overlap)."""
    cancellable: bool = True
    """Cancel the (concurrent) handler when its asker gives up waiting. Inline handlers
    are meant to be quick and are not cancelled (a cancel scope costs ~5 us per ask)."""


@runtime_checkable
class Discardable(Protocol):
    """A reply value that holds resources: discarded when its asker was cancelled."""

    def discard(self) -> None: ...


class Reply:
    """One-shot answer slot for one ``ask``."""

    __slots__ = ("abandoned", "done", "error", "event", "scope", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: object = None
        self.error: BaseException | None = None
        self.done = False
        self.abandoned = False
        self.scope: trio.CancelScope | None = None

    def resolve(self, value: object) -> None:
        if self.done:
            return
        self.done = True
        self.value = value
        self.event.set()
        if self.abandoned and isinstance(value, Discardable):
            value.discard()

    def fail(self, error: BaseException) -> None:
        if self.done:
            return
        self.done = True
        self.error = error
        self.event.set()

    def abandon(self) -> None:
        """The asker stopped waiting: cancel the work, release an unclaimed value."""
        if self.abandoned:
            return
        self.abandoned = True
        if self.scope is not None:
            self.scope.cancel()
        if self.done and self.error is None and isinstance(self.value, Discardable):
            self.value.discard()


Envelope = tuple[object, Reply | None]


class Actor:
    """Base class: subclasses map message types to handlers in :meth:`handler_for`."""

    mailbox_size: int = 256
    max_concurrency: int = 1024
    priority: frozenset[type] = frozenset()
    """Message types served from a second mailbox by a second loop: control messages
    (stop, kill, ...) are never stuck behind a flood of ordinary work."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._inbox, self._outbox = trio.open_memory_channel[Envelope](self.mailbox_size)
        self._pinbox, self._poutbox = trio.open_memory_channel[Envelope](self.mailbox_size)
        self._slots = trio.Semaphore(self.max_concurrency)
        self._nursery: trio.Nursery | None = None
        self.finished = trio.Event()
        """Set once the loop has ended and every reply has been answered or failed."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # -- to override -------------------------------------------------------------------
    def handler_for(self, msg: object) -> Handler:
        """The handler for ``msg``; raise a typed error for messages the actor refuses."""
        raise NotImplementedError

    # -- callers -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self.finished.is_set()

    def _dead(self) -> ActorDead:
        return ActorDead(f"actor {self.name!r} is gone")

    async def ask(self, msg: object) -> Any:
        """Send ``msg`` and wait for the handler's answer (or its exception)."""
        reply = Reply()
        inbox = self._pinbox if type(msg) in self.priority else self._inbox
        try:
            inbox.send_nowait((msg, reply))
        except trio.WouldBlock:
            try:
                await inbox.send((msg, reply))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise self._dead() from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._dead() from None
        try:
            await reply.event.wait()
        except BaseException:
            reply.abandon()
            raise
        if reply.error is not None:
            raise reply.error
        return reply.value

    async def ask_as(self, msg: object, kind: type[R]) -> R:
        """``ask`` and check the answer's type."""
        value = await self.ask(msg)
        if not isinstance(value, kind):
            raise Runtime(
                f"actor {self.name!r} answered {type(msg).__name__} with "
                f"{type(value).__name__}, expected {kind.__name__}"
            )
        return value

    async def tell(self, msg: object) -> None:
        """Send ``msg`` without waiting for it to be handled (errors are logged)."""
        inbox = self._pinbox if type(msg) in self.priority else self._inbox
        try:
            inbox.send_nowait((msg, None))
        except trio.WouldBlock:
            try:
                await inbox.send((msg, None))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise self._dead() from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._dead() from None
        else:
            await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Stop taking messages; what is queued is still handled, then the loops end."""
        self._inbox.close()
        self._pinbox.close()

    # -- the loop ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Actor] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the mailbox until :meth:`close` (the plain actor: no start-up work)."""
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                await self.serve(nursery)
                nursery.cancel_scope.cancel()
        finally:
            self._shut_mailbox()
            self.finished.set()

    async def serve(self, nursery: trio.Nursery) -> None:
        """The mailbox loops; concurrent handlers are spawned into ``nursery``."""
        self._nursery = nursery
        try:
            async with trio.open_nursery() as loops:
                loops.start_soon(self._loop, self._poutbox, nursery, False)
                await self._loop(self._outbox, nursery, True)
        finally:
            self._shut_mailbox()

    async def _loop(
        self,
        outbox: trio.MemoryReceiveChannel[Envelope],
        nursery: trio.Nursery,
        limited: bool,
    ) -> None:
        async for msg, reply in outbox:
            if reply is not None and reply.abandoned:
                continue
            try:
                handler = self.handler_for(msg)
            except Exception as exc:
                if reply is not None:
                    reply.fail(exc)
                else:
                    logger.warning("%r refused %s: %s", self, type(msg).__name__, exc)
                continue
            if not handler.concurrent:
                await self._handle(handler, msg, reply, False, False)
                continue
            if limited:
                await self._slots.acquire()
            nursery.start_soon(self._handle, handler, msg, reply, True, limited)

    async def _handle(
        self,
        handler: Handler,
        msg: object,
        reply: Reply | None,
        concurrent: bool,
        slot: bool,
    ) -> None:
        try:
            if reply is None:
                try:
                    await handler.fn(msg)
                except Exception:
                    logger.exception("%r failed handling %s", self, type(msg).__name__)
                return
            if not (concurrent and handler.cancellable):
                await self._answer(handler, msg, reply)
                return
            reply.scope = scope = trio.CancelScope()
            if reply.abandoned:
                return
            with scope:
                await self._answer(handler, msg, reply)
        finally:
            if slot:
                self._slots.release()
            if reply is not None and not reply.done:
                reply.fail(ActorDead(f"actor {self.name!r} ended before answering"))

    @staticmethod
    async def _answer(handler: Handler, msg: object, reply: Reply) -> None:
        try:
            value = await handler.fn(msg)
        except Exception as exc:
            reply.fail(exc)
        else:
            reply.resolve(value)

    def _shut_mailbox(self) -> None:
        """Refuse new messages and fail the queued ones (no await: atomic)."""
        for inbox, outbox in ((self._inbox, self._outbox), (self._pinbox, self._poutbox)):
            inbox.close()
            while True:
                try:
                    _msg, reply = outbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                if reply is not None:
                    reply.fail(ActorDead(f"actor {self.name!r} ended before answering"))
            outbox.close()

"""Sandbox status and a watchable value (change notification, no polling)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

__all__ = ["SandboxStatus", "Watch"]

T = TypeVar("T")


class SandboxStatus(enum.StrEnum):
    """The seed's sandbox states."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"
    CRASHED = "crashed"

    @property
    def terminal(self) -> bool:
        """Stopped or crashed: nothing runs any more."""
        return self is SandboxStatus.STOPPED or self is SandboxStatus.CRASHED

    @property
    def active(self) -> bool:
        """Running or draining: remove is refused (SandboxStillRunning)."""
        return self is SandboxStatus.RUNNING or self is SandboxStatus.DRAINING


class Watch(Generic[T]):
    """A value that tasks can wait on: ``value``, ``set()``, ``wait_change()``, ``wait_for()``.

    Waiters park on a :class:`trio.lowlevel.ParkingLot` and are woken by ``set``; nothing
    polls. A ``set`` to an equal value is not a change.
    """

    __slots__ = ("_lot", "_observers", "_value", "_version")

    def __init__(self, value: T) -> None:
        self._value = value
        self._version = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._observers: list[Callable[[T], None]] = []

    def __repr__(self) -> str:
        return f"Watch({self._value!r})"

    @property
    def value(self) -> T:
        return self._value

    @property
    def version(self) -> int:
        """Bumped on every change."""
        return self._version

    def set(self, value: T) -> None:
        if value == self._value:
            return
        self._value = value
        self._version += 1
        self._lot.unpark_all()
        for observer in list(self._observers):
            observer(value)

    def observe(self, observer: Callable[[T], None]) -> Callable[[], None]:
        """Call ``observer(value)`` synchronously inside every changing ``set`` (before any
        waiter runs; it must not raise). Returns a function that unsubscribes it."""
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    async def wait_change(self) -> T:
        """Wait for the next change; return the value then current."""
        version = self._version
        while self._version == version:
            await self._lot.park()
        return self._value

    async def wait_for(self, predicate: Callable[[T], bool]) -> T:
        """Return the value as soon as ``predicate(value)`` holds (a checkpoint either way)."""
        if predicate(self._value):
            await trio.lowlevel.checkpoint()
            return self._value
        while not predicate(self._value):
            await self._lot.park()
        return self._value

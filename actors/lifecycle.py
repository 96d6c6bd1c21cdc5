"""Lifecycle policies: restart (permanent / transient / temporary), timers, ephemeral.

A sandbox *crashes* when it ends while nobody stopped it (its process exited on its
own, or its agent went away). What the supervisor does then is the sandbox's
:class:`RestartPolicy`, as in Erlang/OTP:

- ``permanent``: always start it again (even when its process exited with code 0);
- ``transient``: start it again only after an abnormal end (not after a clean exit 0);
- ``temporary`` (the default): never.

A sandbox stopped on request (``stop``/``kill``/``drain``, an idle timeout, a max
duration) is never restarted. At most ``max_restarts`` restarts happen within any
``restart_window`` seconds; one more crash in that window and the supervisor gives up:
the sandbox stays ``crashed`` with ``last_error`` saying so.

``idle_timeout`` (no request in flight for that long) and ``max_duration`` (running for
that long) stop the sandbox with the normal stop ladder; the timers run in the
sandbox's actor. ``ephemeral`` sandboxes are removed (record and directory) once they
have stopped or crashed for good.
"""

from __future__ import annotations

import enum
import math
from collections import deque

import msgspec

from ..errors import InvalidConfig

__all__ = [
    "DEFAULT_MAX_RESTARTS",
    "DEFAULT_RESTART_WINDOW",
    "Restart",
    "RestartPolicy",
    "RestartTracker",
    "check_duration",
]

DEFAULT_MAX_RESTARTS = 3
DEFAULT_RESTART_WINDOW = 5.0


class Restart(enum.StrEnum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What to do when a sandbox crashes (see the module docstring)."""

    restart: Restart = Restart.TEMPORARY
    max_restarts: int = DEFAULT_MAX_RESTARTS
    restart_window: float = DEFAULT_RESTART_WINDOW

    @classmethod
    def build(
        cls,
        restart: Restart | str = Restart.TEMPORARY,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        restart_window: float = DEFAULT_RESTART_WINDOW,
    ) -> RestartPolicy:
        """Validate the user's arguments (InvalidConfig) and build the policy."""
        try:
            kind = Restart(restart.lower() if isinstance(restart, str) else restart)
        except (ValueError, AttributeError):
            raise InvalidConfig(
                f"restart must be 'permanent', 'transient' or 'temporary', got {restart!r}"
            ) from None
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int):
            raise InvalidConfig(f"max_restarts must be a whole number, got {max_restarts!r}")
        if max_restarts < 0:
            raise InvalidConfig(f"max_restarts must be 0 or more, got {max_restarts}")
        check_duration("restart_window", restart_window)
        return cls(restart=kind, max_restarts=max_restarts, restart_window=float(restart_window))

    def wants_restart(self, clean_exit: bool) -> bool:
        """After a crash: restart? (``clean_exit``: the process exited with code 0)."""
        if self.restart is Restart.PERMANENT:
            return True
        if self.restart is Restart.TRANSIENT:
            return not clean_exit
        return False


class RestartTracker:
    """Restart times of one sandbox, to enforce ``max_restarts`` per ``restart_window``."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.times: deque[float] = deque()
        self.total = 0

    def allow(self, now: float) -> bool:
        """Record a restart at ``now`` if the window has room; False means give up."""
        window = self.policy.restart_window
        while self.times and now - self.times[0] >= window:
            self.times.popleft()
        if len(self.times) >= self.policy.max_restarts:
            return False
        self.times.append(now)
        self.total += 1
        return True


def check_duration(name: str, value: float | None) -> float | None:
    """None, or a finite number of seconds greater than 0 (InvalidConfig otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidConfig(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidConfig(f"{name} must be a finite number of seconds above 0, got {value!r}")
    return float(value)

"""``sb.metrics_stream(interval)``: resource samples on a fixed grid until the sandbox stops.

Each sample is an ask to the sandbox actor (``GetMetrics`` → the driver's
``SandboxProcess.metrics()``). Samples are due at ``start + n * interval`` (no drift:
the time a sample takes does not push the next one back); a consumer slower than the
interval gets the next sample at once and the grid skips the ticks it missed. The
iterator ends when the sandbox reaches stopped or crashed, at once, even in the middle
of a wait.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import trio

from ..errors import ActorDead, InvalidConfig, SandboxNotRunning

if TYPE_CHECKING:
    from ..drivers.local.metrics import SandboxMetrics
    from .sandbox import SandboxActor

__all__ = ["MetricsStream", "check_interval"]


def check_interval(interval: object) -> float:
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        raise InvalidConfig(f"metrics interval must be a number of seconds, got {interval!r}")
    if not (interval > 0 and math.isfinite(interval)):
        raise InvalidConfig(f"metrics interval must be > 0 seconds, got {interval!r}")
    return float(interval)


class MetricsStream:
    """``async for sample in sb.metrics_stream(1.0)`` (see the module docstring)."""

    def __init__(self, actor: SandboxActor, request: Any, interval: float) -> None:
        self._actor = actor
        self._request = request
        self.interval = check_interval(interval)
        self._start: float | None = None
        self._tick = 0

    def __aiter__(self) -> MetricsStream:
        return self

    async def __anext__(self) -> SandboxMetrics:
        status = self._actor.status
        now = trio.current_time()
        if self._start is None:
            self._start = now
        else:
            self._tick += 1
            due = self._start + self._tick * self.interval
            if due < now:  # the consumer was slow: sample now, stay on the grid
                self._tick = math.floor((now - self._start) / self.interval)
                due = now
            with trio.move_on_at(due):
                await status.wait_for(lambda s: s.terminal)
        if status.value.terminal:
            raise StopAsyncIteration
        try:
            sample = await self._actor.ask(self._request)
        except (SandboxNotRunning, ActorDead):
            raise StopAsyncIteration from None
        return cast("SandboxMetrics", sample)

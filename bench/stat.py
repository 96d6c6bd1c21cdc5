"""Samples and their summary: :class:`Stat` (p50/p99/min/max) and the timing loops.

Times are taken with ``time.perf_counter_ns`` in-process and kept as seconds (float).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

__all__ = ["Stat", "paired", "percentile", "sample", "timed"]


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted samples, linearly interpolated."""
    if not ordered:
        raise ValueError("no samples")
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Stat:
    """Summary of N samples (warm-up samples are never in it)."""

    n: int
    p50: float
    p99: float
    p01: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        ordered = sorted(samples)
        return cls(
            n=len(ordered),
            p50=percentile(ordered, 0.5),
            p99=percentile(ordered, 0.99),
            p01=percentile(ordered, 0.01),
            min=ordered[0],
            max=ordered[-1],
        )

    @classmethod
    def single(cls, value: float) -> Stat:
        return cls.of([value])


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    """Seconds one call of ``fn`` took."""
    start = time.perf_counter_ns()
    await fn()
    return (time.perf_counter_ns() - start) / 1e9


async def sample(fn: Callable[[], Awaitable[object]], n: int, *, warmup: int = 1) -> list[float]:
    """Time ``n`` calls of ``fn`` (seconds each) after ``warmup`` uncounted ones."""
    for _ in range(warmup):
        await fn()
    out: list[float] = []
    for _ in range(n):
        start = time.perf_counter_ns()
        await fn()
        out.append((time.perf_counter_ns() - start) / 1e9)
    return out


async def paired(
    a: Callable[[], Awaitable[object]],
    b: Callable[[], Awaitable[object]],
    n: int,
    *,
    warmup: int = 1,
) -> tuple[list[float], list[float]]:
    """Time ``a`` and ``b`` in turn (A B A B ...), so drift hits both alike."""
    for _ in range(warmup):
        await a()
        await b()
    times_a: list[float] = []
    times_b: list[float] = []
    for _ in range(n):
        times_a.append(await timed(a))
        times_b.append(await timed(b))
    return times_a, times_b

"""Result rows, their formatting, and the table (plain text and Markdown)."""

from __future__ import annotations

import enum
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .stat import Stat

__all__ = [
    "Row",
    "Target",
    "Unit",
    "at_least",
    "at_most",
    "fmt",
    "machine",
    "markdown",
    "ratio_at_most",
    "table",
]

MIB = 1024 * 1024


class Unit(enum.Enum):
    SECONDS = "s"
    PER_SECOND = "/s"
    BYTES_PER_SECOND = "B/s"
    BYTES = "B"

    @property
    def higher_is_better(self) -> bool:
        return self in (Unit.PER_SECOND, Unit.BYTES_PER_SECOND)


def fmt(value: float, unit: Unit) -> str:
    if unit is Unit.SECONDS:
        for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value * 1e9:.3g} ns"
    if unit is Unit.PER_SECOND:
        return f"{value:,.0f} /s"
    if unit is Unit.BYTES_PER_SECOND:
        return f"{value / 1e6:,.0f} MB/s"
    return f"{value / MIB:,.2f} MiB"


@dataclass(frozen=True)
class Target:
    """What the row should reach: a text for the table and a check on the row."""

    text: str
    check: Callable[[Row], bool]


def ratio_at_most(limit: float) -> Target:
    def check(row: Row) -> bool:
        ratio = row.ratio
        return ratio is not None and ratio <= limit

    return Target(f"≤ {limit:g}x baseline", check)


def at_most(limit: float, unit: Unit) -> Target:
    return Target(
        f"≤ {fmt(limit, unit)}", lambda row: row.value is not None and row.value.p50 <= limit
    )


def at_least(
    limit: float, unit: Unit, *, extra: Callable[[Row], bool] | None = None, text: str = ""
) -> Target:
    def check(row: Row) -> bool:
        ok = row.value is not None and row.value.p50 >= limit
        return ok and (extra is None or extra(row))

    return Target(text or f"≥ {fmt(limit, unit)}", check)


@dataclass
class Row:
    """One line of the table: a figure, its baseline (same run), a target."""

    family: str
    name: str
    unit: Unit
    value: Stat | None = None
    baseline_name: str = ""
    baseline: Stat | None = None
    target: Target | None = None
    note: str = ""
    skipped: str | None = None
    """Why it was not measured (the row prints this instead of numbers)."""
    facts: dict[str, float] = field(default_factory=dict)
    """Extra figures a target's check may use."""

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline is None:
            return None
        if self.baseline.p50 <= 0 or self.value.p50 < 0:
            return None  # e.g. a memory drop lost in noise: no meaningful ratio
        return self.value.p50 / self.baseline.p50

    @property
    def met(self) -> bool | None:
        if self.target is None or self.skipped is not None or self.value is None:
            return None
        return self.target.check(self)

    def cells(self) -> list[str]:
        if self.skipped is not None:
            target = self.target.text if self.target else ""
            return [self.name, self.skipped, "", "", "", "", target, "n/a"]
        value, base = self.value, self.baseline
        worst = ""
        if value is not None:
            # For rates the tail that matters is the slow one: show the 1st percentile.
            tail = value.p01 if self.unit.higher_is_better else value.p99
            worst = fmt(tail, self.unit)
        ratio = self.ratio
        met = self.met
        return [
            self.name,
            fmt(value.p50, self.unit) if value is not None else "",
            worst,
            self.baseline_name,
            fmt(base.p50, self.unit) if base is not None else "",
            f"{ratio:.2f}x" if ratio is not None else "",
            self.target.text if self.target else "",
            "" if met is None else ("met" if met else "MISSED"),
        ]


HEADERS = [
    "benchmark",
    "p50",
    "p99",
    "baseline (same run)",
    "baseline p50",
    "ratio",
    "target",
    "met",
]


def table(rows: Sequence[Row]) -> str:
    """A plain-text table for the terminal."""
    cells = [HEADERS] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    out = []
    for index, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  {row.name}: {row.note}" for row in rows if row.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def machine() -> dict[str, str]:
    try:
        with open("/proc/meminfo") as f:
            total = next(line.split()[1] for line in f if line.startswith("MemTotal:"))
        memory = f"{int(total) / (1024 * 1024):.1f} GiB"
    except (OSError, StopIteration, ValueError):
        memory = "unknown"
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def markdown(
    rows: Sequence[Row], *, command: str, started: datetime, extra: Sequence[str] = ()
) -> str:
    info = machine()
    lines = [
        "# corral benchmarks",
        "",
        f"- date: {started.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}",
        f"- machine: nproc {info['nproc']}, {info['cpu']}, {info['memory']} RAM",
        f"- kernel: {info['kernel']}; python {info['python']} ({info['platform']})",
        f"- command: `{command}`",
        "",
        "Every ratio is against a baseline measured in the same run (lower is better for",
        "times and memory, higher for rates). The absolute values are for this machine only.",
        "For rates, the p99 column is the slow tail (the 1st percentile).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row.cells()) + " |")
    notes = [f"- **{row.name}**: {row.note}" for row in rows if row.note]
    if notes:
        lines += ["", "## Notes", "", *notes]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines) + "\n"

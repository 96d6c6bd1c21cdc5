"""What every benchmark family gets: the run's settings, private dirs, the rows."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from corral.backend import LocalBackend
from corral.testing import local_unavailable

from .report import Row

__all__ = ["Context"]


@dataclass
class Context:
    quick: bool
    big: bool
    root: Path
    """This run's own directory (mode 0755; removed at the end). Every process the run
    starts names a path under it, which is how leftovers are found."""
    rows: list[Row] = field(default_factory=list)

    @property
    def home(self) -> Path:
        """The CORRAL_HOME of the run's sandboxes (0700, like ``~/.corral`` under /root)."""
        path = self.root / "home"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    @property
    def open_dir(self) -> Path:
        """A dir the sandbox uid can search (for the no-staging baselines)."""
        path = self.root / "open"
        path.mkdir(mode=0o755, exist_ok=True)
        return path

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def emit(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    @functools.cached_property
    def local_reason(self) -> str | None:
        """Why real sandboxes cannot run here (None when they can)."""
        reason: str | None = local_unavailable()
        return reason

    def backend(self) -> LocalBackend:
        return LocalBackend(home=self.home)

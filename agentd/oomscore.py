"""The OOM killer's view of the agent and of the commands it starts.

When a sandbox runs out of memory (tmpfs pages count too, and belong to no process),
the kernel kills the process with the highest score: size plus ``oom_score_adj``. The
host lowers the agent's ``oom_score_adj`` to -1000 when it may (see
``corral.drivers.local.hardening``); and every command starts at
:data:`COMMAND_OOM_SCORE_ADJ` (500), so a command is chosen before the agent even when
the host could not protect it.

Setting a child's value between ``fork`` and ``exec`` needs a ``preexec_fn``, which
makes ``subprocess`` fork the whole agent instead of ``vfork``. Instead the agent
raises its *own* value around the spawn (:meth:`OomScore.for_command`): the child
inherits it, then the agent goes back. Raising is always allowed; going back down is
allowed to any value at or above the process's floor (``oom_score_adj_min``, which the
host's privileged write set to the protected value), so no privilege is needed. Cost:
one ``pread`` and two ``pwrite`` calls (~2 µs); the agent is single-threaded, so only
a spawn runs in that window.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["COMMAND_OOM_SCORE_ADJ", "OomScore", "oom_score"]

COMMAND_OOM_SCORE_ADJ = 500
"""The ``oom_score_adj`` every command starts with (unless the agent's is higher)."""
_PATH = "/proc/self/oom_score_adj"


class OomScore:
    """The agent's own ``oom_score_adj`` (an fd opened once, on first use)."""

    def __init__(self, path: str = _PATH) -> None:
        self._path = path
        self._fd: int | None = None
        self._broken = False

    def _open(self) -> int | None:
        if self._fd is None and not self._broken:
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                self._broken = True
        return self._fd

    def current(self) -> int | None:
        """The agent's value now (None when it cannot be read)."""
        fd = self._open()
        if fd is None:
            return None
        try:
            return int(os.pread(fd, 16, 0))
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def for_command(self) -> Iterator[None]:
        """Around a spawn: the child starts at :data:`COMMAND_OOM_SCORE_ADJ`."""
        own = self.current()
        if own is None or own >= COMMAND_OOM_SCORE_ADJ or not self._write(COMMAND_OOM_SCORE_ADJ):
            yield
            return
        try:
            yield
        finally:
            self._write(own)

    def _write(self, value: int) -> bool:
        fd = self._fd
        if fd is None:
            return False
        try:
            os.pwrite(fd, str(value).encode(), 0)
        except OSError:
            return False
        return True


oom_score = OomScore()
"""The agent process's own (one per process)."""

"""The small interface every driver implements.

A driver starts sandboxes and hands back a :class:`SandboxProcess`: the driver's view of
one running sandbox (how to reach its agent, how to signal it, how to wait for it and
how to release what it holds). Everything above (actors, supervisor, API) is written
against this interface only, so local, cloud and fake sandboxes look alike.

Rules every driver keeps:

- ``spawn`` returns only when the agent accepts connections; if it fails or is
  cancelled part-way it has already released everything it started.
- ``cleanup`` is idempotent and safe to call while the sandbox still runs (it kills
  first); callers run it shielded, so it must be bounded in time.
- nothing a driver starts outlives the orchestrator unless ``spec.detached``.
"""

from __future__ import annotations

import signal as _signal
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import trio

if TYPE_CHECKING:
    from .local.metrics import SandboxMetrics

DEFAULT_WORKDIR = "/workspace"
DEFAULT_IMAGE = "host"


@dataclass(frozen=True, kw_only=True)
class SandboxSpec:
    """What to start. Validated by the supervisor before a driver sees it."""

    name: str
    image: str = DEFAULT_IMAGE
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = DEFAULT_WORKDIR
    network: bool = False
    cpus: float | None = None
    memory_mib: int | None = None
    pids_limit: int | None = None
    tmp_size_mib: int | None = None
    """Size of the sandbox's ``/tmp`` tmpfs (local driver; None: the backend's default)."""
    detached: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    ephemeral: bool = False
    """Removed (record and directory) once it has stopped for good."""
    idle_timeout: float | None = None
    """Stop after this many seconds without a request in flight."""
    max_duration: float | None = None
    """Stop after running this many seconds."""
    state_id: str = ""
    """Id of the sandbox's record in the state db (a detached sandbox's keeper updates it)."""


class ProcessIds(NamedTuple):
    """Host pids of a running sandbox and their start times (``/proc/PID/stat`` field 22),
    as recorded in the state db: the start time tells a live process from a recycled pid."""

    pid: int | None = None
    """The sandbox's top process (bwrap for the local driver)."""
    pid_start: int | None = None
    init_pid: int | None = None
    """The init of the sandbox's pid namespace."""
    init_start: int | None = None
    keeper_pid: int | None = None
    """The keeper holding a detached sandbox."""
    keeper_start: int | None = None


class ExitStatus(NamedTuple):
    """How a sandbox's top process ended: an exit code or a signal."""

    code: int | None
    signal: int | None = None

    @property
    def clean(self) -> bool:
        return self.code == 0 and self.signal is None

    def describe(self) -> str:
        if self.signal is not None:
            try:
                return f"killed by {_signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        return f"exited with code {self.code}"


class SandboxProcess(ABC):
    """A running sandbox as its driver sees it."""

    name: str
    pid: int | None = None
    """Host pid of the sandbox's top process, when there is one."""
    exit_reason: str | None = None
    """Why the sandbox ended, when the driver knows more than the exit status (OOM...)."""
    reconnectable: bool = False
    """A lost agent connection does not end the sandbox (cloud: the websocket to the
    control plane dropped). The actor then fails the requests in flight, does not mark
    the sandbox crashed, and connects again for the next request; such a process is
    connected lazily, on its first request."""

    def limit_report(self) -> str | None:
        """Why the kernel killed something in this sandbox (OOM, pids limit), if it did."""
        return None

    async def metrics(self) -> SandboxMetrics:
        """Resource usage now."""
        from ..errors import Unsupported

        raise Unsupported(f"metrics on the {type(self).__name__} driver", "")

    async def request_stop(self, grace: float) -> bool:
        """Ask for a graceful stop out of band (cloud: ``POST …/stop``); True when done.

        The actor's stop ladder calls this first; on False (the default) it sends
        ``Shutdown(grace)`` over the agent channel instead."""
        return False

    def process_ids(self) -> ProcessIds:
        """What the state db records to find this sandbox again (``Driver.attach``)."""
        return ProcessIds(pid=self.pid)

    @abstractmethod
    async def connect(self) -> trio.abc.Stream:
        """Open a new byte stream to the sandbox's agent."""

    @abstractmethod
    async def terminate(self) -> None:
        """Ask every process of the sandbox to end (SIGTERM)."""

    @abstractmethod
    async def kill(self) -> None:
        """End every process of the sandbox now (SIGKILL)."""

    @property
    @abstractmethod
    def exit_status(self) -> ExitStatus | None:
        """None while the sandbox runs; how it ended once it is gone."""

    @abstractmethod
    async def wait(self) -> ExitStatus:
        """Wait until the sandbox is gone."""

    @abstractmethod
    async def cleanup(self) -> None:
        """Kill if still running and release every host resource. Idempotent, bounded."""


class Driver(ABC):
    """Starts sandboxes."""

    kind: str = "abstract"

    @abstractmethod
    async def spawn(self, spec: SandboxSpec) -> SandboxProcess:
        """Start a sandbox; return once its agent accepts connections."""

    async def attach(self, spec: SandboxSpec, ids: ProcessIds) -> SandboxProcess:
        """A running sandbox started elsewhere (another supervisor, another process, a
        keeper), found by what its record holds; Runtime when it is no longer there."""
        from ..errors import Unsupported

        raise Unsupported(f"attaching to a running sandbox on the {self.kind} driver", "")

    def rename(self, proc: SandboxProcess, spec: SandboxSpec) -> None:
        """Give a started sandbox nobody has used yet (a warm pool's) its final name:
        ``spec`` is what a create asked for, with the same image, workdir, network and
        limits as the spec it was spawned with. Synchronous and cheap (the claim path of
        the warm pool calls it); Unsupported by drivers that cannot (no warm pool)."""
        from ..errors import Unsupported

        raise Unsupported(f"renaming a running sandbox on the {self.kind} driver", "")

    @property
    def can_rename(self) -> bool:
        """Does this driver implement :meth:`rename` (so it can keep a warm pool)?"""
        return type(self).rename is not Driver.rename

    async def remove(self, name: str) -> None:  # noqa: B027 - optional hook
        """Delete what the driver keeps for a stopped sandbox (its directory, logs)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release driver-wide resources."""

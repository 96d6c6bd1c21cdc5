"""corral: a trio-native, actor-model sandbox orchestrator.

::

    async with corral.open_supervisor() as sup:
        sb = await sup.create("job-1")
        out = await sb.exec("echo", ["hi"])

The public API is re-exported here; the modules behind it are private. Every error
class of :mod:`corral.errors` is here too (``corral.FsAlreadyExists`` is the error for a
path that already exists; ``corral.FsExists`` is the "does it exist?" request).

The backend names (``set_default_backend``, ``default_backend``, ``backend_scope``,
``BackendKind``, ``LocalBackend``, ``CloudBackend``, ...) load lazily from
:mod:`corral.backend` on first use, so ``import corral`` stays light.
"""

from __future__ import annotations

from typing import Any

from . import errors
from .actors.execs import ExecResult, Job
from .actors.logfiles import LogRecord
from .actors.sandbox import (
    DEFAULT_KILL_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    Drain,
    Kill,
    SandboxInfo,
    Stop,
)
from .actors.state import SandboxStatus, Watch
from .actors.supervisor import Supervisor, open_supervisor
from .errors import (
    ActorDead,
    AgentError,
    AgentGone,
    CloudHttpError,
    CorralError,
    DigestMismatch,
    ExecError,
    ExecFailed,
    ExecTimeout,
    FrameTooLarge,
    FsAlreadyExists,
    FsError,
    FsIsADirectory,
    FsNotADirectory,
    FsNotEmpty,
    FsNotFound,
    FsPathEscape,
    FsPermissionDenied,
    ImageError,
    ImageNotFound,
    InvalidConfig,
    JobNotFound,
    ProtocolError,
    RegistryError,
    Runtime,
    SandboxAlreadyExists,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxStillRunning,
    UnsafeLayer,
    Unsupported,
)
from .names import validate_sandbox_name
from .protocol import (
    Exec,
    ExecExited,
    ExecStarted,
    ExecStderr,
    ExecStdout,
    FsCopy,
    FsData,
    FsEntry,
    FsExists,
    FsList,
    FsMkdir,
    FsRead,
    FsRemove,
    FsRename,
    FsStat,
    FsWrite,
    JobInfo,
    Ping,
    Shutdown,
)
from .sandbox import ExecProcess, Sandbox, SandboxFs

__all__ = [
    # API
    "open_supervisor",
    "Supervisor",
    "Sandbox",
    "SandboxFs",
    "ExecProcess",
    "ExecResult",
    "Job",
    "JobInfo",
    "LogRecord",
    "SandboxInfo",
    "SandboxStatus",
    "Watch",
    "validate_sandbox_name",
    "DEFAULT_STOP_TIMEOUT",
    "DEFAULT_KILL_TIMEOUT",
    # messages
    "Exec",
    "ExecStarted",
    "ExecStdout",
    "ExecStderr",
    "ExecExited",
    "FsRead",
    "FsData",
    "FsWrite",
    "FsStat",
    "FsEntry",
    "FsList",
    "FsExists",
    "FsMkdir",
    "FsRemove",
    "FsCopy",
    "FsRename",
    "Ping",
    "Shutdown",
    "Stop",
    "Kill",
    "Drain",
    # errors
    "errors",
    "ActorDead",
    "AgentError",
    "AgentGone",
    "CloudHttpError",
    "CorralError",
    "ExecError",
    "ExecFailed",
    "ExecTimeout",
    "FrameTooLarge",
    "FsError",
    "FsAlreadyExists",
    "FsNotEmpty",
    "FsIsADirectory",
    "FsNotADirectory",
    "FsNotFound",
    "FsPathEscape",
    "FsPermissionDenied",
    "ImageError",
    "ImageNotFound",
    "DigestMismatch",
    "RegistryError",
    "UnsafeLayer",
    "InvalidConfig",
    "JobNotFound",
    "ProtocolError",
    "Runtime",
    "SandboxAlreadyExists",
    "SandboxNotFound",
    "SandboxNotRunning",
    "SandboxStillRunning",
    "Unsupported",
    # backend (lazy)
    "set_default_backend",
    "default_backend",
    "default_backend_kind",
    "backend_scope",
    "BackendKind",
    "LocalBackend",
    "CloudBackend",
    "__version__",
]

_BACKEND_NAMES = frozenset(
    {
        "set_default_backend",
        "default_backend",
        "default_backend_kind",
        "backend_scope",
        "BackendKind",
        "LocalBackend",
        "CloudBackend",
    }
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("corral")
    except PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = globals()["__version__"] = _version()
        return value
    if name in _BACKEND_NAMES:
        import importlib

        try:
            backend = importlib.import_module("corral.backend")
            value = getattr(backend, name)
        except (ImportError, AttributeError):
            raise AttributeError(
                f"corral.{name} is not available: corral.backend does not provide it yet"
            ) from None
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corral' has no attribute {name!r}")

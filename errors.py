"""The corral error tree.

Every error corral raises on purpose is a :class:`CorralError`. The leaves are the
microsandbox seed's errors (``SandboxNotFound``, ``SandboxAlreadyExists``,
``SandboxStillRunning``, ``InvalidConfig``, ``Unsupported``, ``CloudHttpError``,
``Runtime``) plus the ones a sandbox orchestrator needs on top::

    CorralError
    ├── InvalidConfig               bad names, options, profiles, limits out of range
    ├── SandboxNotFound
    ├── SandboxAlreadyExists
    ├── SandboxStillRunning         remove of a running sandbox
    ├── SandboxNotRunning           exec / fs on a sandbox that is stopped or draining
    ├── Unsupported(feature, available_when)
    ├── CloudHttpError(status, code, message)
    ├── Runtime                     the runtime failed: spawn, lost state, ladder timeouts
    │   └── ActorDead               the actor that owned a sandbox is gone
    ├── ExecError
    │   ├── ExecTimeout             killed after its timeout (partial output attached)
    │   ├── ExecFailed(kind, errno) the command could not be started
    │   └── JobNotFound             no detached job with that id in the sandbox
    ├── ImageError                  an OCI image could not be pulled, verified or unpacked
    │   ├── ImageNotFound           no such repository, tag, digest or platform; not pulled
    │   ├── RegistryError           the registry failed, refused or could not be reached
    │   ├── DigestMismatch          content does not match its digest or declared size
    │   └── UnsafeLayer             a layer tries to leave its root (.., absolute, links)
    ├── AgentError                  the in-sandbox agent failed or went away
    │   ├── AgentGone               channel closed: in-flight requests fail at once
    │   └── ProtocolError           garbage, truncated or version-mismatched frames
    │       └── FrameTooLarge
    └── FsError(path, errno)
        ├── FsNotFound
        ├── FsAlreadyExists
        ├── FsPermissionDenied
        ├── FsIsADirectory
        ├── FsNotADirectory
        ├── FsNotEmpty              a directory removed without recursive
        └── FsPathEscape            a host-side path left its allowed root

Errors cross the agent channel as ``ErrorReply(code, message, errno)``: each class has a
stable ``code`` and :func:`error_from_code` rebuilds the right class on the other side.
This module is pure (no trio, no I/O): the in-sandbox agent imports it too.
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar

__all__ = [
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
    "FsIsADirectory",
    "FsNotADirectory",
    "FsNotEmpty",
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
    "error_from_code",
    "fs_error_from_oserror",
]


class CorralError(Exception):
    """Root of every error corral raises on purpose."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class InvalidConfig(CorralError):
    code = "invalid_config"


class SandboxNotFound(CorralError):
    code = "sandbox_not_found"


class SandboxAlreadyExists(CorralError):
    code = "sandbox_already_exists"


class SandboxStillRunning(CorralError):
    code = "sandbox_still_running"


class SandboxNotRunning(CorralError):
    code = "sandbox_not_running"


class Unsupported(CorralError):
    code = "unsupported"

    def __init__(self, feature: str, available_when: str = "") -> None:
        text = f"{feature} is not supported"
        if available_when:
            text += f" (available {available_when})"
        super().__init__(text)
        self.feature = feature
        self.available_when = available_when


class CloudHttpError(CorralError):
    code = "cloud_http"

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.error_code = code
        self.detail = message


class Runtime(CorralError):
    code = "runtime"


class ActorDead(Runtime):
    code = "actor_dead"


class ExecError(CorralError):
    code = "exec_error"


class ExecTimeout(ExecError):
    code = "exec_timeout"

    def __init__(self, message: str = "", *, stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


class ExecFailed(ExecError):
    """The command could not be started (not found, not executable, bad cwd, ...)."""

    code = "exec_failed"

    def __init__(self, message: str = "", *, kind: str = "other", errno: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.errno = errno


class JobNotFound(ExecError):
    """No detached job with that id (it never existed, or it was pruned)."""

    code = "job_not_found"


class ImageError(CorralError):
    code = "image_error"


class ImageNotFound(ImageError):
    code = "image_not_found"


class RegistryError(ImageError):
    code = "registry_error"


class DigestMismatch(ImageError):
    code = "digest_mismatch"


class UnsafeLayer(ImageError):
    code = "unsafe_layer"


class AgentError(CorralError):
    code = "agent_error"


class AgentGone(AgentError):
    code = "agent_gone"


class ProtocolError(AgentError):
    code = "protocol_error"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class FsError(CorralError):
    code = "fs_error"

    def __init__(self, message: str = "", *, path: str = "", errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class FsNotFound(FsError, FileNotFoundError):
    code = "fs_not_found"


class FsAlreadyExists(FsError, FileExistsError):
    code = "fs_already_exists"


class FsPermissionDenied(FsError, PermissionError):
    code = "fs_permission_denied"


class FsIsADirectory(FsError, IsADirectoryError):
    code = "fs_is_a_directory"


class FsNotADirectory(FsError, NotADirectoryError):
    code = "fs_not_a_directory"


class FsNotEmpty(FsError, OSError):
    code = "fs_not_empty"


class FsPathEscape(FsError, PermissionError):
    code = "fs_path_escape"


def _all_subclasses(cls: type[CorralError]) -> list[type[CorralError]]:
    out: list[type[CorralError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_from_code(code: str, message: str, errno: int | None = None) -> CorralError:
    """Rebuild the error class named by ``code`` (unknown codes become AgentError)."""
    for cls in _all_subclasses(CorralError):
        if cls.code != code:
            continue
        if issubclass(cls, FsError):
            return cls(message, errno=errno)
        if cls is ExecFailed:
            return ExecFailed(message, errno=errno)
        if cls in (Unsupported, CloudHttpError):
            break
        return cls(message)
    return AgentError(f"{code}: {message}")


_ERRNO_TO_FS: dict[int, type[FsError]] = {
    _errno.ENOENT: FsNotFound,
    _errno.EEXIST: FsAlreadyExists,
    _errno.EACCES: FsPermissionDenied,
    _errno.EPERM: FsPermissionDenied,
    _errno.EROFS: FsPermissionDenied,
    _errno.EISDIR: FsIsADirectory,
    _errno.ENOTDIR: FsNotADirectory,
    _errno.ENOTEMPTY: FsNotEmpty,
}


def fs_error_from_oserror(exc: OSError, path: str) -> FsError:
    """Map an OSError to the matching FsError leaf."""
    cls = _ERRNO_TO_FS.get(exc.errno or 0, FsError)
    text = exc.strerror or str(exc)
    return cls(f"{text}: {path}", path=path, errno=exc.errno)

"""The cloud wire format on the client side: create bodies, sandbox records, errors.

Pure (no I/O). Shapes follow ``shared/reference/microsandbox-cloud-wire.md``: the
create body the released microsandbox client sends, the sandbox object a control plane
answers with, and both error body shapes (``{"code", "message"}`` and
``{"error": {"code", "message"}}``). Anything a server answers that does not fit
becomes a :class:`CloudHttpError` with code ``invalid_response`` and a message that says
what was wrong, never a ``KeyError``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec

from ...actors.state import SandboxStatus
from ...errors import (
    CloudHttpError,
    CorralError,
    SandboxAlreadyExists,
    SandboxNotFound,
    Unsupported,
)
from ..base import SandboxSpec

__all__ = [
    "DEFAULT_MEMORY_MIB",
    "DEFAULT_VCPUS",
    "SUBPROTOCOL",
    "TERMINAL",
    "CloudStatus",
    "SandboxWire",
    "cloud_status_to_sandbox_status",
    "create_body",
    "decode_json",
    "decode_sandbox",
    "error_for_response",
]

SUBPROTOCOL = "corral.v1"
"""The WebSocket subprotocol of ``/v1/sandboxes/{id}/corral``: corral's own frames."""

DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 512

CloudStatus = Literal["created", "starting", "running", "stopping", "stopped", "failed"]
TERMINAL: frozenset[str] = frozenset({"stopped", "failed"})

_STATUS: dict[str, SandboxStatus] = {
    "created": SandboxStatus.CREATED,
    "starting": SandboxStatus.STARTING,
    "running": SandboxStatus.RUNNING,
    "stopping": SandboxStatus.DRAINING,
    "stopped": SandboxStatus.STOPPED,
    "failed": SandboxStatus.CRASHED,
}


def cloud_status_to_sandbox_status(status: str) -> SandboxStatus:
    """The seed's mapping: stopping → draining, failed → crashed, the rest one to one."""
    return _STATUS[status]


class SandboxWire(msgspec.Struct, kw_only=True):
    """A sandbox as a control plane answers it (unknown fields are ignored)."""

    id: str
    name: str
    status: CloudStatus
    org_id: str = ""
    status_reason: str | None = None
    ephemeral: bool = False
    created_at: str | None = None
    started_at: str | None = None
    stopped_at: str | None = None
    last_failure_message: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class _ErrorFlat(msgspec.Struct):
    code: str = ""
    message: str = ""


class _ErrorNested(msgspec.Struct):
    error: _ErrorFlat


def _whole_seconds(value: float | None) -> int | None:
    return None if value is None else max(1, math.ceil(value))


def create_body(spec: SandboxSpec) -> dict[str, Any]:
    """The microsandbox create body for ``spec`` (the fields the released client sends).

    Options the cloud wire has no field for raise :class:`Unsupported` naming them, as
    the seed does for its cloud-deferred features, instead of being dropped. Lifecycle
    limits map onto ``lifecycle`` (whole seconds, rounded up); note that a control
    plane's idle timeout counts an open agent WebSocket as activity.
    """
    if spec.pids_limit is not None:
        raise Unsupported("pids_limit over cloud", "when pids limits land on the cloud API")
    if spec.tmp_size_mib is not None:
        raise Unsupported("tmp_size_mib over cloud", "when tmpfs sizes land on the cloud API")
    vcpus = DEFAULT_VCPUS
    if spec.cpus is not None:
        if not float(spec.cpus).is_integer():
            raise Unsupported(
                f"fractional cpus ({spec.cpus:g}) over cloud",
                "when the cloud API takes fractional vCPUs (use a whole number)",
            )
        vcpus = max(1, math.floor(spec.cpus))
    memory = DEFAULT_MEMORY_MIB if spec.memory_mib is None else int(spec.memory_mib)
    network: dict[str, Any] = {"enabled": False, "strict": True}
    if spec.network:
        network = {
            "enabled": True,
            "strict": True,
            "policy": {"default_egress": "allow", "default_ingress": "allow"},
        }
    return {
        "source": "oci",
        "name": spec.name,
        "runtime": {
            "workdir": spec.workdir,
            "shell": None,
            "scripts": {},
            "entrypoint": None,
            "cmd": None,
            "user": None,
            "log_level": None,
        },
        "env": [{"key": k, "value": v} for k, v in spec.env.items()],
        "labels": dict(spec.labels),
        "rlimits": [],
        "mounts": [],
        "network": network,
        "init": None,
        "security_profile": "default",
        "lifecycle": {
            "ephemeral": bool(getattr(spec, "ephemeral", False)),
            "max_duration_secs": _whole_seconds(getattr(spec, "max_duration", None)),
            "idle_timeout_secs": _whole_seconds(getattr(spec, "idle_timeout", None)),
        },
        "reference": spec.image,
        "resources": {"vcpus": vcpus, "memory_mib": memory},
        "patches": [],
        "pull_policy": "if_missing",
    }


def _snippet(body: bytes, limit: int = 120) -> str:
    text = body[:limit].decode("utf-8", "replace")
    return repr(text) + ("…" if len(body) > limit else "")


def invalid_response(status: int, what: str, detail: str) -> CloudHttpError:
    return CloudHttpError(status, "invalid_response", f"{what}: {detail}")


def decode_json(status: int, body: bytes, what: str) -> Any:
    """Any JSON value, or CloudHttpError(invalid_response) naming what came instead."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        pass
    shown = "an empty body" if not body.strip() else f"a body that is not JSON: {_snippet(body)}"
    raise invalid_response(status, what, f"the server answered {shown}")


def decode_sandbox(status: int, body: bytes, what: str) -> SandboxWire:
    """A sandbox object; a body of the wrong shape names the field at fault."""
    decode_json(status, body, what)
    try:
        return msgspec.json.decode(body, type=SandboxWire)
    except msgspec.ValidationError as exc:
        detail = f"the server answered no sandbox object ({exc})"
        raise invalid_response(status, what, detail) from None


def decode_as(status: int, body: bytes, kind: type[Any], what: str) -> Any:
    decode_json(status, body, what)
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise invalid_response(status, what, f"unexpected answer shape ({exc})") from None


def _error_fields(body: bytes) -> tuple[str, str] | None:
    flat: _ErrorFlat | None = None
    try:
        flat = msgspec.json.decode(body, type=_ErrorNested).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        try:
            flat = msgspec.json.decode(body, type=_ErrorFlat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
    if flat.code or flat.message:
        return flat.code, flat.message
    return None


def error_for_response(status: int, body: bytes, what: str) -> CorralError:
    """The typed error for a 4xx/5xx answer to ``what`` (e.g. "create sandbox 'x'")."""
    fields = _error_fields(body)
    if fields is None:
        code = f"http_{status}"
        message = "no error body" if not body.strip() else f"unexpected body {_snippet(body)}"
    else:
        code, message = fields
        code = code or f"http_{status}"
    text = f"{what}: {message}" if message else what
    if status == 404:
        return SandboxNotFound(text)
    if status == 409 and code in ("sandbox_already_exists", "already_exists", f"http_{status}"):
        return SandboxAlreadyExists(text)
    if status in (401, 403):
        return CloudHttpError(
            status,
            code,
            f"{what}: the control plane refused the API key ({message or 'unauthorized'});"
            " check MSB_API_KEY / the profile's key",
        )
    return CloudHttpError(status, code, text)

"""The microsandbox cloud wire types, as the released client sends and accepts them.

Mirrors ``shared/reference/microsandbox-cloud-wire.md``. Request bodies are decoded
strictly (``forbid_unknown_fields``): a field the server does not know is a 400, never
silently dropped. Which *known* fields corral can honour is decided in
:mod:`corral.server.spec`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

CloudStatus = Literal["created", "starting", "running", "stopping", "stopped", "failed"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"stopped", "failed"})


class _In(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are an error."""


class EnvVarIn(_In):
    key: str
    value: str


class RuntimeIn(_In):
    workdir: str | None = None
    shell: str | None = None
    scripts: dict[str, str] = {}
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    user: str | None = None
    log_level: str | None = None
    hostname: str | None = None


class NetworkIn(_In):
    enabled: bool = True
    strict: bool = True
    policy: dict[str, Any] | None = None
    secrets: dict[str, Any] | None = None


class LifecycleIn(_In):
    ephemeral: bool = False
    max_duration_secs: int | None = None
    idle_timeout_secs: int | None = None


class ResourcesIn(_In):
    vcpus: int = 1
    memory_mib: int = 512


class CreateSandboxRequest(_In):
    """``POST /v1/sandboxes`` body (the SDK always sends every field)."""

    name: str
    source: str = "oci"
    reference: str | None = None
    runtime: RuntimeIn = msgspec.field(default_factory=RuntimeIn)
    env: list[EnvVarIn] = []
    labels: dict[str, str] = {}
    rlimits: list[Any] = []
    mounts: list[Any] = []
    network: NetworkIn = msgspec.field(default_factory=NetworkIn)
    init: Any = None
    security_profile: str = "default"
    lifecycle: LifecycleIn = msgspec.field(default_factory=LifecycleIn)
    resources: ResourcesIn = msgspec.field(default_factory=ResourcesIn)
    patches: list[Any] = []
    pull_policy: str = "if_missing"


class EmptyBody(_In):
    """``POST …/stop`` and ``…/start`` send ``{}``."""


# -- responses ----------------------------------------------------------------------------------


class SandboxSpecOut(msgspec.Struct, kw_only=True):
    """What the sandbox was created with (the ``spec`` object of a sandbox)."""

    image: str
    vcpus: int
    memory_mib: int
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    workdir: str | None = None
    shell: str | None = None
    network: bool = False
    max_duration_secs: int | None = None
    idle_timeout_secs: int | None = None


class SandboxOut(msgspec.Struct, kw_only=True):
    id: str
    org_id: str
    name: str
    slug: str
    status: CloudStatus
    status_reason: str | None = None
    spec: SandboxSpecOut
    ephemeral: bool
    created_at: str
    started_at: str | None = None
    stopped_at: str | None = None
    last_failure_message: str | None = None


class SandboxPage(msgspec.Struct):
    data: list[SandboxOut]
    next_cursor: str | None = None


class MessageOut(msgspec.Struct):
    message: str


class ErrorOut(msgspec.Struct):
    code: str
    message: str


class LogEntryOut(msgspec.Struct, kw_only=True):
    """One ``data:`` line of the logs event stream."""

    id: int
    timestamp_ms: float
    source: str
    data: str

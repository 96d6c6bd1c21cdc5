"""Checking ``Supervisor.create``'s options: every bad one is an InvalidConfig up front."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from ..drivers.base import DEFAULT_WORKDIR, SandboxSpec
from ..errors import InvalidConfig
from ..names import validate_sandbox_name
from .lifecycle import check_duration

__all__ = ["build_spec", "check_positive"]


def check_positive(name: str, value: float | None, *, integer: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidConfig(f"{name} must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise InvalidConfig(f"{name} must be a whole number, got {value!r}")
    if not value > 0:
        raise InvalidConfig(f"{name} must be greater than 0, got {value!r}")


def build_spec(
    name: str,
    *,
    image: str,
    env: Mapping[str, str] | None,
    workdir: str | None,
    network: bool,
    cpus: float | None,
    memory_mib: int | None,
    pids_limit: int | None,
    detached: bool,
    tmp_size_mib: int | None = None,
    labels: Mapping[str, str] | None,
    ephemeral: bool,
    idle_timeout: float | None,
    max_duration: float | None,
) -> SandboxSpec:
    """A validated spec with a fresh ``state_id``."""
    validate_sandbox_name(name)
    check_positive("cpus", cpus, integer=False)
    check_positive("memory_mib", memory_mib, integer=True)
    check_positive("pids_limit", pids_limit, integer=True)
    check_positive("tmp_size_mib", tmp_size_mib, integer=True)
    idle = check_duration("idle_timeout", idle_timeout)
    longest = check_duration("max_duration", max_duration)
    if not isinstance(image, str) or not image:
        raise InvalidConfig("image must be a non-empty string")
    workdir = DEFAULT_WORKDIR if workdir is None else workdir
    if not isinstance(workdir, str) or not workdir.startswith("/"):
        raise InvalidConfig(f"workdir must be an absolute path, got {workdir!r}")
    env = dict(env or {})
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise InvalidConfig(f"invalid environment variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise InvalidConfig(f"environment variable {key} must be a string without NUL")
    tags = dict(labels or {})
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidConfig(f"labels must map strings to strings, got {key!r}: {value!r}")
    return SandboxSpec(
        name=name,
        image=image,
        env=env,
        workdir=workdir,
        network=bool(network),
        cpus=cpus,
        memory_mib=memory_mib,
        pids_limit=pids_limit,
        tmp_size_mib=tmp_size_mib,
        detached=bool(detached),
        labels=tags,
        ephemeral=bool(ephemeral),
        idle_timeout=idle,
        max_duration=longest,
        state_id=uuid.uuid4().hex,
    )

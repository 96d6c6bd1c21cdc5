"""Which create fields corral honours, and what it makes of them.

The SDK always sends every field of the create body, mostly at its defaults. Each field
either maps onto corral's ``create`` (image, resources, env, workdir, network, lifecycle
limits, ephemeral, labels) or must stay at its "off" value; any other value is a 400
with a code naming the field, never silently dropped. The unsupported features follow
the microsandbox seed's own cloud rejections (mounts, patches, rlimits, cmd, init, pull
policy) plus what corral's sandboxes do not have (entrypoint, scripts, a user, a
hostname, a log level, security profiles, network policy rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..names import is_valid_sandbox_name
from .http import ApiError
from .models import CreateSandboxRequest, SandboxSpecOut

MAX_VCPUS = 64
MAX_MEMORY_MIB = 256 * 1024
MAX_ENV = 4096
MAX_LIMIT_SECS = 366 * 24 * 3600


@dataclass(frozen=True)
class CreatePlan:
    """A validated create request: everything corral needs to start the sandbox."""

    name: str
    image: str
    cpus: int
    memory_mib: int
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    network: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    shell: str | None = None
    ephemeral: bool = False
    max_duration_secs: int | None = None
    idle_timeout_secs: int | None = None

    def spec_out(self) -> SandboxSpecOut:
        return SandboxSpecOut(
            image=self.image,
            vcpus=self.cpus,
            memory_mib=self.memory_mib,
            env=dict(self.env),
            labels=dict(self.labels),
            workdir=self.workdir,
            shell=self.shell,
            network=self.network,
            max_duration_secs=self.max_duration_secs,
            idle_timeout_secs=self.idle_timeout_secs,
        )

    @classmethod
    def from_spec(
        cls, name: str, spec: SandboxSpecOut, shell: str | None, ephemeral: bool
    ) -> CreatePlan:
        return cls(
            name=name,
            image=spec.image,
            cpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            env=dict(spec.env),
            workdir=spec.workdir,
            network=spec.network,
            labels=dict(spec.labels),
            shell=shell,
            ephemeral=ephemeral,
            max_duration_secs=spec.max_duration_secs,
            idle_timeout_secs=spec.idle_timeout_secs,
        )


def unsupported(field_name: str, detail: str = "") -> ApiError:
    text = f"{field_name} is not supported by this server"
    return ApiError(400, "unsupported_field", f"{text}: {detail}" if detail else text)


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def check_name(name: str) -> None:
    if not is_valid_sandbox_name(name):
        raise ApiError(
            400,
            "invalid_name",
            f"invalid sandbox name {name[:140]!r}: 1 to 128 characters from A-Z a-z 0-9 . - _,"
            " starting with a letter or digit",
        )


def plan_create(req: CreateSandboxRequest, *, allow_network: bool) -> CreatePlan:
    """Validate a create body. ``allow_network``: the server gives sandboxes host network."""
    check_name(req.name)
    if req.source != "oci":
        raise unsupported("source", f"only 'oci' image references, got {req.source!r}")
    if not req.reference:
        raise invalid("reference (the image) is required")
    rt = req.runtime
    for name, value in (
        ("runtime.entrypoint", rt.entrypoint),
        ("runtime.cmd", rt.cmd),
        ("runtime.user", rt.user),
        ("runtime.log_level", rt.log_level),
        ("runtime.hostname", rt.hostname),
        ("init", req.init),
    ):
        if value is not None:
            raise unsupported(name, "leave it unset")
    for name, items in (
        ("runtime.scripts", rt.scripts),
        ("rlimits", req.rlimits),
        ("mounts", req.mounts),
        ("patches", req.patches),
    ):
        if items:
            raise unsupported(name, "leave it empty")
    if req.pull_policy != "if_missing":
        raise unsupported("pull_policy", "only 'if_missing'")
    if req.security_profile != "default":
        raise unsupported("security_profile", "only 'default' (corral's hardened bubblewrap)")
    if rt.workdir is not None and not rt.workdir.startswith("/"):
        raise invalid(f"runtime.workdir must be an absolute path, got {rt.workdir!r}")
    res = req.resources
    if not 1 <= res.vcpus <= MAX_VCPUS:
        raise invalid(f"resources.vcpus must be 1..{MAX_VCPUS}, got {res.vcpus}")
    if not 16 <= res.memory_mib <= MAX_MEMORY_MIB:
        raise invalid(f"resources.memory_mib must be 16..{MAX_MEMORY_MIB}, got {res.memory_mib}")
    if len(req.env) > MAX_ENV:
        raise invalid(f"at most {MAX_ENV} env entries")
    env: dict[str, str] = {}
    for var in req.env:
        if not var.key or "=" in var.key or "\0" in var.key + var.value:
            raise invalid(f"invalid env key {var.key!r}")
        env[var.key] = var.value
    life = req.lifecycle
    for name, secs in (
        ("lifecycle.max_duration_secs", life.max_duration_secs),
        ("lifecycle.idle_timeout_secs", life.idle_timeout_secs),
    ):
        if secs is not None and not 1 <= secs <= MAX_LIMIT_SECS:
            raise invalid(f"{name} must be 1..{MAX_LIMIT_SECS} seconds, got {secs}")
    return CreatePlan(
        name=req.name,
        image=req.reference,
        cpus=res.vcpus,
        memory_mib=res.memory_mib,
        env=env,
        workdir=rt.workdir,
        network=plan_network(req, allow_network=allow_network),
        labels=dict(req.labels),
        shell=rt.shell,
        ephemeral=life.ephemeral,
        max_duration_secs=life.max_duration_secs,
        idle_timeout_secs=life.idle_timeout_secs,
    )


def plan_network(req: CreateSandboxRequest, *, allow_network: bool) -> bool:
    """Map the SDK's network request onto corral's on/off network.

    - ``enabled: false`` or a deny-all policy (``Network.none()``): no network.
    - no policy (the SDK default): the server's default, network only when the server
      was started with ``--sandbox-network host``.
    - an allow-all policy (``Network.allow_all()``): network, or a 400 when the server
      gives sandboxes no network.
    - anything finer (rules, secrets, mixed defaults): a 400, corral has no policy engine.
    """
    net = req.network
    secrets = (net.secrets or {}).get("entries") or []
    if secrets:
        raise unsupported("network.secrets", "corral has no secret injection")
    if not net.enabled:
        return False
    if net.policy is None:
        return allow_network
    policy = net.policy
    extra = set(policy) - {"default_egress", "default_ingress", "rules"}
    if policy.get("rules") or extra:
        raise unsupported("network.policy", "rules are not supported; use allow-all or none")
    egress, ingress = policy.get("default_egress"), policy.get("default_ingress")
    if egress == "deny" and ingress == "deny":
        return False
    if egress == "allow" and ingress == "allow":
        if not allow_network:
            raise ApiError(
                400,
                "network_unavailable",
                "this server gives sandboxes no network (start it with --sandbox-network host)",
            )
        return True
    raise unsupported("network.policy", f"default_egress={egress!r} default_ingress={ingress!r}")

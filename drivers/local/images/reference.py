"""Image references: ``[registry/]repository[:tag][@digest]``, parsed the way docker does.

* The first ``/``-separated component is a registry when it holds a ``.`` or a ``:`` or is
  ``localhost``; otherwise the registry is Docker Hub (``docker.io``) and a one-component
  name gets the ``library/`` prefix (``alpine`` -> ``docker.io/library/alpine:latest``).
* No tag and no digest means ``:latest``. Only ``sha256`` digests are accepted.
* Docker Hub's API lives at ``registry-1.docker.io``.
* Plain ``http://`` is used only for loopback registries (``localhost``, ``127.0.0.0/8``,
  ``::1``) unless the caller allows insecure registries explicitly.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from corral.errors import InvalidConfig, Unsupported

__all__ = [
    "DOCKER_HUB",
    "HOST_IMAGE",
    "ImageRef",
    "check_digest",
    "digest_hex",
    "is_loopback_host",
    "parse_reference",
    "sha256_digest",
]

HOST_IMAGE = "host"
DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_REGISTRY = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_MAX_LEN = 255


def check_digest(digest: str) -> str:
    """Validate a ``sha256:<64 hex>`` digest and return it (other algorithms: Unsupported)."""
    if _DIGEST.fullmatch(digest):
        return digest
    algorithm, sep, _ = digest.partition(":")
    if sep and algorithm in ("sha384", "sha512"):
        raise Unsupported(f"{algorithm} digests", "for sha256 digests")
    raise InvalidConfig(f"bad digest {digest!r} (want sha256:<64 hex digits>)")


def digest_hex(digest: str) -> str:
    """The hex part of a checked digest (safe as a file name)."""
    return check_digest(digest).partition(":")[2]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (no port) names this machine: ``localhost``, 127.0.0.0/8, ``::1``."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference. ``str()`` gives the canonical, fully qualified form."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        """The registry host without its port."""
        if self.registry.startswith("["):
            return self.registry[1 : self.registry.index("]")]
        return self.registry.rsplit(":", 1)[0]

    @property
    def api_host(self) -> str:
        """Where the registry's v2 API is served (Docker Hub's is not ``docker.io``)."""
        return _DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def name(self) -> str:
        """``registry/repository`` (no tag, no digest)."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, None, check_digest(digest))

    def key(self) -> str:
        """A file-name-safe key for this exact reference."""
        return hashlib.sha256(str(self).encode()).hexdigest()

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageRef:
    """Parse an image reference (see the module docstring); InvalidConfig when malformed."""
    if not isinstance(text, str) or not text or len(text) > _MAX_LEN or text != text.strip():
        raise InvalidConfig(f"bad image reference {text!r}")
    if text == HOST_IMAGE:
        raise InvalidConfig("'host' is the built-in host image, not a registry reference")
    rest, at, digest = text.partition("@")
    digest_value = check_digest(digest) if at else None
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidConfig(f"bad tag {tag!r} in image reference {text!r}")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
        if not _REGISTRY.fullmatch(registry):
            raise InvalidConfig(f"bad registry {registry!r} in image reference {text!r}")
    else:
        registry, path = DOCKER_HUB, rest
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    parts = path.split("/")
    if not path or not all(_COMPONENT.fullmatch(part) for part in parts):
        raise InvalidConfig(f"bad repository {path!r} in image reference {text!r}")
    if tag is None and digest_value is None:
        tag = "latest"
    return ImageRef(registry, path, tag, digest_value)

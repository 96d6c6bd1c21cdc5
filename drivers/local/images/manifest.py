"""OCI / Docker v2 manifests, indexes (manifest lists) and image configs, and platforms.

Only what a pull needs is decoded (msgspec, unknown fields ignored). Media types:

* indexes: OCI image index, Docker manifest list;
* manifests: OCI image manifest, Docker image manifest v2 schema 2 (schema 1 is refused);
* layers: tar, tar+gzip (OCI and Docker); zstd and foreign layers are refused.
"""

from __future__ import annotations

import platform as _platform

import msgspec

from corral.errors import ImageError, ImageNotFound, Unsupported

from .reference import check_digest

__all__ = [
    "INDEX_TYPES",
    "MANIFEST_ACCEPT",
    "MANIFEST_TYPES",
    "ContainerConfig",
    "Descriptor",
    "ImageConfig",
    "Index",
    "Manifest",
    "Platform",
    "decode_config",
    "decode_manifest",
    "host_platform",
    "select_platform",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
    }
)
_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class Platform(msgspec.Struct, frozen=True):
    architecture: str
    os: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


class Descriptor(msgspec.Struct, frozen=True, rename="camel"):
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None


class Index(msgspec.Struct, frozen=True, rename="camel"):
    schema_version: int
    manifests: list[Descriptor]
    media_type: str = OCI_INDEX


class Manifest(msgspec.Struct, frozen=True, rename="camel"):
    schema_version: int
    config: Descriptor
    layers: list[Descriptor]
    media_type: str = OCI_MANIFEST


class ContainerConfig(msgspec.Struct, frozen=True, rename="pascal"):
    env: list[str] | None = None
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    working_dir: str | None = None
    user: str | None = None


class ImageConfig(msgspec.Struct, frozen=True):
    architecture: str = ""
    os: str = ""
    variant: str | None = None
    config: ContainerConfig | None = None


class _Envelope(msgspec.Struct):
    schemaVersion: int = 0
    mediaType: str | None = None
    manifests: msgspec.Raw = msgspec.Raw()
    layers: msgspec.Raw = msgspec.Raw()


def host_platform() -> Platform:
    """This machine as an OCI platform (``linux/amd64``, ``linux/arm64``, ...)."""
    machine = _platform.machine().lower()
    arch = _ARCH.get(machine, machine)
    variant = None
    if arch == "arm":
        variant = "v7" if machine.startswith("armv7") else "v6"
    return Platform(architecture=arch, os="linux", variant=variant)


def decode_manifest(body: bytes, content_type: str | None = None) -> Index | Manifest:
    """Decode a manifest or an index; ImageError for anything else (schema 1, garbage)."""
    try:
        env = msgspec.json.decode(body, type=_Envelope)
    except msgspec.DecodeError as exc:
        raise ImageError(f"malformed manifest: {exc}") from exc
    media = env.mediaType or (content_type or "").split(";")[0].strip()
    if env.schemaVersion != 2:
        raise Unsupported(f"manifest schema version {env.schemaVersion}", "for schema 2 (OCI)")
    is_index = media in INDEX_TYPES or (len(env.manifests) > 0 and len(env.layers) == 0)
    try:
        if is_index:
            index = msgspec.json.decode(body, type=Index)
            for desc in index.manifests:
                check_digest(desc.digest)
            return index
        if media and media not in MANIFEST_TYPES:
            raise Unsupported(f"manifest media type {media!r}", "for OCI / Docker v2 manifests")
        manifest = msgspec.json.decode(body, type=Manifest)
    except msgspec.DecodeError as exc:
        raise ImageError(f"malformed manifest: {exc}") from exc
    check_digest(manifest.config.digest)
    for layer in manifest.layers:
        check_digest(layer.digest)
        if layer.size < 0:
            raise ImageError(f"layer {layer.digest} has a negative size")
        if layer.media_type not in LAYER_TYPES:
            raise Unsupported(f"layer media type {layer.media_type!r}", "for tar / tar+gzip")
    return manifest


def decode_config(body: bytes) -> ImageConfig:
    try:
        return msgspec.json.decode(body, type=ImageConfig)
    except msgspec.DecodeError as exc:
        raise ImageError(f"malformed image config: {exc}") from exc


def _is_attestation(desc: Descriptor) -> bool:
    notes = desc.annotations or {}
    return notes.get("vnd.docker.reference.type") == "attestation-manifest"


def select_platform(index: Index, want: Platform) -> Descriptor:
    """The index entry for ``want`` (an exact variant first, then any variant)."""
    candidates = [
        desc
        for desc in index.manifests
        if desc.platform is not None
        and not _is_attestation(desc)
        and desc.platform.os == want.os
        and desc.platform.architecture == want.architecture
    ]
    for desc in candidates:
        if desc.platform is not None and desc.platform.variant == want.variant:
            return desc
    if candidates:
        return candidates[0]
    offered = sorted(
        {str(d.platform) for d in index.manifests if d.platform and not _is_attestation(d)}
    )
    raise ImageNotFound(f"no {want} image in the index (it has: {', '.join(offered) or 'none'})")

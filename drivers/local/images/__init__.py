"""OCI images for the local driver: pull from a registry v2, verify, unpack, cache.

* :mod:`.reference` parses ``registry/repo:tag@digest`` (docker's rules);
* :mod:`.registry` is the pull-side v2 client on httpx (token auth, digest checks);
* :mod:`.manifest` decodes manifests, indexes and configs and picks the host platform;
* :mod:`.unpack` extracts a layer safely; :mod:`.rootfs` flattens layers (whiteouts);
* :mod:`.store` is the content-addressed cache under ``<home>/images`` (single-flight);
* :mod:`.testing` builds and pushes tiny images and runs a throw-away registry.

The sandbox side (the image read-only under a per-sandbox writable layer, the host's
Python for the agent) is in :mod:`corral.drivers.local.bwrap` and ``.runtime``.
"""

from .manifest import Platform, host_platform
from .reference import HOST_IMAGE, ImageRef, parse_reference
from .registry import RegistryClient
from .store import Image, ImageDefaults, ImageRecord, ImageStore
from .unpack import UnpackLimits

__all__ = [
    "HOST_IMAGE",
    "Image",
    "ImageDefaults",
    "ImageRecord",
    "ImageRef",
    "ImageStore",
    "Platform",
    "RegistryClient",
    "UnpackLimits",
    "host_platform",
    "parse_reference",
]

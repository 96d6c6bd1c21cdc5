"""Backends: where sandbox operations go (local host or a cloud control plane).

Configuration objects (:class:`LocalBackend`, :class:`CloudBackend`), the ambient
default (:func:`default_backend`, :func:`set_default_backend`, :func:`backend_scope`)
and microsandbox-compatible profiles (:class:`SdkConfig`, :func:`resolve_default_backend`).
"""

from corral.backend.ambient import (
    backend_scope,
    build_backend,
    default_backend,
    default_backend_kind,
    reset_default_backend,
    set_default_backend,
    swap_default_backend,
)
from corral.backend.kinds import Backend, BackendKind, CloudBackend, LocalBackend, default_home
from corral.backend.profile import (
    KEYRING_SERVICE,
    Profile,
    SdkConfig,
    backend_from_profile,
    cloud_backend_from_profile,
    config_path,
    load_sdk_config,
    read_raw_config,
    redact_api_key_ref,
    resolve_api_key_ref,
    resolve_default_backend,
    save_sdk_config,
    set_active_profile,
)

__all__ = [
    "KEYRING_SERVICE",
    "Backend",
    "BackendKind",
    "CloudBackend",
    "LocalBackend",
    "Profile",
    "SdkConfig",
    "backend_from_profile",
    "backend_scope",
    "build_backend",
    "cloud_backend_from_profile",
    "config_path",
    "default_backend",
    "default_backend_kind",
    "default_home",
    "load_sdk_config",
    "read_raw_config",
    "redact_api_key_ref",
    "reset_default_backend",
    "resolve_api_key_ref",
    "resolve_default_backend",
    "save_sdk_config",
    "set_active_profile",
    "set_default_backend",
    "swap_default_backend",
]

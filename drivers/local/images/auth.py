"""Registry credentials from docker's ``config.json``, as docker-compatible tools read them.

``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``), the ``auths`` map:
each entry's base64 ``auth`` (``user:password``) or its ``username``/``password``.
Keys may be a host, a ``host:port`` or a URL (``https://index.docker.io/v1/`` is Docker
Hub). Credential helpers (``credsStore``, ``credHelpers``) are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from .reference import DOCKER_HUB

__all__ = ["docker_config_path", "docker_credentials", "registry_key"]

_HUB_ALIASES = frozenset({"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def registry_key(key: str) -> str:
    """A docker config ``auths`` key as a registry name (``docker.io`` for Docker Hub)."""
    host = urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]
    host = host.lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def docker_credentials(path: str | os.PathLike[str] | None = None) -> dict[str, tuple[str, str]]:
    """Registry name -> (user, password); empty when the file is missing or unreadable."""
    try:
        doc = json.loads(Path(path or docker_config_path()).read_text())
    except (OSError, ValueError):
        return {}
    auths = doc.get("auths") if isinstance(doc, dict) else None
    out: dict[str, tuple[str, str]] = {}
    for key, entry in (auths or {}).items() if isinstance(auths, dict) else ():
        if not isinstance(entry, dict):
            continue
        user, password = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                continue
        if isinstance(user, str) and isinstance(password, str) and user:
            out[registry_key(str(key))] = (user, password)
    return out

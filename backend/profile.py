"""SDK profiles and the default-backend resolution ladder.

The profile schema is microsandbox's ``SdkConfig`` so one ``config.json`` serves both
tools. Its location is :func:`config_path`: ``$MSB_CONFIG_PATH`` if set, else
``$MSB_HOME/config.json``, else ``~/.microsandbox/config.json``. Only two top-level
keys belong to us; everything else in the file (microsandbox's local config:
``home``, ``paths``, ``database`` ...) is left alone, also when writing::

    {
      "active_profile": "prod",
      "profiles": {
        "prod":  {"backend": "cloud", "url": "https://msb.example.com",
                  "api_key_ref": "env:MSB_API_KEY"},
        "local": {"backend": "local"}
      }
    }

``api_key_ref`` forms:

* ``env:NAME`` -- read environment variable ``NAME`` when the profile is resolved.
* ``inline:KEY`` -- the key itself, in the file. Dev/CI only: logs a warning when used.
* ``keyring:NAME`` -- the OS keyring (the ``keyring`` package), service ``"corral"``,
  entry ``NAME``; ``keyring:SERVICE:NAME`` names the service explicitly (the
  microsandbox form, so an entry stored by another tool can be used). Store one with
  ``keyring set corral NAME``.

Resolution ladder (:func:`resolve_default_backend`), first match wins:

1. ``MSB_BACKEND=local`` -> local. ``MSB_BACKEND=cloud`` -> continue, but the result
   must be cloud (an error otherwise, never a silent local fallback). Other values
   are an error.
2. ``MSB_API_URL`` and ``MSB_API_KEY`` both set -> cloud with those.
3. ``MSB_PROFILE=NAME`` -> that profile.
4. The config's ``active_profile`` -> that profile.
5. Local (``$CORRAL_HOME``).

A programmatic ``set_default_backend`` sits above all of these (see ``ambient``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from corral.backend.kinds import (
    API_KEY_ENV,
    API_URL_ENV,
    Backend,
    BackendKind,
    CloudBackend,
    LocalBackend,
)
from corral.errors import InvalidConfig

__all__ = [
    "KEYRING_SERVICE",
    "Profile",
    "SdkConfig",
    "backend_from_profile",
    "cloud_backend_from_profile",
    "config_path",
    "load_sdk_config",
    "read_raw_config",
    "redact_api_key_ref",
    "resolve_api_key_ref",
    "resolve_default_backend",
    "save_sdk_config",
    "set_active_profile",
]

logger = logging.getLogger("corral.backend")

CONFIG_PATH_ENV = "MSB_CONFIG_PATH"
MSB_HOME_ENV = "MSB_HOME"
BACKEND_ENV = "MSB_BACKEND"
PROFILE_ENV = "MSB_PROFILE"
CONFIG_FILENAME = "config.json"
DEFAULT_MSB_DIRNAME = ".microsandbox"
KEYRING_SERVICE = "corral"
"""Keyring service used by the short ``keyring:NAME`` form."""

_PROFILE_FIELDS = ("backend", "url", "api_key_ref")


class Profile(msgspec.Struct, omit_defaults=True):
    """One named profile: a backend and, for cloud, its URL and key reference."""

    backend: BackendKind
    url: str | None = None
    api_key_ref: str | None = None


class SdkConfig(msgspec.Struct, omit_defaults=True):
    """The profile part of the config file. Missing keys mean "none"."""

    active_profile: str | None = None
    profiles: dict[str, Profile] = msgspec.field(default_factory=dict)


# --------------------------------------------------------------------------- file


def config_path() -> Path:
    """``$MSB_CONFIG_PATH``, else ``$MSB_HOME/config.json``, else ``~/.microsandbox/config.json``.

    Empty variables count as unset.
    """
    explicit = os.environ.get(CONFIG_PATH_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get(MSB_HOME_ENV, "").strip()
    base = Path(home).expanduser() if home else Path.home() / DEFAULT_MSB_DIRNAME
    return base / CONFIG_FILENAME


def read_raw_config(path: Path | None = None) -> dict[str, Any]:
    """The whole config document as plain JSON values; ``{}`` if the file is missing."""
    path = config_path() if path is None else path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InvalidConfig(
            f"cannot read config file {path}: {exc.strerror or exc}: "
            f"fix its permissions or point {CONFIG_PATH_ENV} elsewhere"
        ) from exc
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidConfig(f"config file {path} is not valid JSON ({exc}): fix the file") from exc
    if not isinstance(raw, dict):
        raise InvalidConfig(
            f"config file {path} must hold a JSON object at the top level, "
            f"found {type(raw).__name__}: fix the file"
        )
    return raw


_PROFILE_HINT = (
    'a profile is {"backend": "local"} or {"backend": "cloud", "url": "https://...", '
    '"api_key_ref": "env:VAR"}'
)


def _parse(raw: dict[str, Any], path: Path) -> SdkConfig:
    # Profiles are converted one by one so an error can name the broken profile.
    active = raw.get("active_profile")
    if active is not None and not isinstance(active, str):
        raise InvalidConfig(
            f"config file {path}: 'active_profile' must be a profile name (a string) or "
            f"null, got {type(active).__name__}: fix it"
        )
    entries = raw.get("profiles", {})
    if not isinstance(entries, dict):
        raise InvalidConfig(
            f"config file {path}: 'profiles' must be an object mapping names to profiles, "
            f"got {type(entries).__name__}: fix it ({_PROFILE_HINT})"
        )
    profiles: dict[str, Profile] = {}
    for name, entry in entries.items():
        try:
            profiles[name] = msgspec.convert(entry, Profile)
        except msgspec.ValidationError as exc:
            raise InvalidConfig(
                f"config file {path}: profile {name!r}: {exc}; {_PROFILE_HINT}: fix that entry"
            ) from exc
    return SdkConfig(active_profile=active, profiles=profiles)


def load_sdk_config(path: Path | None = None) -> SdkConfig:
    """Parse the profile part of the config file (a missing file is an empty config)."""
    path = config_path() if path is None else path
    return _parse(read_raw_config(path), path)


def write_raw_config(raw: dict[str, Any], path: Path | None = None) -> None:
    """Atomically replace the config document, keeping the file's mode (new: 0600)."""
    path = config_path() if path is None else path
    target = Path(os.path.realpath(path))
    text = msgspec.json.format(msgspec.json.encode(raw), indent=2) + b"\n"
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o600
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise InvalidConfig(
            f"cannot write config file {target}: {exc.strerror or exc}: "
            f"fix the directory's permissions or point {CONFIG_PATH_ENV} elsewhere"
        ) from exc


def save_sdk_config(cfg: SdkConfig, path: Path | None = None) -> None:
    """Write ``cfg`` into the config file, preserving every key it does not model.

    Unknown top-level keys and unknown keys inside a surviving profile are kept;
    profiles absent from ``cfg`` are removed.
    """
    path = config_path() if path is None else path
    raw = read_raw_config(path)
    if cfg.active_profile is None:
        raw.pop("active_profile", None)
    else:
        raw["active_profile"] = cfg.active_profile
    old = raw.get("profiles")
    old_profiles = old if isinstance(old, dict) else {}
    merged: dict[str, Any] = {}
    for name, profile in cfg.profiles.items():
        previous = old_profiles.get(name)
        entry: dict[str, Any] = dict(previous) if isinstance(previous, dict) else {}
        encoded = msgspec.to_builtins(profile)
        for field in _PROFILE_FIELDS:
            if field in encoded:
                entry[field] = encoded[field]
            else:
                entry.pop(field, None)
        merged[name] = entry
    if merged or "profiles" in raw:
        raw["profiles"] = merged
    write_raw_config(raw, path)


def set_active_profile(name: str, path: Path | None = None) -> None:
    """Make ``name`` the active profile, touching nothing else in the file."""
    path = config_path() if path is None else path
    raw = read_raw_config(path)
    cfg = _parse(raw, path)
    if name not in cfg.profiles:
        raise InvalidConfig(_not_found(name, cfg, path, "the name given"))
    raw["active_profile"] = name
    write_raw_config(raw, path)


def _not_found(name: str, cfg: SdkConfig, path: Path, source: str) -> str:
    known = ", ".join(sorted(cfg.profiles)) or "none"
    return (
        f"profile {name!r} ({source}) is not in {path} (profiles there: {known}): "
        f'add it under "profiles" or choose an existing one'
    )


# --------------------------------------------------------------------------- keys


def redact_api_key_ref(ref: str) -> str:
    """``inline:`` keys become ``inline:<redacted>``; other forms hold no secret."""
    if ref.strip().startswith("inline:"):
        return "inline:<redacted>"
    return ref


def resolve_api_key_ref(profile: str, ref: str) -> str:
    """Turn an ``api_key_ref`` (``env:`` / ``inline:`` / ``keyring:``) into the key."""
    where = f"profile {profile!r}"
    scheme, sep, rest = ref.strip().partition(":")
    if not sep or scheme not in ("env", "inline", "keyring"):
        raise InvalidConfig(
            f"{where}: api_key_ref must start with 'env:', 'inline:' or 'keyring:', "
            f'got {redact_api_key_ref(ref)!r}: e.g. "api_key_ref": "env:MSB_API_KEY"'
        )
    rest = rest.strip()
    if scheme == "env":
        if not rest:
            raise InvalidConfig(f"{where}: 'env:' must name a variable, like 'env:MSB_API_KEY'")
        value = os.environ.get(rest, "").strip()
        if not value:
            raise InvalidConfig(f"{where}: environment variable {rest} is unset or empty: set it")
        return value
    if scheme == "inline":
        if not rest:
            raise InvalidConfig(f"{where}: 'inline:' must be followed by the API key")
        logger.warning(
            "profile %r stores its API key inline in the config file: dev/CI only, "
            "prefer 'env:' or 'keyring:'",
            profile,
        )
        return rest
    return _keyring_key(where, rest)


def _keyring_key(where: str, rest: str) -> str:
    service, sep, entry = rest.partition(":")
    if not sep:
        service, entry = KEYRING_SERVICE, rest
    service, entry = service.strip(), entry.strip()
    if not service or not entry:
        raise InvalidConfig(
            f"{where}: 'keyring:' needs an entry name: 'keyring:NAME' "
            f"(service {KEYRING_SERVICE!r}) or 'keyring:SERVICE:NAME'"
        )
    import keyring  # deferred: backend discovery is slow and rarely needed

    try:
        secret = keyring.get_password(service, entry)
    except Exception as exc:  # any keyring backend failure is an environment problem
        raise InvalidConfig(
            f"{where}: cannot read keyring entry {entry!r} of service {service!r} "
            f"({type(exc).__name__}: {exc}): install or configure a keyring backend "
            "(see `keyring --list-backends`; PYTHON_KEYRING_BACKEND selects one), "
            "or use 'env:' instead"
        ) from exc
    if secret is None or not secret.strip():
        raise InvalidConfig(
            f"{where}: the keyring has no entry {entry!r} for service {service!r}: "
            f"store it with `keyring set {service} {entry}`"
        )
    return secret.strip()


# --------------------------------------------------------------------------- ladder


def backend_from_profile(name: str, profile: Profile) -> Backend:
    """The backend a profile describes (local profiles give the ambient local backend)."""
    if profile.backend is BackendKind.LOCAL:
        return LocalBackend.from_env()
    return _cloud_from(name, profile)


def _cloud_from(name: str, profile: Profile) -> CloudBackend:
    if profile.backend is not BackendKind.CLOUD:
        raise InvalidConfig(
            f"profile {name!r} is a {profile.backend.value} profile, not a cloud one: "
            'pick a profile with "backend": "cloud"'
        )
    url = (profile.url or "").strip()
    ref = (profile.api_key_ref or "").strip()
    if not url:
        raise InvalidConfig(
            f"profile {name!r} has backend=cloud but no 'url': "
            'add "url": "https://<control-plane>" to it'
        )
    if not ref:
        raise InvalidConfig(
            f"profile {name!r} has backend=cloud but no 'api_key_ref': "
            'add e.g. "api_key_ref": "env:MSB_API_KEY" to it'
        )
    key = resolve_api_key_ref(name, ref)
    try:
        return CloudBackend(url, key, profile=name)
    except InvalidConfig as exc:
        raise InvalidConfig(f"profile {name!r}: {exc.message}") from None


def cloud_backend_from_profile(name: str, path: Path | None = None) -> CloudBackend:
    """The cloud backend of profile ``name`` in the config file."""
    path = config_path() if path is None else path
    cfg = load_sdk_config(path)
    profile = cfg.profiles.get(name)
    if profile is None:
        raise InvalidConfig(_not_found(name, cfg, path, "the name given"))
    return _cloud_from(name, profile)


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def resolve_default_backend() -> Backend:
    """Apply the ladder in the module docstring; :class:`InvalidConfig` says what to fix."""
    explicit_cloud = False
    kind_text = _env(BACKEND_ENV)
    if kind_text:
        kind = BackendKind.parse(kind_text, source=BACKEND_ENV)
        if kind is BackendKind.LOCAL:
            return LocalBackend.from_env()
        explicit_cloud = True

    url, key = _env(API_URL_ENV), _env(API_KEY_ENV)
    if url and key:
        return CloudBackend.from_env()
    if url or key:
        logger.debug(
            "only one of %s/%s is set; both are needed to select cloud", API_URL_ENV, API_KEY_ENV
        )

    path = config_path()
    cfg = load_sdk_config(path)
    name, source = _env(PROFILE_ENV), PROFILE_ENV
    if not name:
        name, source = (cfg.active_profile or "").strip(), "active_profile"
    if name:
        profile = cfg.profiles.get(name)
        if profile is None:
            raise InvalidConfig(_not_found(name, cfg, path, f"from {source}"))
        if explicit_cloud and profile.backend is not BackendKind.CLOUD:
            raise InvalidConfig(
                f"{BACKEND_ENV}=cloud but profile {name!r} (from {source}) is local: "
                f"select a cloud profile, or unset {BACKEND_ENV}"
            )
        return backend_from_profile(name, profile)

    if explicit_cloud:
        missing = " and ".join(n for n, v in ((API_URL_ENV, url), (API_KEY_ENV, key)) if not v)
        raise InvalidConfig(
            f"{BACKEND_ENV}=cloud but no cloud backend is configured ({missing} unset, no "
            f"profile selected): set {API_URL_ENV} and {API_KEY_ENV}, or {PROFILE_ENV} / "
            f"active_profile to a cloud profile in {path}"
        )
    return LocalBackend.from_env()

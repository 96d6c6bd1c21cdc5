"""Backend configuration objects: which runtime sandbox operations go to.

Two kinds, mirroring the microsandbox SDK's backend split:

* :class:`LocalBackend` -- sandboxes on this host (bubblewrap + agentd). It is a
  plain, immutable description of *where* local state lives (``CORRAL_HOME``,
  default ``~/.corral``) and the per-sandbox defaults; it opens nothing.
* :class:`CloudBackend` -- a remote control plane speaking the microsandbox cloud
  HTTP API, described by its URL and API key. The key never appears in ``repr()``.

Both carry ``.kind`` (:class:`BackendKind`). Drivers pick their transport from it;
this module does no I/O beyond reading environment variables.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from corral.errors import InvalidConfig

__all__ = [
    "Backend",
    "BackendKind",
    "CloudBackend",
    "LocalBackend",
    "default_home",
]

HOME_ENV = "CORRAL_HOME"
DEFAULT_HOME_DIRNAME = ".corral"
DB_FILENAME = "state.db"

_MAX_CPUS = 255  # the seed stores cpus as a u8
_MAX_MEMORY_MIB = 2**32 - 1  # ... and memory as a u32
_MAX_PIDS = 4_194_304  # the kernel's PID_MAX_LIMIT
_MAX_TMPFS_MIB = 2**32 - 1

StrPath: TypeAlias = "str | os.PathLike[str]"


class BackendKind(enum.StrEnum):
    """Which backend variant a backend object represents."""

    LOCAL = "local"
    CLOUD = "cloud"

    @classmethod
    def parse(cls, value: str | BackendKind, *, source: str = "backend kind") -> BackendKind:
        """Parse ``value`` case-insensitively; :class:`InvalidConfig` names ``source``."""
        if isinstance(value, BackendKind):
            return value
        text = value.strip().lower()
        try:
            return cls(text)
        except ValueError:
            raise InvalidConfig(
                f"{source} must be 'local' or 'cloud', got {value!r}: use one of those two values"
            ) from None


def default_home() -> Path:
    """``$CORRAL_HOME`` if set and non-empty, else ``~/.corral`` (absolute)."""
    env = os.environ.get(HOME_ENV, "").strip()
    if env:
        return _absolute(env)
    return Path.home() / DEFAULT_HOME_DIRNAME


def _absolute(path: StrPath) -> Path:
    return Path(path).expanduser().absolute()


def _optional_dir(value: StrPath | None, default: Path) -> Path:
    return default if value is None else _absolute(value)


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfig(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidConfig(f"{name} must be between {low} and {high}, got {value}")


def _check_abs_guest_path(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidConfig(
            f"{name} must be an absolute path inside the sandbox (like '/bin/sh'), got {value!r}"
        )


@dataclass(frozen=True, init=False)
class LocalBackend:
    """Local sandboxes on this host.

    Every argument is optional and keyword-only::

        LocalBackend()                                   # $CORRAL_HOME or ~/.corral
        LocalBackend(home="/srv/corral", default_cpus=2)

    Directories not given explicitly live under ``home``: ``sandboxes/``,
    ``images/``, ``volumes/``, ``logs/`` and the sqlite state db ``state.db``.
    ``metrics_sample_interval_ms=0`` disables metrics sampling, like
    ``disable_metrics_sample=True`` (as in the seed, where 0 maps to "off").

    Per-sandbox defaults, used when ``create`` leaves the option out (None), as the
    seed's LocalBackend does: ``default_cpus`` (1 CPU of quota), ``default_memory_mib``
    (512), ``default_pids_limit`` (1024 processes) and ``default_tmp_size_mib`` (256,
    the size of the sandbox's ``/tmp`` tmpfs). ``shm_size_mib`` (64) and ``run_size_mib``
    (16) size ``/dev/shm`` and ``/run``. These are limits, not reservations: nothing is
    set aside, so many sandboxes may together promise more than the host has. tmpfs
    pages are charged to the sandbox's memory limit as well.

    Instances are immutable and compare by value. ``dataclasses.replace`` works but
    passes every field, so changing ``home`` that way keeps the old sub-directories:
    build a new ``LocalBackend(home=...)`` instead.
    """

    home: Path
    sandboxes_dir: Path
    images_dir: Path
    volumes_dir: Path
    logs_dir: Path
    db_path: Path
    default_cpus: int
    default_memory_mib: int
    default_pids_limit: int
    default_tmp_size_mib: int
    shm_size_mib: int
    run_size_mib: int
    shell: str
    workdir: str
    metrics_sample_interval_ms: int
    disable_metrics_sample: bool

    def __init__(
        self,
        *,
        home: StrPath | None = None,
        sandboxes_dir: StrPath | None = None,
        images_dir: StrPath | None = None,
        volumes_dir: StrPath | None = None,
        logs_dir: StrPath | None = None,
        db_path: StrPath | None = None,
        default_cpus: int = 1,
        default_memory_mib: int = 512,
        default_pids_limit: int = 1024,
        default_tmp_size_mib: int = 256,
        shm_size_mib: int = 64,
        run_size_mib: int = 16,
        shell: str = "/bin/sh",
        workdir: str = "/workspace",
        metrics_sample_interval_ms: int = 1000,
        disable_metrics_sample: bool = False,
    ) -> None:
        _check_int("default_cpus", default_cpus, 1, _MAX_CPUS)
        _check_int("default_memory_mib", default_memory_mib, 1, _MAX_MEMORY_MIB)
        _check_int("default_pids_limit", default_pids_limit, 1, _MAX_PIDS)
        for size_name, size in (
            ("default_tmp_size_mib", default_tmp_size_mib),
            ("shm_size_mib", shm_size_mib),
            ("run_size_mib", run_size_mib),
        ):
            _check_int(size_name, size, 1, _MAX_TMPFS_MIB)
        _check_int("metrics_sample_interval_ms", metrics_sample_interval_ms, 0, 2**63 - 1)
        _check_abs_guest_path("shell", shell)
        _check_abs_guest_path("workdir", workdir)
        if not isinstance(disable_metrics_sample, bool):
            raise InvalidConfig(
                f"disable_metrics_sample must be True or False, got {disable_metrics_sample!r}"
            )
        root = default_home() if home is None else _absolute(home)
        values = {
            "home": root,
            "sandboxes_dir": _optional_dir(sandboxes_dir, root / "sandboxes"),
            "images_dir": _optional_dir(images_dir, root / "images"),
            "volumes_dir": _optional_dir(volumes_dir, root / "volumes"),
            "logs_dir": _optional_dir(logs_dir, root / "logs"),
            "db_path": _optional_dir(db_path, root / DB_FILENAME),
            "default_cpus": default_cpus,
            "default_memory_mib": default_memory_mib,
            "default_pids_limit": default_pids_limit,
            "default_tmp_size_mib": default_tmp_size_mib,
            "shm_size_mib": shm_size_mib,
            "run_size_mib": run_size_mib,
            "shell": shell,
            "workdir": workdir,
            "metrics_sample_interval_ms": metrics_sample_interval_ms,
            "disable_metrics_sample": disable_metrics_sample,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_env(cls, **overrides: Any) -> LocalBackend:
        """The ambient local backend: home from ``$CORRAL_HOME`` (else ``~/.corral``).

        Keyword ``overrides`` are passed to the constructor (and win over the env).
        """
        return cls(**overrides)

    @property
    def kind(self) -> BackendKind:
        return BackendKind.LOCAL

    @property
    def metrics_enabled(self) -> bool:
        """Whether sandboxes sample metrics by default."""
        return not self.disable_metrics_sample and self.metrics_sample_interval_ms > 0

    def ensure_dirs(self) -> None:
        """Create home and the state directories (mode 0700) if missing. Cheap, sync."""
        for path in (
            self.home,
            self.sandboxes_dir,
            self.images_dir,
            self.volumes_dir,
            self.logs_dir,
            self.db_path.parent,
        ):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)


API_URL_ENV = "MSB_API_URL"
API_KEY_ENV = "MSB_API_KEY"


@dataclass(frozen=True, repr=False)
class CloudBackend:
    """A remote control plane reached over HTTP(S).

    ``url`` must be ``http://`` or ``https://`` with a host; surrounding spaces and
    trailing slashes are removed. ``api_key`` must be non-empty and contain no
    whitespace or control characters (it becomes a ``Bearer`` header). ``profile``
    records which SDK profile produced this backend, if any (not compared).
    """

    url: str
    api_key: str
    profile: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", _normalise_url(self.url))
        object.__setattr__(self, "api_key", _normalise_key(self.api_key))

    def __repr__(self) -> str:
        extra = f", profile={self.profile!r}" if self.profile is not None else ""
        return f"CloudBackend(url={self.url!r}, api_key=<redacted>{extra})"

    @property
    def kind(self) -> BackendKind:
        return BackendKind.CLOUD

    @classmethod
    def from_env(cls) -> CloudBackend:
        """Build from ``MSB_API_URL`` and ``MSB_API_KEY`` (both required)."""
        url = os.environ.get(API_URL_ENV, "").strip()
        key = os.environ.get(API_KEY_ENV, "").strip()
        missing = [name for name, value in ((API_URL_ENV, url), (API_KEY_ENV, key)) if not value]
        if missing:
            raise InvalidConfig(
                f"cloud backend from the environment needs {' and '.join(missing)}: "
                f"set {API_URL_ENV}=https://<control-plane> and {API_KEY_ENV}=<api key>"
            )
        try:
            return cls(url, key)
        except InvalidConfig as exc:
            raise InvalidConfig(f"{API_URL_ENV}/{API_KEY_ENV}: {exc.message}") from None

    @classmethod
    def from_profile(cls, name: str) -> CloudBackend:
        """Build from the named cloud profile of the SDK config file."""
        from corral.backend.profile import cloud_backend_from_profile

        return cloud_backend_from_profile(name)


def _normalise_url(url: str) -> str:
    if not isinstance(url, str):
        raise InvalidConfig(f"cloud URL must be a string, got {type(url).__name__}")
    text = url.strip()
    example = "for example https://api.example.com"
    if not text:
        raise InvalidConfig(f"cloud URL is empty: give the control plane's URL, {example}")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError as exc:
        raise InvalidConfig(f"cloud URL {text!r} is malformed ({exc}): {example}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidConfig(f"cloud URL {text!r} must start with http:// or https://: {example}")
    if not parts.hostname:
        raise InvalidConfig(f"cloud URL {text!r} has no host: {example}")
    if parts.query or parts.fragment:
        raise InvalidConfig(
            f"cloud URL {text!r} must not carry a query or fragment: give the base URL only"
        )
    return text.rstrip("/")


def _normalise_key(key: str) -> str:
    if not isinstance(key, str):
        raise InvalidConfig(f"cloud API key must be a string, got {type(key).__name__}")
    text = key.strip()
    if not text:
        raise InvalidConfig("cloud API key is empty: supply the control plane's API key")
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise InvalidConfig(
            "cloud API key contains whitespace or control characters: "
            "check it was copied whole and on one line"
        )
    return text


Backend: TypeAlias = LocalBackend | CloudBackend
"""Any backend object ``set_default_backend`` / ``open_supervisor`` accept."""

"""The ambient default backend.

:func:`default_backend` answers, in order:

1. the innermost :func:`backend_scope` active in the current context -- a
   :class:`contextvars.ContextVar`, so it follows trio tasks: a task started
   (``nursery.start_soon``) from inside the scope sees the scoped backend, a task
   started before the scope was entered does not;
2. the process-wide default installed by :func:`set_default_backend`;
3. otherwise the resolution ladder (``profile.resolve_default_backend``), run once on
   first use and cached. If it fails, the error is logged and the local backend is
   used, so ``default_backend()`` itself never fails. Call
   :func:`reset_default_backend` to forget the cached value.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import overload

from corral.backend.kinds import Backend, BackendKind, CloudBackend, LocalBackend
from corral.backend.profile import resolve_default_backend
from corral.errors import CorralError, InvalidConfig

__all__ = [
    "backend_scope",
    "build_backend",
    "default_backend",
    "default_backend_kind",
    "reset_default_backend",
    "set_default_backend",
    "swap_default_backend",
]

logger = logging.getLogger("corral.backend")

_lock = threading.Lock()
_global: Backend | None = None
_scoped: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "corral_backend_scope", default=None
)


def build_backend(
    kind: BackendKind | str,
    *,
    url: str | None = None,
    api_key: str | None = None,
    profile: str | None = None,
) -> Backend:
    """A backend from a kind plus options, as ``set_default_backend(kind, ...)`` takes.

    ``local`` takes no options. ``cloud`` takes either ``profile`` (a cloud profile of
    the config file) or ``url`` and ``api_key``.
    """
    parsed = BackendKind.parse(kind)
    if parsed is BackendKind.LOCAL:
        given = [n for n, v in (("url", url), ("api_key", api_key), ("profile", profile)) if v]
        if given:
            raise InvalidConfig(
                f"the local backend takes no {', '.join(given)}: "
                "drop them, or ask for BackendKind.CLOUD"
            )
        return LocalBackend.from_env()
    if profile is not None:
        if url is not None or api_key is not None:
            raise InvalidConfig(
                "give a cloud backend either profile=... or url=... with api_key=..., not both"
            )
        return CloudBackend.from_profile(profile)
    if url is None or api_key is None:
        missing = " and ".join(n for n, v in (("url", url), ("api_key", api_key)) if v is None)
        raise InvalidConfig(
            f"a cloud backend needs {missing}: pass url=... and api_key=..., or profile=..."
        )
    return CloudBackend(url, api_key)


def _coerce(
    target: Backend | BackendKind | str,
    url: str | None,
    api_key: str | None,
    profile: str | None,
) -> Backend:
    if isinstance(target, LocalBackend | CloudBackend):
        if url is not None or api_key is not None or profile is not None:
            raise TypeError("url/api_key/profile only go with a backend kind, not an object")
        return target
    if isinstance(target, str):  # BackendKind is a str too
        return build_backend(target, url=url, api_key=api_key, profile=profile)
    raise TypeError(
        f"expected a LocalBackend, CloudBackend or BackendKind, got {type(target).__name__}"
    )


@overload
def set_default_backend(backend: Backend, /) -> None: ...
@overload
def set_default_backend(
    kind: BackendKind | str,
    /,
    *,
    url: str | None = None,
    api_key: str | None = None,
    profile: str | None = None,
) -> None: ...
def set_default_backend(
    target: Backend | BackendKind | str,
    /,
    *,
    url: str | None = None,
    api_key: str | None = None,
    profile: str | None = None,
) -> None:
    """Install the process-wide default (replacing any previous one).

    ``set_default_backend(CloudBackend(url, key))`` or, like the seed's Python SDK,
    ``set_default_backend(BackendKind.CLOUD, url=..., api_key=...)`` /
    ``set_default_backend("cloud", profile="prod")`` / ``set_default_backend("local")``.
    Active :func:`backend_scope` blocks still win inside their scope.
    """
    global _global
    backend = _coerce(target, url, api_key, profile)
    with _lock:
        _global = backend


def swap_default_backend(backend: Backend) -> Backend:
    """Install ``backend`` process-wide and return the previous default (resolving it
    first if nothing was installed yet), so a caller can restore it later."""
    global _global
    new = _coerce(backend, None, None, None)
    with _lock:
        previous = _global if _global is not None else _resolve()
        _global = new
    return previous


def reset_default_backend() -> None:
    """Forget the process-wide default; the next use runs the ladder again."""
    global _global
    with _lock:
        _global = None


def _resolve() -> Backend:
    try:
        return resolve_default_backend()
    except CorralError as exc:
        logger.warning("default backend resolution failed; falling back to local: %s", exc)
        return LocalBackend.from_env()


def _process_default() -> Backend:
    global _global
    with _lock:
        if _global is None:
            _global = _resolve()
        return _global


def default_backend() -> Backend:
    """The backend in effect here: innermost scope, else the process-wide default."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    return _process_default()


def default_backend_kind() -> BackendKind:
    """``default_backend().kind``."""
    return default_backend().kind


@overload
def backend_scope(backend: Backend, /) -> AbstractContextManager[Backend]: ...
@overload
def backend_scope(
    kind: BackendKind | str,
    /,
    *,
    url: str | None = None,
    api_key: str | None = None,
    profile: str | None = None,
) -> AbstractContextManager[Backend]: ...
def backend_scope(
    target: Backend | BackendKind | str,
    /,
    *,
    url: str | None = None,
    api_key: str | None = None,
    profile: str | None = None,
) -> AbstractContextManager[Backend]:
    """``with backend_scope(b):`` -- ``default_backend()`` is ``b`` in this context and
    in tasks started from it; the previous value is restored on exit (scopes nest).
    Accepts the same arguments as :func:`set_default_backend`."""
    return _scope(_coerce(target, url, api_key, profile))


@contextmanager
def _scope(backend: Backend) -> Iterator[Backend]:
    token = _scoped.set(backend)
    try:
        yield backend
    finally:
        _scoped.reset(token)

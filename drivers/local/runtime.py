"""The agent runtime view: what a sandbox needs to run ``corral.agentd`` with the host's Python.

The agent must not import the whole of corral (the root package pulls in trio, httpx,
...), so the sandbox gets its own tiny package tree at ``/.corral/pkg``::

    /.corral/pkg/corral/__init__.py     empty (created by bwrap from an empty memfd)
    /.corral/pkg/corral/errors.py       read-only bind of the repo's errors.py
    /.corral/pkg/corral/protocol/       read-only bind of the repo's protocol/
    /.corral/pkg/corral/agentd/         read-only bind of the repo's agentd/
    /.corral/pkg/msgspec/               read-only bind of the installed msgspec package

and the interpreter: the host's ``sys.base_prefix`` (and ``base_exec_prefix``) bound
read-only at the same absolute path unless it is under ``/usr``, which the ``host`` image
already shows. The command runs that interpreter with ``-I -S -B`` (isolated, no
``site``, no bytecode writes) and puts ``/.corral/pkg`` first on ``sys.path``; the
repo's ``__pycache__`` files come along read-only, so imports stay fast.

The view is plain data (host path -> sandbox path); ``bwrap.plan_sandbox`` turns it into
bwrap arguments (and stages paths the sandbox uid cannot reach, such as a pyenv under
``/root``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import corral
from corral.errors import Runtime

__all__ = [
    "AGENT_BOOT",
    "PKG_DIR",
    "RuntimeView",
    "agent_runtime",
    "interpreter",
]

PKG_DIR = "/.corral/pkg"
AGENT_BOOT = (
    f"import sys; sys.path.insert(0, {PKG_DIR!r}); from corral.agentd.main import main; main()"
)
_HOST_IMAGE_ROOTS = ("/usr",)


@dataclass(frozen=True, kw_only=True)
class RuntimeView:
    """Read-only binds (host source, sandbox dest), empty files to create, and the command."""

    ro_binds: tuple[tuple[str, str], ...]
    empty_files: tuple[str, ...]
    argv: tuple[str, ...]


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def interpreter() -> tuple[str, tuple[str, ...]]:
    """The host interpreter's real path and the prefixes to bind so it runs in a sandbox."""
    exe = os.path.realpath(sys.executable)
    prefixes: list[str] = []
    for prefix in (sys.base_prefix, sys.base_exec_prefix):
        real = os.path.realpath(prefix)
        if not _under(real, _HOST_IMAGE_ROOTS) and real not in prefixes:
            prefixes.append(real)
    if not _under(exe, [*_HOST_IMAGE_ROOTS, *prefixes]):
        raise Runtime(
            f"the interpreter {exe} is neither under /usr nor under its prefix "
            f"{sys.base_prefix}; cannot show it inside a sandbox"
        )
    return exe, tuple(prefixes)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise Runtime(f"package {name!r} is not installed; the sandbox agent needs it")
    return Path(spec.origin).parent


def agent_runtime(
    *,
    args: Sequence[str] = (),
    repo: Path | None = None,
    boot: str = AGENT_BOOT,
) -> RuntimeView:
    """The view that lets ``python -c BOOT ARGS...`` run ``corral.agentd`` in a sandbox.

    ``repo`` is the corral package directory (default: the running one); ``args`` are
    appended to the command (the agent sees them in ``sys.argv[1:]``).
    """
    root = repo if repo is not None else Path(corral.__file__).parent
    pkg = f"{PKG_DIR}/corral"
    parts = [
        (root / "errors.py", f"{pkg}/errors.py"),
        (root / "protocol", f"{pkg}/protocol"),
        (root / "agentd", f"{pkg}/agentd"),
        (_package_dir("msgspec"), f"{PKG_DIR}/msgspec"),
    ]
    missing = [str(src) for src, _ in parts if not src.exists()]
    if missing:
        raise Runtime(f"agent runtime files missing: {', '.join(missing)}")
    exe, prefixes = interpreter()
    binds = [(os.path.realpath(src), dest) for src, dest in parts]
    binds += [(prefix, prefix) for prefix in prefixes]
    return RuntimeView(
        ro_binds=tuple(binds),
        empty_files=(f"{pkg}/__init__.py",),
        argv=(exe, "-I", "-S", "-B", "-c", boot, *args),
    )

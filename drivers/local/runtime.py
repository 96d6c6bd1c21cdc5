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

**OCI images** (:func:`image_agent_runtime`) have their own ``/usr`` and maybe no Python
or another libc, so the host's files are shown under ``/.corral/host`` instead: the
host's ``/usr`` (and ``/lib*`` where they are real directories) at
``/.corral/host/usr`` ..., the interpreter's prefix (when not under ``/usr``) at
``/.corral/host/prefix``. The agent is started through the host's dynamic loader with
an explicit ``--library-path`` (so the image's libraries and its ``ld.so.cache`` are
never mixed in, and nothing leaks into the environment of the commands it runs)::

    /.corral/host/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path ... \
        /.corral/host/prefix/bin/python3.11 -I -S -B -c BOOT

Python finds its standard library from its own path (``argv[0]`` as the loader passes
it), so no ``PYTHONHOME`` is needed (``-I`` would ignore it anyway).
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import corral
from corral.errors import Runtime

__all__ = [
    "AGENT_BOOT",
    "HOST_DIR",
    "PKG_DIR",
    "RuntimeView",
    "agent_runtime",
    "elf_interpreter",
    "image_agent_runtime",
    "interpreter",
]

PKG_DIR = "/.corral/pkg"
HOST_DIR = "/.corral/host"
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


def elf_interpreter(path: str) -> str | None:
    """The dynamic loader an ELF executable asks for (its ``PT_INTERP``), if any."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 52 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
            return None
        order = "<" if head[5] == 1 else ">"
        if head[4] == 2:  # 64-bit: e_phoff at 32, e_phentsize/e_phnum at 54
            (phoff,) = struct.unpack_from(f"{order}Q", head, 32)
            size, count = struct.unpack_from(f"{order}HH", head, 54)
            fields = f"{order}I4xQ16xQ"  # p_type, p_offset, p_filesz
        else:  # 32-bit: e_phoff at 28, e_phentsize/e_phnum at 42
            (phoff,) = struct.unpack_from(f"{order}I", head, 28)
            size, count = struct.unpack_from(f"{order}HH", head, 42)
            fields = f"{order}II8xI"
        f.seek(phoff)
        table = f.read(size * count)
        for i in range(count):
            kind, offset, length = struct.unpack_from(fields, table, i * size)
            if kind == 3:  # PT_INTERP
                f.seek(offset)
                return f.read(length).rstrip(b"\0").decode()
    return None


def image_agent_runtime(
    *,
    args: Sequence[str] = (),
    repo: Path | None = None,
    boot: str = AGENT_BOOT,
    host_dir: str = HOST_DIR,
) -> RuntimeView:
    """Like :func:`agent_runtime`, for an image root: the host's Python under ``host_dir``
    started through the host's dynamic loader (see the module docstring)."""
    base = agent_runtime(args=args, repo=repo, boot=boot)
    exe, prefixes = interpreter()
    roots: list[tuple[str, str]] = [("/usr", f"{host_dir}/usr")]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{name}"
        if os.path.isdir(path) and not os.path.islink(path):
            roots.append((path, f"{host_dir}{path}"))
    for i, prefix in enumerate(prefixes):
        roots.append((prefix, f"{host_dir}/prefix{i or ''}"))

    def inside(path: str) -> str:
        real = os.path.realpath(path)
        for src, dest in roots:
            if _under(real, [src]):
                return dest + real[len(src) :]
        raise Runtime(
            f"{real} is not under a directory shown to images ({', '.join(s for s, _ in roots)})"
        )

    loader = elf_interpreter(exe)
    if loader is None:
        raise Runtime(f"{exe} has no ELF interpreter; cannot start it inside an image")
    multiarch = str(sysconfig.get_config_var("MULTIARCH") or "")
    candidates = [os.path.join(p, "lib") for p in prefixes]
    for top in ("/usr/local/lib", "/lib", "/usr/lib", "/lib64", "/usr/lib64"):
        if multiarch:
            candidates.append(f"{top}/{multiarch}")
        candidates.append(top)
    libdirs: list[str] = []
    for directory in candidates:
        if os.path.isdir(directory):
            mapped = inside(directory)
            if mapped not in libdirs:
                libdirs.append(mapped)
    tail = base.argv[1:]  # -I -S -B -c BOOT ARGS...
    return RuntimeView(
        ro_binds=(
            *[(src, dest) for src, dest in base.ro_binds if dest.startswith(PKG_DIR)],
            *roots,
        ),
        empty_files=base.empty_files,
        argv=(inside(loader), "--library-path", ":".join(libdirs), inside(exe), *tail),
    )


_compiled: set[Path] = set()


def precompile_agent(repo: Path | None = None) -> None:
    """Write the agent's bytecode next to its sources, once per process.

    The agent runs with ``-B`` and imports from read-only binds, so without ``.pyc`` files
    every sandbox start compiles ``corral.agentd``/``protocol``/``errors`` again (several
    ms). Best effort: a read-only install simply keeps compiling at start.
    """
    import compileall

    root = repo if repo is not None else Path(corral.__file__).parent
    if root in _compiled:
        return
    _compiled.add(root)
    for sub in ("agentd", "protocol"):
        compileall.compile_dir(root / sub, quiet=2, workers=1)
    compileall.compile_file(root / "errors.py", quiet=2)

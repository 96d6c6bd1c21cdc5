"""Copying files and trees between the host and a sandbox, without trusting the sandbox.

``sb.fs.copy_to_host(path, host_path)`` writes only at ``host_path`` and below it,
whatever the sandbox answers. A sandbox controls every name, kind and symlink target it
reports (its agent runs as the sandbox's user), so:

- each listed name must be one plain path component (no ``/``, ``.``, ``..``, NUL,
  nothing empty), else :class:`~corral.errors.FsPathEscape`;
- the host tree is built through directory file descriptors (``openat`` style) with
  ``O_NOFOLLOW`` on every component and ``O_EXCL`` on every file: no host symlink is
  ever followed below ``host_path``, nothing is written through one, no existing host
  file is opened for writing;
- a sandbox symlink is recreated as a symlink only when its target provably stays in the
  copy: a relative target whose ``..`` components all come first and climb no higher
  than the copy's root (``../lib/x`` from a sub-directory, ``b/c``, ``.``). Any other
  target (absolute, climbing out, or ``..`` after a name, which could climb out through
  another symlink) refuses the copy with ``FsPathEscape``. The rule is decided here;
  it is stricter than "resolves inside": it needs no look at the (racing) tree.
- file modes keep their ``rwx`` bits; setuid, setgid and sticky bits are dropped (a
  host copy owned by the copier must not become a setuid program); owners are the
  copier's. Directories are made 0o700 while filled and get their mode afterwards.
- a file is copied up to the size the listing reported (a file swapped for an endless
  one cannot fill the host disk); trees deeper than ``MAX_DEPTH`` are refused.

``host_path`` is what the copy becomes: for a file, the file (replaced atomically by
a rename when it exists; refused when it is a directory or a symlink); for a directory,
a new directory, or an existing empty one (not a symlink). On any error the copy is
removed again (only what this copy created): a failed copy leaves nothing behind.

The other way, ``sb.fs.copy_from_host``, is :mod:`corral.hostfs_in`.
"""

from __future__ import annotations

import errno
import os
import posixpath
import secrets
import shutil
import stat as _stat
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import trio

from .errors import (
    CorralError,
    FsAlreadyExists,
    FsError,
    FsIsADirectory,
    FsPathEscape,
    fs_error_from_oserror,
)
from .protocol import FsEntry

__all__ = [
    "MAX_DEPTH",
    "SandboxFiles",
    "BUSY_DIR_MODE",
    "check_name",
    "copy_to_host",
    "host_error",
    "link_stays_inside",
    "split_host_path",
]

MAX_DEPTH = 256
"""Deepest directory nesting a copy follows (either way)."""
MODE_BITS = 0o777
"""Mode bits a copy to the host keeps (no setuid, setgid or sticky bit)."""
BUSY_DIR_MODE = 0o700

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class SandboxFiles(Protocol):
    """What a copy needs of ``sb.fs`` (:class:`corral.SandboxFs`)."""

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FsEntry: ...

    async def list(self, path: str) -> list[FsEntry]: ...

    def read_stream(
        self, path: str, *, chunk_size: int = ..., offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]: ...

    async def write_stream(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        chunk_size: int = ...,
        mode: int | None = None,
    ) -> int: ...

    async def mkdir(self, path: str, *, parents: bool = False, mode: int | None = None) -> None: ...

    async def remove(self, path: str, *, recursive: bool = False) -> None: ...

    async def symlink(self, target: str, path: str) -> None: ...


# -- rules on what a sandbox reports ---------------------------------------------------------


def check_name(name: object, where: str) -> str:
    """A directory entry name from the sandbox: one plain component, else FsPathEscape."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise FsPathEscape(
            f"the sandbox listed an entry named {name!r} in {where}: not a plain file name",
            path=where,
        )
    return name


def link_stays_inside(target: str, depth: int) -> bool:
    """Does a symlink ``depth`` directories below the copy's root stay in the copy?

    Accepted: relative targets whose ``..`` components all lead (at most ``depth`` of
    them), then plain names. Each symlink so made resolves inside the copy, whatever
    other symlinks its path goes through (they obey the same rule).
    """
    if not target or target.startswith("/") or "\0" in target:
        return False
    ups = 0
    named = False
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if named:
                return False
            ups += 1
        else:
            named = True
    return ups <= depth


def host_error(exc: OSError, path: str) -> FsError:
    if exc.errno == errno.ELOOP:
        return FsPathEscape(f"{path} is a symlink on the host: not written through", path=path)
    return fs_error_from_oserror(exc, path)


def _open_dir(name: str, dir_fd: int, host: str) -> int:
    """Open a directory below ``dir_fd`` without following a symlink in its place."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except NotADirectoryError:  # O_DIRECTORY | O_NOFOLLOW on a symlink: ENOTDIR
        if _stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise FsPathEscape(
                f"{host} is a symlink on the host: not written through", path=host
            ) from None
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def split_host_path(host_path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(absolute path, its parent, its last component) of a host path."""
    full = os.path.abspath(os.fspath(host_path))
    return full, os.path.dirname(full), os.path.basename(full)


def _open_parent(parent: str) -> int:
    """The parent of the destination: the caller named it, so symlinks in it are followed."""
    try:
        return os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise host_error(exc, parent) from None


# -- sandbox → host ------------------------------------------------------------------------


async def copy_to_host(fs: SandboxFiles, path: str, host_path: str | os.PathLike[str]) -> None:
    """Copy a sandbox file or directory tree to ``host_path`` (see the module docstring)."""
    entry = await fs.stat(path)
    if entry.kind == "file":
        await _file_to_host(fs, path, entry, host_path)
    elif entry.kind == "dir":
        await _tree_to_host(fs, path, entry, host_path)
    else:
        raise FsError(f"{path} is not a file or a directory ({entry.kind})", path=path)


async def _stream_into(fs: SandboxFiles, path: str, size: int, fd: int) -> None:
    """The sandbox file's first ``size`` bytes into ``fd``: the next chunk is read while
    this one is written (at most three chunks in memory)."""
    send, recv = trio.open_memory_channel[bytes](1)

    async def fetch() -> None:
        async with send:
            async for chunk in fs.read_stream(path, length=size):
                await send.send(chunk)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            async with recv:
                async for chunk in recv:
                    await trio.to_thread.run_sync(_write_all, fd, chunk)
    except BaseExceptionGroup as group:
        raise _sole(group) from None


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a two-task nursery failed with (the other task was cancelled)."""
    errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if len(errors) == 1 and not isinstance(errors[0], BaseExceptionGroup):
        return errors[0]
    return group


async def _new_file(fs: SandboxFiles, path: str, entry: FsEntry, name: str, dir_fd: int) -> None:
    """Create ``name`` (O_EXCL, O_NOFOLLOW) in ``dir_fd`` with the sandbox file's bytes."""
    fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        await _stream_into(fs, path, entry.size, fd)
        os.fchmod(fd, entry.mode & MODE_BITS)
    finally:
        os.close(fd)


async def _file_to_host(
    fs: SandboxFiles, path: str, entry: FsEntry, host_path: str | os.PathLike[str]
) -> None:
    full, parent, name = split_host_path(host_path)
    if not name:
        raise FsIsADirectory(f"{full} is a directory", path=full)
    dir_fd = _open_parent(parent)
    tmp = f".{name}.corral-{secrets.token_hex(4)}"
    made_tmp = False
    try:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if _stat.S_ISLNK(st.st_mode):
                raise FsPathEscape(f"{full} is a symlink: not written through", path=full)
            if _stat.S_ISDIR(st.st_mode):
                raise FsIsADirectory(f"{full} is a directory", path=full)
        made_tmp = True
        await _new_file(fs, path, entry, tmp, dir_fd)
        # rename replaces the directory entry itself: nothing is written through it.
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        made_tmp = False
    except OSError as exc:
        if isinstance(exc, CorralError):
            raise
        raise host_error(exc, full) from None
    finally:
        if made_tmp:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
        os.close(dir_fd)


@dataclass
class _Enter:
    """A sandbox directory still to create on the host (in ``parent_fd``) and fill."""

    path: str
    host: str
    parent_fd: int
    name: str
    depth: int
    mode: int


@dataclass
class _Leave:
    """A host directory whose entries are all copied: set its mode, close it."""

    fd: int
    mode: int


class _TreeCopy:
    """One sandbox tree copied into the open host directory ``root_fd`` (at ``root``)."""

    def __init__(self, fs: SandboxFiles, root: str) -> None:
        self.fs = fs
        self.root = root
        self.stack: list[_Enter | _Leave] = []
        self.open_fds: list[int] = []

    async def run(self, path: str, root_fd: int, root_mode: int) -> None:
        try:
            await self.fill(path, self.root, root_fd, 0)
            while self.stack:
                item = self.stack.pop()
                if isinstance(item, _Leave):
                    os.fchmod(item.fd, item.mode & MODE_BITS)
                    self.open_fds.remove(item.fd)
                    os.close(item.fd)
                else:
                    await self.enter(item)
            os.fchmod(root_fd, root_mode & MODE_BITS)
        finally:
            for fd in self.open_fds:
                os.close(fd)

    async def enter(self, item: _Enter) -> None:
        if item.depth > MAX_DEPTH:
            raise FsError(f"{item.path}: deeper than {MAX_DEPTH} directories", path=item.path)
        try:
            os.mkdir(item.name, BUSY_DIR_MODE, dir_fd=item.parent_fd)
            fd = _open_dir(item.name, item.parent_fd, item.host)
        except OSError as exc:
            raise host_error(exc, item.host) from None
        self.open_fds.append(fd)
        self.stack.append(_Leave(fd=fd, mode=item.mode))
        await self.fill(item.path, item.host, fd, item.depth)

    async def fill(self, path: str, host: str, dir_fd: int, depth: int) -> None:
        """Copy one directory's files and symlinks; queue its sub-directories."""
        for entry in await self.fs.list(path):
            name = check_name(entry.name, path)
            child = posixpath.join(path, name)
            child_host = os.path.join(host, name)
            try:
                if entry.kind == "dir":
                    self.stack.append(
                        _Enter(child, child_host, dir_fd, name, depth + 1, entry.mode)
                    )
                elif entry.kind == "file":
                    await _new_file(self.fs, child, entry, name, dir_fd)
                elif entry.kind == "symlink":
                    self.link(child, entry.target, name, dir_fd, depth)
                else:
                    raise FsError(
                        f"{child} is not a file, directory or symlink ({entry.kind}): not copied",
                        path=child,
                    )
            except OSError as exc:
                if isinstance(exc, CorralError):
                    raise
                raise host_error(exc, child_host) from None

    def link(self, child: str, target: str | None, name: str, dir_fd: int, depth: int) -> None:
        if target is None or not link_stays_inside(target, depth):
            raise FsPathEscape(
                f"{child} is a symlink to {target!r}, which leads out of the copy at "
                f"{self.root}: refused",
                path=child,
            )
        os.symlink(target, name, dir_fd=dir_fd)


async def _tree_to_host(
    fs: SandboxFiles, path: str, entry: FsEntry, host_path: str | os.PathLike[str]
) -> None:
    full, parent, name = split_host_path(host_path)
    if not name:
        raise FsAlreadyExists(f"{full} exists and is not empty", path=full)
    parent_fd = _open_parent(parent)
    root_fd: int | None = None
    created_root = filling = False
    try:
        try:
            os.mkdir(name, BUSY_DIR_MODE, dir_fd=parent_fd)
            created_root = True
        except FileExistsError:
            pass
        root_fd = _open_dir(name, parent_fd, full)
        if not created_root and os.listdir(root_fd):
            raise FsAlreadyExists(f"{full} exists and is not empty", path=full)
        filling = True  # from here on, everything in root_fd is this copy's
        await _TreeCopy(fs, full).run(path, root_fd, entry.mode)
    except BaseException as exc:
        if created_root or filling:
            _undo(parent_fd, name, root_fd, created_root)
        if isinstance(exc, OSError) and not isinstance(exc, CorralError):
            raise host_error(exc, full) from None
        raise
    finally:
        _close(root_fd)
        os.close(parent_fd)


def _undo(parent_fd: int, name: str, root_fd: int | None, created_root: bool) -> None:
    """Remove what a failed copy made (shutil.rmtree's fd-based walk follows no symlink)."""
    try:
        if created_root:
            shutil.rmtree(name, dir_fd=parent_fd, ignore_errors=True)
        elif root_fd is not None:
            for child in os.listdir(root_fd):
                st = os.stat(child, dir_fd=root_fd, follow_symlinks=False)
                if _stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(child, dir_fd=root_fd, ignore_errors=True)
                else:
                    os.unlink(child, dir_fd=root_fd)
    except OSError:
        pass

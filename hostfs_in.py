"""Copying a host file or directory tree into a sandbox: ``sb.fs.copy_from_host``.

``host_path`` itself may be a symlink (the caller named it); inside a tree, symlinks are
recreated as symlinks (never followed), and device files, FIFOs and sockets refuse the
copy with :class:`~corral.errors.FsError` before anything is written (the tree is
scanned first). Names that are not UTF-8 cannot cross the protocol and refuse it too.
Modes are kept (not owners); directories are filled while 0o700 and get their mode
last, deepest first, so read-only directories copy too. The sandbox path must not
exist, or be an empty directory for a tree; a failed tree copy is removed again.
"""

from __future__ import annotations

import os
import posixpath
import stat as _stat
from dataclasses import dataclass

import trio

from .errors import CorralError, FsAlreadyExists, FsError, FsIsADirectory
from .hostfs import (
    BUSY_DIR_MODE,
    MAX_DEPTH,
    SandboxFiles,
    check_name,
    host_error,
    split_host_path,
)
from .protocol import FS_CHUNK

__all__ = ["HostItem", "copy_from_host", "scan_host_tree"]


@dataclass(frozen=True)
class HostItem:
    """One entry of a host tree to copy: its path relative to the root, in walk order."""

    rel: str
    kind: str
    """``dir``, ``file`` or ``symlink``."""
    mode: int
    target: str | None = None


def _kind_name(mode: int) -> str:
    for test, name in (
        (_stat.S_ISFIFO, "a FIFO"),
        (_stat.S_ISCHR, "a character device"),
        (_stat.S_ISBLK, "a block device"),
        (_stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def _plain_text(name: str, where: str) -> str:
    try:
        name.encode()
    except UnicodeEncodeError:
        raise FsError(f"{where}: host file name {name!r} is not UTF-8", path=where) from None
    return name


def scan_host_tree(root: str) -> list[HostItem]:
    """Every entry under ``root`` (pre-order, names sorted), refusing special files.

    Symlinks are listed, never followed. Blocking: run it in a thread.
    """
    items: list[HostItem] = []
    todo: list[tuple[str, int]] = [("", 0)]
    while todo:
        rel, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise FsError(f"{root}: deeper than {MAX_DEPTH} directories", path=root)
        base = os.path.join(root, rel) if rel else root
        subdirs: list[str] = []
        for name in sorted(os.listdir(base)):
            child_rel = f"{rel}/{name}" if rel else name
            host = os.path.join(root, child_rel)
            _plain_text(name, host)
            st = os.lstat(host)
            mode = _stat.S_IMODE(st.st_mode)
            if _stat.S_ISDIR(st.st_mode):
                items.append(HostItem(child_rel, "dir", mode))
                subdirs.append(child_rel)
            elif _stat.S_ISREG(st.st_mode):
                items.append(HostItem(child_rel, "file", mode))
            elif _stat.S_ISLNK(st.st_mode):
                target = _plain_text(os.readlink(host), host)
                items.append(HostItem(child_rel, "symlink", mode, target))
            else:
                raise FsError(
                    f"{host} is {_kind_name(st.st_mode)}: only regular files, directories "
                    "and symlinks are copied",
                    path=host,
                )
        todo.extend((sub, depth + 1) for sub in reversed(subdirs))
    return items


def _open_host_file(host: str, *, nofollow: bool) -> tuple[int, int]:
    """Open a regular host file for reading (no FIFO can block us): (fd, mode)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    fd = os.open(host, flags)
    st = os.fstat(fd)
    if not _stat.S_ISREG(st.st_mode):
        os.close(fd)
        if _stat.S_ISDIR(st.st_mode):
            raise FsIsADirectory(f"{host} is a directory", path=host)
        raise FsError(
            f"{host} is {_kind_name(st.st_mode)}: only regular files, directories and "
            "symlinks are copied",
            path=host,
        )
    return fd, _stat.S_IMODE(st.st_mode)


class _HostChunks:
    """A host file's bytes, ``FS_CHUNK`` at a time, read in a thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __aiter__(self) -> _HostChunks:
        return self

    async def __anext__(self) -> bytes:
        data = await trio.to_thread.run_sync(os.read, self.fd, FS_CHUNK)
        if not data:
            raise StopAsyncIteration
        return data


async def _file_from_host(fs: SandboxFiles, host: str, path: str, *, nofollow: bool) -> None:
    """``nofollow`` inside a tree: a file scanned as regular may not turn into a symlink."""
    try:
        fd, mode = _open_host_file(host, nofollow=nofollow)
    except OSError as exc:
        if isinstance(exc, CorralError):
            raise
        raise host_error(exc, host) from None
    try:
        await fs.write_stream(path, _HostChunks(fd), mode=mode)
    finally:
        os.close(fd)


async def copy_from_host(fs: SandboxFiles, host_path: str | os.PathLike[str], path: str) -> None:
    """Copy a host file or directory tree into the sandbox at ``path``."""
    host = split_host_path(host_path)[0]
    try:
        st = os.stat(host)
    except OSError as exc:
        raise host_error(exc, host) from None
    if _stat.S_ISDIR(st.st_mode):
        await _tree_from_host(fs, host, path, _stat.S_IMODE(st.st_mode))
    else:
        await _file_from_host(fs, host, path, nofollow=False)


async def _tree_from_host(fs: SandboxFiles, host: str, path: str, root_mode: int) -> None:
    try:
        items = await trio.to_thread.run_sync(scan_host_tree, host)
    except OSError as exc:
        if isinstance(exc, CorralError):
            raise
        raise host_error(exc, host) from None
    created = False
    try:
        await fs.mkdir(path)
        created = True
    except FsAlreadyExists:
        if (await fs.stat(path)).kind != "dir" or await fs.list(path):
            raise FsAlreadyExists(
                f"{path} exists in the sandbox and is not an empty directory", path=path
            ) from None
    try:
        await fs.mkdir(path, parents=True, mode=BUSY_DIR_MODE)
        for item in items:
            dst = posixpath.join(path, item.rel)
            src = os.path.join(host, item.rel)
            if item.kind == "dir":
                await fs.mkdir(dst, mode=BUSY_DIR_MODE)
            elif item.kind == "symlink":
                assert item.target is not None
                await fs.symlink(item.target, dst)
            else:
                await _file_from_host(fs, src, dst, nofollow=True)
        # Directory modes last, deepest first (a 0o555 directory is filled by then).
        for item in reversed(items):
            if item.kind == "dir":
                await fs.mkdir(posixpath.join(path, item.rel), parents=True, mode=item.mode)
        await fs.mkdir(path, parents=True, mode=root_mode)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            try:
                if created:
                    await fs.remove(path, recursive=True)
                else:
                    for entry in await fs.list(path):
                        name = check_name(entry.name, path)
                        await fs.remove(posixpath.join(path, name), recursive=True)
            except CorralError:
                pass
        raise

"""Flatten unpacked layers into one root filesystem, and tree helpers.

:func:`flatten` applies the layers bottom-up into a new directory, the way overlayfs
would show them stacked: a layer's ``.wh..wh..opq`` empties the directory (of what lower
layers put there), ``.wh.NAME`` deletes ``NAME``, a directory merges into a directory
and replaces anything else, every other entry replaces what was there. Files are hard
links to the layer's files (no copy; a copy when linking fails), so a rootfs costs
little more than its directories. Nothing on the destination side is ever followed:
a directory is descended into only after it was made a real directory in that very
pass, and modes are applied through ``O_NOFOLLOW`` fds at the end (deepest first). A
directory a layer holds only implicitly (``unpack.IMPLICIT``) keeps the owner and mode
the lower layers gave it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .unpack import IMPLICIT, META, OPAQUE, WHITEOUT, open_dir

__all__ = ["chown_tree", "flatten", "force_rmtree"]


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        force_rmtree(path)
    else:
        os.unlink(path)


def _clear(path: Path) -> None:
    with os.scandir(path) as it:
        names = [entry.name for entry in it]
    for name in names:
        _remove(path / name)


def _place(src: os.DirEntry[str], st: os.stat_result, target: Path) -> None:
    """Put the non-directory ``src`` at ``target``: a hard link, else a copy."""
    try:
        os.link(src.path, target, follow_symlinks=False)
        return
    except OSError:
        pass
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src.path), target)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(target, stat.S_IMODE(st.st_mode))
    else:
        shutil.copy2(src.path, target, follow_symlinks=False)
    if os.geteuid() == 0:
        os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)


def flatten(
    layers: Sequence[str | os.PathLike[str]],
    dest: str | os.PathLike[str],
    *,
    check: Callable[[], None] | None = None,
) -> None:
    """Stack ``layers`` (bottom first) into the new directory ``dest``."""
    root = Path(dest)
    os.mkdir(root, 0o700)
    dirs: dict[tuple[str, ...], os.stat_result] = {}
    for layer in layers:
        if check is not None:
            check()
        dirs[()] = os.stat(layer)
        stack: list[tuple[Path, tuple[str, ...]]] = [(Path(layer), ())]
        while stack:
            src_dir, rel = stack.pop()
            dst_dir = root.joinpath(*rel)
            with os.scandir(src_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
            names = {e.name for e in entries}
            if OPAQUE in names:
                _clear(dst_dir)
            for name in names:
                if name.startswith(WHITEOUT) and not name.startswith(META):
                    _remove(dst_dir / name[len(WHITEOUT) :])
            for entry in entries:
                if entry.name.startswith(WHITEOUT):
                    continue
                st = entry.stat(follow_symlinks=False)
                target = dst_dir / entry.name
                if stat.S_ISDIR(st.st_mode):
                    try:
                        existing = os.lstat(target)
                    except FileNotFoundError:
                        existing = None
                    if existing is not None and not stat.S_ISDIR(existing.st_mode):
                        os.unlink(target)
                        existing = None
                    if existing is None:
                        os.mkdir(target, 0o700)
                    if existing is None or not os.path.lexists(Path(entry.path, IMPLICIT)):
                        dirs[(*rel, entry.name)] = st
                    stack.append((Path(entry.path), (*rel, entry.name)))
                else:
                    _remove(target)
                    _place(entry, st, target)
    _finish_dirs(root, dirs)


def _finish_dirs(root: Path, dirs: dict[tuple[str, ...], os.stat_result]) -> None:
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for parts in sorted(dirs, key=len, reverse=True):
            st = dirs[parts]
            try:
                fd = open_dir(root_fd, parts)
            except Exception:
                continue  # whited out by a later layer
            try:
                if os.geteuid() == 0:
                    os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)


def chown_tree(path: str | os.PathLike[str], uid: int, gid: int) -> None:
    """``lchown -R``: every entry under ``path`` (and ``path``), never following links."""
    os.chown(path, uid, gid, follow_symlinks=False)
    for top, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(top, name), uid, gid, follow_symlinks=False)


def force_rmtree(path: str | os.PathLike[str]) -> None:
    """``rm -rf`` that also gets through directories without write permission."""

    def retry(func: Callable[..., object], failed: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        parent = os.path.dirname(failed)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
        func(failed)

    if not os.path.lexists(path):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=lambda func, p, info: retry(func, p, info[1]))

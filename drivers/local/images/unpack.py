"""Safe extraction of one layer tarball into a directory of its own.

Nothing a layer holds may reach outside the layer's directory, whatever the order of its
members. Every path is walked from an fd of the layer root, one component at a time,
with ``O_NOFOLLOW``: a member whose parent is a symlink (``evil -> /etc`` then
``evil/passwd``) or a regular file is refused, and the file itself is created with
``O_EXCL | O_NOFOLLOW``. Refused with :class:`~corral.errors.UnsafeLayer`: absolute
names, ``..`` components, hard links whose target is absolute, has ``..`` or is not an
earlier member of the same layer, and layers larger than the limits. Symlinks are stored
as they are (an absolute target means the image's root at run time; they are never
followed here). Device nodes are skipped (the sandbox gets its own ``/dev``); FIFOs
are created. Modes keep the permission bits (and the sticky bit of directories), never
setuid/setgid; xattrs (file capabilities included) are dropped.

Whiteouts are kept as empty files with their names (``.wh.NAME``, ``.wh..wh..opq``):
the layer stays a faithful copy of the tarball and :mod:`.rootfs` applies them.

Compression is detected from the first bytes: gzip, bzip2, xz or none; zstd is refused.
"""

from __future__ import annotations

import errno
import lzma
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from corral.errors import ImageError, UnsafeLayer, Unsupported

__all__ = [
    "IMPLICIT",
    "META",
    "OPAQUE",
    "WHITEOUT",
    "LayerStats",
    "UnpackLimits",
    "open_dir",
    "split_name",
    "unpack_layer",
]

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
META = ".wh..wh."
"""Prefix of special (non-whiteout) markers; ``IMPLICIT`` is corral's own."""
IMPLICIT = ".wh..wh.corral.implicit"
"""In a directory the tarball did not list (made for a member inside it): :mod:`.rootfs`
then keeps the lower layers' owner and mode for it, as extracting over them would."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_CHECK_EVERY = 64


@dataclass(frozen=True)
class UnpackLimits:
    max_bytes: int = 32 << 30
    """Total size of the regular files of one layer."""
    max_entries: int = 1_000_000
    max_depth: int = 256


@dataclass
class LayerStats:
    entries: int = 0
    bytes: int = 0
    whiteouts: int = 0
    skipped_devices: int = 0


def split_name(name: str, what: str = "member") -> tuple[str, ...]:
    """A tar name as safe components; UnsafeLayer for absolute names and ``..``."""
    if "\0" in name:
        raise UnsafeLayer(f"{what} name with a NUL byte: {name!r}")
    if name.startswith("/"):
        raise UnsafeLayer(f"{what} with an absolute path: {name!r}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeLayer(f"{what} with a '..' component: {name!r}")
    return parts


def open_dir(
    root_fd: int,
    parts: Sequence[str],
    *,
    create: Callable[[int, tuple[str, ...]], None] | None = None,
) -> int:
    """An fd of the directory ``parts`` under ``root_fd``, never following a symlink.

    Missing components are created (mode 0700) when ``create`` is given, which is then
    called with the new directory's fd and parts; else FileNotFoundError. A component
    that is a symlink or not a directory raises UnsafeLayer.
    """
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise
                os.mkdir(part, 0o700, dir_fd=fd)
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                create(nfd, tuple(parts[: i + 1]))
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeLayer(
                        f"path {'/'.join(parts)!r} goes through {part!r}, "
                        "which is a symlink or not a directory"
                    ) from exc
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _remove(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` whatever it is (a directory with its contents)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _open_tar(f: IO[bytes]) -> tarfile.TarFile:
    head = f.read(6)
    f.seek(0)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise Unsupported("zstd-compressed layers", "for tar, tar+gzip, bzip2 or xz layers")
    if head.startswith(b"\x1f\x8b"):
        mode = "r|gz"
    elif head.startswith(b"BZh"):
        mode = "r|bz2"
    elif head.startswith(b"\xfd7zXZ\x00"):
        mode = "r|xz"
    else:
        mode = "r|"
    return tarfile.open(fileobj=f, mode=mode)  # type: ignore[call-overload,no-any-return]


class _Unpacker:
    def __init__(
        self,
        root_fd: int,
        owner: tuple[int, int] | None,
        limits: UnpackLimits,
        check: Callable[[], None] | None,
    ) -> None:
        self.root_fd = root_fd
        self.owner = owner
        self.limits = limits
        self.check = check
        self.stats = LayerStats()
        self.dirs: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self.implicit: set[tuple[str, ...]] = set()

    def member(self, tf: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        stats = self.stats
        stats.entries += 1
        if stats.entries > self.limits.max_entries:
            raise UnsafeLayer(f"layer has more than {self.limits.max_entries} entries")
        if self.check is not None and stats.entries % _CHECK_EVERY == 0:
            self.check()
        parts = split_name(info.name)
        if len(parts) > self.limits.max_depth:
            raise UnsafeLayer(f"member nested deeper than {self.limits.max_depth}: {info.name!r}")
        if not parts:
            return  # the layer root itself ("./")
        leaf = parts[-1]
        pfd = open_dir(self.root_fd, parts[:-1], create=self._implicit)
        try:
            if leaf.startswith(WHITEOUT):
                if leaf != OPAQUE and leaf[len(WHITEOUT) :] in ("", ".", ".."):
                    raise UnsafeLayer(f"bad whiteout {info.name!r}")
                stats.whiteouts += 1
                _remove(pfd, leaf)
                os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=pfd))
                return
            if info.isdir():
                self._dir(pfd, leaf, parts, info)
            elif info.isreg():
                self._file(tf, pfd, leaf, info)
            elif info.issym():
                if len(info.linkname) > 4095 or "\0" in info.linkname:
                    raise UnsafeLayer(f"bad symlink target for {info.name!r}")
                _remove(pfd, leaf)
                os.symlink(info.linkname, leaf, dir_fd=pfd)
                self._own(pfd, leaf)
                os.utime(leaf, (info.mtime, info.mtime), dir_fd=pfd, follow_symlinks=False)
            elif info.islnk():
                self._hardlink(pfd, leaf, parts, info)
            elif info.isfifo():
                _remove(pfd, leaf)
                os.mkfifo(leaf, info.mode & 0o777, dir_fd=pfd)
                self._own(pfd, leaf)
            else:
                stats.skipped_devices += 1
        finally:
            os.close(pfd)

    def _implicit(self, fd: int, parts: tuple[str, ...]) -> None:
        os.close(os.open(IMPLICIT, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=fd))
        self.implicit.add(parts)

    def _own(self, pfd: int, leaf: str) -> None:
        if self.owner is not None:
            os.chown(leaf, *self.owner, dir_fd=pfd, follow_symlinks=False)

    def _dir(self, pfd: int, leaf: str, parts: tuple[str, ...], info: tarfile.TarInfo) -> None:
        try:
            st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                _remove(pfd, leaf)
                raise FileNotFoundError
        except FileNotFoundError:
            os.mkdir(leaf, 0o700, dir_fd=pfd)
        if parts in self.implicit:  # listed after all: an ordinary directory
            self.implicit.discard(parts)
            fd = open_dir(self.root_fd, parts)
            try:
                os.unlink(IMPLICIT, dir_fd=fd)
            finally:
                os.close(fd)
        self.dirs[parts] = info

    def _file(self, tf: tarfile.TarFile, pfd: int, leaf: str, info: tarfile.TarInfo) -> None:
        self.stats.bytes += info.size
        if self.stats.bytes > self.limits.max_bytes:
            raise UnsafeLayer(f"layer expands to more than {self.limits.max_bytes} bytes")
        _remove(pfd, leaf)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(leaf, flags, 0o600, dir_fd=pfd)
        try:
            src = tf.extractfile(info)
            if src is not None:
                written = 0
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    if self.check is not None and written >= 64 * _CHUNK:
                        self.check()
                        written = 0
            if self.owner is not None:
                os.fchown(fd, *self.owner)
            os.fchmod(fd, info.mode & 0o777)
            os.utime(fd, (info.mtime, info.mtime))
        finally:
            os.close(fd)

    def _hardlink(self, pfd: int, leaf: str, parts: tuple[str, ...], info: tarfile.TarInfo) -> None:
        target = split_name(info.linkname, "hard link target")
        if not target:
            raise UnsafeLayer(f"hard link {info.name!r} to the layer root")
        if target == parts:
            return  # a link to itself: the file is already there
        try:
            tfd = open_dir(self.root_fd, target[:-1])
        except FileNotFoundError:
            tfd = -1
        try:
            st = None if tfd < 0 else _lstat(tfd, target[-1])
            if st is None or stat.S_ISDIR(st.st_mode):
                raise UnsafeLayer(
                    f"hard link {info.name!r} -> {info.linkname!r}: "
                    "the target is not an earlier file of this layer"
                )
            _remove(pfd, leaf)
            os.link(target[-1], leaf, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            if tfd >= 0:
                os.close(tfd)

    def finish(self) -> None:
        """Directory modes, owners and times, deepest first (a 0555 dir gets its files first)."""
        todo: list[tuple[tuple[str, ...], int, float | None]] = [
            (p, i.mode & 0o1777, float(i.mtime)) for p, i in self.dirs.items()
        ]
        todo += [(p, 0o755, None) for p in self.implicit]
        for parts, mode, mtime in sorted(todo, key=lambda t: len(t[0]), reverse=True):
            try:
                fd = open_dir(self.root_fd, parts)
            except (FileNotFoundError, UnsafeLayer):
                continue  # replaced by a later member
            try:
                self._set_dir(fd, mode, mtime)
            finally:
                os.close(fd)
        self._set_dir(self.root_fd, 0o755, None)

    def _set_dir(self, fd: int, mode: int, mtime: float | None) -> None:
        if self.owner is not None:
            os.fchown(fd, *self.owner)
        os.fchmod(fd, mode | stat.S_IRUSR | stat.S_IXUSR)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def unpack_layer(
    blob: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    owner: tuple[int, int] | None = None,
    limits: UnpackLimits | None = None,
    check: Callable[[], None] | None = None,
) -> LayerStats:
    """Extract the layer tarball ``blob`` into the empty directory ``dest``.

    ``owner`` (uid, gid) owns every entry (root only); ``check`` is called now and then
    and may raise to stop (a cancelled pull). On error ``dest`` is left half-filled: the
    caller extracts into a temporary directory and deletes it.
    """
    root_fd = os.open(dest, _DIR_FLAGS)
    try:
        unpacker = _Unpacker(root_fd, owner, limits or UnpackLimits(), check)
        with open(blob, "rb") as f:
            try:
                with _open_tar(f) as tf:
                    for info in tf:
                        unpacker.member(tf, info)
            except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
                raise ImageError(f"corrupt layer: {exc}") from exc
            except OSError as exc:
                if exc.filename is None and exc.errno is None:  # gzip/lzma stream errors
                    raise ImageError(f"corrupt layer: {exc}") from exc
                raise
        unpacker.finish()
        return unpacker.stats
    finally:
        os.close(root_fd)

"""The in-memory file tree behind the fake agent's Fs* requests (see drivers/fake.py).

Errors are raised as OSError with a real errno, which the agent maps to the error tree
(``fs_error_from_oserror``) exactly as a real agent would.
"""

from __future__ import annotations

import errno as _errno
import os
import posixpath

from ..protocol import (
    FsCopy,
    FsEntry,
    FsExists,
    FsExistsReply,
    FsList,
    FsListReply,
    FsMkdir,
    FsRemove,
    FsRename,
    FsStat,
    FsStatReply,
    FsWrite,
    FsWritten,
    Message,
    Ok,
)

__all__ = ["FakeFs"]

FILE_MODE = 0o100644
DIR_MODE = 0o040755


def _oserror(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class FakeFs:
    """Files and directories keyed by absolute, normalised path."""

    def __init__(self, workdir: str = "/workspace") -> None:
        self.workdir = workdir
        self.files: dict[str, bytearray] = {}
        self.dirs: set[str] = {"/", "/tmp"}
        self.mtime = 1_700_000_000.0
        self._mkdirs(workdir)

    def _path(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.workdir, path))

    def _mkdirs(self, path: str) -> None:
        path = self._path(path)
        while path not in self.dirs:
            self.dirs.add(path)
            path = posixpath.dirname(path)

    def _parent_dir(self, path: str) -> None:
        parent = posixpath.dirname(path)
        if parent in self.files:
            raise _oserror(_errno.ENOTDIR, path)
        if parent not in self.dirs:
            raise _oserror(_errno.ENOENT, path)

    def _children(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        found = [p for p in (*self.files, *self.dirs) if p != path and p.startswith(prefix)]
        return sorted(p for p in found if "/" not in p[len(prefix) :])

    def _entry(self, path: str) -> FsEntry:
        name = posixpath.basename(path) or "/"
        if path in self.dirs:
            return FsEntry(
                name=name, path=path, kind="dir", size=0, mode=DIR_MODE, mtime=self.mtime
            )
        if path in self.files:
            size = len(self.files[path])
            return FsEntry(
                name=name, path=path, kind="file", size=size, mode=FILE_MODE, mtime=self.mtime
            )
        raise _oserror(_errno.ENOENT, path)

    # -- reads and writes ----------------------------------------------------------------
    def size(self, path: str) -> int:
        return len(self.files.get(self._path(path), b""))

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(path)
        if path in self.dirs:
            raise _oserror(_errno.EISDIR, path)
        if path not in self.files:
            raise _oserror(_errno.ENOENT, path)
        data = self.files[path]
        end = len(data) if length is None else offset + length
        return bytes(data[offset:end])

    def write(self, msg: FsWrite) -> int:
        path = self._path(msg.path)
        if path in self.dirs:
            raise _oserror(_errno.EISDIR, path)
        self._parent_dir(path)
        content = self.files.setdefault(path, bytearray())
        if msg.append:
            content += msg.data
        else:
            if msg.truncate:
                del content[msg.offset :]
            if len(content) < msg.offset:
                content += bytes(msg.offset - len(content))
            content[msg.offset : msg.offset + len(msg.data)] = msg.data
        return len(msg.data)

    # -- requests --------------------------------------------------------------------------
    def handle(self, msg: Message) -> Message:
        """Answer one Fs* request (raises OSError)."""
        if isinstance(msg, FsWrite):
            return FsWritten(written=self.write(msg))
        if isinstance(msg, FsStat):
            return FsStatReply(entry=self._entry(self._path(msg.path)))
        if isinstance(msg, FsExists):
            path = self._path(msg.path)
            return FsExistsReply(exists=path in self.files or path in self.dirs)
        if isinstance(msg, FsList):
            path = self._path(msg.path)
            if path in self.files:
                raise _oserror(_errno.ENOTDIR, path)
            if path not in self.dirs:
                raise _oserror(_errno.ENOENT, path)
            return FsListReply(entries=[self._entry(p) for p in self._children(path)])
        if isinstance(msg, FsMkdir):
            self._mkdir(self._path(msg.path), msg.parents)
            return Ok()
        if isinstance(msg, FsRemove):
            self._remove(self._path(msg.path), msg.recursive)
            return Ok()
        if isinstance(msg, FsCopy):
            self._copy(self._path(msg.src), self._path(msg.dst), move=False)
            return Ok()
        if isinstance(msg, FsRename):
            self._copy(self._path(msg.src), self._path(msg.dst), move=True)
            return Ok()
        raise _oserror(_errno.ENOSYS, type(msg).__name__)

    def _mkdir(self, path: str, parents: bool) -> None:
        if path in self.files:
            raise _oserror(_errno.EEXIST, path)
        if path in self.dirs:
            if parents:
                return
            raise _oserror(_errno.EEXIST, path)
        if parents:
            parent = posixpath.dirname(path)
            if parent not in self.dirs:
                self._mkdir(parent, True)
        self._parent_dir(path)
        self.dirs.add(path)

    def _remove(self, path: str, recursive: bool) -> None:
        if path in self.files:
            del self.files[path]
            return
        if path not in self.dirs:
            raise _oserror(_errno.ENOENT, path)
        if path == "/":
            raise _oserror(_errno.EPERM, path)
        children = self._children(path)
        if children and not recursive:
            raise _oserror(_errno.ENOTEMPTY, path)
        for child in children:
            self._remove(child, True)
        self.dirs.discard(path)

    def _copy(self, src: str, dst: str, *, move: bool) -> None:
        if src not in self.files and src not in self.dirs:
            raise _oserror(_errno.ENOENT, src)
        if dst in self.dirs:
            dst = posixpath.join(dst, posixpath.basename(src))
        self._parent_dir(dst)
        if src in self.files:
            self.files[dst] = bytearray(self.files[src])
        else:
            if dst == src or dst.startswith(src.rstrip("/") + "/"):
                raise _oserror(_errno.EINVAL, dst)
            self.dirs.add(dst)
            for child in self._children(src):
                self._copy(child, posixpath.join(dst, posixpath.basename(child)), move=False)
        if move:
            self._remove(src, True)

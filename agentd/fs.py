"""Filesystem requests, served synchronously (the caller decides what runs in a thread).

Every function takes its request Struct and returns the reply Struct; failures come back
as ``ErrorReply`` with the code of the matching :mod:`corral.errors` class, never as an
exception. Relative paths resolve against the agent's working directory.
"""

from __future__ import annotations

import os
import stat as _stat
from typing import TYPE_CHECKING

from ..errors import fs_error_from_oserror
from ..protocol.messages import (
    FS_CHUNK,
    ErrorReply,
    FsCopy,
    FsData,
    FsEntry,
    FsExists,
    FsExistsReply,
    FsList,
    FsListReply,
    FsMkdir,
    FsRead,
    FsRemove,
    FsRename,
    FsStat,
    FsStatReply,
    FsSymlink,
    FsWrite,
    FsWritten,
    Ok,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..protocol.messages import Message

FsRequest = (
    FsRead
    | FsWrite
    | FsStat
    | FsList
    | FsMkdir
    | FsRemove
    | FsCopy
    | FsRename
    | FsExists
    | FsSymlink
)


def is_slow(msg: FsRequest) -> bool:
    """Requests whose cost has no bound (whole trees): run them off the event loop."""
    return isinstance(msg, FsCopy) or (isinstance(msg, FsRemove) and msg.recursive)


def handle(msg: FsRequest) -> Message:
    """Serve one filesystem request; never raises for I/O failures."""
    fn = _HANDLERS[type(msg)]
    try:
        return fn(msg)
    except OSError as exc:
        path = exc.filename if isinstance(exc.filename, str) else _main_path(msg)
        err = fs_error_from_oserror(exc, path)
        return ErrorReply(code=err.code, message=err.message, errno=err.errno)
    except (ValueError, OverflowError) as exc:  # embedded NUL, a mode/offset past C types
        return ErrorReply(code="fs_error", message=f"{exc}: {_main_path(msg)!r}")


def _main_path(msg: FsRequest) -> str:
    return msg.src if isinstance(msg, FsCopy | FsRename) else msg.path


def _text(name: str) -> str:
    """File names that are not UTF-8 cannot cross msgpack strings: make them printable."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name


def _kind(mode: int) -> str:
    if _stat.S_ISREG(mode):
        return "file"
    if _stat.S_ISDIR(mode):
        return "dir"
    if _stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _entry(path: str, st: os.stat_result) -> FsEntry:
    target = None
    if _stat.S_ISLNK(st.st_mode):
        try:
            target = _text(os.readlink(path))
        except OSError:
            target = None
    return FsEntry(
        name=_text(os.path.basename(path) or path),
        path=_text(path),
        kind=_kind(st.st_mode),
        size=st.st_size,
        mode=st.st_mode,
        mtime=st.st_mtime,
        uid=st.st_uid,
        gid=st.st_gid,
        target=target,
    )


def _read(msg: FsRead) -> Message:
    want = FS_CHUNK if msg.length is None else max(0, min(msg.length, FS_CHUNK))
    fd = os.open(msg.path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the agent
    try:
        parts: list[bytes] = []
        got = 0
        eof = False
        while got < want:
            part = os.pread(fd, want - got, msg.offset + got)
            if not part:
                eof = True
                break
            parts.append(part)
            got += len(part)
        if not eof:
            eof = not os.pread(fd, 1, msg.offset + got)
    finally:
        os.close(fd)
    return FsData(data=b"".join(parts), eof=eof)


def _write(msg: FsWrite) -> Message:
    """Write at ``offset``; ``append`` ignores offset and truncate; ``truncate`` makes the
    file end where this write ends; ``mode`` (exact, no umask) applies to regular files."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK
    at_start = msg.offset == 0
    if msg.append:
        flags |= os.O_APPEND
    elif msg.truncate and at_start:
        flags |= os.O_TRUNC
    fd = os.open(msg.path, flags, 0o666 if msg.mode is None else msg.mode)
    try:
        regular = _stat.S_ISREG(os.fstat(fd).st_mode)
        if msg.mode is not None and regular:
            os.fchmod(fd, msg.mode)
        view = memoryview(msg.data)
        done = 0
        while done < len(view):
            if msg.append or at_start:
                done += os.write(fd, view[done:])
            else:
                done += os.pwrite(fd, view[done:], msg.offset + done)
        if msg.truncate and not msg.append and not at_start and regular:
            os.ftruncate(fd, msg.offset + done)
    finally:
        os.close(fd)
    return FsWritten(written=done)


def _stat_req(msg: FsStat) -> Message:
    path = os.path.abspath(msg.path)
    return FsStatReply(entry=_entry(path, os.stat(path, follow_symlinks=msg.follow_symlinks)))


def _list(msg: FsList) -> Message:
    base = os.path.abspath(msg.path)
    entries: list[FsEntry] = []
    with os.scandir(base) as it:
        for d in it:
            try:
                st = d.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed while listing
                continue
            entries.append(_entry(os.path.join(base, d.name), st))
    entries.sort(key=lambda e: e.name)
    return FsListReply(entries=entries)


def _mkdir(msg: FsMkdir) -> Message:
    mode = 0o777 if msg.mode is None else msg.mode
    if msg.parents:
        os.makedirs(msg.path, mode, exist_ok=True)
    else:
        os.mkdir(msg.path, mode)
    if msg.mode is not None:
        os.chmod(msg.path, msg.mode)
    return Ok()


def _remove(msg: FsRemove) -> Message:
    st = os.lstat(msg.path)
    if not _stat.S_ISDIR(st.st_mode):
        os.unlink(msg.path)
    elif msg.recursive:
        import shutil

        shutil.rmtree(msg.path)
    else:
        os.rmdir(msg.path)
    return Ok()


def _copy(msg: FsCopy) -> Message:
    import shutil

    if _stat.S_ISDIR(os.stat(msg.src).st_mode):
        shutil.copytree(msg.src, msg.dst, symlinks=True)
    else:
        shutil.copyfile(msg.src, msg.dst)
        shutil.copymode(msg.src, msg.dst)
    return Ok()


def _rename(msg: FsRename) -> Message:
    os.rename(msg.src, msg.dst)
    return Ok()


def _exists(msg: FsExists) -> Message:
    try:
        os.stat(msg.path)
    except (FileNotFoundError, NotADirectoryError):
        return FsExistsReply(exists=False)
    return FsExistsReply(exists=True)


def _symlink(msg: FsSymlink) -> Message:
    try:
        os.symlink(msg.target, msg.path)
    except OSError as exc:  # report the link's path, not its target
        raise OSError(exc.errno, exc.strerror, msg.path) from None
    return Ok()


_HANDLERS: dict[type, Callable[..., Message]] = {
    FsRead: _read,
    FsWrite: _write,
    FsStat: _stat_req,
    FsList: _list,
    FsMkdir: _mkdir,
    FsRemove: _remove,
    FsCopy: _copy,
    FsRename: _rename,
    FsExists: _exists,
    FsSymlink: _symlink,
}

"""The sandbox log's files: the record format, rotation layout, and reading them.

A record on disk is a 4-byte big-endian length and a msgpack :class:`LogRecord`. The
files of one sandbox are ``<sandbox dir>/logs/sandbox.log`` (the newest) and
``sandbox.log.1`` ... ``sandbox.log.<files-1>`` (older). Records carry a host sequence
number that keeps growing across rotations, so a reader that lags, or another process,
can tell exactly what it has. :func:`read_log` and :func:`follow_log` work from any
process (``corral logs`` on a stopped or detached sandbox); the writer is
:class:`corral.actors.logs.LogStore`.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from datetime import datetime
from pathlib import Path

import msgspec
import trio

from ..errors import InvalidConfig

__all__ = [
    "DEFAULT_FILES",
    "DEFAULT_FILE_BYTES",
    "LOG_FILE",
    "LogFileFollower",
    "LogRecord",
    "decode_records",
    "encode_record",
    "follow_log",
    "read_log",
]

LOG_FILE = "sandbox.log"
DEFAULT_FILE_BYTES = 8 << 20
DEFAULT_FILES = 4
FOLLOW_POLL = 0.25

_HEADER = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()


class LogRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the sandbox log."""

    seq: int
    """Host sequence number: grows by one per record, across rotations."""
    timestamp: float
    """Unix time the entry was made (the agent's clock for agent entries)."""
    stream: str
    """``stdout`` / ``stderr`` (a job's output) or ``system`` (agent and host events)."""
    data: bytes
    job: int | None = None
    agent_seq: int | None = None
    """The agent's own sequence number (for resubscribing after a reconnect)."""

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp).astimezone()


_decoder = msgspec.msgpack.Decoder(LogRecord)


def encode_record(record: LogRecord) -> bytes:
    body = _encoder.encode(record)
    return _HEADER.pack(len(body)) + body


def decode_records(data: bytes) -> list[LogRecord]:
    """The records in ``data``; a truncated or garbled tail (a crash mid-write) ends it."""
    return _decode(data)[0]


def _decode(data: bytes) -> tuple[list[LogRecord], int]:
    """The whole records at the start of ``data`` and how many bytes they took."""
    out: list[LogRecord] = []
    view = memoryview(data)
    pos = 0
    while pos + _HEADER.size <= len(view):
        (size,) = _HEADER.unpack_from(view, pos)
        end = pos + _HEADER.size + size
        if end > len(view):
            break
        try:
            out.append(_decoder.decode(view[pos + _HEADER.size : end]))
        except msgspec.DecodeError:
            break
        pos = end
    return out, pos


def check_since(since: float | datetime | None) -> float | None:
    if since is None:
        return None
    if isinstance(since, datetime):
        return since.timestamp()
    if isinstance(since, bool) or not isinstance(since, int | float):
        raise InvalidConfig(f"since must be a datetime or a Unix time, got {since!r}")
    return float(since)


def check_tail(tail: int | None) -> int | None:
    if tail is None:
        return None
    if isinstance(tail, bool) or not isinstance(tail, int) or tail < 0:
        raise InvalidConfig(f"tail must be a whole number >= 0, got {tail!r}")
    return tail


def log_paths(directory: Path, files: int) -> list[Path]:
    """The log files, oldest first."""
    return [directory / f"{LOG_FILE}.{n}" for n in range(files - 1, 0, -1)] + [directory / LOG_FILE]


def read_fds(fds: list[int]) -> list[LogRecord]:
    out: list[LogRecord] = []
    for fd in fds:
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            out.extend(decode_records(b"".join(chunks)))
        finally:
            os.close(fd)
    return out


def open_all(directory: Path, files: int) -> list[int]:
    fds = []
    for path in log_paths(directory, files):
        try:
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            continue
    return fds


def select_records(
    records: list[LogRecord], tail: int | None, since: float | None, after: int = 0
) -> list[LogRecord]:
    picked = [r for r in records if r.seq > after and (since is None or r.timestamp >= since)]
    if tail is not None:
        picked = picked[len(picked) - tail :] if tail else []
    return picked


def read_log(
    directory: str | os.PathLike[str],
    *,
    tail: int | None = None,
    since: float | datetime | None = None,
    files: int = DEFAULT_FILES,
) -> list[LogRecord]:
    """Read a sandbox log from its files (any process; the sandbox may be stopped)."""
    records = read_fds(open_all(Path(directory), files))
    return select_records(records, check_tail(tail), check_since(since))


class _Tailer:
    """Reads what was appended to the current log file since the last poll.

    Holds no file open between polls: it remembers the current file's inode and how far
    it read. After a rotation it finishes the old file (now ``sandbox.log.1``) first."""

    def __init__(self, directory: Path, files: int) -> None:
        self.directory = directory
        self.files = files
        self.ino = -1
        self.offset = 0
        self.buf = b""

    def poll(self) -> list[LogRecord]:
        out: list[LogRecord] = []
        try:
            fd = os.open(self.directory / LOG_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return out
        try:
            ino = os.fstat(fd).st_ino
            if ino != self.ino:
                if self.ino != -1:
                    out += self._finish_old()
                self.ino, self.offset, self.buf = ino, 0, b""
            out += self._read(fd)
        finally:
            os.close(fd)
        return out

    def _finish_old(self) -> list[LogRecord]:
        for path in log_paths(self.directory, self.files)[:-1]:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if os.fstat(fd).st_ino == self.ino:
                    return self._read(fd)
            finally:
                os.close(fd)
        return []  # rotated away entirely: the caller sees the gap in seqs

    def _read(self, fd: int) -> list[LogRecord]:
        os.lseek(fd, self.offset, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 20):
            self.buf += chunk
            self.offset += len(chunk)
        records, used = _decode(self.buf)
        self.buf = self.buf[used:]
        return records


class LogFileFollower:
    """``async for record in follow_log(directory)``: see :func:`follow_log`."""

    def __init__(
        self,
        directory: Path,
        tail: int | None,
        since: float | None,
        files: int,
        interval: float,
    ) -> None:
        self.directory = directory
        self.tail = tail
        self.since = since
        self.files = files
        self.interval = interval
        self._tailer = _Tailer(directory, files)
        self._backlog: deque[LogRecord] = deque()
        self._last: int | None = None

    def __aiter__(self) -> LogFileFollower:
        return self

    async def __anext__(self) -> LogRecord:
        if self._last is None:
            first = await trio.to_thread.run_sync(self._first)
            self._backlog.extend(first)
            self._last = first[-1].seq if first else 0
        while not self._backlog:
            await self._poll()
            if not self._backlog:
                await trio.sleep(self.interval)
        record = self._backlog.popleft()
        self._last = max(self._last, record.seq)
        return record

    def _first(self) -> list[LogRecord]:
        self._tailer.poll()  # from here on, only what is appended
        records = read_fds(open_all(self.directory, self.files))
        return select_records(records, self.tail, self.since)

    async def _poll(self) -> None:
        assert self._last is not None
        fresh = [r for r in await trio.to_thread.run_sync(self._tailer.poll) if r.seq > self._last]
        if fresh and fresh[0].seq > self._last + 1 and self._last:
            every = await trio.to_thread.run_sync(read_fds, open_all(self.directory, self.files))
            fresh = [r for r in every if r.seq > self._last]
        if fresh:
            self._last = fresh[-1].seq
        self._backlog.extend(select_records(fresh, None, self.since))


def follow_log(
    directory: str | os.PathLike[str],
    *,
    tail: int | None = None,
    since: float | datetime | None = None,
    files: int = DEFAULT_FILES,
    interval: float = FOLLOW_POLL,
) -> LogFileFollower:
    """Follow a sandbox log written by another process (polls every ``interval``).

    Yields what ``read_log`` gives, then every record appended later, reading only what
    is new in the current file (all the files again if it rotated more than once between
    two polls); runs until the caller stops iterating. Holds no file open between steps.
    """
    return LogFileFollower(Path(directory), check_tail(tail), check_since(since), files, interval)

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
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import msgspec
import trio

from ..errors import InvalidConfig

__all__ = [
    "DEFAULT_FILES",
    "DEFAULT_FILE_BYTES",
    "LOG_FILE",
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
    """Reads records appended to the current log file since the last poll."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1
        self.ino = -1
        self.buf = b""

    def poll(self) -> list[LogRecord]:
        out: list[LogRecord] = []
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            ino = -1
        if self.fd >= 0 and ino != self.ino:  # rotated: finish the old file first
            out += self._drain()
            self.close()
        if self.fd < 0 and ino >= 0:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return out
            self.ino = os.fstat(self.fd).st_ino
        if self.fd >= 0:
            out += self._drain()
        return out

    def _drain(self) -> list[LogRecord]:
        while chunk := os.read(self.fd, 1 << 20):
            self.buf += chunk
        records, used = _decode(self.buf)
        self.buf = self.buf[used:]
        return records

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
        self.buf = b""


async def follow_log(
    directory: str | os.PathLike[str],
    *,
    tail: int | None = None,
    since: float | datetime | None = None,
    files: int = DEFAULT_FILES,
    interval: float = FOLLOW_POLL,
) -> AsyncIterator[LogRecord]:
    """Follow a sandbox log written by another process (polls every ``interval``).

    Yields what ``read_log`` gives, then every record appended later, reading only what
    is new in the current file (all the files again if it rotated more than once between
    two polls); runs until the caller stops iterating.
    """
    path = Path(directory)
    cutoff = check_since(since)
    last = 0
    tailer = _Tailer(path / LOG_FILE)
    try:
        first = await trio.to_thread.run_sync(
            lambda: read_log(path, tail=tail, since=since, files=files)
        )
        for record in first:
            last = record.seq
            yield record
        while True:
            fresh = await trio.to_thread.run_sync(tailer.poll)
            fresh = [r for r in fresh if r.seq > last]
            if fresh and fresh[0].seq > last + 1 and last:
                everything = await trio.to_thread.run_sync(lambda: read_fds(open_all(path, files)))
                fresh = [r for r in everything if r.seq > last]
            for record in select_records(fresh, None, cutoff):
                last = record.seq
                yield record
            await trio.sleep(interval)
    finally:
        tailer.close()

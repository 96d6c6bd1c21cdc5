"""The sandbox log on the host: files the host owns, fed by the agent's log ring.

The agent keeps job output and its own events in a bounded ring (see
:mod:`corral.agentd.logring`); :func:`pump_logs` subscribes to it over the agent channel
and appends every entry to a :class:`LogStore`, acknowledging what is stored (the
acknowledgements are the subscription's credit). The sandbox cannot reach the files, so
it cannot fill the host's disk through them: they live in ``<sandbox dir>/logs/`` (mode
0700), capped at ``files`` files of ``file_bytes`` each and rotated (see
:mod:`.logfiles` for the format). A store without a directory (the fake driver) keeps
the same amount in memory.

Appends are plain ``write`` calls (to the page cache) in the caller's thread. Reading:
:meth:`LogStore.read` (``tail``/``since``) and :meth:`LogStore.follow` (an async iterator
woken by appends, no polling). :class:`SandboxLog` is what a sandbox
actor keeps: the store, its pump, and the notes it makes (started, stopped, limits hit).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from itertools import islice, pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..errors import CorralError, InvalidConfig, ProtocolError
from ..protocol import LOG_ENTRY_COST, LOG_WINDOW, LogAck, LogEntry, LogSubscribe, Ok
from .channel import AgentChannel
from .logfiles import (
    DEFAULT_FILE_BYTES,
    DEFAULT_FILES,
    LOG_FILE,
    LogRecord,
    check_since,
    check_tail,
    encode_record,
    follow_log,
    log_paths,
    open_all,
    read_fds,
    read_log,
    select_records,
)

if TYPE_CHECKING:
    from ..drivers.base import Driver, SandboxProcess
    from .state import SandboxStatus

__all__ = [
    "DEFAULT_FILES",
    "DEFAULT_FILE_BYTES",
    "LOG_FILE",
    "LogFollower",
    "LogRecord",
    "LogStore",
    "SandboxLog",
    "follow_log",
    "keep_logs",
    "log_dir",
    "log_limits",
    "pump_logs",
    "read_log",
    "run_log_pump",
]

MAX_RECORD_DATA = 64 * 1024
"""Data beyond this in one agent entry is cut (the agent's chunks are this size)."""
STREAMS = frozenset({"stdout", "stderr", "system"})
RECENT = 1024
RECENT_BYTES = 256 * 1024
"""Records kept in memory per sandbox, for followers and tail reads (anything further
back is read from the files, in a thread). Small: a server may hold thousands."""
ACK_DELAY = 0.05
"""How long the pump waits for more entries before acknowledging what it stored."""


class LogStore:
    """The log of one sandbox: append, read, follow (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        *,
        file_bytes: int = DEFAULT_FILE_BYTES,
        files: int = DEFAULT_FILES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if file_bytes < 4096 or files < 1:  # a record (a quarter file at most) fits
            raise InvalidConfig("a log needs files of at least 4096 bytes, and one file")
        self.directory = None if directory is None else Path(directory)
        self.file_bytes = file_bytes
        self.files = files
        self.clock = clock
        self.seq = -1  # unknown until the first append (the files may hold earlier ones)
        self.closed = False
        self._fd = -1
        self._size = 0
        self._recent: deque[LogRecord] = deque()
        self._recent_bytes = 0
        self._base = 0  # the seq the files ended at when this store started
        self._lock = threading.Lock()  # file open/rotate vs a reader thread opening files
        self._lot = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        where = self.directory or "memory"
        return f"<LogStore {where} seq={self.seq}>"

    # -- writing -------------------------------------------------------------------------------

    def _start(self) -> None:
        """Learn the last seq from the files (another process may have written them)."""
        if self.seq >= 0:
            return
        self.seq = 0
        if self.directory is not None:
            with self._lock:
                fds = open_all(self.directory, self.files)[-1:]
            for record in read_fds(fds)[-1:]:
                self.seq = record.seq
        self._base = self.seq

    def append(
        self,
        stream: str,
        data: bytes | str,
        *,
        job: int | None = None,
        timestamp: float | None = None,
        agent_seq: int | None = None,
    ) -> LogRecord | None:
        """Add a record (None once the store is closed) and return it. Data longer than a
        quarter of a file goes in several records (so files keep to their size)."""
        if self.closed:
            return None
        self._start()
        raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
        ts = self.clock() if timestamp is None or not math.isfinite(timestamp) else timestamp
        piece = max(1024, self.file_bytes // 4)
        for start in range(0, max(1, len(raw)), piece):
            self.seq += 1
            record = LogRecord(
                seq=self.seq,
                timestamp=ts,
                stream=stream,
                data=raw[start : start + piece],
                job=job,
                agent_seq=agent_seq,
            )
            if self.directory is not None:
                self._write(encode_record(record))
            self._remember(record)
        self._lot.unpark_all()
        return record

    def _remember(self, record: LogRecord) -> None:
        self._recent.append(record)
        self._recent_bytes += len(record.data) + LOG_ENTRY_COST
        if self.directory is not None:
            # Never more than the files hold, so memory can stand in for them (_from_memory).
            count, cap = RECENT, min(RECENT_BYTES, self.file_bytes * (self.files - 1))
        else:
            count, cap = 1 << 62, self.file_bytes * self.files
        while (self._recent_bytes > cap or len(self._recent) > count) and len(self._recent) > 1:
            self._recent_bytes -= len(self._recent.popleft().data) + LOG_ENTRY_COST

    def _write(self, frame: bytes) -> None:
        assert self.directory is not None
        with self._lock:
            if self._fd >= 0 and self._size and self._size + len(frame) > self.file_bytes:
                self._rotate()
            if self._fd < 0:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                path = self.directory / LOG_FILE
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
                self._fd = os.open(path, flags, 0o600)
                self._size = os.fstat(self._fd).st_size
                if self._size and self._size + len(frame) > self.file_bytes:
                    self._rotate()
                    self._fd = os.open(path, flags, 0o600)
                    self._size = 0
            os.write(self._fd, frame)
            self._size += len(frame)

    def _rotate(self) -> None:
        assert self.directory is not None
        os.close(self._fd)
        self._fd = -1
        self._size = 0
        paths = log_paths(self.directory, self.files)  # oldest first; the last is LOG_FILE
        if len(paths) == 1:
            paths[0].unlink(missing_ok=True)
            return
        for older, newer in pairwise(paths):
            if newer.exists():
                os.replace(newer, older)

    def reopen(self) -> None:
        """Open the file again on the next append (its directory may have been recreated)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def close(self) -> None:
        """No more records; followers end after what they have not seen yet."""
        self.closed = True
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        self._lot.unpark_all()

    # -- reading -------------------------------------------------------------------------------

    def _recent_after(self, after: int) -> list[LogRecord] | None:
        """Records with seq > ``after`` from memory; None when memory no longer has them all."""
        if after >= self.seq:
            return []
        if not self._recent or self._recent[0].seq > after + 1:
            return None if self.directory is not None else list(self._recent)
        return list(islice(self._recent, after + 1 - self._recent[0].seq, None))

    def _read_all(self) -> list[LogRecord]:
        if self.directory is None:
            return list(self._recent)
        with self._lock:
            fds = open_all(self.directory, self.files)
        return read_fds(fds)

    def _from_memory(self, tail: int | None, cutoff: float | None) -> list[LogRecord] | None:
        """The answer from memory when memory has it all (None: read the files)."""
        self._start()
        recent = self._recent
        whole = self.directory is None or (self._base == 0 and (not recent or recent[0].seq == 1))
        if whole or (cutoff is not None and recent and recent[0].timestamp < cutoff):
            return select_records(list(recent), tail, cutoff)
        if cutoff is None and tail is not None:
            after = self._recent_after(max(0, self.seq - tail))
            if after is not None:
                return select_records(after, tail, None)
        return None

    def read(
        self, *, tail: int | None = None, since: float | datetime | None = None
    ) -> list[LogRecord]:
        """Records, oldest first: those at or after ``since``, the last ``tail`` of them."""
        tail, cutoff = check_tail(tail), check_since(since)
        found = self._from_memory(tail, cutoff)
        return select_records(self._read_all(), tail, cutoff) if found is None else found

    async def read_async(
        self, *, tail: int | None = None, since: float | datetime | None = None
    ) -> list[LogRecord]:
        """``read``, with file reading (when memory does not have it all) in a thread."""
        tail, cutoff = check_tail(tail), check_since(since)
        found = self._from_memory(tail, cutoff)
        if found is not None:
            await trio.lowlevel.checkpoint()
            return found
        records = await trio.to_thread.run_sync(self._read_all)
        return select_records(records, tail, cutoff)

    def follow(
        self,
        *,
        tail: int | None = None,
        since: float | datetime | None = None,
        until: Callable[[], bool] | None = None,
    ) -> LogFollower:
        """What ``read`` gives, then every new record as it is appended, until closed
        (or ``until()`` holds once everything so far was yielded)."""
        return LogFollower(self, check_tail(tail), check_since(since), until)

    async def _wait(self, after: int) -> None:
        while self.seq <= after and not self.closed:
            await self._lot.park()

    def last_agent_seq(self) -> int:
        """The agent seq of the last agent entry stored (0 if none): ``pump_logs(after=)``."""
        for record in reversed(self.read(tail=RECENT)):
            if record.agent_seq is not None:
                return record.agent_seq
        return 0


class LogFollower:
    """``async for record in store.follow()``: backlog, then live records as they come.

    Ends when the store closes, or (with ``until``) when nothing is left to yield and
    ``until()`` holds; whoever makes ``until`` true must append a record (or close the
    store) afterwards, since that is what wakes a waiting follower.
    """

    def __init__(
        self,
        store: LogStore,
        tail: int | None,
        since: float | None,
        until: Callable[[], bool] | None = None,
    ) -> None:
        self._store = store
        self._tail = tail
        self._since = since
        self._until = until
        self._backlog: deque[LogRecord] = deque()
        self._last: int | None = None

    def __aiter__(self) -> LogFollower:
        return self

    async def __anext__(self) -> LogRecord:
        store = self._store
        if self._last is None:
            store._start()
            self._last = store.seq
            old = await store.read_async(tail=self._tail, since=self._since)
            self._backlog.extend(r for r in old if r.seq <= self._last)
        while True:
            if self._backlog:
                record = self._backlog.popleft()
                self._last = max(self._last, record.seq)
                return record
            fresh = store._recent_after(self._last)
            if fresh is None:  # fell behind what memory holds: read the files
                everything = await trio.to_thread.run_sync(store._read_all)
                fresh = [r for r in everything if r.seq > self._last]
            if fresh:
                self._last = fresh[-1].seq
                if self._since is not None:
                    fresh = [r for r in fresh if r.timestamp >= self._since]
                self._backlog.extend(fresh)
                continue
            if store.closed or (self._until is not None and self._until()):
                raise StopAsyncIteration
            await store._wait(self._last)


# -- the agent → host pump ----------------------------------------------------------------------


def _stream(name: str) -> str:
    return name if name in STREAMS else "system"


async def pump_logs(
    channel: AgentChannel,
    store: LogStore,
    *,
    after: int = 0,
    window: int = LOG_WINDOW,
    on_entry: Callable[[LogEntry], None] | None = None,
) -> int:
    """Subscribe to the agent's log ring and store every entry until the subscription ends.

    A plain function, so whoever holds a channel to the agent can run it (the sandbox
    actor; a keeper of a detached sandbox). ``after`` is the last agent seq already
    stored (``store.last_agent_seq()`` after a reconnect to the same agent). Entries
    are acknowledged once stored: at half a window, or when none came for
    ``ACK_DELAY``. Returns the last agent seq stored. Ends when the agent hands the
    subscription to someone else (``Ok``) or the channel ends (AgentGone is raised).
    """
    if window < 1:
        raise InvalidConfig(f"log window must be at least 1 byte, got {window}")
    last = acked = after
    owed = 0
    async with channel.conversation(LogSubscribe(after=after, window=window)) as conv:
        while not conv.done:
            msg = None
            with trio.move_on_after(ACK_DELAY if last > acked else math.inf):
                msg = await conv.receive()
            if msg is None:
                await conv.send(LogAck(seq=last))
                acked, owed = last, 0
                continue
            if isinstance(msg, Ok):
                break
            if not isinstance(msg, LogEntry):
                raise ProtocolError(f"unexpected {type(msg).__name__} in the log subscription")
            if msg.seq <= last:
                continue  # sent again after a resubscription: stored already
            store.append(
                _stream(msg.stream),
                msg.data[:MAX_RECORD_DATA],
                job=msg.job,
                timestamp=msg.ts,
                agent_seq=msg.seq,
            )
            last = msg.seq
            owed += len(msg.data) + LOG_ENTRY_COST
            if on_entry is not None:
                on_entry(msg)
            if owed >= window // 2:
                await conv.send(LogAck(seq=last))
                acked, owed = last, 0
    return last


async def run_log_pump(
    channel: AgentChannel,
    store: LogStore,
    on_entry: Callable[[LogEntry], None] | None = None,
) -> None:
    """``pump_logs`` for an owner's nursery: an agent without logs or a lost channel
    just ends it (the owner learns about a lost agent elsewhere)."""
    try:
        await pump_logs(channel, store, on_entry=on_entry)
    except CorralError:
        pass


async def keep_logs(channel: AgentChannel, directory: str | os.PathLike[str]) -> None:
    """Store a running sandbox's log in ``directory`` for as long as ``channel`` lives:
    for a process that takes over a sandbox another one started (a detached sandbox's
    keeper). Resumes after the last agent entry the files hold (right when it is the
    same agent, i.e. the sandbox was not started again in between)."""
    file_bytes, files = log_limits()
    store = LogStore(directory, file_bytes=file_bytes, files=files)
    try:
        after = await trio.to_thread.run_sync(store.last_agent_seq)
        await pump_logs(channel, store, after=after)
    except CorralError:
        pass
    finally:
        store.close()


# -- what a sandbox actor keeps ----------------------------------------------------------------

LOG_SETTLE = 1.0
"""How long a stopping sandbox waits for the agent's last log entries to be stored."""


def log_limits() -> tuple[int, int]:
    """(file_bytes, files) for sandbox logs: ``CORRAL_LOG_FILE_BYTES`` and
    ``CORRAL_LOG_FILES`` when set (whole numbers), else 8 MiB x 4."""
    sizes = []
    for name, default in (
        ("CORRAL_LOG_FILE_BYTES", DEFAULT_FILE_BYTES),
        ("CORRAL_LOG_FILES", DEFAULT_FILES),
    ):
        raw = os.environ.get(name, "").strip()
        if raw and not raw.isdigit():
            raise InvalidConfig(f"{name} must be a whole number, got {raw!r}")
        sizes.append(int(raw) if raw else default)
    return sizes[0], sizes[1]


def log_dir(driver: Driver, name: str) -> Path | None:
    """Where a driver keeps a sandbox's log files (None: in memory)."""
    sandbox_dir = getattr(driver, "sandbox_dir", None)
    if sandbox_dir is None:
        return None
    return Path(sandbox_dir(name)) / "logs"


class SandboxLog:
    """A sandbox actor's log: the store, the pump from the agent, and its own notes.

    ``limit_error`` is set when a command ended with 137 and the driver's
    ``limit_report()`` says the sandbox hit a limit (OOM, pids) it had not reported yet.
    """

    def __init__(self, directory: Path | None) -> None:
        file_bytes, files = log_limits()
        self.store = LogStore(directory, file_bytes=file_bytes, files=files)
        self.limit_error: str | None = None
        self._reported: str | None = None
        self._proc: SandboxProcess | None = None
        self._pump_done = trio.Event()
        self._pump_done.set()
        self._exits: deque[int] = deque(maxlen=1024)  # jobs whose "exited" entry is stored
        self._lot = trio.lowlevel.ParkingLot()

    def start(self, nursery: trio.Nursery, channel: AgentChannel, proc: SandboxProcess) -> None:
        """A new incarnation runs: note it and pump its agent's log."""
        self._proc = proc
        self.store.reopen()
        self.store.append("system", f"sandbox started (pid {proc.pid})")
        self._pump_done = done = trio.Event()

        async def pump() -> None:
            try:
                await run_log_pump(channel, self.store, self._on_entry)
            finally:
                done.set()
                self._lot.unpark_all()

        nursery.start_soon(pump)

    def _on_entry(self, entry: LogEntry) -> None:
        if entry.stream == "system" and entry.job is not None and entry.exit_code is not None:
            self._exits.append(entry.job)
            self._lot.unpark_all()
            if entry.exit_code == 137:
                self.note_exit(137, f"job {entry.job}")

    async def job_logged(self, job: int) -> None:
        """Wait (bounded) until job ``job``'s "exited" entry is stored, so its output is
        in the log when ``Job.wait()`` returns (its frames may still be on their way)."""
        with trio.move_on_after(LOG_SETTLE):
            while job not in self._exits and not self._pump_done.is_set():
                await self._lot.park()

    def note_exit(self, exit_code: int | None, what: str) -> None:
        """After a command exits 137: record what limit the sandbox hit, if any."""
        if exit_code != 137 or self._proc is None:
            return
        try:
            report = self._proc.limit_report()
        except OSError:
            return
        if report is None or report == self._reported:
            return
        self._reported = report
        self.limit_error = f"{what} was killed (exit 137): {report}"
        self.store.append("system", self.limit_error)

    async def settle(self, channel: AgentChannel | None, proc: SandboxProcess | None) -> None:
        """Before the channel closes: if the process has exited, let the reader reach the
        end of the stream so the agent's last entries are routed (bounded)."""
        if channel is None or proc is None or proc.exit_status is None:
            return
        with trio.move_on_after(LOG_SETTLE):
            await channel.closed.wait()

    async def drained(self) -> None:
        """After the channel closed: wait (bounded) for the pump to store what it got."""
        with trio.move_on_after(LOG_SETTLE):
            await self._pump_done.wait()

    def ended(self, status: SandboxStatus, reason: str = "") -> None:
        self.store.append("system", f"sandbox {status}" + (f": {reason}" if reason else ""))

    def close(self) -> None:
        self.store.close()

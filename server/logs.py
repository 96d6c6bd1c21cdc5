"""Per-sandbox log rings, served as server-sent events.

Each sandbox keeps its recent log in a ring bounded by bytes and entries: lifecycle
events (source ``system``) and the output of execs run through the agent WebSocket
(``stdout`` / ``stderr``, with the exec's correlation id as ``session_id``). Entry ids
only grow, so a client that reconnects with ``Last-Event-ID: N`` gets exactly what came
after N that is still in the ring.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import msgspec
import trio

MAX_BYTES = 64 * 1024
MAX_ENTRIES = 1000
MAX_ENTRY = 8 * 1024
"""Longer output chunks are cut to this many bytes in the log (the exec still gets all)."""


class LogEntry(msgspec.Struct, kw_only=True):
    id: int
    timestamp_ms: float
    source: str
    data: str
    session_id: int | None = None


_json = msgspec.json.Encoder()


def sse(entry: LogEntry) -> bytes:
    """One server-sent event."""
    return b"id: %d\nevent: log\ndata: %s\n\n" % (entry.id, _json.encode(entry))


@dataclass
class LogRing:
    max_bytes: int = MAX_BYTES
    max_entries: int = MAX_ENTRIES

    def __post_init__(self) -> None:
        self._entries: deque[LogEntry] = deque()
        self._bytes = 0
        self._next_id = 1
        self._changed = trio.Event()
        self.closed = False

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    def append(self, source: str, data: bytes | str, session_id: int | None = None) -> None:
        if self.closed:
            return
        raw = data.encode() if isinstance(data, str) else data
        text = raw[:MAX_ENTRY].decode("utf-8", errors="replace")
        entry = LogEntry(
            id=self._next_id,
            timestamp_ms=time.time() * 1000.0,
            source=source,
            data=text,
            session_id=session_id,
        )
        self._next_id += 1
        self._entries.append(entry)
        self._bytes += len(text)
        while self._entries and (
            self._bytes > self.max_bytes or len(self._entries) > self.max_entries
        ):
            self._bytes -= len(self._entries.popleft().data)
        self._wake()

    def since(self, last_id: int) -> list[LogEntry]:
        return [e for e in self._entries if e.id > last_id]

    async def wait_after(self, last_id: int) -> None:
        """Return once there is an entry after ``last_id`` or the ring closed."""
        while self.last_id <= last_id and not self.closed:
            await self._changed.wait()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

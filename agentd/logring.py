"""The agent's side of the sandbox log: a bounded ring pushed to one host subscriber.

The ring holds the output of detached jobs and the agent's own events (``system``
entries: job started/exited, exec start failures, shutdown). The host owns the log
files; the agent only keeps what the host has not acknowledged yet, bounded by bytes
(each entry counts its data plus ``LOG_ENTRY_COST``):

- ``pending``: not sent yet; ``unacked``: sent to the subscriber, not yet acknowledged.
- A subscriber (``LogSubscribe``) gets pending entries while its unacknowledged bytes
  stay within its window and the connection is not paused for writing; ``LogAck(seq)``
  frees everything up to ``seq`` and lets more go out.
- A new subscription replaces the old one (which ends with ``Ok``) and starts after the
  ``after`` seq it names: what was sent but not acknowledged goes out again.
- When the ring is over its size (nobody reads, or the reader is slow) the oldest
  entries go, acknowledged-or-not first; the dropped unsent bytes are announced by a
  ``system`` entry at the head ("dropped N bytes ..."), merged with an earlier one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

from ..protocol.framing import TERMINAL
from ..protocol.messages import LOG_ENTRY_COST, Cancel, LogAck, LogEntry, LogSubscribe, Ok

if TYPE_CHECKING:
    from ..protocol.messages import Message

__all__ = ["MIN_RING_BYTES", "RING_BYTES", "LogRing", "LogSubscription"]

RING_BYTES = 1 << 20
"""Default ring size (bytes of entries, costs included)."""

MIN_RING_BYTES = 128 * 1024
"""Smallest ring accepted: a job's output chunk (64 KiB) always fits."""


class Link(Protocol):
    """What the ring needs of a host connection (``agentd.conn.Connection``)."""

    @property
    def paused(self) -> bool: ...

    @property
    def convs(self) -> MutableMapping[int, Any]: ...

    def send(self, id: int, msg: Message, flags: int = 0) -> None: ...

    def is_closing(self) -> bool: ...


class _Item:
    __slots__ = ("data", "dropped", "exit_code", "job", "seq", "stream", "ts")

    def __init__(
        self,
        seq: int,
        ts: float,
        stream: str,
        data: bytes,
        job: int | None = None,
        exit_code: int | None = None,
        dropped: int = 0,
    ) -> None:
        self.seq = seq
        self.ts = ts
        self.stream = stream
        self.data = data
        self.job = job
        self.exit_code = exit_code
        self.dropped = dropped
        """Non-zero on a "dropped N bytes" marker: N."""

    @property
    def cost(self) -> int:
        return len(self.data) + LOG_ENTRY_COST

    def message(self) -> LogEntry:
        return LogEntry(
            seq=self.seq,
            ts=self.ts,
            stream=self.stream,
            data=self.data,
            job=self.job,
            exit_code=self.exit_code,
        )


def _marker_text(dropped: int) -> bytes:
    return f"dropped {dropped} bytes of log output (nobody read the log in time)".encode()


class LogRing:
    def __init__(self, limit: int = RING_BYTES, *, clock: Callable[[], float] = time.time) -> None:
        self.limit = max(int(limit), MIN_RING_BYTES)
        self.clock = clock
        self.pending: deque[_Item] = deque()
        self.unacked: deque[_Item] = deque()
        self.flight: deque[tuple[int, int]] = deque()
        """(seq, cost) of what the subscriber has not acknowledged (kept apart from the
        entries: an unacknowledged entry dropped from memory is still in flight)."""
        self.size = 0
        self.in_flight = 0
        self.seq = 0
        self.dropped = 0
        """Unsent bytes dropped over the ring's life."""
        self.sub: LogSubscription | None = None

    def __len__(self) -> int:
        return len(self.pending) + len(self.unacked)

    # -- writing ------------------------------------------------------------------------------

    def append(
        self,
        stream: str,
        data: bytes | str,
        *,
        job: int | None = None,
        exit_code: int | None = None,
    ) -> None:
        raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
        self.seq += 1
        item = _Item(self.seq, self.clock(), stream, raw, job, exit_code)
        self.pending.append(item)
        self.size += item.cost
        if self.size > self.limit:
            self._trim()
        if self.sub is not None:
            self.sub.pump()

    def _trim(self) -> None:
        while self.size > self.limit and self.unacked:
            self.size -= self.unacked.popleft().cost
        dropped = 0
        last = 0
        while self.size > self.limit and len(self.pending) > 1:
            old = self.pending.popleft()
            self.size -= old.cost
            if not old.dropped:
                self.dropped += len(old.data)
            dropped += old.dropped or len(old.data)
            last = old.seq
        if dropped:
            marker = _Item(last, self.clock(), "system", _marker_text(dropped), dropped=dropped)
            self.pending.appendleft(marker)
            self.size += marker.cost

    # -- the subscriber -----------------------------------------------------------------------

    def ack(self, seq: int) -> None:
        """Everything up to ``seq`` is stored by the host."""
        while self.flight and self.flight[0][0] <= seq:
            self.in_flight -= self.flight.popleft()[1]
        while self.unacked and self.unacked[0].seq <= seq:
            self.size -= self.unacked.popleft().cost
        while self.pending and self.pending[0].seq <= seq:
            self.size -= self.pending.popleft().cost

    def subscribe(self, conn: Link, id: int, req: LogSubscribe) -> LogSubscription:
        if self.sub is not None:
            self.sub.replaced()
        # What was sent and not acknowledged goes out again (it may not have arrived).
        while self.unacked:
            self.pending.appendleft(self.unacked.pop())
        self.flight.clear()
        self.in_flight = 0
        after = req.after if 0 <= req.after <= self.seq else 0  # a bigger one: another agent
        self.ack(after)
        sub = LogSubscription(self, conn, id, max(1, req.window))
        self.sub = sub
        conn.convs[id] = sub
        sub.pump()
        return sub

    def unsent(self) -> bool:
        """A subscriber is there and has entries still to take (for the shutdown flush)."""
        return self.sub is not None and bool(self.pending)


class LogSubscription:
    """The ``LogSubscribe`` conversation of one connection."""

    def __init__(self, ring: LogRing, conn: Link, id: int, window: int) -> None:
        self.ring = ring
        self.conn = conn
        self.id = id
        self.window = window
        self.ended = False

    def pump(self) -> None:
        ring = self.ring
        conn = self.conn
        while not self.ended and not conn.paused and ring.pending:
            item = ring.pending[0]
            if ring.in_flight and ring.in_flight + item.cost > self.window:
                return
            ring.pending.popleft()
            ring.unacked.append(item)
            ring.flight.append((item.seq, item.cost))
            ring.in_flight += item.cost
            conn.send(self.id, item.message())
            if conn.is_closing():
                return

    # -- the conversation protocol of agentd.conn --------------------------------------------

    def follow_up(self, msg: Message) -> None:
        if self.ended:
            return
        if isinstance(msg, LogAck):
            self.ring.ack(msg.seq)
            self.pump()
        elif isinstance(msg, Cancel):
            self._end()

    def flow_changed(self) -> None:
        self.pump()

    def end_now(self) -> None:
        """The connection is gone: unacknowledged entries wait for the next subscriber."""
        self.ended = True
        if self.ring.sub is self:
            self.ring.sub = None

    def replaced(self) -> None:
        self._end()

    def _end(self) -> None:
        self.end_now()
        if self.conn.convs.get(self.id) is self:
            del self.conn.convs[self.id]
        self.conn.send(self.id, Ok(), TERMINAL)

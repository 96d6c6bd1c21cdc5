"""The state db: one sqlite row per sandbox, shared by every process on one ``CORRAL_HOME``.

The file is the LocalBackend's ``db_path`` (``<home>/state.db``); a supervisor without
a local backend (a fake or cloud driver) keeps the same table in memory. WAL mode and a
busy timeout let several processes use it at once; every statement is its own short
transaction, run synchronously from the trio thread (a write is ~0.1 ms, a read
~20 us: cheaper than a hop to a worker thread).

A name is claimed by its INSERT: ``name`` is the primary key, so when two processes
create the same name exactly one wins and the other gets SandboxAlreadyExists. Each
record carries an ``id`` that is new on every create, and every update names it, so a
late writer (a keeper, a slow owner) never touches a newer sandbox of the same name.

A record holds the spec (JSON), the status, the pids with their start times (field 22
of ``/proc/PID/stat``: a pid whose start time differs is a recycled pid, never
signalled), who owns it (the creating process; for a detached sandbox its keeper too),
timestamps (microseconds since the epoch, exact) and the last error. The keeper of a
detached sandbox (``corral.drivers.local.keeper``) writes the same table with plain SQL;
keep the two in step (``SCHEMA_VERSION``).
"""

from __future__ import annotations

import base64
import binascii
import builtins
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from ..drivers.base import ProcessIds, SandboxSpec
from ..errors import InvalidConfig, Runtime, SandboxAlreadyExists, SandboxNotFound
from .lifecycle import RestartPolicy
from .sandbox import SandboxInfo
from .state import SandboxStatus

__all__ = [
    "BUSY_TIMEOUT",
    "INTERNAL_PREFIX",
    "Registry",
    "SandboxList",
    "SandboxRecord",
    "from_us",
    "now_us",
    "process_alive",
    "process_start",
    "signal_process",
    "to_us",
]

SCHEMA_VERSION = 1
INTERNAL_PREFIX = "_"
"""Names starting with it are never a user's (names start with a letter or a digit):
records of a warm pool's idle sandboxes, which ``page`` (``list``) leaves out."""
BUSY_TIMEOUT = 5.0
"""Seconds a statement waits for another process's write lock."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandbox (
    name            TEXT PRIMARY KEY,
    id              TEXT NOT NULL,
    driver          TEXT NOT NULL,
    status          TEXT NOT NULL,
    detached        INTEGER NOT NULL DEFAULT 0,
    ephemeral       INTEGER NOT NULL DEFAULT 0,
    spec            TEXT NOT NULL,
    policy          TEXT NOT NULL DEFAULT '{}',
    owner_pid       INTEGER,
    owner_start     INTEGER,
    pid             INTEGER,
    pid_start       INTEGER,
    init_pid        INTEGER,
    init_start      INTEGER,
    keeper_pid      INTEGER,
    keeper_start    INTEGER,
    stop_requested  INTEGER NOT NULL DEFAULT 0,
    restarts        INTEGER NOT NULL DEFAULT 0,
    exit_code       INTEGER,
    exit_signal     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    stopped_at      INTEGER,
    updated_at      INTEGER NOT NULL
)
"""

_COLUMNS = (
    "name id driver status detached ephemeral spec policy owner_pid owner_start pid "
    "pid_start init_pid init_start keeper_pid keeper_start stop_requested restarts "
    "exit_code exit_signal last_error created_at started_at stopped_at updated_at"
).split()
_UPDATABLE = frozenset(_COLUMNS) - {"name", "id", "created_at"}


# -- time and processes ----------------------------------------------------------------------


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch."""
    return to_us(datetime.now(UTC))


def to_us(when: datetime) -> int:
    return (when - _EPOCH) // _US


def from_us(value: int) -> datetime:
    return _EPOCH + value * _US


def process_start(pid: int | None) -> int | None:
    """Start time of ``pid`` (clock ticks after boot), None if there is no such process.

    A zombie counts as gone.
    """
    if pid is None or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, start: int | None) -> bool:
    """Is ``pid`` the same live process that was recorded (start time ``start``)?"""
    now = process_start(pid)
    return now is not None and (start is None or now == start)


def signal_process(pid: int | None, start: int | None, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the recorded process; True if sent.

    Through a pidfd, so the pid cannot be recycled between the check and the signal.
    """
    if pid is None or pid <= 0:
        return False
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not process_alive(pid, start):
            return False
        import signal

        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


_own: tuple[int, int | None] | None = None


def own_identity() -> tuple[int, int | None]:
    """(pid, start time) of this process (recomputed after a fork)."""
    global _own
    pid = os.getpid()
    if _own is None or _own[0] != pid:
        _own = (pid, process_start(pid))
    return _own


# -- records -----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SandboxRecord:
    """One row of the ``sandbox`` table, decoded."""

    name: str
    id: str
    driver: str
    status: SandboxStatus
    spec: SandboxSpec
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    detached: bool = False
    ephemeral: bool = False
    owner_pid: int | None = None
    owner_start: int | None = None
    pid: int | None = None
    pid_start: int | None = None
    init_pid: int | None = None
    init_start: int | None = None
    keeper_pid: int | None = None
    keeper_start: int | None = None
    stop_requested: bool = False
    restarts: int = 0
    exit_code: int | None = None
    exit_signal: int | None = None
    last_error: str | None = None
    created_at: int = 0
    started_at: int | None = None
    stopped_at: int | None = None
    updated_at: int = 0

    @property
    def ids(self) -> ProcessIds:
        return ProcessIds(
            pid=self.pid,
            pid_start=self.pid_start,
            init_pid=self.init_pid,
            init_start=self.init_start,
            keeper_pid=self.keeper_pid,
            keeper_start=self.keeper_start,
        )

    def owner_alive(self) -> bool:
        return process_alive(self.owner_pid, self.owner_start)

    def keeper_alive(self) -> bool:
        return process_alive(self.keeper_pid, self.keeper_start)

    def info(self) -> SandboxInfo:
        return SandboxInfo(
            name=self.name,
            status=self.status,
            image=self.spec.image,
            created_at=from_us(self.created_at),
            detached=self.detached,
            pid=self.pid,
            ephemeral=self.ephemeral,
            labels=dict(self.spec.labels),
            owner_pid=self.owner_pid,
            started_at=None if self.started_at is None else from_us(self.started_at),
            stopped_at=None if self.stopped_at is None else from_us(self.stopped_at),
            exit_code=self.exit_code,
            exit_signal=self.exit_signal,
            last_error=self.last_error,
            restarts=self.restarts,
        )

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in _COLUMNS}
        out["status"] = str(self.status)
        out["spec"] = msgspec.json.encode(self.spec).decode()
        out["policy"] = msgspec.json.encode(self.policy).decode()
        out["detached"] = int(self.detached)
        out["ephemeral"] = int(self.ephemeral)
        out["stop_requested"] = int(self.stop_requested)
        return out

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SandboxRecord:
        values = {key: row[key] for key in row.keys()}
        try:
            values["status"] = SandboxStatus(values["status"])
        except ValueError:
            values["status"] = SandboxStatus.CRASHED
        values["spec"] = msgspec.json.decode(values["spec"], type=SandboxSpec)
        try:
            values["policy"] = msgspec.json.decode(values["policy"], type=RestartPolicy)
        except msgspec.DecodeError:
            values["policy"] = RestartPolicy()
        for flag in ("detached", "ephemeral", "stop_requested"):
            values[flag] = bool(values[flag])
        return cls(**values)


class SandboxList:
    """One page of ``Supervisor.list``: ``.sandboxes`` and ``.next_cursor`` (None: last
    page). Iterating it (or ``len``) goes over ``.sandboxes``."""

    __slots__ = ("next_cursor", "sandboxes")

    def __init__(self, sandboxes: builtins.list[SandboxInfo], next_cursor: str | None) -> None:
        self.sandboxes = sandboxes
        self.next_cursor = next_cursor

    def __iter__(self) -> Iterator[SandboxInfo]:
        return iter(self.sandboxes)

    def __len__(self) -> int:
        return len(self.sandboxes)

    def __getitem__(self, index: int) -> SandboxInfo:
        return self.sandboxes[index]

    def __repr__(self) -> str:
        names = ", ".join(info.name for info in self.sandboxes)
        return f"<SandboxList [{names}] next_cursor={self.next_cursor!r}>"

    @property
    def items(self) -> builtins.list[SandboxInfo]:
        return self.sandboxes


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(b"n:" + name.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    if not isinstance(cursor, str) or not cursor:
        raise InvalidConfig(f"cursor must be a non-empty string, got {cursor!r}")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        if raw.startswith(b"n:"):
            return raw[2:].decode()
    except (binascii.Error, ValueError):
        pass
    raise InvalidConfig(f"cursor {cursor!r} is not one this server handed out")


# -- the db --------------------------------------------------------------------------------------


class Registry:
    """The ``sandbox`` table (a file, or ``None`` for a private in-memory one)."""

    def __init__(self, path: Path | None = None, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        target = ":memory:"
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            target = str(path)
        try:
            self._db = sqlite3.connect(
                target, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
        except sqlite3.Error as exc:
            raise Runtime(f"cannot open the state db {path or ':memory:'}: {exc}") from exc
        # Two processes opening a new db at once: switching to WAL and creating the
        # schema can report "database is locked" without waiting on the busy timeout,
        # so retry until it is spent.
        deadline = time.monotonic() + busy_timeout
        delay = 0.005
        while True:
            try:
                self._init_schema(path)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    self._db.close()
                    raise Runtime(f"cannot open the state db {path}: {exc}") from exc
            except sqlite3.Error as exc:
                self._db.close()
                raise Runtime(f"cannot open the state db {path or ':memory:'}: {exc}") from exc
            time.sleep(delay)  # this runs in a worker thread (see open_supervisor)
            delay = min(delay * 2, 0.1)

    def _init_schema(self, path: Path | None) -> None:
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._db.execute("CREATE INDEX IF NOT EXISTS sandbox_status ON sandbox (status)")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version > SCHEMA_VERSION:
            raise Runtime(
                f"state db {path} has schema version {version}; this corral knows "
                f"{SCHEMA_VERSION}: upgrade corral or use another CORRAL_HOME"
            )

    def __repr__(self) -> str:
        return f"<Registry {self.path or ':memory:'}>"

    def close(self) -> None:
        self._db.close()

    def _run(self, sql: str, args: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise Runtime(f"state db {self.path or ':memory:'}: {exc}") from exc

    # -- writes
    def claim(self, record: SandboxRecord) -> SandboxRecord | None:
        """Insert ``record``; None on success, else the record holding the name now."""
        row = record.row()
        names = ", ".join(_COLUMNS)
        marks = ", ".join(f":{name}" for name in _COLUMNS)
        try:
            self._run(f"INSERT INTO sandbox ({names}) VALUES ({marks})", row)
        except sqlite3.IntegrityError:
            existing = self.get(record.name)
            if existing is None:  # removed in between: try once more
                try:
                    self._run(f"INSERT INTO sandbox ({names}) VALUES ({marks})", row)
                    return None
                except sqlite3.IntegrityError:
                    existing = self.get(record.name)
            if existing is None:
                raise SandboxAlreadyExists(f"sandbox {record.name!r} already exists") from None
            return existing
        return None

    def rename(self, name: str, id: str, record: SandboxRecord) -> SandboxRecord | None:
        """Turn the record ``name``/``id`` into ``record`` (a new name and id: a warm
        pool's sandbox claimed by a create) in one UPDATE, so the new name is claimed
        atomically, as by :meth:`claim`. None on success, else the record holding
        ``record.name`` now; SandboxNotFound when ``name``/``id`` is gone."""
        row = record.row()
        sets = ", ".join(f"{column} = :{column}" for column in _COLUMNS)
        sql = f"UPDATE sandbox SET {sets} WHERE name = :_name AND id = :_id"
        try:
            cursor = self._run(sql, {**row, "_name": name, "_id": id})
        except sqlite3.IntegrityError:
            existing = self.get(record.name)
            if existing is None:
                raise SandboxAlreadyExists(f"sandbox {record.name!r} already exists") from None
            return existing
        if cursor.rowcount == 0:
            raise SandboxNotFound(f"sandbox {name!r} not found")
        return None

    def update(self, name: str, id: str, *, where: str = "", **fields: Any) -> bool:
        """Set ``fields`` on the record ``name`` if its id is still ``id``; True if it was.

        ``where`` adds a condition (SQL over the columns, e.g. ``"status = 'created'"``).
        """
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        values = {key: _column_value(value) for key, value in fields.items()}
        values["updated_at"] = now_us()
        sets = ", ".join(f"{key} = :{key}" for key in values)
        cond = f" AND ({where})" if where else ""
        cursor = self._run(
            f"UPDATE sandbox SET {sets} WHERE name = :_name AND id = :_id{cond}",
            {**values, "_name": name, "_id": id},
        )
        return cursor.rowcount > 0

    def delete(self, name: str, id: str | None = None) -> bool:
        if id is None:
            cursor = self._run("DELETE FROM sandbox WHERE name = ?", (name,))
        else:
            cursor = self._run("DELETE FROM sandbox WHERE name = ? AND id = ?", (name, id))
        return cursor.rowcount > 0

    # -- reads
    def get(self, name: str) -> SandboxRecord | None:
        row = self._run("SELECT * FROM sandbox WHERE name = ?", (name,)).fetchone()
        return None if row is None else SandboxRecord.from_row(row)

    def page(
        self, cursor: str | None = None, limit: int | None = None
    ) -> tuple[builtins.list[SandboxRecord], str | None]:
        """Records by name after ``cursor``, at most ``limit``; and the next cursor.
        Internal records (a warm pool's idle sandboxes, :data:`INTERNAL_PREFIX`) are
        left out."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise InvalidConfig(f"limit must be a whole number, got {limit!r}")
        if limit is not None and limit < 1:
            raise InvalidConfig(f"limit must be at least 1, got {limit}")
        after = None if cursor is None else _decode_cursor(cursor)
        sql = f"SELECT * FROM sandbox WHERE substr(name, 1, 1) != '{INTERNAL_PREFIX}'"
        args: builtins.list[Any] = []
        if after is not None:
            sql += " AND name > ?"
            args.append(after)
        sql += " ORDER BY name"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit + 1)
        rows = self._run(sql, tuple(args)).fetchall()
        records = [SandboxRecord.from_row(row) for row in rows]
        if limit is not None and len(records) > limit:
            records = records[:limit]
            return records, _encode_cursor(records[-1].name)
        return records, None

    def unsettled(self) -> builtins.list[SandboxRecord]:
        """Records not stopped or crashed (the ones whose processes reaping checks)."""
        rows = self._run(
            "SELECT * FROM sandbox WHERE status NOT IN ('stopped', 'crashed')"
        ).fetchall()
        return [SandboxRecord.from_row(row) for row in rows]


def _column_value(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, SandboxStatus):
        return str(value)
    if isinstance(value, datetime):
        return to_us(value)
    if isinstance(value, SandboxSpec | RestartPolicy):
        return msgspec.json.encode(value).decode()
    return value

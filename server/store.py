"""The server's state: organisations, API keys and sandbox records, in sqlite.

Lives at ``<data dir>/server.db``. API keys are random 256-bit secrets shown once; only
their SHA-256 is stored (a slow password hash buys nothing for keys this long), so a
leaked database does not leak keys. ``corral serve keys …`` opens the same file from
another process while the server runs: it only touches ``orgs`` and ``api_keys``, and the
server reads keys from sqlite on every request, so a revoke takes effect at once.

Sandbox records are kept in memory as well (the server process is their only writer)
and written through to sqlite, so ``get`` and ``list`` never wait on disk. Their order
is ``seq``, a counter that only grows: list pages and cursors stay stable while
sandboxes come and go.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import secrets
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from .models import SandboxOut, SandboxSpecOut

KEY_PREFIX = "crl_"
DB_NAME = "server.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orgs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, org_id TEXT NOT NULL REFERENCES orgs(id),
    hash TEXT NOT NULL UNIQUE, label TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, org_id TEXT NOT NULL,
    name TEXT NOT NULL, record BLOB NOT NULL, UNIQUE (org_id, name));
"""


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "sandbox"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Org:
    id: str
    name: str
    created_at: str


@dataclass(frozen=True)
class KeyInfo:
    id: str
    org_id: str
    org_name: str
    label: str
    created_at: str
    revoked_at: str | None


@dataclass
class SandboxRecord:
    """One sandbox as the API shows it (persisted as msgpack of :class:`SandboxOut`)."""

    seq: int
    out: SandboxOut
    shell: str | None = None

    @property
    def id(self) -> str:
        return self.out.id

    @property
    def org_id(self) -> str:
        return self.out.org_id

    @property
    def name(self) -> str:
        return self.out.name


class _Row(msgspec.Struct):
    out: SandboxOut
    shell: str | None = None


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Row)


class Store:
    """sqlite-backed state. One instance per process; not thread-safe."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._by_id: dict[str, SandboxRecord] = {}
        self._by_name: dict[tuple[str, str], SandboxRecord] = {}
        self._org_seqs: dict[str, list[int]] = {}
        self._by_seq: dict[int, SandboxRecord] = {}
        self._next_seq = 1

    @classmethod
    def open(cls, data_dir: str | Path) -> Store:
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(path / DB_NAME, isolation_level=None, timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        (path / DB_NAME).chmod(0o600)
        return cls(db)

    def close(self) -> None:
        self._db.close()

    # -- orgs and keys --------------------------------------------------------------------------

    def org_by_name(self, name: str) -> Org | None:
        row = self._db.execute(
            "SELECT id, name, created_at FROM orgs WHERE name = ?", (name,)
        ).fetchone()
        return Org(*row) if row else None

    def ensure_org(self, name: str) -> Org:
        org = self.org_by_name(name)
        if org is not None:
            return org
        org = Org("org_" + secrets.token_hex(8), name, now_rfc3339())
        self._db.execute("INSERT INTO orgs VALUES (?, ?, ?)", (org.id, org.name, org.created_at))
        return org

    def create_key(self, org_name: str, label: str = "") -> tuple[KeyInfo, str]:
        """A new API key for ``org_name`` (created if missing): (info, the secret key)."""
        org = self.ensure_org(org_name)
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        created = now_rfc3339()
        self._db.execute(
            "INSERT INTO api_keys (id, org_id, hash, label, created_at) VALUES (?, ?, ?, ?, ?)",
            (key_id, org.id, hash_key(key), label, created),
        )
        return KeyInfo(key_id, org.id, org.name, label, created, None), key

    def has_keys(self) -> bool:
        return self._db.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def list_keys(self, org_name: str | None = None) -> list[KeyInfo]:
        sql = (
            "SELECT k.id, k.org_id, o.name, k.label, k.created_at, k.revoked_at"
            " FROM api_keys k JOIN orgs o ON o.id = k.org_id"
        )
        args: tuple[str, ...] = ()
        if org_name is not None:
            sql += " WHERE o.name = ?"
            args = (org_name,)
        return [KeyInfo(*row) for row in self._db.execute(sql + " ORDER BY k.created_at", args)]

    def revoke_key(self, key_id: str) -> bool:
        """Revoke by key id (the part after ``crl_``); False if no live key has it."""
        cur = self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (now_rfc3339(), key_id),
        )
        return cur.rowcount > 0

    def authenticate(self, key: str) -> str | None:
        """The org id of a live key, or None."""
        if not key.startswith(KEY_PREFIX) or len(key) > 256:
            return None
        row = self._db.execute(
            "SELECT org_id FROM api_keys WHERE hash = ? AND revoked_at IS NULL", (hash_key(key),)
        ).fetchone()
        return str(row[0]) if row else None

    # -- sandbox records ----------------------------------------------------------------------

    def load_sandboxes(self) -> list[SandboxRecord]:
        """Read every record from disk into memory (call once, at start-up)."""
        for seq, blob in self._db.execute("SELECT seq, record FROM sandboxes ORDER BY seq"):
            row = _dec.decode(blob)
            self._index(SandboxRecord(seq, row.out, row.shell))
            self._next_seq = max(self._next_seq, seq + 1)
        return list(self._by_seq.values())

    def new_sandbox(
        self, org_id: str, name: str, spec: SandboxSpecOut, *, ephemeral: bool, shell: str | None
    ) -> SandboxRecord:
        """Add a record in status ``created``. The caller checked the name is free."""
        seq = self._next_seq
        self._next_seq += 1
        out = SandboxOut(
            id="sb_" + secrets.token_hex(10),
            org_id=org_id,
            name=name,
            slug=slugify(name),
            status="created",
            spec=spec,
            ephemeral=ephemeral,
            created_at=now_rfc3339(),
        )
        rec = SandboxRecord(seq, out, shell)
        self._db.execute(
            "INSERT INTO sandboxes VALUES (?, ?, ?, ?, ?)",
            (out.id, seq, org_id, name, _enc.encode(_Row(out, shell))),
        )
        self._index(rec)
        return rec

    def save(self, rec: SandboxRecord) -> None:
        """Write a changed record through to disk."""
        self._db.execute(
            "UPDATE sandboxes SET record = ? WHERE id = ?",
            (_enc.encode(_Row(rec.out, rec.shell)), rec.id),
        )

    def delete(self, rec: SandboxRecord) -> None:
        self._db.execute("DELETE FROM sandboxes WHERE id = ?", (rec.id,))
        if self._by_id.pop(rec.id, None) is None:
            return
        self._by_name.pop((rec.org_id, rec.name), None)
        self._by_seq.pop(rec.seq, None)
        seqs = self._org_seqs.get(rec.org_id, [])
        i = bisect.bisect_left(seqs, rec.seq)
        if i < len(seqs) and seqs[i] == rec.seq:
            del seqs[i]

    def get(self, org_id: str, sandbox_id: str) -> SandboxRecord | None:
        rec = self._by_id.get(sandbox_id)
        return rec if rec is not None and rec.org_id == org_id else None

    def get_by_name(self, org_id: str, name: str) -> SandboxRecord | None:
        return self._by_name.get((org_id, name))

    def page(
        self,
        org_id: str,
        *,
        after_seq: int = 0,
        limit: int = 20,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[list[SandboxRecord], int | None]:
        """Records of ``org_id`` with ``seq > after_seq`` in seq order, and the seq to
        continue after (None on the last page)."""
        seqs = self._org_seqs.get(org_id, [])
        out: list[SandboxRecord] = []
        for seq in self._iter_after(seqs, after_seq):
            rec = self._by_seq[seq]
            if labels and any(rec.out.spec.labels.get(k) != v for k, v in labels.items()):
                continue
            if len(out) == limit:
                return out, out[-1].seq
            out.append(rec)
        return out, None

    def all(self) -> list[SandboxRecord]:
        return list(self._by_seq.values())

    def count(self, org_id: str) -> int:
        return len(self._org_seqs.get(org_id, []))

    @staticmethod
    def _iter_after(seqs: list[int], after: int) -> Iterator[int]:
        i = bisect.bisect_right(seqs, after)
        while i < len(seqs):
            yield seqs[i]
            i += 1

    def _index(self, rec: SandboxRecord) -> None:
        self._by_id[rec.id] = rec
        self._by_name[(rec.org_id, rec.name)] = rec
        self._by_seq[rec.seq] = rec
        seqs = self._org_seqs.setdefault(rec.org_id, [])
        bisect.insort(seqs, rec.seq)

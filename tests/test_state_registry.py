"""The state db on its own: claiming names, updates by record id, paging, process identity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from corral.actors.lifecycle import RestartPolicy
from corral.actors.registry import (
    Registry,
    SandboxRecord,
    from_us,
    now_us,
    process_alive,
    process_start,
    signal_process,
    to_us,
)
from corral.actors.state import SandboxStatus
from corral.drivers.base import SandboxSpec
from corral.errors import InvalidConfig, Runtime


def record(name: str, id: str = "", **fields: object) -> SandboxRecord:
    values: dict[str, object] = {
        "name": name,
        "id": id or f"id-{name}",
        "driver": "fake",
        "status": SandboxStatus.RUNNING,
        "spec": SandboxSpec(name=name, env={"A": "1"}, labels={"k": "v"}, idle_timeout=3.0),
        "created_at": now_us(),
        "updated_at": now_us(),
    }
    values.update(fields)
    return SandboxRecord(**values)  # type: ignore[arg-type]


def test_a_record_round_trips(tmp_path: Path) -> None:
    db = Registry(tmp_path / "state.db")
    original = record("a", policy=RestartPolicy.build("transient", 2, 7.5), pid=12, detached=True)
    assert db.claim(original) is None
    back = db.get("a")
    assert back == original
    assert back.spec.env == {"A": "1"} and back.spec.idle_timeout == 3.0
    info = back.info()
    assert info.name == "a" and info.labels == {"k": "v"} and info.detached and info.pid == 12
    assert to_us(info.created_at) == original.created_at
    assert db.get("missing") is None


def test_a_name_is_claimed_once_across_connections(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    one, two = Registry(path), Registry(path)
    assert one.claim(record("a", "first")) is None
    holder = two.claim(record("a", "second"))
    assert holder is not None and holder.id == "first"
    assert two.delete("a", "second") is False  # another record's id: untouched
    assert two.delete("a", "first") is True
    assert two.claim(record("a", "second")) is None
    assert one.get("a").id == "second"  # type: ignore[union-attr]


def test_concurrent_claims_from_threads_have_one_winner(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Registry(path).close()
    results: list[SandboxRecord | None] = []
    barrier = threading.Barrier(8)

    def claim(n: int) -> None:
        db = Registry(path)
        barrier.wait()
        results.append(db.claim(record("same", f"id{n}")))
        db.close()

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(None) == 1 and len(results) == 8


def test_updates_name_the_record_id(tmp_path: Path) -> None:
    db = Registry(tmp_path / "state.db")
    db.claim(record("a", status=SandboxStatus.CREATED))
    assert db.update("a", "id-a", status=SandboxStatus.STARTING, stop_requested=True)
    assert not db.update("a", "other", status=SandboxStatus.CRASHED)
    assert not db.update("a", "id-a", where="status = 'created'", status="running")
    got = db.get("a")
    assert got is not None and got.status is SandboxStatus.STARTING and got.stop_requested
    with pytest.raises(ValueError, match="not updatable"):
        db.update("a", "id-a", created_at=1)


def test_pages_by_name_with_opaque_cursors() -> None:
    db = Registry()
    names = [f"s{n:02d}" for n in range(7)]
    for name in reversed(names):
        db.claim(record(name))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        rows, cursor = db.page(cursor, 3)
        pages += 1
        seen += [r.name for r in rows]
        if cursor is None:
            break
    assert seen == names and pages == 3
    assert [r.name for r in db.page(None, None)[0]] == names
    assert db.page(None, 7)[1] is None
    for bad in ("", "%%%", "bm9wZQ"):
        with pytest.raises(InvalidConfig):
            db.page(bad, 2)
    for limit in (0, -3, 2.0, False):
        with pytest.raises(InvalidConfig):
            db.page(None, limit)  # type: ignore[arg-type]


def test_unsettled_records() -> None:
    db = Registry()
    for name, status in [("a", "running"), ("b", "stopped"), ("c", "crashed"), ("d", "created")]:
        db.claim(record(name, status=SandboxStatus(status)))
    assert sorted(r.name for r in db.unsettled()) == ["a", "d"]


def test_an_unknown_status_reads_as_crashed(tmp_path: Path) -> None:
    db = Registry(tmp_path / "state.db")
    db.claim(record("a"))
    db.update("a", "id-a", status="paused")
    assert db.get("a").status is SandboxStatus.CRASHED  # type: ignore[union-attr]


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "state.db"
    Registry(path).close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version=99")
    con.close()
    with pytest.raises(Runtime, match="schema version 99"):
        Registry(path)


def test_time_is_exact_to_the_microsecond() -> None:
    now = now_us()
    assert to_us(from_us(now)) == now
    assert from_us(0).year == 1970


def test_process_identity_and_verified_signals() -> None:
    me = process_start(os.getpid())
    assert me is not None and process_alive(os.getpid(), me)
    assert not process_alive(os.getpid(), me + 1)  # a recycled pid looks like this
    assert process_start(None) is None and process_start(-1) is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start(child.pid)
        assert start is not None
        assert not signal_process(child.pid, start + 1, signal.SIGTERM)  # wrong identity
        assert child.poll() is None
        assert signal_process(child.pid, start, signal.SIGTERM)
        assert child.wait(timeout=10) == -signal.SIGTERM
        assert not process_alive(child.pid, start)
        assert not signal_process(child.pid, start, signal.SIGTERM)
    finally:
        child.kill()
        child.wait()

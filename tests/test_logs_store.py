"""The host's sandbox log store: files, rotation, reading back, following."""

from __future__ import annotations

import os
import stat
from datetime import datetime
from pathlib import Path

import pytest
import trio
import trio.testing

from corral.actors import logs as logs_module
from corral.actors.logfiles import LOG_FILE, decode_records, encode_record, follow_log, read_log
from corral.actors.logs import LogRecord, LogStore
from corral.errors import InvalidConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture(params=["disk", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> LogStore:
    where = tmp_path / "logs" if request.param == "disk" else None
    return LogStore(where, clock=Clock())


def texts(records: list[LogRecord]) -> list[str]:
    return [r.text for r in records]


def test_append_and_read_back_with_tail_and_since(store: LogStore) -> None:
    for n in range(10):
        store.append("stdout" if n % 2 else "system", f"line {n}", job=n % 3 or None)
    everything = store.read()
    assert texts(everything) == [f"line {n}" for n in range(10)]
    assert [r.seq for r in everything] == list(range(1, 11))
    assert everything[1].stream == "stdout" and everything[1].job == 1
    assert everything[0].stream == "system" and everything[0].job is None
    assert texts(store.read(tail=3)) == ["line 7", "line 8", "line 9"]
    assert store.read(tail=0) == []
    assert texts(store.read(tail=100)) == texts(everything)
    cut = everything[6].timestamp
    assert texts(store.read(since=cut)) == ["line 6", "line 7", "line 8", "line 9"]
    assert texts(store.read(since=datetime.fromtimestamp(cut), tail=2)) == ["line 8", "line 9"]
    assert everything[0].time.timestamp() == everything[0].timestamp


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tail": -1}, "tail"),
        ({"tail": 1.5}, "tail"),
        ({"tail": True}, "tail"),
        ({"since": "yesterday"}, "since"),
    ],
)
def test_bad_filters_are_invalid_config(store: LogStore, kw: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidConfig, match=match):
        store.read(**kw)  # type: ignore[arg-type]


def test_files_rotate_and_stay_capped(tmp_path: Path) -> None:
    where = tmp_path / "logs"
    store = LogStore(where, file_bytes=4096, files=3)
    for n in range(400):
        store.append("stdout", b"%04d" % n + b"x" * 96)
    names = sorted(p.name for p in where.iterdir())
    assert names == [LOG_FILE, f"{LOG_FILE}.1", f"{LOG_FILE}.2"]
    assert all(p.stat().st_size <= 4096 for p in where.iterdir())
    kept = store.read()
    seqs = [r.seq for r in kept]
    assert seqs == list(range(seqs[0], 401)) and seqs[0] > 1  # the oldest went
    assert kept[-1].data.startswith(b"0399")
    assert read_log(where, files=3) == kept
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert stat.S_IMODE((where / LOG_FILE).stat().st_mode) == 0o600


def test_data_longer_than_a_quarter_file_is_split_so_files_keep_their_size(
    tmp_path: Path,
) -> None:
    store = LogStore(tmp_path, file_bytes=8192, files=2)
    big = bytes(range(256)) * 40  # 10 KiB: more than a whole file
    last = store.append("stdout", big, job=3, timestamp=5.0, agent_seq=11)
    records = store.read()
    assert [len(r.data) for r in records] == [2048] * 5
    assert b"".join(r.data for r in records) == big and last == records[-1]
    assert {(r.stream, r.job, r.timestamp, r.agent_seq) for r in records} == {
        ("stdout", 3, 5.0, 11)
    }
    assert all(p.stat().st_size <= 8192 for p in tmp_path.iterdir())
    assert store.append("stdout", b"") is not None and store.read()[-1].data == b""


def test_one_file_means_truncate_on_rotation(tmp_path: Path) -> None:
    store = LogStore(tmp_path, file_bytes=4096, files=1)
    for _ in range(100):
        store.append("stdout", b"y" * 100)
    assert [p.name for p in tmp_path.iterdir()] == [LOG_FILE]
    assert 0 < len(store.read()) < 100 and store.read()[-1].seq == 100


def test_memory_store_is_capped_the_same_way() -> None:
    store = LogStore(None, file_bytes=4096, files=2)
    for _ in range(1000):
        store.append("stdout", b"z" * 100)
    kept = store.read()
    assert sum(len(r.data) + 64 for r in kept) <= 8192 and kept[-1].seq == 1000


def test_a_new_store_on_the_same_files_continues_the_sequence(tmp_path: Path) -> None:
    first = LogStore(tmp_path)
    first.append("system", "one")
    first.append("system", "two", agent_seq=7)
    first.close()
    second = LogStore(tmp_path)
    assert second.last_agent_seq() == 7
    second.append("system", "three")
    assert [(r.seq, r.text) for r in second.read()] == [(1, "one"), (2, "two"), (3, "three")]


def test_reopen_after_the_directory_was_recreated(tmp_path: Path) -> None:
    where = tmp_path / "logs"
    store = LogStore(where)
    store.append("system", "before")
    (where / LOG_FILE).unlink()
    where.rmdir()
    store.reopen()
    store.append("system", "after")
    assert [(r.seq, r.text) for r in read_log(where)] == [(2, "after")]


def test_a_torn_last_record_is_ignored(tmp_path: Path) -> None:
    good = LogRecord(seq=1, timestamp=1.0, stream="stdout", data=b"ok")
    torn = encode_record(LogRecord(seq=2, timestamp=2.0, stream="stdout", data=b"lost"))[:-3]
    (tmp_path / LOG_FILE).write_bytes(encode_record(good) + torn)
    assert read_log(tmp_path) == [good]
    assert decode_records(b"\xff\xff") == []
    store = LogStore(tmp_path)
    store.append("stdout", "next")  # appends after the torn bytes: readers stop there
    assert store.seq == 2


def test_closed_store_takes_nothing(store: LogStore) -> None:
    store.append("system", "kept")
    store.close()
    assert store.append("system", "dropped") is None
    assert texts(store.read()) == ["kept"]


async def test_follow_gives_the_backlog_then_live_records_and_ends_on_close(
    store: LogStore,
) -> None:
    for n in range(3):
        store.append("stdout", f"old {n}")
    got: list[str] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                async for record in store.follow(tail=2):
                    got.append(record.text)

            nursery.start_soon(follow)
            await trio.testing.wait_all_tasks_blocked()
            assert got == ["old 1", "old 2"]
            store.append("stdout", "new 1")
            store.append("stdout", "new 2")
            await trio.testing.wait_all_tasks_blocked()
            assert got == ["old 1", "old 2", "new 1", "new 2"]
            store.close()
    assert got[-1] == "new 2"


async def test_follow_ends_when_until_holds(store: LogStore) -> None:
    done = False
    got: list[str] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                async for record in store.follow(until=lambda: done):
                    got.append(record.text)

            nursery.start_soon(follow)
            store.append("system", "running")
            await trio.testing.wait_all_tasks_blocked()
            done = True
            store.append("system", "stopped")  # what wakes the follower to see `until`
    assert got == ["running", "stopped"]


async def test_a_follower_far_behind_reads_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs_module, "RECENT", 5)
    store = LogStore(tmp_path)
    follower = store.follow()
    with trio.fail_after(5):
        store.append("stdout", "first")
        assert (await follower.__anext__()).text == "first"
        for n in range(50):
            store.append("stdout", f"n{n}")
        rest = [(await follower.__anext__()).text for _ in range(50)]
    assert rest == [f"n{n}" for n in range(50)]


async def test_follow_log_from_another_process_polls_the_files(tmp_path: Path) -> None:
    store = LogStore(tmp_path, file_bytes=4096, files=4)
    store.append("system", "before")
    got: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                async for record in follow_log(tmp_path, interval=0.01):
                    got.append(record.text)
                    if record.text == "n199":
                        nursery.cancel_scope.cancel()

            nursery.start_soon(follow)
            for n in range(200):  # several rotations on the way
                store.append("stdout", f"n{n}" + "-" * 60)
                if n % 20 == 0:
                    await trio.sleep(0.02)
            store.append("stdout", "n199")
    assert got[0] == "before"
    lines = [t.split("-")[0] for t in got[1:]]
    assert lines[:-1] == [f"n{n}" for n in range(200)] and lines[-1] == "n199"


def test_records_are_msgpack_with_a_length_prefix(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    record = store.append("stderr", b"\x00\xff binary", job=4, timestamp=12.5, agent_seq=9)
    assert record is not None
    raw = (tmp_path / LOG_FILE).read_bytes()
    assert raw == encode_record(record) and int.from_bytes(raw[:4], "big") == len(raw) - 4
    assert decode_records(raw) == [record]
    assert record.timestamp == 12.5
    store.append("stdout", "nan time", timestamp=float("nan"))
    assert os.path.getsize(tmp_path / LOG_FILE) > len(raw)
    assert store.read()[-1].timestamp > 1e9

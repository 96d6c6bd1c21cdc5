"""sb.fs without real sandboxes: argument checks, stream chunking on the fake driver, and
copy_to_host against a lying sandbox (names and kinds a real file system cannot hold)."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import corral
from corral import hostfs
from corral.drivers.fake import FakeDriver
from corral.hostfs import check_name, link_stays_inside
from corral.protocol import FS_CHUNK, FsEntry, FsWrite


@asynccontextmanager
async def fake_sandbox() -> AsyncIterator[tuple[corral.Sandbox, list[FsWrite]]]:
    """A fake sandbox, and the FsWrite requests its agent received."""
    async with FakeDriver() as driver, corral.open_supervisor(driver=driver) as sup:
        sb = await sup.create("fs")
        fs = driver.processes["fs"].fs
        writes: list[FsWrite] = []
        real_write = fs.write

        def record(msg: FsWrite) -> int:
            writes.append(msg)
            return real_write(msg)

        fs.write = record  # type: ignore[method-assign]
        yield sb, writes


# -- symlink and name rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "depth", "ok"),
    [
        ("b", 0, True),
        ("sub/f", 0, True),
        (".", 0, True),
        ("./x/./y", 0, True),
        ("../f", 1, True),
        ("../../lib/x", 2, True),
        ("..", 1, True),
        ("..", 0, False),
        ("../f", 0, False),
        ("../../x", 1, False),
        ("/etc/passwd", 5, False),
        ("/", 5, False),
        ("", 0, False),
        ("s/..", 3, False),  # ".." after a name: s may be a symlink climbing out
        ("s/../..", 3, False),
        ("a/../b", 3, False),
        ("../a/../b", 3, False),
        ("x\0y", 1, False),
    ],
)
def test_link_stays_inside(target: str, depth: int, ok: bool) -> None:
    assert link_stays_inside(target, depth) is ok


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc", "../x", "x\0", None, 3])
def test_check_name_refuses_anything_but_one_component(name: object) -> None:
    with pytest.raises(corral.FsPathEscape):
        check_name(name, "/workspace")


@pytest.mark.parametrize("name", ["a", "...", ".hidden", "with space", "naïve", "a\\b", "-"])
def test_check_name_accepts_plain_names(name: str) -> None:
    assert check_name(name, "/workspace") == name


# -- streams on the fake driver -----------------------------------------------------------------


async def test_read_stream_chunks_and_offsets() -> None:
    with trio.fail_after(10):
        async with fake_sandbox() as (sb, _):
            data = bytes(range(256)) * 40  # 10240 bytes
            await sb.fs.write("/workspace/f", data)
            chunks = [c async for c in sb.fs.read_stream("/workspace/f", chunk_size=1000)]
            assert [len(c) for c in chunks] == [1000] * 10 + [240]
            assert b"".join(chunks) == data
            part = [
                c
                async for c in sb.fs.read_stream(
                    "/workspace/f", chunk_size=300, offset=100, length=700
                )
            ]
            assert [len(c) for c in part] == [300, 300, 100]
            assert b"".join(part) == data[100:800]
            exact = [c async for c in sb.fs.read_stream("/workspace/f", chunk_size=1024)]
            assert [len(c) for c in exact] == [1024] * 10
            await sb.fs.write("/workspace/empty", b"")
            assert [c async for c in sb.fs.read_stream("/workspace/empty")] == []
            assert [c async for c in sb.fs.read_stream("/workspace/f", length=0)] == []
            with pytest.raises(corral.FsNotFound):
                async for _ in sb.fs.read_stream("/workspace/missing"):
                    pass
            with pytest.raises(corral.FsIsADirectory):
                async for _ in sb.fs.read_stream("/workspace"):
                    pass


async def test_write_stream_sends_chunk_sized_writes_and_mode_last() -> None:
    with trio.fail_after(10):
        async with fake_sandbox() as (sb, writes):

            async def pieces() -> AsyncIterator[bytes]:
                for n in range(7):
                    yield bytes([n]) * 1500  # pieces straddle the chunk boundaries

            total = await sb.fs.write_stream("/workspace/w", pieces(), chunk_size=4096, mode=0o444)
            assert total == 7 * 1500
            assert await sb.fs.read("/workspace/w") == b"".join(bytes([n]) * 1500 for n in range(7))
            assert [len(w.data) for w in writes] == [4096, 4096, 10500 - 8192]
            assert [w.offset for w in writes] == [0, 4096, 8192]
            assert [w.truncate for w in writes] == [True, False, False]
            # The owner can write until the last request, which sets the exact mode.
            assert [w.mode for w in writes] == [0o644, None, 0o444]

            writes.clear()
            mixed: list[Any] = [b"ab", bytearray(b"cd")]
            assert await sb.fs.write_stream("/workspace/w", iter(mixed)) == 4
            assert await sb.fs.read("/workspace/w") == b"abcd"
            assert [(len(w.data), w.truncate, w.mode) for w in writes] == [(4, True, None)]

            writes.clear()
            assert await sb.fs.write_stream("/workspace/w", [], mode=0o600) == 0
            assert await sb.fs.read("/workspace/w") == b""
            assert [(w.data, w.truncate, w.mode) for w in writes] == [(b"", True, 0o600)]

            writes.clear()
            exact = [b"x" * 4096, b"y" * 4096]
            assert await sb.fs.write_stream("/workspace/w", exact, chunk_size=4096) == 8192
            assert [len(w.data) for w in writes] == [4096, 4096]


def _forever() -> Iterator[bytes]:
    while True:
        yield b"z" * 10


async def test_write_stream_of_bad_chunks_is_refused() -> None:
    with trio.fail_after(10):
        async with fake_sandbox() as (sb, writes):
            with pytest.raises(corral.InvalidConfig, match="use write"):
                await sb.fs.write_stream("/workspace/w", b"bytes")  # type: ignore[arg-type]
            with pytest.raises(corral.InvalidConfig, match="must be bytes"):
                await sb.fs.write_stream("/workspace/w", ["text"])  # type: ignore[list-item]
            with pytest.raises(corral.InvalidConfig, match="iterable"):
                await sb.fs.write_stream("/workspace/w", 42)  # type: ignore[arg-type]
            assert writes == []
            with pytest.raises(corral.FsNotFound):
                await sb.fs.write_stream("/nowhere/w", _forever(), chunk_size=100)
            assert len(writes) == 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda fs: fs.read(""), "must not be empty"),
        (lambda fs: fs.read(b"/x"), "must be a string"),
        (lambda fs: fs.read("/x\0y"), "NUL"),
        (lambda fs: fs.write("/x", 42), "bytes or str"),
        (lambda fs: fs.write("/x", b"", mode=0o10000), "mode"),
        (lambda fs: fs.write("/x", b"", mode=True), "mode"),
        (lambda fs: fs.write_stream("/x", [], chunk_size=0), "chunk_size"),
        (lambda fs: fs.write_stream("/x", [], chunk_size=FS_CHUNK + 1), "chunk_size"),
        (lambda fs: fs.stat(None), "must be a string"),
        (lambda fs: fs.list(""), "must not be empty"),
        (lambda fs: fs.mkdir("/d", mode=-1), "mode"),
        (lambda fs: fs.remove(""), "must not be empty"),
        (lambda fs: fs.copy("/a", ""), "dst"),
        (lambda fs: fs.rename("", "/b"), "src"),
        (lambda fs: fs.symlink("", "/l"), "target"),
        (lambda fs: fs.exists(""), "must not be empty"),
        (lambda fs: fs.copy_to_host("/a", 42), "host_path"),
        (lambda fs: fs.copy_to_host("/a", ""), "host_path"),
        (lambda fs: fs.copy_from_host(b"/etc", "/a"), "host_path"),
    ],
)
async def test_bad_arguments_raise_invalid_config(call: Any, match: str) -> None:
    with trio.fail_after(10):
        async with fake_sandbox() as (sb, writes):
            with pytest.raises(corral.InvalidConfig, match=match):
                await call(sb.fs)
            assert writes == []


@pytest.mark.parametrize(
    "kwargs",
    [{"chunk_size": 0}, {"chunk_size": FS_CHUNK * 4}, {"offset": -1}, {"length": -5}],
)
async def test_bad_read_stream_arguments(kwargs: dict[str, int]) -> None:
    with trio.fail_after(10):
        async with fake_sandbox() as (sb, _):
            with pytest.raises(corral.InvalidConfig):
                sb.fs.read_stream("/workspace/f", **kwargs)


# -- a lying sandbox ----------------------------------------------------------------------------


def _entry(
    name: str, kind: str = "file", *, size: int = 3, mode: int = 0o644, **kw: Any
) -> FsEntry:
    bits = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(kind, 0)
    return FsEntry(
        name=name, path="/lies/" + name, kind=kind, size=size, mode=bits | mode, mtime=0.0, **kw
    )


class LyingFs:
    """Answers like an agent under the sandbox's control: listings say anything."""

    def __init__(self, tree: dict[str, list[FsEntry]], data: bytes = b"abc") -> None:
        self.tree = tree
        self.data = data
        self.reads: list[str] = []

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FsEntry:
        await trio.lowlevel.checkpoint()
        if path in self.tree:
            return _entry(os.path.basename(path) or "/", "dir")
        return _entry(os.path.basename(path), "file", size=len(self.data))

    async def list(self, path: str) -> list[FsEntry]:
        await trio.lowlevel.checkpoint()
        return self.tree[path]

    def read_stream(
        self, path: str, *, chunk_size: int = FS_CHUNK, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        self.reads.append(path)
        data = self.data if length is None else self.data[:length]

        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 2):
                yield data[i : i + 2]

        return gen()

    async def write_stream(self, path: str, chunks: Any, **kw: Any) -> int:
        raise AssertionError("not used")

    async def mkdir(self, path: str, *, parents: bool = False, mode: int | None = None) -> None:
        raise AssertionError("not used")

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        raise AssertionError("not used")

    async def symlink(self, target: str, path: str) -> None:
        raise AssertionError("not used")


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    "hostile",
    [
        _entry(".."),
        _entry("."),
        _entry("../escaped"),
        _entry("/tmp/escaped"),
        _entry("a/b"),
        _entry(""),
        _entry("nul\0name"),
        _entry("..", "dir"),
        _entry("link", "symlink", target="/etc"),
        _entry("link", "symlink", target="../../.."),
        _entry("link", "symlink", target=None),
    ],
)
async def test_copy_to_host_refuses_lying_listings(tmp_path: Path, hostile: FsEntry) -> None:
    with trio.fail_after(10):
        fs = LyingFs({"/w": [_entry("fine"), _entry("sub", "dir"), hostile], "/w/sub": []})
        before = _snapshot(tmp_path)
        with pytest.raises(corral.FsPathEscape):
            await hostfs.copy_to_host(fs, "/w", tmp_path / "out")
        assert _snapshot(tmp_path) == before  # nothing anywhere, not even the root


async def test_copy_to_host_stops_at_the_listed_size_and_refuses_specials(tmp_path: Path) -> None:
    with trio.fail_after(10):
        # A file swapped for an endless one (/dev/zero) is cut at the size listed.
        fs = LyingFs({"/w": [_entry("f", size=2)]}, data=b"0123456789")
        await hostfs.copy_to_host(fs, "/w", tmp_path / "out")
        assert (tmp_path / "out" / "f").read_bytes() == b"01"
        fs = LyingFs({"/w": [_entry("fifo", "other")]})
        with pytest.raises(corral.FsError, match="not a file, directory or symlink"):
            await hostfs.copy_to_host(fs, "/w", tmp_path / "out2")
        assert not (tmp_path / "out2").exists()


async def test_copy_to_host_strips_setuid_and_refuses_deep_trees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(10):
        fs = LyingFs({"/w": [_entry("suid", mode=0o6755), _entry("dup"), _entry("dup")]})
        with pytest.raises(corral.FsAlreadyExists):  # the same name twice: O_EXCL
            await hostfs.copy_to_host(fs, "/w", tmp_path / "dup")
        assert not (tmp_path / "dup").exists()
        fs = LyingFs({"/w": [_entry("suid", mode=0o6755)]})
        await hostfs.copy_to_host(fs, "/w", tmp_path / "out")
        assert stat.S_IMODE((tmp_path / "out" / "suid").stat().st_mode) == 0o755
        monkeypatch.setattr(hostfs, "MAX_DEPTH", 3)
        loop = LyingFs({})
        path = "/w"
        for _ in range(6):
            loop.tree[path] = [_entry("d", "dir")]
            path += "/d"
        loop.tree[path] = []
        with pytest.raises(corral.FsError, match="deeper than 3"):
            await hostfs.copy_to_host(loop, "/w", tmp_path / "deep")
        assert not (tmp_path / "deep").exists()


class VanishingFs(LyingFs):
    """A file listed, then gone when read (a racing sandbox): the read fails mid-copy."""

    def read_stream(
        self, path: str, *, chunk_size: int = FS_CHUNK, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            yield b"ab"
            raise corral.FsNotFound(f"{path}: gone", path=path)

        return gen()


async def test_a_failed_read_is_the_plain_error_and_the_copy_is_undone(tmp_path: Path) -> None:
    with trio.fail_after(10):
        fs = VanishingFs({"/w": [_entry("sub", "dir")], "/w/sub": [_entry("f", size=10)]})
        with pytest.raises(corral.FsNotFound, match="gone"):
            await hostfs.copy_to_host(fs, "/w", tmp_path / "out")
        assert os.listdir(tmp_path) == []
        with pytest.raises(corral.FsNotFound, match="gone"):
            await hostfs.copy_to_host(fs, "/w/sub/f", tmp_path / "file")
        assert os.listdir(tmp_path) == []  # the temporary file too

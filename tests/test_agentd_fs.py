"""agentd filesystem requests against a real agent process on the host."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from corral.agentd.testing import AgentClient, spawn_agent
from corral.protocol import (
    FS_CHUNK,
    ErrorReply,
    FsCopy,
    FsData,
    FsExists,
    FsExistsReply,
    FsList,
    FsListReply,
    FsMkdir,
    FsRead,
    FsRemove,
    FsRename,
    FsStat,
    FsStatReply,
    FsWrite,
    FsWritten,
    Message,
    Ok,
)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[AgentClient]:
    async with AsyncExitStack() as stack:
        with trio.fail_after(10):
            agent = await stack.enter_async_context(spawn_agent(cwd=str(tmp_path)))
            c, _ = await agent.handshake()
        yield c
        await c.aclose()


async def call(client: AgentClient, msg: Message) -> Message:
    with trio.fail_after(10):
        return await client.call(msg)


def error(reply: Message) -> tuple[str, int | None]:
    assert isinstance(reply, ErrorReply), reply
    return reply.code, reply.errno


async def test_write_then_read_binary(client: AgentClient, tmp_path: Path) -> None:
    data = bytes(range(256)) * 100
    path = str(tmp_path / "f.bin")
    assert await call(client, FsWrite(path=path, data=data)) == FsWritten(written=len(data))
    assert await trio.Path(path).read_bytes() == data
    assert await call(client, FsRead(path=path)) == FsData(data=data, eof=True)
    assert await call(client, FsRead(path=path, offset=10, length=5)) == FsData(data=data[10:15])
    tail = await call(client, FsRead(path=path, offset=len(data) - 3, length=3))
    assert tail == FsData(data=data[-3:], eof=True)
    past = await call(client, FsRead(path=path, offset=len(data) + 5))
    assert past == FsData(data=b"", eof=True)


async def test_read_is_chunked(client: AgentClient, tmp_path: Path) -> None:
    path = tmp_path / "big"
    data = os.urandom(FS_CHUNK + 1000)
    path.write_bytes(data)
    first = await call(client, FsRead(path=str(path), length=FS_CHUNK * 3))
    assert isinstance(first, FsData) and not first.eof and first.data == data[:FS_CHUNK]
    second = await call(client, FsRead(path=str(path), offset=FS_CHUNK))
    assert second == FsData(data=data[FS_CHUNK:], eof=True)


async def test_write_modes(client: AgentClient, tmp_path: Path) -> None:
    path = tmp_path / "w.txt"
    p = str(path)
    await call(client, FsWrite(path=p, data=b"hello world", mode=0o600))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    await call(client, FsWrite(path=p, data=b"!!", append=True))
    assert path.read_bytes() == b"hello world!!"
    await call(client, FsWrite(path=p, data=b"J", offset=6, truncate=False))
    assert path.read_bytes() == b"hello Jorld!!"
    await call(client, FsWrite(path=p, data=b"XY", offset=3))  # truncate: the file ends here
    assert path.read_bytes() == b"helXY"
    await call(client, FsWrite(path=p, data=b"new"))
    assert path.read_bytes() == b"new"


async def test_stat_kinds_and_relative_paths(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"12345")
    (tmp_path / "l").symlink_to("f")
    reply = await call(client, FsStat(path="f"))  # relative to the agent's cwd
    assert isinstance(reply, FsStatReply)
    e = reply.entry
    assert (e.name, e.path, e.kind, e.size) == ("f", str(tmp_path / "f"), "file", 5)
    assert stat.S_ISREG(e.mode) and e.uid == os.getuid()
    assert e.mtime == pytest.approx((tmp_path / "f").stat().st_mtime)
    d = await call(client, FsStat(path=str(tmp_path / "d")))
    assert isinstance(d, FsStatReply) and d.entry.kind == "dir"
    followed = await call(client, FsStat(path=str(tmp_path / "l")))
    assert isinstance(followed, FsStatReply) and followed.entry.kind == "file"
    link = await call(client, FsStat(path=str(tmp_path / "l"), follow_symlinks=False))
    assert isinstance(link, FsStatReply)
    assert (link.entry.kind, link.entry.target) == ("symlink", "f")


async def test_list_sorted(client: AgentClient, tmp_path: Path) -> None:
    base = tmp_path / "dir"
    base.mkdir()
    for name in ("zeta", "alpha", "Mid"):
        (base / name).write_text(name)
    (base / "sub").mkdir()
    (base / "link").symlink_to("alpha")
    reply = await call(client, FsList(path=str(base)))
    assert isinstance(reply, FsListReply)
    names = [e.name for e in reply.entries]
    assert names == sorted(["zeta", "alpha", "Mid", "sub", "link"])
    kinds = {e.name: e.kind for e in reply.entries}
    assert kinds == {
        "zeta": "file",
        "alpha": "file",
        "Mid": "file",
        "sub": "dir",
        "link": "symlink",
    }
    assert {e.path for e in reply.entries} == {str(base / n) for n in names}
    assert [e.target for e in reply.entries if e.kind == "symlink"] == ["alpha"]
    empty = await call(client, FsList(path=str(base / "sub")))
    assert empty == FsListReply(entries=[])


async def test_mkdir(client: AgentClient, tmp_path: Path) -> None:
    assert await call(client, FsMkdir(path=str(tmp_path / "a"))) == Ok()
    assert (tmp_path / "a").is_dir()
    assert error(await call(client, FsMkdir(path=str(tmp_path / "a")))) == (
        "fs_already_exists",
        errno.EEXIST,
    )
    deep = tmp_path / "x" / "y" / "z"
    missing = await call(client, FsMkdir(path=str(deep)))
    assert error(missing) == ("fs_not_found", errno.ENOENT)
    assert await call(client, FsMkdir(path=str(deep), parents=True, mode=0o700)) == Ok()
    assert stat.S_IMODE(deep.stat().st_mode) == 0o700
    assert await call(client, FsMkdir(path=str(deep), parents=True)) == Ok()


async def test_remove(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    tree = tmp_path / "t" / "u"
    tree.mkdir(parents=True)
    (tree / "g").write_text("y")
    (tmp_path / "dangling").symlink_to("nowhere")
    assert await call(client, FsRemove(path=str(tmp_path / "f"))) == Ok()
    assert await call(client, FsRemove(path=str(tmp_path / "dangling"))) == Ok()
    not_empty = await call(client, FsRemove(path=str(tmp_path / "t")))
    assert error(not_empty) == ("fs_not_empty", errno.ENOTEMPTY)
    assert await call(client, FsRemove(path=str(tmp_path / "t"), recursive=True)) == Ok()
    assert sorted(os.listdir(tmp_path)) == []


async def test_copy_file_and_tree(client: AgentClient, tmp_path: Path) -> None:
    src = tmp_path / "src.sh"
    src.write_bytes(b"#!/bin/sh\n")
    src.chmod(0o751)
    assert await call(client, FsCopy(src=str(src), dst=str(tmp_path / "dst.sh"))) == Ok()
    assert (tmp_path / "dst.sh").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE((tmp_path / "dst.sh").stat().st_mode) == 0o751
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"deep")
    (tree / "link").symlink_to("a/b/f")
    assert await call(client, FsCopy(src=str(tree), dst=str(tmp_path / "copy"))) == Ok()
    assert (tmp_path / "copy" / "a" / "b" / "f").read_bytes() == b"deep"
    assert os.readlink(tmp_path / "copy" / "link") == "a/b/f"
    again = await call(client, FsCopy(src=str(tree), dst=str(tmp_path / "copy")))
    assert error(again)[0] == "fs_already_exists"


async def test_rename_and_exists(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "old").write_text("x")
    assert await call(client, FsExists(path=str(tmp_path / "old"))) == FsExistsReply(exists=True)
    assert await call(client, FsRename(src=str(tmp_path / "old"), dst="new")) == Ok()
    assert (tmp_path / "new").read_text() == "x"
    assert await call(client, FsExists(path=str(tmp_path / "old"))) == FsExistsReply(exists=False)
    under_file = await call(client, FsExists(path=str(tmp_path / "new" / "x")))
    assert under_file == FsExistsReply(exists=False)


async def test_missing_paths(client: AgentClient, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    requests: list[Message] = [
        FsRead(path=missing),
        FsStat(path=missing),
        FsList(path=missing),
        FsRemove(path=missing),
        FsRemove(path=missing, recursive=True),
        FsCopy(src=missing, dst=str(tmp_path / "x")),
        FsRename(src=missing, dst=str(tmp_path / "x")),
        FsWrite(path=str(tmp_path / "no" / "dir" / "f"), data=b"x"),
    ]
    for req in requests:
        reply = await call(client, req)
        assert error(reply) == ("fs_not_found", errno.ENOENT), req
        assert isinstance(reply, ErrorReply) and str(tmp_path) in reply.message
    (tmp_path / "d").mkdir()
    assert error(await call(client, FsRead(path=str(tmp_path / "d"))))[0] == "fs_is_a_directory"
    (tmp_path / "f").write_text("x")
    assert error(await call(client, FsList(path=str(tmp_path / "f"))))[0] == "fs_not_a_directory"
    assert error(await call(client, FsStat(path="bad\x00path")))[0] == "fs_error"


async def test_fifo_does_not_block_the_agent(client: AgentClient, tmp_path: Path) -> None:
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    assert error(await call(client, FsRead(path=fifo)))[1] == errno.ESPIPE
    assert error(await call(client, FsWrite(path=fifo, data=b"x")))[1] == errno.ENXIO
    assert await call(client, FsExists(path=fifo)) == FsExistsReply(exists=True)

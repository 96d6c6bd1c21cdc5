"""sb.fs end to end on real bubblewrap sandboxes: every operation and its typed errors,
trees, symlinks, hostile trees built inside the sandbox, host copies both ways."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import trio

import corral

pytestmark = pytest.mark.integration

W = "/workspace"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every path under root with its mode and content (or link target)."""
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            body: bytes | str | None = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            body = p.read_bytes()
        else:
            body = None
        out[str(p.relative_to(root))] = (st.st_mode, body)
    return out


async def test_every_operation_and_its_typed_error(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("fsops")
        fs = sb.fs
        assert await fs.write(f"{W}/a.txt", "hello") == 5
        assert await fs.write(f"{W}/a.txt", b" world", append=True) == 6
        assert await fs.read(f"{W}/a.txt") == b"hello world"
        assert await fs.read_text("a.txt") == "hello world"  # relative to the workdir
        st = await fs.stat(f"{W}/a.txt")
        assert (st.kind, st.size, stat.S_IMODE(st.mode)) == ("file", 11, 0o644)
        assert st.mtime > 0
        await fs.mkdir(f"{W}/d/e/f", parents=True)
        await fs.mkdir(f"{W}/d/e/f", parents=True)  # exists: fine with parents
        await fs.mkdir(f"{W}/m", mode=0o750)
        assert stat.S_IMODE((await fs.stat(f"{W}/m")).mode) == 0o750
        await fs.symlink("a.txt", f"{W}/ln")
        entries = {e.name: e for e in await fs.list(W)}
        assert {n: e.kind for n, e in entries.items()} == {
            "a.txt": "file",
            "d": "dir",
            "ln": "symlink",
            "m": "dir",
        }
        assert entries["a.txt"].size == 11 and entries["ln"].target == "a.txt"
        assert (await fs.stat(f"{W}/ln")).kind == "file"
        assert (await fs.stat(f"{W}/ln", follow_symlinks=False)).kind == "symlink"
        await fs.copy(f"{W}/a.txt", f"{W}/d/b.txt")
        await fs.copy(f"{W}/d", f"{W}/d2")
        assert await fs.read(f"{W}/d2/b.txt") == b"hello world"
        await fs.rename(f"{W}/d2", f"{W}/d3")
        assert not await fs.exists(f"{W}/d2")
        assert await fs.exists(f"{W}/d3/e/f")
        assert not await fs.exists(f"{W}/a.txt/below")
        await fs.remove(f"{W}/d3", recursive=True)
        await fs.remove(f"{W}/ln")
        assert await fs.exists(f"{W}/a.txt")  # removing the link left its target

        missing = f"{W}/missing"
        not_found = [
            fs.read(missing),
            fs.stat(missing),
            fs.list(missing),
            fs.remove(missing),
            fs.copy(missing, f"{W}/x"),
            fs.rename(missing, f"{W}/x"),
            fs.mkdir(f"{missing}/sub"),
            fs.write(f"{missing}/f", b"x"),
            fs.write_stream(f"{missing}/f", [b"x"]),
        ]
        for call in not_found:
            with pytest.raises(corral.FsNotFound) as info:
                await call
            assert missing in str(info.value) and info.value.errno == errno.ENOENT
        with pytest.raises(corral.FsNotFound):
            async for _ in fs.read_stream(missing):
                pass
        with pytest.raises(corral.FsIsADirectory):
            await fs.read(W)
        with pytest.raises(corral.FsIsADirectory):
            await fs.write(f"{W}/d", b"x")
        with pytest.raises(corral.FsNotADirectory):
            await fs.list(f"{W}/a.txt")
        with pytest.raises(corral.FsNotADirectory):
            await fs.write(f"{W}/a.txt/f", b"x")
        with pytest.raises(corral.FsAlreadyExists):
            await fs.mkdir(f"{W}/d")
        with pytest.raises(corral.FsAlreadyExists):
            await fs.symlink("x", f"{W}/a.txt")
        with pytest.raises(corral.FsNotEmpty) as not_empty:
            await fs.remove(f"{W}/d")
        assert not_empty.value.errno == errno.ENOTEMPTY
        with pytest.raises(corral.FsPermissionDenied):
            await fs.write("/usr/evil", b"x")  # the image is read-only
        with pytest.raises(corral.FsPermissionDenied):
            await fs.mkdir("/usr/evil")


async def test_tree_round_trip_keeps_modes_and_links(
    local_sup: corral.Supervisor, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("fstree")
        fs = sb.fs
        await fs.mkdir(f"{W}/t/sub/deep", parents=True)
        await fs.write(f"{W}/t/top.txt", b"top", mode=0o600)
        await fs.write(f"{W}/t/sub/run.sh", b"#!/bin/sh\n", mode=0o4755)  # setuid
        await fs.write(f"{W}/t/sub/deep/big", os.urandom(3 * 1024 * 1024 + 5))
        await fs.write(f"{W}/t/sub/empty", b"")
        await fs.symlink("sub/run.sh", f"{W}/t/ln")
        await fs.symlink("../top.txt", f"{W}/t/sub/up")
        await fs.symlink("../../sub", f"{W}/t/sub/deep/loop")
        await fs.symlink(".", f"{W}/t/self")
        await fs.mkdir(f"{W}/t/ro", mode=0o555)  # filled before it became read-only?
        await fs.mkdir(f"{W}/t/sub/deep/nothing")
        await fs.mkdir(f"{W}/t/sub", parents=True, mode=0o750)

        out = tmp_path / "out"
        await fs.copy_to_host(f"{W}/t", out)
        assert (out / "top.txt").read_bytes() == b"top" and _mode(out / "top.txt") == 0o600
        assert _mode(out / "sub/run.sh") == 0o755  # no setuid bit on the host
        assert (out / "sub/deep/big").read_bytes() == await fs.read(f"{W}/t/sub/deep/big")
        assert (out / "sub/empty").read_bytes() == b""
        assert os.readlink(out / "ln") == "sub/run.sh"
        assert os.readlink(out / "sub/up") == "../top.txt"
        assert os.readlink(out / "sub/deep/loop") == "../../sub"
        assert os.readlink(out / "self") == "."
        assert _mode(out / "ro") == 0o555 and _mode(out / "sub") == 0o750
        assert (out / "sub/deep/nothing").is_dir()

        # a read-only directory with content, on the host, back into the sandbox
        (out / "ro").chmod(0o755)
        (out / "ro" / "inside").write_bytes(b"in")
        (out / "ro").chmod(0o555)
        await fs.copy_from_host(out, f"{W}/back")
        back = tmp_path / "back"
        await fs.copy_to_host(f"{W}/back", back)
        assert _snapshot(back) == _snapshot(out)
        assert stat.S_IMODE((await fs.stat(f"{W}/back/ro")).mode) == 0o555
        assert await fs.read(f"{W}/back/ro/inside") == b"in"

        # a single file, over an existing host file (replaced, not written through)
        target = tmp_path / "file"
        target.write_bytes(b"old")
        os.link(target, tmp_path / "hardlink")
        await fs.copy_to_host(f"{W}/t/top.txt", target)
        assert target.read_bytes() == b"top" and (tmp_path / "hardlink").read_bytes() == b"old"
        await fs.copy_from_host(tmp_path / "hardlink", f"{W}/single")
        assert await fs.read(f"{W}/single") == b"old"
        # an existing empty directory is a fine destination for a tree
        (tmp_path / "empty").mkdir()
        with pytest.raises(corral.FsPathEscape, match="loop"):  # inside t, outside t/sub/deep
            await fs.copy_to_host(f"{W}/t/sub/deep", tmp_path / "empty")
        assert list((tmp_path / "empty").iterdir()) == []
        await fs.remove(f"{W}/t/sub/deep/loop")
        await fs.copy_to_host(f"{W}/t/sub/deep", tmp_path / "empty")
        assert (tmp_path / "empty" / "big").stat().st_size == 3 * 1024 * 1024 + 5


HOSTILE = {
    "absolute-link": [("symlink", "/etc/passwd", "evil")],
    "absolute-dir-link": [("symlink", "/", "root")],
    "climbing-link": [("symlink", "../../../../../../etc", "up")],
    "climbing-from-sub": [("mkdir", "", "sub"), ("symlink", "../..", "sub/up")],
    # each link alone looks inside; together s/../.. climbs out through s -> ..
    "chain": [("mkdir", "", "sub"), ("symlink", "..", "sub/s"), ("symlink", "s/../..", "sub/t")],
    "fifo": [("mkfifo", "", "pipe")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_trees_never_reach_outside_the_target(
    local_sup: corral.Supervisor, tmp_path: Path, case: str
) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("hostile")
        fs = sb.fs
        await fs.mkdir(f"{W}/h")
        await fs.write(f"{W}/h/fine", b"ok")
        for op, arg, rel in HOSTILE[case]:
            path = f"{W}/h/{rel}"
            if op == "mkdir":
                await fs.mkdir(path)
            elif op == "symlink":
                await fs.symlink(arg, path)
            else:
                assert (await sb.exec("mkfifo", [path])).exit_code == 0
        area = tmp_path / "area"
        area.mkdir()
        (area / "keep").write_bytes(b"mine")
        before = _snapshot(tmp_path)
        error = corral.FsError if case == "fifo" else corral.FsPathEscape
        with pytest.raises(error):
            await fs.copy_to_host(f"{W}/h", area / "target")
        assert _snapshot(tmp_path) == before  # nothing new anywhere, the target undone
        (area / "target").mkdir()
        with pytest.raises(error):
            await fs.copy_to_host(f"{W}/h", area / "target")
        assert list((area / "target").iterdir()) == []  # emptied again, still there


async def test_copy_to_host_never_writes_through_host_symlinks(
    local_sup: corral.Supervisor, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("hostlinks")
        fs = sb.fs
        await fs.mkdir(f"{W}/tree")
        await fs.write(f"{W}/tree/f", b"sandbox bytes")
        await fs.write(f"{W}/file", b"sandbox bytes")
        precious = tmp_path / "precious"
        precious.write_bytes(b"host secret")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (tmp_path / "file-link").symlink_to(precious)
        (tmp_path / "dir-link").symlink_to(elsewhere)
        with pytest.raises(corral.FsPathEscape):
            await fs.copy_to_host(f"{W}/file", tmp_path / "file-link")
        with pytest.raises(corral.FsPathEscape):
            await fs.copy_to_host(f"{W}/tree", tmp_path / "dir-link")
        assert precious.read_bytes() == b"host secret"
        assert list(elsewhere.iterdir()) == []
        assert (tmp_path / "file-link").is_symlink() and (tmp_path / "dir-link").is_symlink()
        # a tree never lands in a non-empty directory, a file never replaces a directory
        (elsewhere / "x").write_bytes(b"")
        with pytest.raises(corral.FsAlreadyExists):
            await fs.copy_to_host(f"{W}/tree", elsewhere)
        with pytest.raises(corral.FsIsADirectory):
            await fs.copy_to_host(f"{W}/file", elsewhere)
        assert [p.name for p in elsewhere.iterdir()] == ["x"]
        with pytest.raises(corral.FsNotFound):
            await fs.copy_to_host(f"{W}/missing", tmp_path / "m")
        with pytest.raises(corral.FsNotFound):
            await fs.copy_to_host(f"{W}/file", tmp_path / "no-such-dir" / "f")
        assert not (tmp_path / "m").exists()
        # the parents of host_path are the caller's: a symlinked parent is followed
        await fs.copy_to_host(f"{W}/file", tmp_path / "dir-link" / "copied")
        assert (elsewhere / "copied").read_bytes() == b"sandbox bytes"


async def test_copy_from_host_refuses_special_files(
    local_sup: corral.Supervisor, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        sb = await local_sup.create("specials")
        fs = sb.fs
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(corral.FsError, match="FIFO"):
            await fs.copy_from_host(fifo, f"{W}/fifo")
        with pytest.raises(corral.FsError, match="character device"):
            await fs.copy_from_host("/dev/null", f"{W}/null")
        tree = tmp_path / "tree"
        (tree / "a" / "b").mkdir(parents=True)
        (tree / "a" / "file").write_bytes(b"x")
        os.mkfifo(tree / "a" / "b" / "pipe")
        with pytest.raises(corral.FsError, match="FIFO"):
            await fs.copy_from_host(tree, f"{W}/tree")
        assert await fs.list(W) == []  # refused before anything was written
        os.unlink(tree / "a" / "b" / "pipe")
        (tree / "a" / "b" / "link-out").symlink_to("/etc/passwd")  # kept as a link
        await fs.copy_from_host(tree, f"{W}/tree")
        link = await fs.stat(f"{W}/tree/a/b/link-out", follow_symlinks=False)
        assert (link.kind, link.target) == ("symlink", "/etc/passwd")
        with pytest.raises(corral.FsAlreadyExists):
            await fs.copy_from_host(tree, f"{W}/tree")
        with pytest.raises(corral.FsNotFound):
            await fs.copy_from_host(tmp_path / "missing", f"{W}/missing")
        odd = tmp_path / "odd"
        odd.mkdir()
        (odd / os.fsdecode(b"bad\xffname")).write_bytes(b"")
        with pytest.raises(corral.FsError, match="not UTF-8"):
            await fs.copy_from_host(odd, f"{W}/odd")
        assert not await fs.exists(f"{W}/odd")

"""Layer extraction (safety first) and flattening with whiteouts, on the real filesystem."""

from __future__ import annotations

import bz2
import os
import stat
import tarfile
from pathlib import Path

import pytest

from corral.drivers.local.images.rootfs import flatten, force_rmtree
from corral.drivers.local.images.testing import Member, layer
from corral.drivers.local.images.unpack import IMPLICIT, UnpackLimits, unpack_layer
from corral.errors import ImageError, UnsafeLayer, Unsupported

DIR, SYM, LNK, FIFO, CHR = (
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.FIFOTYPE,
    tarfile.CHRTYPE,
)
ROOT = os.geteuid() == 0
OWNER = (65534, 65534) if ROOT else None


def unpack(tmp: Path, members: list[Member], name: str = "layer", **kw: object) -> Path:
    blob = tmp / f"{name}.tar.gz"
    blob.write_bytes(layer(members))
    dest = tmp / name
    dest.mkdir()
    unpack_layer(blob, dest, owner=OWNER, **kw)  # type: ignore[arg-type]
    return dest


def test_regular_layer(tmp_path: Path) -> None:
    dest = unpack(
        tmp_path,
        [
            Member("./", kind=DIR, mode=0o755),
            Member("usr/", kind=DIR, mode=0o755),
            Member("usr/bin/", kind=DIR, mode=0o555),  # read-only dir: files still land
            Member("usr/bin/tool", b"#!/bin/sh\n", mode=0o4755),  # setuid is dropped
            Member("usr/bin/alias", kind=LNK, linkname="usr/bin/tool"),
            Member("etc/localtime", kind=SYM, linkname="/usr/share/zoneinfo/UTC"),
            Member("tmp/", kind=DIR, mode=0o1777),
            Member("dev/null", kind=CHR, mode=0o666),
            Member("run/fifo", kind=FIFO, mode=0o600),
            Member("dup", b"first"),
            Member("dup", b"second"),
        ],
    )
    tool = dest / "usr/bin/tool"
    assert tool.read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755
    assert (dest / "usr/bin/alias").stat().st_ino == tool.stat().st_ino
    assert stat.S_IMODE((dest / "usr/bin").stat().st_mode) == 0o555
    assert os.readlink(dest / "etc/localtime") == "/usr/share/zoneinfo/UTC"  # never followed
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777
    assert not (dest / "dev/null").exists()  # device nodes are skipped
    assert stat.S_ISFIFO((dest / "run/fifo").lstat().st_mode)
    assert (dest / "dup").read_bytes() == b"second"
    assert tool.stat().st_mtime == 1_700_000_000
    # a directory the tarball never listed is marked implicit (rootfs keeps lower modes)
    assert (dest / "etc" / IMPLICIT).exists() and not (dest / "usr" / IMPLICIT).exists()
    if OWNER is not None:
        for path in (dest, tool, dest / "etc/localtime", dest / "etc", dest / "run/fifo"):
            st = path.lstat()
            assert (st.st_uid, st.st_gid) == OWNER, path


@pytest.mark.parametrize(
    "members",
    [
        [Member("../escape", b"x")],
        [Member("a/../../escape", b"x")],
        [Member("/abs-escape", b"x")],
        [Member("ok", b"x"), Member("hl", kind=LNK, linkname="../escape")],
        [Member("hl", kind=LNK, linkname="/etc/passwd")],
        [Member("hl", kind=LNK, linkname="missing")],
        [Member("d/", kind=DIR), Member("hl", kind=LNK, linkname="d")],
        [Member("bad/.wh..", b"")],
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "hardlink-dotdot", "hardlink-abs",
         "hardlink-missing", "hardlink-dir", "whiteout-dotdot"],
)  # fmt: skip
def test_escapes_are_refused(tmp_path: Path, members: list[Member]) -> None:
    with pytest.raises(UnsafeLayer):
        unpack(tmp_path, members)
    assert not (tmp_path / "escape").exists()
    assert not Path("/abs-escape").exists()


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = [
        [Member("evil", kind=SYM, linkname=str(outside)), Member("evil/pwned", b"x")],
        [Member("evil", kind=SYM, linkname="../outside"), Member("evil/pwned", b"x")],
        [Member("a/", kind=DIR), Member("a/b", kind=SYM, linkname="/"),
         Member("a/b" + str(outside) + "/pwned", b"x")],
        [Member("evil", kind=SYM, linkname=str(outside)),
         Member("evil/sub/", kind=DIR)],
        [Member("evil", kind=SYM, linkname=str(outside)), Member("t", b"x"),
         Member("evil/hl", kind=LNK, linkname="t")],
        [Member("evil", kind=SYM, linkname=str(outside)),
         Member("hl", kind=LNK, linkname="evil/secret")],
    ]  # fmt: skip
    (outside / "secret").write_text("s")
    for i, members in enumerate(cases):
        with pytest.raises(UnsafeLayer):
            unpack(tmp_path, members, name=f"layer{i}")
        assert sorted(os.listdir(outside)) == ["secret"], i


def test_later_members_replace_without_following(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = unpack(
        tmp_path,
        [
            Member("x", kind=SYM, linkname=str(outside)),
            Member("x/", kind=DIR, mode=0o700),  # replaces the symlink, does not follow it
            Member("x/in", b"inside"),
            Member("f/", kind=DIR),
            Member("f/child", b"c"),
            Member("f", b"now a file"),
            Member("s", b"file"),
            Member("s", kind=SYM, linkname="/etc/passwd"),
        ],
    )
    assert (dest / "x").is_dir() and not (dest / "x").is_symlink()
    assert (dest / "x/in").read_bytes() == b"inside"
    assert os.listdir(outside) == []
    assert (dest / "f").read_bytes() == b"now a file"
    assert os.readlink(dest / "s") == "/etc/passwd"


def test_limits(tmp_path: Path) -> None:
    many = [Member(f"f{i}", b"x") for i in range(20)]
    with pytest.raises(UnsafeLayer, match="entries"):
        unpack(tmp_path, many, name="a", limits=UnpackLimits(max_entries=10))
    big = [Member("big", b"x" * 5000)]
    with pytest.raises(UnsafeLayer, match="bytes"):
        unpack(tmp_path, big, name="b", limits=UnpackLimits(max_bytes=4096))
    deep = [Member("/".join(["d"] * 20) + "/f", b"x")]
    with pytest.raises(UnsafeLayer, match="deeper"):
        unpack(tmp_path, deep, name="c", limits=UnpackLimits(max_depth=10))

    class Stop(Exception):
        pass

    def check() -> None:
        raise Stop

    with pytest.raises(Stop):
        unpack(tmp_path, [Member(f"g{i}", b"x") for i in range(200)], name="d", check=check)


def test_compression_and_corruption(tmp_path: Path) -> None:
    plain = layer([Member("a", b"plain")], compress=False)
    for name, data in (("plain", plain), ("bz2", bz2.compress(plain))):
        (tmp_path / name).write_bytes(data)
        dest = tmp_path / f"{name}-out"
        dest.mkdir()
        unpack_layer(tmp_path / name, dest, owner=OWNER)
        assert (dest / "a").read_bytes() == b"plain"
    cases = {
        "zstd": (b"\x28\xb5\x2f\xfd" + b"\0" * 64, Unsupported),
        "badgz": (b"\x1f\x8b\x08\x00" + b"garbage" * 20, ImageError),
        "truncated": (layer([Member("a", os.urandom(100_000))])[:-100], ImageError),
    }
    for name, (data, error) in cases.items():
        (tmp_path / name).write_bytes(data)
        dest = tmp_path / f"{name}-out"
        dest.mkdir()
        with pytest.raises(error):
            unpack_layer(tmp_path / name, dest, owner=OWNER)


def test_flatten_applies_whiteouts(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    low = unpack(
        tmp_path,
        [
            Member("etc/", kind=DIR, mode=0o750),
            Member("etc/keep", b"keep"),
            Member("etc/gone", b"gone"),
            Member("etc/gonedir/", kind=DIR),
            Member("etc/gonedir/f", b"f"),
            Member("opq/", kind=DIR, mode=0o755),
            Member("opq/a", b"a"),
            Member("opq/sub/b", b"b"),
            Member("link", kind=SYM, linkname=str(outside)),
            Member("wasdir/", kind=DIR),
            Member("wasdir/f", b"f"),
            Member("replaced", b"old"),
        ],
        name="low",
    )
    up = unpack(
        tmp_path,
        [
            Member("etc/.wh.gone"),
            Member("etc/.wh.gonedir"),
            Member("etc/new", b"new"),  # etc/ itself is implicit here
            Member("opq/.wh..wh..opq"),
            Member("opq/c", b"c"),
            Member("link/", kind=DIR, mode=0o755),  # a directory over a symlink
            Member("link/inside", b"i"),
            Member("wasdir", b"now a file"),
            Member("replaced", b"new"),
            Member(".wh.nothing-there"),
        ],
        name="up",
    )
    root = tmp_path / "rootfs"
    flatten([low, up], root)
    assert sorted(os.listdir(root / "etc")) == ["keep", "new"]
    assert stat.S_IMODE((root / "etc").stat().st_mode) == 0o750  # the lower layer's mode
    assert sorted(os.listdir(root / "opq")) == ["c"]
    assert (root / "link").is_dir() and not (root / "link").is_symlink()
    assert os.listdir(outside) == []  # nothing went through the lower layer's symlink
    assert (root / "wasdir").read_bytes() == b"now a file"
    assert (root / "replaced").read_bytes() == b"new"
    assert (root / "etc/keep").stat().st_ino == (low / "etc/keep").stat().st_ino  # linked
    assert not any(name.startswith(".wh.") for _, _, files in os.walk(root) for name in files)
    if OWNER is not None:
        assert (root.stat().st_uid, root.stat().st_gid) == OWNER
        assert ((root / "opq").stat().st_uid, (root / "etc").stat().st_gid) == OWNER
    force_rmtree(root)
    assert not root.exists()


def test_force_rmtree_gets_through_read_only_dirs(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "ro").mkdir(parents=True)
    (tree / "ro" / "f").write_text("x")
    (tree / "ro").chmod(0o555)
    tree.chmod(0o555)
    force_rmtree(tree)
    assert not tree.exists()
    force_rmtree(tree)  # missing: fine

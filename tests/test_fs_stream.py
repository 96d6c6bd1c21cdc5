"""Large files through sb.fs on real sandboxes: chunked both ways, the orchestrator's memory
flat. 64 MiB always; 1 GiB (streams and host copies) with CORRAL_SLOW=1.

Peak RSS is the kernel's high-water mark (VmHWM), reset before each phase through
/proc/self/clear_refs, so earlier tests' allocations do not count. The file lives in the
sandbox's workdir (host disk), not its /tmp (tmpfs, which is RAM)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import corral
from corral.protocol import FS_CHUNK

pytestmark = pytest.mark.integration

MiB = 1 << 20
PATTERN = os.urandom(MiB)
DOUBLED = PATTERN + PATTERN


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)


def _peak_supported() -> bool:
    try:
        _reset_peak()
    except OSError:
        return False
    return _status("VmHWM") <= _status("VmRSS") + 8 * MiB


def _pieces(size: int, piece: int) -> Iterator[bytes]:
    """``size`` bytes of a repeating random pattern, in pieces of ``piece`` (<= 1 MiB)."""
    sent = 0
    while sent < size:
        n = min(piece, size - sent, MiB)
        start = sent % MiB
        yield DOUBLED[start : start + n]
        sent += n


def _digest(size: int, piece: int) -> str:
    h = hashlib.sha256()
    for p in _pieces(size, piece):
        h.update(p)
    return h.hexdigest()


class Meter:
    """Peak RSS growth over a phase, in bytes."""

    def __enter__(self) -> Meter:
        self.base = _status("VmRSS")
        _reset_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status("VmHWM") - self.base


async def _round_trip(
    sb: corral.Sandbox, tmp_path: Path, size: int, *, chunk_size: int, host_copies: bool
) -> dict[str, int]:
    """Stream ``size`` bytes in and out (and through the host, if asked); peak growth."""
    path = "/workspace/big.bin"
    want = _digest(size, 300_000)
    growth: dict[str, int] = {}
    with Meter() as m:
        written = await sb.fs.write_stream(path, _pieces(size, 300_000), chunk_size=chunk_size)
    growth["write_stream"] = m.growth
    assert written == size
    out = await sb.exec("sha256sum", [path], timeout=300)
    assert out.stdout.split()[0].decode() == want

    h = hashlib.sha256()
    sizes: list[int] = []
    with Meter() as m:
        async for chunk in sb.fs.read_stream(path, chunk_size=chunk_size):
            sizes.append(len(chunk))
            h.update(chunk)
    growth["read_stream"] = m.growth
    assert h.hexdigest() == want
    assert sum(sizes) == size and max(sizes) <= chunk_size
    assert len(sizes) == -(-size // chunk_size)

    if host_copies:
        host = tmp_path / "big.bin"
        with Meter() as m:
            await sb.fs.copy_to_host(path, host)
        growth["copy_to_host"] = m.growth
        assert host.stat().st_size == size
        await sb.fs.remove(path)
        with Meter() as m:
            await sb.fs.copy_from_host(host, path)
        growth["copy_from_host"] = m.growth
        host.unlink()
        out = await sb.exec("sha256sum", [path], timeout=300)
        assert out.stdout.split()[0].decode() == want
    return growth


async def test_64mib_streams_in_chunks_with_flat_memory(
    local_sup: corral.Supervisor, tmp_path: Path
) -> None:
    if not _peak_supported():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    with trio.fail_after(120):
        sb = await local_sup.create("stream64")
        await sb.fs.write("/workspace/warm", b"x" * FS_CHUNK)  # warm up allocator and threads
        async for _ in sb.fs.read_stream("/workspace/warm"):
            pass
        growth = await _round_trip(sb, tmp_path, 64 * MiB, chunk_size=256 * 1024, host_copies=True)
        for phase, grew in growth.items():
            assert grew < 24 * MiB, f"{phase}: peak RSS grew {grew / MiB:.1f} MiB for 64 MiB"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CORRAL_SLOW") != "1", reason="soak: set CORRAL_SLOW=1 for the 1 GiB stream"
)
async def test_1gib_both_ways_with_flat_memory(
    local_sup: corral.Supervisor, corral_home: Path, tmp_path: Path
) -> None:
    if not _peak_supported():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    free = min(shutil.disk_usage(corral_home.parent).free, shutil.disk_usage(tmp_path).free)
    if free < 4 << 30:
        pytest.skip(f"needs 4 GiB of free disk, {free >> 20} MiB free")
    with trio.fail_after(600):
        sb = await local_sup.create("stream1g")
        await sb.fs.write("/workspace/warm", b"x" * FS_CHUNK)
        async for _ in sb.fs.read_stream("/workspace/warm"):
            pass
        started = trio.current_time()
        growth = await _round_trip(sb, tmp_path, 1 << 30, chunk_size=FS_CHUNK, host_copies=True)
        elapsed = trio.current_time() - started
        print(
            f"1 GiB in {elapsed:.1f}s, peak RSS growth: "
            + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in growth.items())
        )
        for phase, grew in growth.items():
            assert grew < 32 * MiB, f"{phase}: peak RSS grew {grew / MiB:.1f} MiB for 1 GiB"

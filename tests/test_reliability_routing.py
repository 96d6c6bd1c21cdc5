"""500 real sandboxes x 20 concurrent execs each, every one with its own output.

Each exec writes a stdout line, a stderr line and an exit code that name its sandbox and
its index (one exec per sandbox also writes a multi-chunk stdout), all 10 000 at once:
not one result may be lost, mixed up or land on another exec or sandbox. Afterwards
every sandbox stops, and the orchestrator holds no more fds and leaves no process.

The soak variant (``CORRAL_SLOW=1``) runs several rounds of execs, streams and file
round trips over the same 500 sandboxes.
"""

from __future__ import annotations

import os
import resource
import time
import uuid

import pytest
import trio

import corral
from corral.backend import LocalBackend
from corral.testing import processes_matching, wait_until

pytestmark = pytest.mark.integration

SANDBOXES = 500
EXECS = 20
CREATE_CONCURRENCY = 32
FDS_PER_SANDBOX = 8
"""Headroom: a sandbox holds about 4 orchestrator fds (agent socket, process, pipes)."""
BIG = 20_000
"""``seq 1 BIG`` prints ~110 KB: the agent splits it into several output frames."""

slow = pytest.mark.skipif(not os.environ.get("CORRAL_SLOW"), reason="soak: set CORRAL_SLOW=1")


def raise_nofile(needed: int) -> None:
    """Raise our soft RLIMIT_NOFILE to ``needed`` (skip if the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed for this test")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def expected(i: int, j: int) -> tuple[bytes, bytes, int]:
    out = f"out {i} {j}\n".encode()
    if j == 0:
        out += "".join(f"{n}\n" for n in range(1, BIG + i + 1)).encode()
    return out, f"err {i} {j}\n".encode(), (i + j) % 200


SCRIPT = 'echo "out $1 $2"; echo "err $1 $2" >&2; [ "$2" = 0 ] && seq 1 "$3"; exit "$4"'


async def create_many(sup: corral.Supervisor, tag: str, count: int) -> list[corral.Sandbox]:
    limit = trio.Semaphore(CREATE_CONCURRENCY)
    made: dict[int, corral.Sandbox] = {}

    async def one(i: int) -> None:
        async with limit:
            made[i] = await sup.create(f"{tag}-{i}")

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    return [made[i] for i in range(count)]


async def run_all_execs(sandboxes: list[corral.Sandbox]) -> dict[tuple[int, int], object]:
    got: dict[tuple[int, int], object] = {}

    async def one(i: int, sb: corral.Sandbox, j: int) -> None:
        code = (i + j) % 200
        args = ["-c", SCRIPT, "sh", str(i), str(j), str(BIG + i), str(code)]
        try:
            got[i, j] = await sb.exec("sh", args)
        except corral.CorralError as exc:
            got[i, j] = exc

    async with trio.open_nursery() as nursery:
        for i, sb in enumerate(sandboxes):
            for j in range(EXECS):
                nursery.start_soon(one, i, sb, j)
    return got


def check_results(got: dict[tuple[int, int], object], count: int) -> None:
    lost = [(i, j) for i in range(count) for j in range(EXECS) if (i, j) not in got]
    assert not lost, f"{len(lost)} results lost, e.g. {lost[:5]}"
    wrong = []
    for (i, j), result in got.items():
        out, err, code = expected(i, j)
        if not isinstance(result, corral.ExecResult) or (
            result.stdout,
            result.stderr,
            result.exit_code,
        ) != (out, err, code):
            wrong.append(((i, j), repr(result)[:200]))
    assert not wrong, f"{len(wrong)} of {len(got)} results wrong, e.g. {wrong[:3]}"


async def test_five_hundred_sandboxes_twenty_concurrent_execs_each(
    local_backend: LocalBackend,
) -> None:
    raise_nofile(SANDBOXES * FDS_PER_SANDBOX + 1024)
    tag = f"rt{uuid.uuid4().hex[:8]}"
    fds = open_fds()
    t0 = time.monotonic()
    with trio.fail_after(240):
        async with corral.open_supervisor(local_backend) as sup:
            sandboxes = await create_many(sup, tag, SANDBOXES)
            created = time.monotonic()
            got = await run_all_execs(sandboxes)
            executed = time.monotonic()
            check_results(got, SANDBOXES)
        stopped = time.monotonic()
    assert await wait_until(lambda: not processes_matching(tag), timeout=10)
    assert await wait_until(lambda: open_fds() <= fds, timeout=10), (open_fds(), fds)
    # Time budget (CI must stay well under 15 minutes): about a minute on 2 cores.
    assert stopped - t0 < 180, (
        f"create {created - t0:.1f}s, execs {executed - created:.1f}s, "
        f"stop {stopped - executed:.1f}s"
    )


async def stream_and_files(i: int, sb: corral.Sandbox, mismatched: list[int]) -> None:
    """A file written through fs, streamed back by ``cat``, and read back through fs."""
    blob = f"{i}".encode() * (1000 + i)
    await sb.fs.write(f"/workspace/{i}.bin", blob)
    async with sb.exec_stream("cat", [f"/workspace/{i}.bin"]) as p:
        seen = b""
        async for event in p:
            if isinstance(event, corral.protocol.ExecStdout):
                seen += event.data
    if seen != blob or await sb.fs.read(f"/workspace/{i}.bin") != blob:
        mismatched.append(i)


@pytest.mark.slow
@slow
async def test_soak_rounds_of_execs_streams_and_files_over_five_hundred_sandboxes(
    local_backend: LocalBackend,
) -> None:
    raise_nofile(SANDBOXES * FDS_PER_SANDBOX + 1024)
    tag = f"sk{uuid.uuid4().hex[:8]}"
    rounds = int(os.environ.get("CORRAL_SOAK_ROUNDS", "5"))
    with trio.fail_after(600 + 240 * rounds):
        async with corral.open_supervisor(local_backend) as sup:
            sandboxes = await create_many(sup, tag, SANDBOXES)
            for _ in range(rounds):
                check_results(await run_all_execs(sandboxes), SANDBOXES)
                mismatched: list[int] = []
                async with trio.open_nursery() as nursery:
                    for i, sb in enumerate(sandboxes):
                        nursery.start_soon(stream_and_files, i, sb, mismatched)
                assert mismatched == []
    assert await wait_until(lambda: not processes_matching(tag), timeout=10)

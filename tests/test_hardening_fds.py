"""The orchestrator's fd limit: raised when the local driver opens, given back to the
sandboxes, and running out of fds in ``create`` is a clear ``Runtime``, never a raw OSError.
"""

from __future__ import annotations

import os
import resource
import uuid
from collections.abc import Iterator

import pytest
import trio

import corral
from corral.backend import LocalBackend
from corral.drivers.local import hardening
from corral.errors import Runtime

pytestmark = pytest.mark.integration

STEP = 120
SANDBOXES = 24


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def low_soft_limit() -> Iterator[int]:
    """A soft RLIMIT_NOFILE just above what is open now, as if the process started with
    it; restored (and the driver's once-per-process raise forgotten) afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = open_fds() + 48
    if hard != resource.RLIM_INFINITY and hard < SANDBOXES * 8 + low:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    hardening.reset_for_tests()
    try:
        yield low
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        hardening.reset_for_tests()


async def test_the_driver_raises_the_soft_limit_and_sandboxes_keep_the_old_one(
    local_backend: LocalBackend, low_soft_limit: int
) -> None:
    """SANDBOXES need about 4 fds each, far more than the low limit leaves: they all
    start because opening the supervisor raised it; inside, the old soft limit holds."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    tag = f"fds{uuid.uuid4().hex[:6]}"
    with trio.fail_after(STEP):
        async with corral.open_supervisor(local_backend) as sup:
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
            made: list[corral.Sandbox] = []
            limit = trio.Semaphore(8)

            async def one(i: int) -> None:
                async with limit:
                    made.append(await sup.create(f"{tag}-{i}"))

            async with trio.open_nursery() as nursery:
                for i in range(SANDBOXES):
                    nursery.start_soon(one, i)
            assert open_fds() > low_soft_limit  # would not have fitted under the old limit
            out = await made[0].exec("sh", ["-c", "ulimit -Sn; ulimit -Hn"])
            expected_hard = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
            assert out.stdout.decode().split() == [str(low_soft_limit), expected_hard]


async def test_out_of_fds_in_create_is_a_runtime_error_and_leaves_nothing(
    local_backend: LocalBackend,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(STEP):
        async with corral.open_supervisor(local_backend) as sup:
            failures = 0
            for extra in range(1, 12):
                name = f"emfile-{extra}"
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + extra, hard))
                try:
                    sb = await sup.create(name)
                except Runtime as exc:
                    failures += 1
                    assert "open" in str(exc) and name in str(exc), exc
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                    assert name not in {i.name for i in (await sup.list()).sandboxes}
                    assert not (local_backend.sandboxes_dir / name).exists()
                else:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                    await sb.stop()
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert failures >= 1
            assert (await (await sup.create("after")).exec("true")).exit_code == 0

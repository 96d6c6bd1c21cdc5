"""A restart keeps the sandbox's disk; a new sandbox starts from an empty directory.

``sb.start()`` after a stop (and a restart by policy after a crash) spawns the same
sandbox again: ``work/`` (the workdir), ``logs/``, ``agent.log`` and an image's
writable layer stay; ``run/`` and the tmpfs mounts are new. A sandbox created under the
name of a removed one sees nothing of it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest
import trio

import corral
from corral.actors.logfiles import read_log
from corral.backend import LocalBackend
from corral.drivers.local.driver import ID_FILE, LocalDriver
from corral.drivers.local.images.testing import host_rootfs_members, layer, push_image, run_registry

pytestmark = pytest.mark.integration

STEP = 60


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def test_stop_then_start_keeps_the_workdir_and_the_logs(
    local_sup: corral.Supervisor, local_backend: LocalBackend
) -> None:
    with trio.fail_after(STEP):
        name = unique("restart")
        sb = await local_sup.create(name)
        await sb.fs.write("/workspace/kept.txt", b"still here")
        await sb.fs.write("/tmp/gone.txt", b"tmpfs")
        job = await sb.exec_detached("echo", ["before the restart"])
        assert await job.wait() == 0
        before = [r for r in await sb.logs() if r.stream == "stdout"]
        assert [r.text for r in before] == ["before the restart\n"]
        await sb.stop()
        await sb.start()
        assert sb.status is corral.SandboxStatus.RUNNING
        assert await sb.fs.read("/workspace/kept.txt") == b"still here"
        assert not await sb.fs.exists("/tmp/gone.txt")
        job = await sb.exec_detached("echo", ["after the restart"])
        assert await job.wait() == 0
        texts = [r.text for r in await sb.logs() if r.stream == "stdout"]
        assert texts == ["before the restart\n", "after the restart\n"]
        on_disk = read_log(local_backend.sandboxes_dir / name / "logs")
        assert [r.text for r in on_disk if r.stream == "stdout"] == texts
        assert (local_backend.sandboxes_dir / name / "agent.log").exists()


async def test_a_new_sandbox_under_a_removed_ones_name_starts_empty(
    local_sup: corral.Supervisor, local_backend: LocalBackend
) -> None:
    with trio.fail_after(STEP):
        name = unique("reuse")
        sb = await local_sup.create(name)
        await sb.fs.write("/workspace/old.txt", b"old")
        await sb.stop()
        await local_sup.remove(name)
        # a leftover directory (an orchestrator that died before its clean-up) with a
        # file in the workdir and another sandbox's id
        root = local_backend.sandboxes_dir / name
        (root / "work").mkdir(parents=True)
        (root / "work" / "stale.txt").write_text("stale")
        (root / ID_FILE).write_text("someone-else\n")
        again = await local_sup.create(name)
        assert await again.fs.list("/workspace") == []
        assert (root / ID_FILE).read_text().strip() != "someone-else"


async def test_a_failed_restart_keeps_the_disk(
    local_sup: corral.Supervisor, local_backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(STEP):
        name = unique("failstart")
        sb = await local_sup.create(name)
        await sb.fs.write("/workspace/kept.txt", b"kept")
        await sb.stop()

        async def broken(*args: object, **kwargs: object) -> None:
            raise corral.errors.Runtime("bwrap refused (test)")

        monkeypatch.setattr("corral.drivers.local.launch.start_bwrap", broken)
        with pytest.raises(corral.errors.Runtime, match="refused"):
            await sb.start()
        monkeypatch.undo()
        assert (local_backend.sandboxes_dir / name / "work" / "kept.txt").read_bytes() == b"kept"
        await sb.start()
        assert await sb.fs.read("/workspace/kept.txt") == b"kept"


# -- images: the writable layer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    addr = os.environ.get("CORRAL_TEST_REGISTRY")
    if addr:
        registry: str = addr
        yield from _push(registry)
        return
    if shutil.which("docker-registry") is None:
        pytest.skip("no registry: CORRAL_TEST_REGISTRY is unset and docker-registry is missing")
    with run_registry(tmp_path_factory.mktemp("registry")) as started:
        yield from _push(started)


def _push(registry: str) -> Iterator[str]:
    members = host_rootfs_members(["sh", "cat", "ls", "rm", "mkdir"])
    pushed = trio.run(
        lambda: push_image(registry, f"test/restart-{uuid.uuid4().hex[:8]}", "1", [layer(members)])
    )
    yield pushed.reference


@pytest.mark.parametrize("layer_kind", ["overlay", "copy"])
async def test_a_restart_keeps_the_image_layer(
    local_backend: LocalBackend, tiny_image: str, layer_kind: str
) -> None:
    if layer_kind == "overlay" and os.geteuid() != 0:
        pytest.skip("the overlay layer needs root")
    driver = LocalDriver(local_backend, image_layer=layer_kind)
    async with corral.open_supervisor(driver=driver) as sup:
        with trio.fail_after(STEP):
            sb = await sup.create(unique("imgrestart"), image=tiny_image)
            ls = (await sb.exec("sh", ["-c", "command -v ls"])).stdout.decode().strip()
            assert ls.startswith("/"), ls
            script = f"mkdir /srv && echo layer > /srv/mine && rm {ls}; echo $?"
            assert (await sb.exec("sh", ["-c", script])).stdout == b"0\n"
            await sb.stop()
            await sb.start()
            out = await sb.exec("sh", ["-c", f"cat /srv/mine; test -e {ls}; echo $?"])
            assert out.stdout == b"layer\n1\n", out  # a write and a deletion, both kept

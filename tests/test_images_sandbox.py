"""Sandboxes on OCI images, end to end: pushed to a real registry, pulled by the local
driver, run under bubblewrap with the image at ``/`` and a writable layer per sandbox.

The image holds a few host binaries (``sh``, ``cat``, ``ls``...) and their libraries,
no Python: the agent runs on the host's interpreter under ``/.corral/host``.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

import corral
from corral.backend import LocalBackend
from corral.drivers.local.driver import LocalDriver
from corral.drivers.local.images import ImageStore, host_platform
from corral.drivers.local.images.testing import (
    Member,
    host_rootfs_members,
    layer,
    push_image,
    run_registry,
)
from corral.errors import ImageNotFound, InvalidConfig

pytestmark = pytest.mark.integration

TOOLS = ["sh", "cat", "ls", "id", "touch", "mkdir", "rm", "env", "sleep"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    addr = os.environ.get("CORRAL_TEST_REGISTRY")
    if addr:
        yield addr
        return
    if shutil.which("docker-registry") is None:
        pytest.skip("no registry: CORRAL_TEST_REGISTRY is unset and docker-registry is missing")
    with run_registry(tmp_path_factory.mktemp("registry")) as started:
        yield started


@pytest.fixture(scope="module")
def tiny(registry: str) -> str:
    """``<registry>/test/tiny-<random>:1``: tools + a whiteout layer + an index."""
    base = host_rootfs_members(TOOLS)
    lower = [
        *base,
        Member("etc/", kind=tarfile.DIRTYPE, mode=0o755),
        Member("etc/motd", b"hello from the image\n"),
        Member("etc/gone", b"x"),
        Member("opq/a", b"a"),
    ]
    upper = [Member("etc/.wh.gone"), Member("opq/.wh..wh..opq"), Member("opq/c", b"c")]
    config: dict[str, object] = {
        "Env": ["PATH=/usr/bin:/bin", "FOO=bar", "B=image"],
        "WorkingDir": "/srv",
        "Cmd": ["sh"],
    }
    arch = host_platform().architecture
    other = "arm64" if arch != "arm64" else "amd64"
    pushed = trio.run(
        lambda: push_image(
            registry,
            f"test/tiny-{uuid.uuid4().hex[:8]}",
            "1",
            [layer(lower), layer(upper)],
            config=config,
            arch=arch,
            others={other: [layer([Member("other-arch", b"")])]},
        )
    )
    return pushed.reference


def driver(backend: LocalBackend, **options: object) -> LocalDriver:
    return LocalDriver(backend, **options)  # type: ignore[arg-type]


def status(text: bytes) -> dict[str, str]:
    lines = text.decode().splitlines()
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


@pytest.mark.parametrize("layer_kind", ["overlay", "copy"])
async def test_sandbox_on_an_image(local_backend: LocalBackend, tiny: str, layer_kind: str) -> None:
    if layer_kind == "overlay" and os.geteuid() != 0:
        pytest.skip("the overlay layer needs root")
    drv = driver(local_backend, image_layer=layer_kind)
    async with corral.open_supervisor(driver=drv) as sup:
        with trio.fail_after(60):
            sb = await sup.create("img", image=tiny, env={"B": "caller"})
            script = "echo $FOO $B; cat /etc/motd; ls /opq; test -e /etc/gone || echo gone; pwd"
            out = await sb.exec("sh", ["-c", script])
            assert (out.exit_code, out.stderr) == (0, b"")
            assert out.stdout == b"bar caller\nhello from the image\nc\ngone\n/srv\n"
            # the image's files, not the host's: no python3, no host /etc/os-release
            probe = "for p in /usr/bin/python3 /etc/os-release; do test -e $p && echo $p; done"
            assert (await sb.exec("sh", ["-c", probe])).stdout == b""

            st = status((await sb.exec("cat", ["/proc/self/status"])).stdout)
            assert int(st["CapEff"], 16) == 0
            assert (st["NoNewPrivs"], st["Seccomp"]) == ("1", "2")
            assert (await sb.exec("id", ["-u"])).stdout.strip() != b"0"

            # the writable layer: anywhere in the image, on the sandbox's own layer
            wrote = await sb.exec("sh", ["-c", "echo new > /etc/newfile && cat /etc/newfile"])
            assert wrote.stdout == b"new\n", wrote.stderr
            await sb.fs.write("/workspace/w", b"work")
            await sb.fs.mkdir("/srv/sub")
            await sb.fs.write("/srv/sub/data", b"\x00\x01bin")
            assert await sb.fs.read("/srv/sub/data") == b"\x00\x01bin"
            assert await sb.fs.read("/etc/motd") == b"hello from the image\n"
            names = {e.name for e in await sb.fs.list("/etc")}
            assert names == {"motd", "newfile"}
            await sb.fs.remove("/etc/motd")
            assert not await sb.fs.exists("/etc/motd")

            image = drv.images.lookup(tiny)
            assert image is not None
            home = drv.sandbox_dir("img")
            upper = home / "layer" / ("upper" if layer_kind == "overlay" else "rootfs")
            assert (upper / "etc" / "newfile").read_bytes() == b"new\n"
            assert not (image.rootfs / "etc" / "newfile").exists()  # the cache is untouched
            assert (image.rootfs / "etc" / "motd").exists()
            assert (home / "image").read_text().strip() == image.record.digest

            other = await sup.create("img2", image=tiny)
            seen = await other.exec("sh", ["-c", "cat /etc/motd; test -e /etc/newfile; echo $?"])
            assert seen.stdout == b"hello from the image\n1\n"
            await other.stop()
            await sb.stop()


async def test_read_only_image_root(local_backend: LocalBackend, tiny: str) -> None:
    drv = driver(local_backend, image_writable=False)
    async with corral.open_supervisor(driver=drv) as sup:
        with trio.fail_after(60):
            sb = await sup.create("ro", image=tiny, workdir="/work")
            denied = await sb.exec("sh", ["-c", "touch /etc/x"])
            assert denied.exit_code != 0 and b"Read-only" in denied.stderr
            ok = await sb.exec("sh", ["-c", "echo a > /tmp/a && echo b > /work/b && pwd"])
            assert (ok.exit_code, ok.stdout) == (0, b"/work\n")  # a caller's workdir wins
            await sb.stop()


class Counting(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_concurrent_creates_share_one_pull(local_backend: LocalBackend, tiny: str) -> None:
    counting = Counting()
    store = ImageStore(local_backend.images_dir, transport=counting)
    drv = driver(local_backend, images=store)
    async with corral.open_supervisor(driver=drv) as sup:
        with trio.fail_after(90):
            boxes: list[corral.Sandbox] = []

            async def create(name: str) -> None:
                boxes.append(await sup.create(name, image=tiny))

            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(create, f"c{i}")
            for sb in boxes:
                assert (await sb.exec("cat", ["/etc/motd"])).stdout == b"hello from the image\n"
            blobs = [p for p in counting.requests if "/blobs/" in p]
            assert len(blobs) == len(set(blobs)) == 3  # config + 2 layers, each once
            assert len([p for p in counting.requests if "/manifests/" in p]) == 2  # index + one
            for sb in boxes:
                await sb.stop()
    await counting.aclose()


async def test_a_missing_image_fails_the_create(local_backend: LocalBackend, tiny: str) -> None:
    missing = tiny.rsplit(":", 1)[0] + ":no-such-tag"
    async with corral.open_supervisor(driver=driver(local_backend)) as sup:
        with trio.fail_after(30):
            with pytest.raises(ImageNotFound):
                await sup.create("nope", image=missing)
    assert not (local_backend.sandboxes_dir / "nope").exists()


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A world-writable directory the sandbox uid could reach on the host."""
    path = Path(tempfile.mkdtemp(prefix="corral-evil-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("where", [".corral", "run", "workspace"])
async def test_symlinks_at_mount_points_are_refused(
    local_backend: LocalBackend, registry: str, host_dir: Path, where: str
) -> None:
    # bwrap follows symlinks in destinations while the host's root is still at /oldroot:
    # an image must not steer a mount point (nor a mkdir) anywhere else
    evil = [
        *host_rootfs_members(["sh"]),
        Member(where, kind=tarfile.SYMTYPE, linkname=f"/oldroot{host_dir}"),
    ]
    pushed = await push_image(registry, f"test/evil-{uuid.uuid4().hex[:8]}", "1", [layer(evil)])
    async with corral.open_supervisor(driver=driver(local_backend)) as sup:
        with trio.fail_after(60):
            with pytest.raises(InvalidConfig, match=f"symlink at /{where}"):
                await sup.create("evil", image=pushed.reference)
    assert os.listdir(host_dir) == []


async def test_network_brings_the_hosts_resolver_files(
    local_backend: LocalBackend, tiny: str
) -> None:
    # A minimal host (a fresh debootstrap) may lack /etc/hosts: then nothing is copied.
    host: dict[str, bytes | None] = {}
    for name in ("resolv.conf", "hosts"):
        path = trio.Path("/etc", name)
        host[name] = await path.read_bytes() if await path.is_file() else None
    async with corral.open_supervisor(driver=driver(local_backend)) as sup:
        with trio.fail_after(60):
            online = await sup.create("net", image=tiny, network=True)
            offline = await sup.create("nonet", image=tiny)
            for name, data in host.items():
                if data is None:
                    assert not await online.fs.exists(f"/etc/{name}")
                else:
                    assert (await online.exec("cat", [f"/etc/{name}"])).stdout == data
                assert not await offline.fs.exists(f"/etc/{name}")
            await online.stop()
            await offline.stop()

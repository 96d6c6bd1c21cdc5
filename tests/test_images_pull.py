"""Pulling from a real registry v2 (docker-registry on 127.0.0.1): indexes, digests,
whiteouts, unsafe layers, single-flight, token auth, ls/rm/gc.

The registry is ``$CORRAL_TEST_REGISTRY`` (scripts/check.sh starts one) or, when unset,
one started here from Debian's ``docker-registry``. Every test pushes its own images.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from corral.drivers.local.images import ImageStore, host_platform
from corral.drivers.local.images.testing import Member, layer, push_image, run_registry
from corral.errors import DigestMismatch, ImageNotFound, RegistryError, UnsafeLayer

pytestmark = pytest.mark.integration

DIR = tarfile.DIRTYPE
ARCH = host_platform().architecture
OTHER_ARCH = "arm64" if ARCH != "arm64" else "amd64"


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


def repo() -> str:
    return f"test/{uuid.uuid4().hex[:12]}"


LOWER = [
    Member("etc/", kind=DIR, mode=0o755),
    Member("etc/motd", b"hello\n"),
    Member("etc/gone", b"deleted by the next layer"),
    Member("opq/", kind=DIR, mode=0o755),
    Member("opq/a", b"a"),
    Member("opq/b", b"b"),
]
UPPER = [
    Member("etc/.wh.gone"),
    Member("etc/added", b"added\n"),
    Member("opq/.wh..wh..opq"),
    Member("opq/c", b"c"),
]


def files(root: Path) -> dict[str, bytes]:
    out = {}
    for top, _, names in os.walk(root):
        for name in names:
            path = Path(top, name)
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


def cached(home: Path) -> dict[str, list[str]]:
    return {
        sub: sorted(os.listdir(home / sub)) if (home / sub).is_dir() else []
        for sub in ("blobs/sha256", "layers", "rootfs", "refs", "tmp")
    }


async def test_pull_with_an_index_applies_whiteouts(registry: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        pushed = await push_image(
            registry,
            repo(),
            "1",
            [layer(LOWER), layer(UPPER)],
            config={"Env": ["PATH=/bin", "FOO=bar"], "WorkingDir": "/srv", "Cmd": ["sh"]},
            arch=ARCH,
            others={OTHER_ARCH: [layer([Member("wrong-arch", b"x")])]},
        )
        assert pushed.index is not None
        store = ImageStore(tmp_path / "images")
        image = await store.ensure(pushed.reference)
        assert image.record.digest == pushed.digest  # the host platform's manifest
        assert image.record.index_digest == pushed.index
        assert image.record.layers == tuple(pushed.layers)
        assert image.record.platform == f"linux/{ARCH}"
        assert files(image.rootfs) == {
            "etc/motd": b"hello\n",
            "etc/added": b"added\n",
            "opq/c": b"c",
        }
        defaults = image.defaults
        assert defaults.env_map() == {"PATH": "/bin", "FOO": "bar"}
        assert (defaults.workdir, defaults.cmd) == ("/srv", ("sh",))
        if os.geteuid() == 0:  # the files belong to the sandbox uid
            assert image.rootfs.stat().st_uid == store.owner[0]  # type: ignore[index]
        # pulled refs: the tag and the digest it resolved to; a second ensure is local
        refs = {r.reference for r in store.list_images()}
        name = pushed.reference.rsplit(":", 1)[0]
        assert refs == {pushed.reference, f"{name}@{pushed.digest}", f"{name}@{pushed.index}"}
        again = await store.ensure(f"{name}@{pushed.digest}")
        assert again.rootfs == image.rootfs


async def test_pull_without_an_index_and_docker_media_types(registry: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        name = repo()
        pushed = await push_image(
            registry, name, "v2", [layer(LOWER)], docker_media=True, arch=ARCH
        )
        store = ImageStore(tmp_path / "images")
        image = await store.ensure(f"{registry}/{name}:v2")
        assert image.record.index_digest is None
        assert files(image.rootfs)["etc/gone"] == b"deleted by the next layer"
        by_digest = ImageStore(tmp_path / "other")
        assert (await by_digest.ensure(f"{registry}/{name}@{pushed.digest}")).record.digest == (
            pushed.digest
        )
        with pytest.raises(ImageNotFound):
            await store.ensure(f"{registry}/{name}:missing")
        foreign = await push_image(registry, name, "arm", [layer(LOWER)], arch=OTHER_ARCH)
        with pytest.raises(ImageNotFound, match=f"linux/{OTHER_ARCH} image; this host is"):
            await store.ensure(foreign.reference)
        assert not store.rootfs_dir(foreign.digest).exists()
        with pytest.raises(ImageNotFound):
            await store.ensure(f"{registry}/test/never-pushed-{uuid.uuid4().hex[:8]}:1")


class Tamper(httpx.AsyncBaseTransport):
    """A man in the middle: ``edit`` rewrites the body of matching 200 answers."""

    def __init__(
        self,
        match: Callable[[httpx.Request], bool],
        edit: Callable[[bytes], bytes],
        drop_headers: tuple[str, ...] = (),
    ) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.match, self.edit, self.drop = match, edit, drop_headers
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        resp = await self.inner.handle_async_request(request)
        if resp.status_code != 200 or not self.match(request):
            return resp
        body = await resp.aread()
        await resp.aclose()
        skip = {"content-length", "content-encoding", "transfer-encoding", *self.drop}
        headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in skip]
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(self.edit(body)))

    async def aclose(self) -> None:
        await self.inner.aclose()


def flip(body: bytes) -> bytes:
    return bytes([body[0] ^ 1]) + body[1:]


async def test_digest_mismatch_caches_nothing(registry: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        pushed = await push_image(registry, repo(), "1", [layer(LOWER), layer(UPPER)])
        name = pushed.reference.rsplit(":", 1)[0]
        bad_layer = pushed.layers[1]
        cases: list[tuple[str, Tamper]] = [
            # a corrupted layer blob
            ("layer", Tamper(lambda r: r.url.path.endswith(bad_layer), flip)),
            # a blob with extra bytes past its declared size
            ("long", Tamper(lambda r: r.url.path.endswith(bad_layer), lambda b: b + b"x")),
            # a tampered manifest, by tag: checked against Docker-Content-Digest
            ("manifest", Tamper(lambda r: "/manifests/" in r.url.path, lambda b: b + b" ")),
        ]
        for what, transport in cases:
            home = tmp_path / what
            store = ImageStore(home, transport=transport)
            with pytest.raises(DigestMismatch):
                await store.ensure(pushed.reference)
            await transport.aclose()
            left = cached(home)
            assert left["refs"] == [] and left["rootfs"] == [] and left["tmp"] == [], what
            assert bad_layer.split(":")[1] not in left["blobs/sha256"], what
            assert bad_layer.split(":")[1] not in left["layers"], what
        # a tampered manifest asked for by digest, with no digest header to compare to
        transport = Tamper(
            lambda r: "/manifests/" in r.url.path,
            lambda b: b.replace(b'"schemaVersion": 2', b'"schemaVersion":2'),
            drop_headers=("docker-content-digest",),
        )
        store = ImageStore(tmp_path / "by-digest", transport=transport)
        with pytest.raises(DigestMismatch):
            await store.ensure(f"{name}@{pushed.digest}")
        await transport.aclose()
        assert cached(tmp_path / "by-digest")["refs"] == []
        # and a clean pull afterwards into the same home works
        clean = await ImageStore(tmp_path / "layer").ensure(pushed.reference)
        assert files(clean.rootfs)["etc/added"] == b"added\n"


async def test_index_entry_must_match_its_digest(registry: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        pushed = await push_image(
            registry, repo(), "1", [layer(LOWER)], arch=ARCH, others={OTHER_ARCH: [layer([])]}
        )
        child = pushed.digest
        transport = Tamper(
            lambda r: r.url.path.endswith(f"/manifests/{child}"),
            lambda b: b + b"\n",
            drop_headers=("docker-content-digest",),
        )
        store = ImageStore(tmp_path / "images", transport=transport)
        with pytest.raises(DigestMismatch):
            await store.ensure(pushed.reference)
        await transport.aclose()
        assert cached(tmp_path / "images")["rootfs"] == []


async def test_unsafe_layers_are_rejected(registry: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    bad = {
        "dotdot": [Member("../../escape", b"x")],
        "absolute": [Member("/etc/corral-abs", b"x")],
        "symlink": [
            Member("evil", kind=tarfile.SYMTYPE, linkname=str(outside)),
            Member("evil/pwned", b"x"),
        ],
    }
    with trio.fail_after(60):
        for what, members in bad.items():
            pushed = await push_image(registry, repo(), "1", [layer(LOWER), layer(members)])
            home = tmp_path / what
            with pytest.raises(UnsafeLayer):
                await ImageStore(home).ensure(pushed.reference)
            left = cached(home)
            assert left["refs"] == [] and left["rootfs"] == [] and left["tmp"] == [], what
            assert pushed.layers[1].split(":")[1] not in left["layers"], what
        assert os.listdir(outside) == []
        assert not await trio.Path(tmp_path / "escape").exists()
        assert not await trio.Path("/etc/corral-abs").exists()


async def test_concurrent_pulls_share_one_download(registry: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        pushed = await push_image(registry, repo(), "1", [layer(LOWER), layer(UPPER)])
        name = pushed.reference.rsplit(":", 1)[0]
        transport = Tamper(lambda r: False, lambda b: b)
        store = ImageStore(tmp_path / "images", transport=transport)
        results: list[Path] = []

        async def pull(ref: str) -> None:
            results.append((await store.ensure(ref)).rootfs)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(pull, pushed.reference)
            nursery.start_soon(pull, f"{name}@{pushed.digest}")  # same image, other ref
        await transport.aclose()
        assert len(set(results)) == 1 and len(results) == 5
        blob_gets = [r for r in transport.requests if "/blobs/" in r]
        assert sorted(blob_gets) == sorted(
            f"GET /v2/{name.split('/', 1)[1]}/blobs/{d}" for d in [*pushed.layers, pushed.config]
        )
        # the tag was resolved once; the digest reference fetched its manifest once more
        assert len([r for r in transport.requests if "/manifests/" in r]) == 2


async def test_ls_rm_and_gc(registry: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        a = await push_image(registry, repo(), "1", [layer(LOWER), layer(UPPER)])
        b = await push_image(registry, repo(), "1", [layer(LOWER)])  # shares the lower layer
        store = ImageStore(tmp_path / "images")
        image_a = await store.ensure(a.reference)
        await store.ensure(b.reference)
        assert {r.reference for r in store.list_images()} >= {a.reference, b.reference}
        with pytest.raises(ImageNotFound):
            store.remove(f"{registry}/test/not-pulled:1")
        removed = store.remove(a.digest, in_use={a.digest})  # every ref of that digest
        assert sorted(removed) == sorted([a.reference, a.reference.replace(":1", "@" + a.digest)])
        assert image_a.rootfs.is_dir()  # a sandbox still uses it
        assert not store.blob_path(a.layers[1]).exists()  # only a's upper layer is freed
        assert store.blob_path(a.layers[0]).exists() and store.layer_dir(a.layers[0]).is_dir()
        store.gc()
        assert not image_a.rootfs.exists()
        store.remove(b.reference)
        store.remove(b.digest[7:20])  # a digest prefix
        assert store.list_images() == []
        assert cached(tmp_path / "images")["blobs/sha256"] == []
        assert cached(tmp_path / "images")["layers"] == []


class AuthProxy:
    """A registry front that wants a Bearer token from its own token endpoint
    (``/token``, basic auth), then forwards ``GET /v2/...`` to the real registry."""

    def __init__(self, upstream: str, user: str, password: str) -> None:
        self.upstream = upstream
        self.basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.token = secrets.token_hex(16)
        self.token_requests: list[dict[str, str]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        if path == "/token":
            query = httpx.QueryParams(scope["query_string"].decode())
            self.token_requests.append(dict(query))
            if headers.get("authorization") != self.basic:
                return await self._reply(send, 401, b'{"errors": []}')
            body = json.dumps({"token": self.token, "expires_in": 60}).encode()
            return await self._reply(send, 200, body, [("content-type", "application/json")])
        if headers.get("authorization") != f"Bearer {self.token}":
            realm = f"http://{headers['host']}/token"
            challenge = f'Bearer realm="{realm}",service="corral-test",scope="repository:x:pull"'
            return await self._reply(send, 401, b"{}", [("www-authenticate", challenge)])
        async with httpx.AsyncClient() as client:
            upstream = await client.get(
                f"http://{self.upstream}{path}", headers={"accept": headers.get("accept", "*/*")}
            )
        keep = ("content-type", "docker-content-digest")
        out = [(k, v) for k, v in upstream.headers.items() if k.lower() in keep]
        await self._reply(send, upstream.status_code, upstream.content, out)

    @staticmethod
    async def _reply(
        send: Any, status: int, body: bytes, headers: list[tuple[str, str]] | None = None
    ) -> None:
        raw = [(k.encode(), v.encode()) for k, v in headers or []]
        raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


async def test_token_auth(registry: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        name = repo()
        await push_image(registry, name, "1", [layer(LOWER)])
        proxy = AuthProxy(registry, "alice", "s3cret")
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            app: Any = proxy
            binds: list[str] = await nursery.start(partial(hypercorn_serve, app, config))
            front = binds[0].removeprefix("http://")
            ref = f"{front}/{name}:1"
            with pytest.raises(RegistryError, match="token endpoint refused"):
                await ImageStore(tmp_path / "anon").ensure(ref)
            wrong = {front: ("alice", "nope")}
            with pytest.raises(RegistryError):
                await ImageStore(tmp_path / "wrong", credentials=wrong).ensure(ref)
            good = {front: ("alice", "s3cret")}
            image = await ImageStore(tmp_path / "good", credentials=good).ensure(ref)
            assert files(image.rootfs)["etc/motd"] == b"hello\n"
            docker = tmp_path / "docker"
            docker.mkdir()
            token = base64.b64encode(b"alice:s3cret").decode()
            (docker / "config.json").write_text(json.dumps({"auths": {front: {"auth": token}}}))
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("DOCKER_CONFIG", str(docker))
                from_config = await ImageStore(tmp_path / "docker-home").ensure(ref)
            assert from_config.record.digest == image.record.digest
            assert proxy.token_requests[-1] == {
                "service": "corral-test",
                "scope": "repository:x:pull",
            }
            nursery.cancel_scope.cancel()

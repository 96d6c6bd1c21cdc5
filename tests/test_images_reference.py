"""Image references, manifests, platforms and the registry client's auth rules (no network)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from corral.drivers.local.images import ImageStore, Platform, RegistryClient, parse_reference
from corral.drivers.local.images.auth import docker_credentials
from corral.drivers.local.images.manifest import (
    Index,
    Manifest,
    decode_manifest,
    host_platform,
    select_platform,
)
from corral.drivers.local.images.reference import check_digest, is_loopback_host
from corral.drivers.local.images.registry import parse_challenge
from corral.errors import (
    DigestMismatch,
    ImageError,
    ImageNotFound,
    InvalidConfig,
    RegistryError,
    Unsupported,
)

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


@pytest.mark.parametrize(
    ("text", "canonical", "api_host", "loopback"),
    [
        ("alpine", "docker.io/library/alpine:latest", "registry-1.docker.io", False),
        ("alpine:3.19", "docker.io/library/alpine:3.19", "registry-1.docker.io", False),
        ("library/alpine", "docker.io/library/alpine:latest", "registry-1.docker.io", False),
        ("docker.io/alpine", "docker.io/library/alpine:latest", "registry-1.docker.io", False),
        ("index.docker.io/x/y:1", "docker.io/x/y:1", "registry-1.docker.io", False),
        ("user/app", "docker.io/user/app:latest", "registry-1.docker.io", False),
        ("ghcr.io/o/r/deep:v1.2", "ghcr.io/o/r/deep:v1.2", "ghcr.io", False),
        ("localhost/app", "localhost/app:latest", "localhost", True),
        ("localhost:5000/app:dev", "localhost:5000/app:dev", "localhost:5000", True),
        ("127.0.0.1:5000/test/tiny:1", "127.0.0.1:5000/test/tiny:1", "127.0.0.1:5000", True),
        ("[::1]:5000/a", "[::1]:5000/a:latest", "[::1]:5000", True),
        (f"127.0.0.1:5000/a@{D1}", f"127.0.0.1:5000/a@{D1}", "127.0.0.1:5000", True),
        (f"reg.example/a:1@{D1}", f"reg.example/a:1@{D1}", "reg.example", False),
    ],
)
def test_parse_reference(text: str, canonical: str, api_host: str, loopback: bool) -> None:
    ref = parse_reference(text)
    assert str(ref) == canonical
    assert ref.api_host == api_host
    assert ref.loopback is loopback
    assert parse_reference(str(ref)) == ref  # canonical forms are fixed points


def test_reference_parts() -> None:
    ref = parse_reference(f"127.0.0.1:5000/test/tiny:1@{D1}")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "127.0.0.1:5000",
        "test/tiny",
        "1",
        D1,
    )
    assert ref.reference == D1  # the digest wins over the tag at the registry
    assert ref.host == "127.0.0.1"
    assert str(ref.with_digest(D2)) == f"127.0.0.1:5000/test/tiny@{D2}"
    assert parse_reference("[::1]:5000/a").host == "::1"
    assert len(ref.key()) == 64 and ref.key() != parse_reference("127.0.0.1:5000/x").key()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host",
        " alpine",
        "Alpine",
        "a//b",
        "a/../b",
        "a:",
        "a:-bad",
        "a@sha256:abc",
        "a@sha256:" + "A" * 64,
        "reg.example/",
        "reg.example/UPPER:1",
        "x" * 300,
    ],
)
def test_bad_references(text: str) -> None:
    with pytest.raises(InvalidConfig):
        parse_reference(text)


def test_digests() -> None:
    assert check_digest(D1) == D1
    with pytest.raises(Unsupported):
        check_digest("sha512:" + "a" * 128)
    with pytest.raises(InvalidConfig):
        check_digest("md5:abc")


def test_loopback_hosts() -> None:
    for host in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]", "a.localhost"):
        assert is_loopback_host(host), host
    for host in ("10.0.0.1", "example.com", "localhost.example.com", "0.0.0.0"):
        assert not is_loopback_host(host), host


def test_plain_http_only_for_loopback_or_insecure() -> None:
    remote = parse_reference("reg.example:5000/a:1")
    local = parse_reference("127.0.0.1:5000/a:1")
    assert RegistryClient().base_url(remote) == "https://reg.example:5000/v2/a"
    assert RegistryClient().base_url(local) == "http://127.0.0.1:5000/v2/a"
    assert RegistryClient(insecure=True).base_url(remote) == "http://reg.example:5000/v2/a"


def test_parse_challenge() -> None:
    ch = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert ch.scheme == "bearer"
    assert ch.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    basic = parse_challenge('Basic realm="Registry \\"x\\"", charset=UTF-8')
    assert basic.scheme == "basic"
    assert basic.params == {"realm": 'Registry "x"', "charset": "UTF-8"}


def _desc(digest: str, arch: str | None = None, **extra: object) -> dict[str, object]:
    out: dict[str, object] = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest,
        "size": 10,
    }
    if arch is not None:
        out["platform"] = {"architecture": arch, "os": "linux", **extra}
    return out


def test_decode_manifest_and_index() -> None:
    def manifest(layer_type: str = "application/vnd.oci.image.layer.v1.tar+gzip") -> bytes:
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": D1,
                "size": 2,
            },
            "layers": [{"mediaType": layer_type, "digest": D2, "size": 5}],
        }
        return json.dumps(doc).encode()

    doc = decode_manifest(manifest())
    assert isinstance(doc, Manifest) and doc.layers[0].digest == D2
    index = {"schemaVersion": 2, "manifests": [_desc(D1, "amd64"), _desc(D2, "arm64")]}
    assert isinstance(decode_manifest(json.dumps(index).encode()), Index)

    with pytest.raises(Unsupported):
        decode_manifest(manifest("application/vnd.oci.image.layer.v1.tar+zstd"))
    with pytest.raises(Unsupported):
        decode_manifest(json.dumps({"schemaVersion": 1, "fsLayers": []}).encode())
    with pytest.raises(ImageError):
        decode_manifest(b"not json")
    with pytest.raises(InvalidConfig):
        decode_manifest(manifest().replace(D1.encode(), b"sha256:xyz"))


def test_select_platform() -> None:
    attestation = _desc(D2, "amd64")
    attestation["annotations"] = {"vnd.docker.reference.type": "attestation-manifest"}
    attestation["platform"] = {"architecture": "unknown", "os": "unknown"}
    index = decode_manifest(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    attestation,
                    _desc("sha256:" + "c" * 64, "arm", variant="v6"),
                    _desc("sha256:" + "d" * 64, "arm", variant="v7"),
                    _desc(D1, "amd64"),
                ],
            }
        ).encode()
    )
    assert isinstance(index, Index)
    assert select_platform(index, Platform("amd64", "linux")).digest == D1
    assert select_platform(index, Platform("arm", "linux", "v7")).digest == "sha256:" + "d" * 64
    assert select_platform(index, Platform("arm", "linux", "v8")).digest == "sha256:" + "c" * 64
    with pytest.raises(ImageNotFound, match=r"has: linux/amd64, linux/arm/v6, linux/arm/v7\)"):
        select_platform(index, Platform("s390x", "linux"))
    assert host_platform().os == "linux"


async def test_token_realm_must_be_https_off_loopback() -> None:
    def registry(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="http://auth.example/token"'}
        )

    ref = parse_reference("reg.example/a:1")
    async with RegistryClient(transport=httpx.MockTransport(registry)) as client:
        with pytest.raises(RegistryError, match="not https"):
            await client.get_manifest(ref)


async def test_manifest_checked_against_the_registry_digest_header() -> None:
    body = b'{"schemaVersion": 2}'

    def registry(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Docker-Content-Digest": D1})

    ref = parse_reference("reg.example/a:1")
    async with RegistryClient(transport=httpx.MockTransport(registry)) as client:
        with pytest.raises(DigestMismatch):
            await client.get_manifest(ref)
        with pytest.raises(DigestMismatch):
            await client.get_manifest(ref, D2)  # asked by digest: that one must match


async def test_basic_auth_and_not_found() -> None:
    seen: list[str | None] = []

    def registry(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if "authorization" not in request.headers:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return httpx.Response(404)

    ref = parse_reference("reg.example/a:1")
    creds = {"reg.example": ("me", "pw")}
    async with RegistryClient(transport=httpx.MockTransport(registry), credentials=creds) as c:
        with pytest.raises(ImageNotFound):
            await c.get_manifest(ref)
    assert seen == [None, "Basic bWU6cHc="]
    async with RegistryClient(transport=httpx.MockTransport(registry)) as client:
        with pytest.raises(RegistryError, match="authentication required"):
            await client.get_manifest(ref)


def test_docker_config_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    config = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": b64("hub:pw:with:colons")},
            "127.0.0.1:5000": {"username": "u", "password": "p"},
            "https://reg.example/v2/": {"auth": b64("me:secret")},
            "broken.example": {"auth": "%%%"},
            "empty.example": {},
        },
        "credsStore": "desktop",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert docker_credentials() == {
        "docker.io": ("hub", "pw:with:colons"),
        "127.0.0.1:5000": ("u", "p"),
        "reg.example": ("me", "secret"),
    }
    assert ImageStore(tmp_path / "s").credentials["reg.example"] == ("me", "secret")
    explicit = ImageStore(tmp_path / "s", credentials={"reg.example": ("x", "y")})
    assert explicit.credentials["reg.example"] == ("x", "y")
    assert ImageStore(tmp_path / "s", docker_config=False).credentials == {}
    (tmp_path / "config.json").write_text("{not json")
    assert docker_credentials() == {}
    assert docker_credentials(tmp_path / "missing.json") == {}

"""Helpers for tests: build tiny OCI images, push them to a registry, run a registry.

There is no network in tests, so they build their own images: :func:`host_rootfs_members`
copies a few host binaries and their shared-library closure (found with ``ldd``) into
layer members, keeping the host's symlink structure (``/bin -> usr/bin`` ...);
:func:`layer` makes a (gzipped) tarball of members; :func:`push_image` uploads the blobs
and a manifest (optionally an index with more platforms) through the registry v2 API;
:func:`run_registry` starts Debian's ``docker-registry`` on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, host_platform

__all__ = [
    "Member",
    "PushedImage",
    "host_rootfs_members",
    "layer",
    "push_blob",
    "push_image",
    "push_manifest",
    "run_registry",
]

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Member:
    """One tar member: ``kind`` is a tarfile type (REGTYPE, DIRTYPE, SYMTYPE, LNKTYPE...)."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    mode: int = 0o644
    linkname: str = ""
    uid: int = 0
    gid: int = 0

    def info(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = self.kind
        info.mode = self.mode
        info.uid, info.gid = self.uid, self.gid
        info.linkname = self.linkname
        info.size = len(self.data) if self.kind == tarfile.REGTYPE else 0
        info.mtime = 1_700_000_000
        return info


def layer(members: Iterable[Member], *, compress: bool = True) -> bytes:
    """A layer tarball (gzip unless ``compress=False``), members in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            tf.addfile(m.info(), io.BytesIO(m.data) if m.kind == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def _ldd(path: str) -> list[str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=False).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                libs.append(target)
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def host_rootfs_members(binaries: Sequence[str]) -> list[Member]:
    """Members holding the host ``binaries`` (names or paths) and all they need to run."""
    seen: dict[str, Member] = {}

    def add_dirs(rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in seen:
                seen[d] = Member(d, kind=tarfile.DIRTYPE, mode=0o755)

    def replicate(path: str) -> None:
        # walk the components, copying each symlink met on the way, then the file
        parts = [p for p in path.split("/") if p]
        current = ""
        for i, part in enumerate(parts):
            current = f"{current}/{part}"
            if os.path.islink(current):
                target = os.readlink(current)
                rel = current.lstrip("/")
                if rel not in seen:
                    add_dirs(rel)
                    seen[rel] = Member(rel, kind=tarfile.SYMTYPE, mode=0o777, linkname=target)
                base = os.path.dirname(current) if not target.startswith("/") else ""
                rest = "/".join(parts[i + 1 :])
                joined = os.path.normpath(os.path.join(base or "/", target))
                replicate(f"{joined}/{rest}" if rest else joined)
                return
        rel = current.lstrip("/")
        if rel not in seen:
            add_dirs(rel)
            mode = os.stat(current).st_mode & 0o777
            seen[rel] = Member(rel, data=Path(current).read_bytes(), mode=mode)

    for binary in binaries:
        path = binary if binary.startswith("/") else shutil.which(binary)
        if path is None:
            raise FileNotFoundError(binary)
        replicate(path)
        for lib in _ldd(os.path.realpath(path)):
            replicate(lib)
    ordered = sorted(seen.values(), key=lambda m: (m.kind != tarfile.DIRTYPE, m.name))
    return ordered


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push_blob(client: httpx.AsyncClient, registry: str, repo: str, data: bytes) -> str:
    digest = _digest(data)
    base = f"http://{registry}/v2/{repo}"
    resp = await client.post(f"{base}/blobs/uploads/")
    if resp.status_code != 202:
        raise RuntimeError(f"blob upload start: HTTP {resp.status_code} {resp.text}")
    location = resp.headers["location"]
    if location.startswith("/"):
        location = f"http://{registry}{location}"
    sep = "&" if "?" in location else "?"
    resp = await client.put(
        f"{location}{sep}digest={digest}",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    if resp.status_code != 201:
        raise RuntimeError(f"blob upload: HTTP {resp.status_code} {resp.text}")
    return digest


async def push_manifest(
    client: httpx.AsyncClient, registry: str, repo: str, ref: str, body: bytes, media_type: str
) -> str:
    resp = await client.put(
        f"http://{registry}/v2/{repo}/manifests/{ref}",
        content=body,
        headers={"Content-Type": media_type},
    )
    if resp.status_code != 201:
        raise RuntimeError(f"manifest upload: HTTP {resp.status_code} {resp.text}")
    return _digest(body)


@dataclass
class PushedImage:
    reference: str
    digest: str
    """The manifest's digest (the host platform's one when there is an index)."""
    layers: list[str]
    config: str
    index: str | None = None
    other: dict[str, str] = field(default_factory=dict)
    """Digest of the manifest of each other platform in the index."""


def _config(arch: str, diff_ids: list[str], config: dict[str, object]) -> bytes:
    doc = {
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    return json.dumps(doc, sort_keys=True).encode()


async def _push_one(
    client: httpx.AsyncClient,
    registry: str,
    repo: str,
    layers: Sequence[bytes],
    arch: str,
    config: dict[str, object],
    media: str,
) -> tuple[bytes, list[str], str]:
    layer_descs: list[dict[str, object]] = []
    diff_ids: list[str] = []
    digests: list[str] = []
    for blob in layers:
        raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        diff_ids.append(_digest(raw))
        kind = OCI_LAYER_GZIP if blob[:2] == b"\x1f\x8b" else OCI_LAYER
        if media == DOCKER_MANIFEST:
            kind = "application/vnd.docker.image.rootfs.diff.tar.gzip"
        digest = await push_blob(client, registry, repo, blob)
        digests.append(digest)
        layer_descs.append({"mediaType": kind, "digest": digest, "size": len(blob)})
    config_body = _config(arch, diff_ids, config)
    config_digest = await push_blob(client, registry, repo, config_body)
    config_type = (
        OCI_CONFIG if media == OCI_MANIFEST else "application/vnd.docker.container.image.v1+json"
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": media,
        "config": {"mediaType": config_type, "digest": config_digest, "size": len(config_body)},
        "layers": layer_descs,
    }
    return json.dumps(manifest).encode(), digests, config_digest


async def push_image(
    registry: str,
    repo: str,
    tag: str,
    layers: Sequence[bytes],
    *,
    config: dict[str, object] | None = None,
    arch: str | None = None,
    others: dict[str, Sequence[bytes]] | None = None,
    docker_media: bool = False,
) -> PushedImage:
    """Push an image (for ``arch``, default: this host's); with ``others`` (arch ->
    layers), push an index of all platforms under ``tag``."""
    media = DOCKER_MANIFEST if docker_media else OCI_MANIFEST
    arch = arch or host_platform().architecture
    async with httpx.AsyncClient(timeout=30) as client:
        body, layer_digests, config_digest = await _push_one(
            client, registry, repo, layers, arch, config or {}, media
        )
        if not others:
            digest = await push_manifest(client, registry, repo, tag, body, media)
            return PushedImage(f"{registry}/{repo}:{tag}", digest, layer_digests, config_digest)
        digest = await push_manifest(client, registry, repo, _digest(body), body, media)
        entries = [(arch, digest, len(body))]
        other: dict[str, str] = {}
        for other_arch, other_layers in others.items():
            obody, _, _ = await _push_one(
                client, registry, repo, other_layers, other_arch, {}, media
            )
            odigest = await push_manifest(client, registry, repo, _digest(obody), obody, media)
            entries.append((other_arch, odigest, len(obody)))
            other[other_arch] = odigest
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": media,
                    "digest": d,
                    "size": n,
                    "platform": {"architecture": a, "os": "linux"},
                }
                for a, d, n in entries
            ],
        }
        index_body = json.dumps(index).encode()
        index_digest = await push_manifest(client, registry, repo, tag, index_body, OCI_INDEX)
        return PushedImage(
            f"{registry}/{repo}:{tag}", digest, layer_digests, config_digest, index_digest, other
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _up(addr: str) -> bool:
    try:
        return httpx.get(f"http://{addr}/v2/", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def run_registry(workdir: Path, *, timeout: float = 15.0) -> Iterator[str]:
    """Run ``docker-registry`` (storage under ``workdir``) until the block ends; yields
    ``127.0.0.1:PORT``. FileNotFoundError when the binary is not installed."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise FileNotFoundError("docker-registry")
    addr = f"127.0.0.1:{_free_port()}"
    config = workdir / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
        "  delete:\n    enabled: true\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: {addr}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    log = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen(
        [binary, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
    )
    try:
        deadline = time.monotonic() + timeout
        while not _up(addr):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"docker-registry did not come up: {(workdir / 'registry.log').read_text()}"
                )
            time.sleep(0.05)
        yield addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

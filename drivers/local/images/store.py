"""The local image store: a content-addressed cache under ``<home>/images/``.

Layout::

    blobs/sha256/<hex>    verified blobs: indexes, manifests, configs, layer tarballs
    layers/<hex>/         a layer unpacked (hex of its tarball's digest), whiteouts kept
    rootfs/<hex>/         an image's layers flattened (hex of its manifest digest)
    refs/<key>.json       what a reference resolved to (an ImageRecord), key = sha256(ref)
    tmp/<pid>-<rand>      work in progress, renamed into place when complete

Everything lands by ``rename`` once complete and verified, so a crash or a failed pull
leaves nothing half-made in place, and two processes pulling the same image at once
both succeed (one rename wins; the other's copy is dropped). Inside one process, pulls
are single-flight: one lock per reference, per blob, per layer and per rootfs, and a
task that waited for a lock finds the work done.

As root, every unpacked file belongs to the sandbox uid/gid (``owner``): inside a
sandbox the image's files are the sandbox user's, so its writable layer is writable
everywhere, as root's would be in a container. The cache itself stays in the 0700
home, so that uid cannot reach it from the host.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import trio

from corral.errors import ImageError, ImageNotFound

from ..cgroup import pid_exists
from .auth import docker_credentials
from .manifest import (
    Descriptor,
    Index,
    Manifest,
    Platform,
    decode_config,
    decode_manifest,
    host_platform,
    select_platform,
)
from .reference import ImageRef, digest_hex, parse_reference
from .registry import RegistryClient
from .rootfs import chown_tree, flatten, force_rmtree
from .unpack import UnpackLimits, unpack_layer

__all__ = ["Image", "ImageDefaults", "ImageRecord", "ImageStore"]

MAX_CONFIG_BYTES = 16 << 20
MAX_LAYER_BYTES = 16 << 30


class ImageDefaults(msgspec.Struct, frozen=True):
    """What the image config says a container should get unless told otherwise."""

    env: tuple[str, ...] = ()
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    workdir: str | None = None
    user: str | None = None

    def env_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.env:
            key, sep, value = item.partition("=")
            if sep and key:
                out[key] = value
        return out


class ImageRecord(msgspec.Struct, frozen=True):
    """One pulled reference: what it resolved to and when."""

    reference: str
    digest: str
    config_digest: str
    layers: tuple[str, ...]
    platform: str
    size: int
    pulled_at: float
    defaults: ImageDefaults = ImageDefaults()
    index_digest: str | None = None

    @property
    def rootfs_key(self) -> str:
        return digest_hex(self.digest)


@dataclass(frozen=True)
class Image:
    record: ImageRecord
    rootfs: Path

    @property
    def defaults(self) -> ImageDefaults:
        return self.record.defaults


class _KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (trio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class _Borrowed(httpx.AsyncBaseTransport):
    """The caller's transport, left open when a pull's client closes."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class ImageStore:
    """Pull, cache and list OCI images under ``root`` (``<home>/images``).

    Registry credentials: ``credentials`` (registry -> (user, password)) over those of
    docker's ``config.json`` (unless ``docker_config=False``, see :mod:`.auth`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        owner: tuple[int, int] | None = None,
        platform: Platform | None = None,
        insecure: bool = False,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        docker_config: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 60.0,
        limits: UnpackLimits | None = None,
        max_layer_bytes: int = MAX_LAYER_BYTES,
    ) -> None:
        self.root = Path(root)
        if owner is None and os.geteuid() == 0:
            from ..launch import sandbox_credentials

            owner = sandbox_credentials()
        self.owner = owner
        self.platform = platform or host_platform()
        self.insecure = insecure
        self.credentials = {
            **(docker_credentials() if docker_config else {}),
            **(credentials or {}),
        }
        self.transport = transport
        self.timeout = timeout
        self.limits = limits or UnpackLimits()
        self.max_layer_bytes = max_layer_bytes
        self._locks = _KeyedLocks()
        self._prepared = False

    # -- paths -----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest_hex(digest)

    def layer_dir(self, digest: str) -> Path:
        return self.root / "layers" / digest_hex(digest)

    def rootfs_dir(self, digest: str) -> Path:
        return self.root / "rootfs" / digest_hex(digest)

    def _ref_path(self, ref: ImageRef) -> Path:
        return self.root / "refs" / f"{ref.key()}.json"

    def _prepare(self) -> None:
        if self._prepared:
            return
        for sub in ("", "blobs/sha256", "layers", "rootfs", "refs", "tmp"):
            path = self.root / sub
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for entry in os.scandir(self.root / "tmp"):
            pid = entry.name.split("-", 1)[0]
            if not pid.isdigit() or not pid_exists(int(pid)):
                force_rmtree(entry.path)
        self._prepared = True

    def _tmp(self, what: str) -> Path:
        return self.root / "tmp" / f"{os.getpid()}-{what}-{secrets.token_hex(8)}"

    # -- queries -------------------------------------------------------------------------

    def lookup(self, reference: str) -> Image | None:
        """The pulled image for ``reference`` (no network), or None."""
        ref = parse_reference(reference)
        record = self._load(self._ref_path(ref))
        if record is None:
            return None
        rootfs = self.rootfs_dir(record.digest)
        return Image(record, rootfs) if rootfs.is_dir() else None

    def list_images(self) -> list[ImageRecord]:
        refs = self.root / "refs"
        if not refs.is_dir():
            return []
        records = [self._load(path) for path in refs.glob("*.json")]
        return sorted((r for r in records if r is not None), key=lambda r: r.reference)

    @staticmethod
    def _load(path: Path) -> ImageRecord | None:
        try:
            return msgspec.json.decode(path.read_bytes(), type=ImageRecord)
        except (FileNotFoundError, msgspec.DecodeError):
            return None

    def _save(self, ref: ImageRef, record: ImageRecord) -> None:
        tmp = self._tmp("ref")
        tmp.write_bytes(msgspec.json.encode(record))
        os.replace(tmp, self._ref_path(ref))

    # -- pulling -------------------------------------------------------------------------

    async def ensure(self, reference: str) -> Image:
        """The image for ``reference``: from the cache when pulled before, else pulled."""
        ref = parse_reference(reference)
        async with self._locks.hold(f"ref:{ref}"):
            image = self.lookup(str(ref))
            if image is not None:
                await self._own_rootfs(image.rootfs)
                return image
            return await self._pull(ref)

    async def pull(self, reference: str) -> Image:
        """Resolve ``reference`` at the registry again (a moved tag is followed) and pull."""
        ref = parse_reference(reference)
        async with self._locks.hold(f"ref:{ref}"):
            return await self._pull(ref)

    def _client(self) -> RegistryClient:
        return RegistryClient(
            insecure=self.insecure,
            credentials=self.credentials,
            timeout=self.timeout,
            transport=None if self.transport is None else _Borrowed(self.transport),
        )

    async def _pull(self, ref: ImageRef) -> Image:
        self._prepare()
        async with self._client() as client:
            fetched = await client.get_manifest(ref)
            doc = decode_manifest(fetched.body, fetched.media_type)
            index_digest = None
            if isinstance(doc, Index):
                index_digest = fetched.digest
                await self._store_bytes(index_digest, fetched.body)
                entry = select_platform(doc, self.platform)
                fetched = await client.get_manifest(ref, entry.digest)
                doc = decode_manifest(fetched.body, fetched.media_type)
                if isinstance(doc, Index):
                    raise ImageError(f"{ref}: an index inside an index is not supported")
            manifest: Manifest = doc
            if manifest.config.size > MAX_CONFIG_BYTES:
                raise ImageError(f"{ref}: image config larger than {MAX_CONFIG_BYTES} bytes")
            await self._blob(client, ref, manifest.config)
            config = decode_config(self.blob_path(manifest.config.digest).read_bytes())
            want = self.platform
            if (config.os or want.os) != want.os or (
                config.architecture or want.architecture
            ) != want.architecture:
                raise ImageNotFound(
                    f"{ref} is a {config.os}/{config.architecture} image; this host is {want}"
                )
            layer_dirs = []
            for layer in manifest.layers:
                if layer.size > self.max_layer_bytes:
                    raise ImageError(f"{ref}: layer {layer.digest} larger than the limit")
                await self._blob(client, ref, layer)
                layer_dirs.append(await self._unpack(layer.digest))
        rootfs = await self._flatten(fetched.digest, layer_dirs)
        await self._store_bytes(fetched.digest, fetched.body)
        cc = config.config
        defaults = ImageDefaults(
            env=tuple(cc.env or ()) if cc else (),
            cmd=tuple(cc.cmd) if cc and cc.cmd is not None else None,
            entrypoint=tuple(cc.entrypoint) if cc and cc.entrypoint is not None else None,
            workdir=(cc.working_dir or None) if cc else None,
            user=(cc.user or None) if cc else None,
        )
        variant = f"/{config.variant}" if config.variant else ""
        record = ImageRecord(
            reference=str(ref),
            digest=fetched.digest,
            config_digest=manifest.config.digest,
            layers=tuple(layer.digest for layer in manifest.layers),
            platform=f"{config.os or '?'}/{config.architecture or '?'}{variant}",
            size=sum(layer.size for layer in manifest.layers),
            pulled_at=time.time(),
            defaults=defaults,
            index_digest=index_digest,
        )
        self._save(ref, record)
        if ref.digest is None:  # also reachable by the digests it resolved to
            for digest in (fetched.digest, index_digest):
                if digest is not None:
                    alias = ref.with_digest(digest)
                    self._save(alias, msgspec.structs.replace(record, reference=str(alias)))
        return Image(record, rootfs)

    async def _store_bytes(self, digest: str, body: bytes) -> None:
        path = self.blob_path(digest)
        if path.exists():
            return
        tmp = self._tmp("blob")
        tmp.write_bytes(body)
        os.replace(tmp, path)
        await trio.lowlevel.checkpoint()

    async def _blob(self, client: RegistryClient, ref: ImageRef, desc: Descriptor) -> Path:
        path = self.blob_path(desc.digest)
        async with self._locks.hold(f"blob:{desc.digest}"):
            if path.exists():
                return path
            tmp = self._tmp("blob")
            try:
                await client.fetch_blob(ref, desc, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return path

    async def _unpack(self, digest: str) -> Path:
        dest = self.layer_dir(digest)
        async with self._locks.hold(f"layer:{digest}"):
            if dest.is_dir():
                return dest
            tmp = self._tmp("layer")
            tmp.mkdir(mode=0o700)
            try:
                await trio.to_thread.run_sync(self._unpack_sync, digest, tmp)
                try:
                    os.rename(tmp, dest)
                except OSError:
                    if not dest.is_dir():
                        raise
            finally:
                force_rmtree(tmp)
        return dest

    def _unpack_sync(self, digest: str, dest: Path) -> None:
        unpack_layer(
            self.blob_path(digest),
            dest,
            owner=self.owner,
            limits=self.limits,
            check=trio.from_thread.check_cancelled,
        )

    async def _flatten(self, digest: str, layers: list[Path]) -> Path:
        dest = self.rootfs_dir(digest)
        async with self._locks.hold(f"rootfs:{digest}"):
            if dest.is_dir():
                await self._own_rootfs(dest)
                return dest
            tmp = self._tmp("rootfs")
            try:
                await trio.to_thread.run_sync(
                    lambda: flatten(layers, tmp, check=trio.from_thread.check_cancelled)
                )
                try:
                    os.rename(tmp, dest)
                except OSError:
                    if not dest.is_dir():
                        raise
            finally:
                force_rmtree(tmp)
        return dest

    async def _own_rootfs(self, rootfs: Path) -> None:
        """After a change of the sandbox uid, hand the cached files to the new one."""
        if self.owner is None or os.geteuid() != 0:
            return
        st = os.lstat(rootfs)
        if (st.st_uid, st.st_gid) != self.owner:
            uid, gid = self.owner
            await trio.to_thread.run_sync(chown_tree, rootfs, uid, gid)

    # -- removal -------------------------------------------------------------------------

    def remove(self, reference: str, *, in_use: Collection[str] = ()) -> list[str]:
        """Forget ``reference`` (or every reference of a digest) and free what no longer
        has a reference; ``in_use`` are manifest digests of sandboxes that still run.
        Returns the references removed; ImageNotFound when none matched."""
        matched = self._match(reference)
        if not matched:
            raise ImageNotFound(f"no pulled image {reference!r}")
        for path, _ in matched:
            path.unlink(missing_ok=True)
        self.gc(in_use=in_use)
        return sorted(record.reference for _, record in matched)

    def _match(self, reference: str) -> list[tuple[Path, ImageRecord]]:
        refs = self.root / "refs"
        records = [(p, self._load(p)) for p in refs.glob("*.json")] if refs.is_dir() else []
        found = [(p, r) for p, r in records if r is not None]
        text = reference.removeprefix("sha256:")
        if len(text) >= 12 and all(c in "0123456789abcdef" for c in text):
            return [(p, r) for p, r in found if digest_hex(r.digest).startswith(text)]
        canonical = str(parse_reference(reference))
        return [(p, r) for p, r in found if r.reference == canonical]

    def gc(self, *, in_use: Collection[str] = ()) -> int:
        """Delete rootfs, layers and blobs no reference (nor ``in_use``) needs; entries freed."""
        if not self.root.is_dir():
            return 0
        records = self.list_images()
        keep_rootfs = {digest_hex(r.digest) for r in records}
        keep_rootfs |= {digest_hex(d) for d in in_use}
        keep_blobs: set[str] = set()
        for r in records:
            digests = [r.digest, r.config_digest, *r.layers]
            if r.index_digest:
                digests.append(r.index_digest)
            keep_blobs.update(digest_hex(d) for d in digests)
        keep_layers = {digest_hex(d) for r in records for d in r.layers}
        freed = 0
        plan = (("rootfs", keep_rootfs), ("layers", keep_layers), ("blobs/sha256", keep_blobs))
        for sub, keep in plan:
            folder = self.root / sub
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.name in keep:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    force_rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                freed += 1
        return freed

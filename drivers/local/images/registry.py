"""A small registry v2 client (pull only) on ``httpx.AsyncClient``.

* ``http://`` only for loopback registries or with ``insecure=True``; ``https://`` else.
* Auth: an anonymous request first; on ``401`` the ``WWW-Authenticate`` challenge decides.
  ``Bearer realm=...,service=...,scope=...`` -> ``GET realm?service=&scope=`` (with
  basic credentials when the caller has some for this registry) -> ``{"token": ...}``
  (or ``access_token``), cached per scope and sent as ``Authorization: Bearer``;
  ``Basic`` -> the caller's credentials. One retry per request.
* Manifests are read whole (at most ``max_manifest_bytes``) and verified: against the
  digest asked for, else against ``Docker-Content-Digest`` when the registry sends one.
* Blobs are streamed to a file while hashing; more bytes than the descriptor's size, a
  short body or a wrong digest raise :class:`~corral.errors.DigestMismatch` (the caller
  deletes the partial file). Redirects (to blob storage) are followed; httpx drops the
  ``Authorization`` header when a redirect leaves the registry's origin.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import cast

import httpx

from corral.errors import (
    DigestMismatch,
    ImageNotFound,
    InvalidConfig,
    RegistryError,
)

from .manifest import MANIFEST_ACCEPT, Descriptor
from .reference import ImageRef, check_digest, is_loopback_host

__all__ = [
    "MAX_MANIFEST_BYTES",
    "Challenge",
    "FetchedManifest",
    "RegistryClient",
    "parse_challenge",
]

MAX_MANIFEST_BYTES = 4 << 20
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]


@dataclass(frozen=True)
class FetchedManifest:
    body: bytes
    media_type: str
    digest: str


def _gen(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """httpx's body iterators are async generators: close them (``aclosing``) when a
    check stops reading early, rather than leaving them to the garbage collector."""
    return cast(AsyncGenerator[bytes, None], chunks)


def parse_challenge(header: str) -> Challenge:
    """Parse one ``WWW-Authenticate`` challenge: ``Scheme k="v", k2=v2``."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            value = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(rest[i])
                i += 1
            i += 1
            params[key] = "".join(value)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return Challenge(scheme.lower(), params)


class RegistryClient:
    """Pull-side registry v2 API. Use as ``async with RegistryClient() as client``."""

    def __init__(
        self,
        *,
        insecure: bool = False,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_manifest_bytes: int = MAX_MANIFEST_BYTES,
    ) -> None:
        self.insecure = insecure
        self.credentials = dict(credentials or {})
        self.max_manifest_bytes = max_manifest_bytes
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            transport=transport,
            follow_redirects=True,
            headers={"User-Agent": "corral-image-client/0.1"},
        )
        self._tokens: dict[tuple[str, str], str] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- urls and auth -------------------------------------------------------------------

    def base_url(self, ref: ImageRef) -> str:
        scheme = "http" if ref.loopback or self.insecure else "https"
        return f"{scheme}://{ref.api_host}/v2/{ref.repository}"

    def _check_realm(self, realm: str) -> httpx.URL:
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL as exc:
            raise RegistryError(f"bad token realm {realm!r}") from exc
        if url.scheme == "https" or (
            url.scheme == "http" and (self.insecure or is_loopback_host(url.host))
        ):
            return url
        raise RegistryError(f"refusing token realm {realm!r}: not https")

    async def _fetch_token(self, ref: ImageRef, challenge: Challenge) -> str:
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryError(f"{ref.registry}: Bearer challenge without a realm")
        url = self._check_realm(realm)
        params = {"scope": challenge.params.get("scope") or f"repository:{ref.repository}:pull"}
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        auth = self.credentials.get(ref.registry)
        try:
            resp = await self._http.get(url, params=params, auth=auth)
        except httpx.HTTPError as exc:
            raise RegistryError(f"token endpoint {realm}: {exc!r}") from exc
        if resp.status_code in (401, 403):
            raise RegistryError(f"{ref.registry}: token endpoint refused ({resp.status_code})")
        if resp.status_code != 200:
            raise RegistryError(f"token endpoint {realm}: HTTP {resp.status_code}")
        try:
            data = resp.json()
        except ValueError as exc:
            raise RegistryError(f"token endpoint {realm}: not JSON") from exc
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token endpoint {realm}: no token in the answer")
        return token

    async def _authorize(self, ref: ImageRef, resp: httpx.Response) -> dict[str, str]:
        header = resp.headers.get("www-authenticate", "")
        challenge = parse_challenge(header)
        if challenge.scheme == "bearer":
            scope = challenge.params.get("scope", "")
            token = await self._fetch_token(ref, challenge)
            self._tokens[(ref.registry, scope)] = token
            self._tokens[(ref.registry, ref.repository)] = token
            return {"Authorization": f"Bearer {token}"}
        if challenge.scheme == "basic" and ref.registry in self.credentials:
            user, password = self.credentials[ref.registry]
            pair = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        raise RegistryError(f"{ref.registry}: authentication required ({header or 'no challenge'})")

    @asynccontextmanager
    async def _open(
        self, ref: ImageRef, url: str, headers: Mapping[str, str]
    ) -> AsyncIterator[httpx.Response]:
        """GET ``url`` streaming, authenticating once on 401; the caller reads the body."""
        sent = dict(headers)
        token = self._tokens.get((ref.registry, ref.repository))
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        for attempt in range(2):
            request = self._http.build_request("GET", url, headers=sent)
            try:
                resp = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise RegistryError(f"{ref.registry}: {exc!r}") from exc
            try:
                if resp.status_code == 401 and attempt == 0:
                    await resp.aclose()
                    sent.update(await self._authorize(ref, resp))
                    continue
                yield resp
                return
            finally:
                await resp.aclose()
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _fail(ref: ImageRef, resp: httpx.Response, what: str) -> RegistryError:
        if resp.status_code in (401, 403):
            return RegistryError(f"{ref.name}: not authorized to pull {what}")
        return RegistryError(f"{ref.name}: {what}: HTTP {resp.status_code}")

    # -- manifests and blobs -------------------------------------------------------------

    async def get_manifest(self, ref: ImageRef, reference: str | None = None) -> FetchedManifest:
        """The manifest (or index) for a tag or a digest, verified."""
        reference = reference or ref.reference
        want = check_digest(reference) if reference.startswith("sha") else None
        url = f"{self.base_url(ref)}/manifests/{reference}"
        async with self._open(ref, url, {"Accept": MANIFEST_ACCEPT}) as resp:
            if resp.status_code == 404:
                raise ImageNotFound(f"{ref.name}: no manifest {reference!r} in the registry")
            if resp.status_code != 200:
                raise self._fail(ref, resp, f"manifest {reference!r}")
            size = resp.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > self.max_manifest_bytes:
                raise RegistryError(f"{ref.name}: manifest larger than {self.max_manifest_bytes}")
            body = bytearray()
            try:
                async with aclosing(_gen(resp.aiter_bytes())) as chunks:
                    async for chunk in chunks:
                        body += chunk
                        if len(body) > self.max_manifest_bytes:
                            raise RegistryError(
                                f"{ref.name}: manifest larger than {self.max_manifest_bytes} bytes"
                            )
            except httpx.HTTPError as exc:
                raise RegistryError(f"{ref.name}: reading the manifest: {exc!r}") from exc
            media_type = resp.headers.get("content-type", "").split(";")[0].strip()
            claimed = resp.headers.get("docker-content-digest")
        got = "sha256:" + hashlib.sha256(body).hexdigest()
        expected = want or (claimed if claimed and claimed.startswith("sha256:") else None)
        if expected is not None and got != expected:
            raise DigestMismatch(
                f"{ref.name}: manifest {reference!r} is {got}, expected {expected}"
            )
        return FetchedManifest(bytes(body), media_type, got)

    async def fetch_blob(
        self, ref: ImageRef, desc: Descriptor, dest: str | os.PathLike[str]
    ) -> None:
        """Stream the blob ``desc`` into the new file ``dest``, verifying size and digest."""
        digest = check_digest(desc.digest)
        if desc.size < 0:
            raise InvalidConfig(f"blob {digest} has a negative size")
        url = f"{self.base_url(ref)}/blobs/{digest}"
        hasher = hashlib.sha256()
        seen = 0
        async with self._open(ref, url, {"Accept-Encoding": "identity"}) as resp:
            if resp.status_code == 404:
                raise ImageNotFound(f"{ref.name}: blob {digest} is not in the registry")
            if resp.status_code != 200:
                raise self._fail(ref, resp, f"blob {digest}")
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                async with aclosing(_gen(resp.aiter_raw(_CHUNK))) as chunks:
                    async for chunk in chunks:
                        seen += len(chunk)
                        if seen > desc.size:
                            raise DigestMismatch(
                                f"{ref.name}: blob {digest} is larger than its {desc.size} bytes"
                            )
                        hasher.update(chunk)
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
            except httpx.HTTPError as exc:
                raise RegistryError(f"{ref.name}: reading blob {digest}: {exc!r}") from exc
            finally:
                os.close(fd)
        if seen != desc.size:
            raise DigestMismatch(f"{ref.name}: blob {digest} has {seen} bytes, not {desc.size}")
        got = "sha256:" + hasher.hexdigest()
        if got != digest:
            raise DigestMismatch(f"{ref.name}: blob {digest} has digest {got}")

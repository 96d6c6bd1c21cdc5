"""REST calls to the control plane: one shared httpx ``AsyncClient`` per driver.

The pool is sized for thousands of sandboxes (each polls its status and is stopped and
removed over the same pool; no per-sandbox client). HTTP/2 is used when the ``h2``
package is installed (httpx then negotiates it over TLS; plain ``http://`` stays
HTTP/1.1). Every failure leaves this module as a typed corral error (one mapping point):

- 4xx/5xx → :func:`wire.error_for_response` (404 SandboxNotFound, 409
  SandboxAlreadyExists, 401/403 CloudHttpError saying the key was refused, others
  CloudHttpError(status, code, message) from either error body shape);
- a body that is not what the route answers → CloudHttpError ``invalid_response``;
- the network (refused, reset, timed out) → :class:`Runtime` naming the URL.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import httpx
import msgspec

from ...backend.kinds import CloudBackend
from ...errors import Runtime
from .wire import SandboxWire, decode_json, decode_sandbox, error_for_response

__all__ = ["HTTP2", "CloudHttp", "pool_limits"]

HTTP2 = importlib.util.find_spec("h2") is not None
REQUEST_TIMEOUT = 30.0
MAX_CONNECTIONS = 4096
MAX_KEEPALIVE = 1024


def pool_limits() -> httpx.Limits:
    return httpx.Limits(
        max_connections=MAX_CONNECTIONS,
        max_keepalive_connections=MAX_KEEPALIVE,
        keepalive_expiry=30.0,
    )


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"corral/{version('corral')}"
    except Exception:
        return "corral"


class CloudHttp:
    """The REST side of one cloud backend."""

    def __init__(
        self, backend: CloudBackend, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.base_url = backend.url
        self.client = httpx.AsyncClient(
            base_url=backend.url,
            headers={
                "authorization": f"Bearer {backend.api_key}",
                "user-agent": _user_agent(),
            },
            limits=pool_limits(),
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=10.0),
            http2=HTTP2,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """Send one request; the (2xx) status and body, or the typed error."""
        content = None if json is None else msgspec.json.encode(json)
        headers = None if content is None else {"content-type": "application/json"}
        try:
            response = await self.client.request(
                method,
                path,
                content=content,
                headers=headers,
                params=params,
                timeout=REQUEST_TIMEOUT if timeout is None else timeout,
            )
        except httpx.TimeoutException as exc:
            raise Runtime(
                f"{what}: the control plane at {self.base_url} timed out ({exc!r})"
            ) from None
        except httpx.HTTPError as exc:
            raise Runtime(
                f"{what}: cannot reach the control plane at {self.base_url}: {exc!r}"
            ) from None
        body = response.content
        if not 200 <= response.status_code < 300:
            raise error_for_response(response.status_code, body, what)
        return response.status_code, body

    async def sandbox(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> SandboxWire:
        """A request answered with a sandbox object."""
        status, body = await self.call(
            method, path, what=what, json=json, params=params, timeout=timeout
        )
        return decode_sandbox(status, body, what)

    async def message(self, method: str, path: str, *, what: str) -> Any:
        """A request answered with any JSON body (``{"message": ...}`` for DELETE)."""
        status, body = await self.call(method, path, what=what)
        return decode_json(status, body, what)

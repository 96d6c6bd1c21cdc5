"""Small ASGI helpers: typed request bodies, JSON responses, errors.

Every error leaves the server as ``{"code": "...", "message": "..."}`` with a 4xx/5xx
status; :class:`ApiError` carries the three. Request bodies are read with a size limit
and decoded strictly into msgspec Structs (bad JSON → 400 ``invalid_json``, unknown or
ill-typed fields → 400 ``invalid_body``, too large → 413 ``body_too_large``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import msgspec

from .models import ErrorOut

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

T = TypeVar("T")

MAX_BODY = 1024 * 1024
"""Largest request body accepted (the SDK's create bodies are a few hundred bytes)."""

_json = msgspec.json.Encoder()


class ApiError(Exception):
    """An HTTP error response: ``status`` and the wire ``{"code", "message"}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> ErrorOut:
        return ErrorOut(self.code, self.message)


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


def not_found(what: str = "sandbox") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


async def read_body(receive: Receive, limit: int = MAX_BODY) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes (413)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body over the {limit}-byte limit")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def decode_body(body: bytes, cls: type[T], *, empty_ok: bool = False) -> T:
    """Decode a JSON body strictly into ``cls``."""
    if not body.strip():
        if empty_ok:
            body = b"{}"
        else:
            raise ApiError(400, "invalid_json", "a JSON request body is required")
    try:
        msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_body", f"invalid request body: {exc}") from None


def query(scope: Scope) -> dict[str, str]:
    """The query string, percent-decoded (last value wins)."""
    raw = scope.get("query_string", b"").decode("latin-1")
    try:
        return dict(parse_qsl(raw, keep_blank_values=True, strict_parsing=False))
    except ValueError:
        raise ApiError(400, "invalid_query", "malformed query string") from None


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def bearer(scope: Scope) -> str | None:
    auth = header(scope, b"authorization")
    if auth is None:
        return None
    kind, _, token = auth.partition(" ")
    return token.strip() if kind.lower() == "bearer" and token.strip() else None


async def send_json(
    send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = _json.encode(obj)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, err: ApiError) -> None:
    extra = [(b"www-authenticate", b"Bearer")] if err.status == 401 else None
    await send_json(send, err.status, err.body(), extra)


WS_DENIAL = "websocket.http.response"
"""The ASGI extension that lets a server refuse an upgrade with an HTTP response."""


async def deny_websocket(scope: Scope, send: Send, err: ApiError) -> None:
    """Refuse a WebSocket upgrade with a real status and JSON body (a 1008 close when the
    server cannot send one)."""
    if WS_DENIAL not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    body = msgspec.json.encode(err.body())
    await send(
        {
            "type": "websocket.http.response.start",
            "status": err.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})

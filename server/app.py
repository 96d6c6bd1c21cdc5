"""The ASGI application of ``corral serve``: routing, auth, errors.

A small hand-written router (hypercorn gives ASGI on trio; nothing here needs more).
Routes, bodies and statuses follow ``shared/reference/microsandbox-cloud-wire.md``::

    POST   /v1/sandboxes?start=&wait_for=running&wait_timeout=   create
    GET    /v1/sandboxes?cursor=&limit=&labels=                  list (opaque cursors)
    GET    /v1/sandboxes/{id}              /by-name/{name}       get
    DELETE /v1/sandboxes/{id}              /by-name/{name}       remove ({"message"})
    POST   /v1/sandboxes/{id}/start|stop   /by-name/{name}/…     start / stop
    GET    /v1/sandboxes/{id}/logs         /by-name/{name}/logs  server-sent events
    WS     /v1/sandboxes/{id}/agent        microsandbox agent protocol (msb_session)
    WS     /v1/sandboxes/{id}/corral       reserved: corral's own frames (see `relay`)
    GET    /healthz                        no auth

Every route but ``/healthz`` needs ``Authorization: Bearer <key>`` (401 otherwise);
a key belongs to one org, and another org's sandbox is a 404 like a missing one.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import msgspec
import trio

from .http import (
    MAX_BODY,
    ApiError,
    ClientGone,
    Receive,
    Scope,
    Send,
    bearer,
    decode_body,
    deny_websocket,
    header,
    not_found,
    query,
    read_body,
    send_error,
    send_json,
)
from .logs import sse
from .models import TERMINAL_STATUSES, CreateSandboxRequest, EmptyBody, MessageOut, SandboxPage
from .msb_session import AgentSession
from .service import ControlPlane
from .spec import plan_create
from .store import SandboxRecord

log = logging.getLogger("corral.server")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_WAIT = 600.0
SSE_HEARTBEAT = 15.0

Relay = Callable[[SandboxRecord, Scope, Receive, Send], Awaitable[None]]
"""Handler for the reserved ``/corral`` WebSocket route (corral's cloud driver)."""


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, _, seq = raw.partition(":")
        if tag == "v1" and seq.isdigit():
            return int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise ApiError(400, "invalid_cursor", "cursor is not one this server handed out")


def _bool(q: dict[str, str], name: str, default: bool) -> bool:
    value = q.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ApiError(400, "invalid_query", f"{name} must be true or false")


def _wait(q: dict[str, str]) -> tuple[bool, float]:
    """``wait_for`` (only ``running``) and ``wait_timeout`` (seconds)."""
    wait_for = q.get("wait_for")
    if wait_for not in (None, "", "running"):
        raise ApiError(400, "invalid_query", f"wait_for must be 'running', got {wait_for!r}")
    try:
        timeout = float(q.get("wait_timeout", "90"))
    except ValueError:
        raise ApiError(400, "invalid_query", "wait_timeout must be a number of seconds") from None
    if not 0 <= timeout <= MAX_WAIT:
        raise ApiError(400, "invalid_query", f"wait_timeout must be 0..{MAX_WAIT:g} seconds")
    return wait_for == "running", timeout


class App:
    """The ASGI callable."""

    def __init__(
        self, plane: ControlPlane, *, max_body: int = MAX_BODY, relay: Relay | None = None
    ) -> None:
        self.plane = plane
        self.max_body = max_body
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    def _org(self, scope: Scope) -> str:
        key = bearer(scope)
        if key is None:
            raise ApiError(401, "unauthorized", "missing API key (Authorization: Bearer <key>)")
        org = self.plane.store.authenticate(key)
        if org is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key")
        return org

    @staticmethod
    def _segments(scope: Scope) -> list[str]:
        raw = scope.get("raw_path") or scope["path"].encode()
        path = bytes(raw).split(b"?", 1)[0].decode("latin-1")
        return [unquote(s) for s in path.strip("/").split("/")]

    def _lookup(self, org: str, segs: list[str]) -> tuple[SandboxRecord, list[str]]:
        """``[by-name, NAME, rest…]`` or ``[ID, rest…]`` (after v1/sandboxes)."""
        if segs[0] == "by-name":
            if len(segs) < 2:
                raise not_found("route")
            return self.plane.get_by_name(org, segs[1]), segs[2:]
        return self.plane.get(org, segs[0]), segs[1:]

    # -- HTTP -------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._route(scope, receive, send)
        except ApiError as err:
            await send_error(send, err)
        except ClientGone:
            pass
        except Exception:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            await send_error(send, ApiError(500, "internal_error", "internal server error"))

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, segs = scope["method"], self._segments(scope)
        if segs == ["healthz"]:
            await send_json(send, 200, MessageOut("ok"))
            return
        if segs[:2] != ["v1", "sandboxes"]:
            raise not_found("route")
        org = self._org(scope)
        rest = segs[2:]
        if not rest:
            if method == "POST":
                await self._create(org, scope, receive, send)
            elif method == "GET":
                await self._list(org, scope, send)
            else:
                raise ApiError(405, "method_not_allowed", f"{method} not allowed here")
            return
        rec, tail = self._lookup(org, rest)
        plane = self.plane
        if not tail and method == "GET":
            await send_json(send, 200, rec.out)
        elif not tail and method == "DELETE":
            await send_json(send, 200, MessageOut(await plane.remove(rec)))
        elif tail == ["stop"] and method == "POST":
            decode_body(await read_body(receive, self.max_body), EmptyBody, empty_ok=True)
            await send_json(send, 200, (await plane.stop(rec)).out)
        elif tail == ["start"] and method == "POST":
            decode_body(await read_body(receive, self.max_body), EmptyBody, empty_ok=True)
            wait, timeout = _wait(query(scope))
            await send_json(
                send, 200, (await plane.start(rec, wait=wait, wait_timeout=timeout)).out
            )
        elif tail == ["logs"] and method == "GET":
            await self._logs(rec, scope, receive, send)
        elif not tail or tail in (["stop"], ["start"], ["logs"], ["agent"]):
            raise ApiError(405, "method_not_allowed", f"{method} not allowed here")
        else:
            raise not_found("route")

    async def _create(self, org: str, scope: Scope, receive: Receive, send: Send) -> None:
        q = query(scope)
        start = _bool(q, "start", True)
        wait, timeout = _wait(q)
        body = decode_body(await read_body(receive, self.max_body), CreateSandboxRequest)
        plan = plan_create(body, allow_network=self.plane.allow_network)
        rec = await self.plane.create(org, plan, start=start, wait=wait, wait_timeout=timeout)
        await send_json(send, 201, rec.out)

    async def _list(self, org: str, scope: Scope, send: Send) -> None:
        q = query(scope)
        try:
            limit = int(q.get("limit", DEFAULT_LIMIT))
        except ValueError:
            raise ApiError(400, "invalid_query", "limit must be an integer") from None
        if limit < 1:
            raise ApiError(400, "invalid_query", "limit must be at least 1")
        limit = min(limit, MAX_LIMIT)
        after = decode_cursor(q["cursor"]) if q.get("cursor") else 0
        labels: dict[str, str] | None = None
        if q.get("labels"):
            try:
                labels = msgspec.json.decode(q["labels"], type=dict[str, str])
            except msgspec.MsgspecError:
                raise ApiError(400, "invalid_query", "labels must be a JSON object") from None
        recs, next_seq = self.plane.store.page(org, after_seq=after, limit=limit, labels=labels)
        page = SandboxPage(
            data=[r.out for r in recs],
            next_cursor=None if next_seq is None else encode_cursor(next_seq),
        )
        await send_json(send, 200, page)

    async def _logs(self, rec: SandboxRecord, scope: Scope, receive: Receive, send: Send) -> None:
        q = query(scope)
        follow = _bool(q, "follow", False)
        raw = header(scope, b"last-event-id") or q.get("last_event_id") or "0"
        if not raw.strip().isdigit():
            raise ApiError(400, "invalid_last_event_id", "Last-Event-ID must be an entry id")
        last = int(raw)
        ring = self.plane.logs(rec)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )

        async def chunk(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            while True:
                entries = ring.since(last)
                for entry in entries:
                    await chunk(sse(entry))
                    last = entry.id
                if entries:
                    continue  # more may have come while we sent
                if not follow or ring.closed or rec.out.status in TERMINAL_STATUSES:
                    break
                with trio.move_on_after(SSE_HEARTBEAT) as heartbeat:
                    await ring.wait_after(last)
                if heartbeat.cancelled_caught:
                    await chunk(b": keep-alive\n\n")
            nursery.cancel_scope.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- WebSocket ------------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        connect = await receive()
        if connect["type"] != "websocket.connect":
            return
        try:
            segs = self._segments(scope)
            if segs[:2] != ["v1", "sandboxes"] or len(segs) < 4:
                raise not_found("route")
            org = self._org(scope)
            rec, tail = self._lookup(org, segs[2:])
            if tail == ["corral"]:
                if self.relay is None:
                    raise ApiError(501, "not_implemented", "the corral frame relay is not served")
                await self.relay(rec, scope, receive, send)
                return
            if tail != ["agent"]:
                raise not_found("route")
            target = await self.plane.agent_target(rec)
        except ApiError as err:
            await deny_websocket(scope, send, err)
            return
        await send({"type": "websocket.accept"})
        ws = AsgiWebSocket(receive, send)
        session = self.plane.session_started(rec)
        log = self.plane.logs(rec).append
        try:
            await AgentSession(target, ws, on_activity=session.touch, log=log).run()
        finally:
            session.end()
            if not ws.disconnected:
                with trio.CancelScope(shield=True):
                    await send({"type": "websocket.close", "code": 1000})


class AsgiWebSocket:
    """An accepted ASGI WebSocket as a byte-message transport (text is ignored)."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.disconnected = False

    async def receive(self) -> bytes | None:
        while not self.disconnected:
            msg = await self._receive()
            if msg["type"] == "websocket.receive":
                data = msg.get("bytes")
                if data is not None:
                    return bytes(data)
            elif msg["type"] == "websocket.disconnect":
                self.disconnected = True
        return None

    async def send(self, data: bytes) -> None:
        await self._send({"type": "websocket.send", "bytes": data})


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        msg: dict[str, Any] = dict(await receive())
        if msg["type"] == "http.disconnect":
            scope.cancel()
            return

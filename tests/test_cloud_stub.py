"""The cloud driver against stand-in control planes (tiny ASGI apps on 127.0.0.1, port 0):
a server that answers garbage, and a microsandbox-only server (no ``/corral`` route)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
from hypercorn.trio import serve as hypercorn_serve

import corral
from corral.actors.state import SandboxStatus
from corral.backend import CloudBackend
from corral.drivers.cloud import CloudDriver
from corral.errors import (
    CloudHttpError,
    CorralError,
    SandboxAlreadyExists,
    SandboxNotFound,
    Unsupported,
)
from corral.server.run import hypercorn_config

Reply = tuple[int, bytes]


@dataclass
class StandIn:
    """An in-memory microsandbox control plane without the corral route."""

    override: dict[tuple[str, str], Reply] = field(default_factory=dict)
    """(method, path) → a canned answer, whatever the state."""
    create_gate: trio.Event | None = None
    corral_status: int = 404
    requests: list[tuple[str, str]] = field(default_factory=list)
    sandboxes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def by_name(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.sandboxes.values() if s["name"] == name), None)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if scope["type"] == "websocket":
            await receive()
            self.requests.append(("WS", path))
            body = b'{"code": "not_found", "message": "route not found"}'
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": self.corral_status,
                    "headers": [(b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
            return
        while (await receive()).get("more_body"):
            pass
        method = scope["method"]
        self.requests.append((method, path))
        status, body = self.override.get((method, path)) or await self.answer(method, path)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def answer(self, method: str, path: str) -> Reply:
        parts = path.strip("/").split("/")[2:]
        if method == "POST" and not parts:
            sid = f"sb_{len(self.sandboxes) + 1}"
            new = self.sandboxes[sid] = {
                "id": sid,
                "org_id": "org_1",
                "name": "job",
                "slug": "job",
                "status": "starting",
                "ephemeral": False,
                "created_at": "2026-01-01T00:00:00Z",
            }
            if self.create_gate is not None:  # recorded at once, answered once running
                await self.create_gate.wait()
            if new["status"] == "starting":
                new["status"] = "running"
            return 201, json.dumps(new).encode()
        box = self.by_name(parts[1]) if parts[:1] == ["by-name"] else self.sandboxes.get(parts[0])
        tail = parts[2:] if parts[:1] == ["by-name"] else parts[1:]
        if box is None:
            return 404, b'{"error": {"code": "not_found", "message": "sandbox not found"}}'
        if method == "GET" and not tail:
            return 200, json.dumps(box).encode()
        if method == "POST" and tail == ["stop"]:
            box["status"] = "stopped"
            return 200, json.dumps(box).encode()
        if method == "DELETE" and not tail:
            if box["status"] not in ("stopped", "failed"):
                return 409, b'{"code": "sandbox_still_running", "message": "stop it first"}'
            del self.sandboxes[box["id"]]
            return 200, b'{"message": "removed"}'
        return 404, b'{"code": "not_found", "message": "route not found"}'


@asynccontextmanager
async def stand_in(app: StandIn) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        run = partial(hypercorn_serve, app, hypercorn_config("127.0.0.1", 0))  # type: ignore[arg-type]
        binds: list[str] = await nursery.start(run)
        yield binds[0]
        nursery.cancel_scope.cancel()


NESTED = b'{"error": {"code": "boom", "message": "it broke"}}'


@pytest.mark.parametrize(
    ("status", "body", "error", "code", "text"),
    [
        (201, b"<html>hello</html>", CloudHttpError, "invalid_response", "not JSON"),
        (201, b"", CloudHttpError, "invalid_response", "an empty body"),
        (201, b'{"id": 5}', CloudHttpError, "invalid_response", "no sandbox object"),
        (201, b"[1, 2]", CloudHttpError, "invalid_response", "no sandbox object"),
        (
            201,
            b'{"id": "sb", "name": "job", "status": "exploding"}',
            CloudHttpError,
            "invalid_response",
            "status",
        ),
        (500, NESTED, CloudHttpError, "boom", "it broke"),
        (503, b"Service Unavailable", CloudHttpError, "http_503", "Service Unavailable"),
        (400, b'{"code": "unsupported_field", "message": "mounts"}', CloudHttpError, "", "mounts"),
        (302, b"", CloudHttpError, "http_302", "no error body"),
        (
            409,
            b'{"code": "sandbox_already_exists", "message": "taken"}',
            SandboxAlreadyExists,
            "",
            "taken",
        ),
        (404, b'{"code": "not_found", "message": "no such route"}', SandboxNotFound, "", "no such"),
    ],
)
async def test_garbage_and_errors_from_the_server_are_typed(
    status: int, body: bytes, error: type[CorralError], code: str, text: str
) -> None:
    app = StandIn(override={("POST", "/v1/sandboxes"): (status, body)})
    with trio.fail_after(20):
        async with stand_in(app) as url:
            async with corral.open_supervisor(CloudBackend(url, "crl_key")) as sup:
                with pytest.raises(error, match=text) as info:
                    await sup.create("job")
                assert type(info.value) is error
                if isinstance(info.value, CloudHttpError):
                    assert info.value.status == status
                    if code:
                        assert info.value.error_code == code
                assert "job" not in sup
    # An unreadable 2xx leaves the outcome unknown: the driver stops and removes by name.
    abandoned = ("POST", "/v1/sandboxes/by-name/job/stop") in app.requests
    assert abandoned == (status < 300)


async def test_without_the_corral_route_the_seed_features_are_unsupported() -> None:
    app = StandIn()
    with trio.fail_after(20):
        async with stand_in(app) as url:
            async with corral.open_supervisor(CloudBackend(url, "crl_key")) as sup:
                sb = await sup.create("job")
                assert sb.status is SandboxStatus.RUNNING
                with pytest.raises(Unsupported) as info:
                    await sb.exec("echo", ["x"])
                assert info.value.available_when == "when the control plane is corral serve"
                with pytest.raises(Unsupported):
                    await sb.fs.write("/tmp/x", b"x")
                driver = sup.driver
                assert isinstance(driver, CloudDriver) and driver.corral_route is False
                with pytest.raises(Unsupported, match="metrics"):
                    await driver.sandboxes["sb_1"].metrics()
                await sb.stop()
            assert [r for r in app.requests if r[0] == "WS"] == [
                ("WS", "/v1/sandboxes/sb_1/corral")
            ]  # asked once, then known
            assert ("DELETE", "/v1/sandboxes/sb_1") in app.requests
            assert not app.sandboxes


async def test_a_501_on_the_route_is_unsupported_too() -> None:
    app = StandIn(corral_status=501)
    with trio.fail_after(20):
        async with stand_in(app) as url:
            async with corral.open_supervisor(CloudBackend(url, "crl_key")) as sup:
                sb = await sup.create("job")
                with pytest.raises(Unsupported):
                    await sb.fs.read("/etc/hostname")


async def test_a_create_cancelled_in_flight_leaves_nothing_behind() -> None:
    gate = trio.Event()
    app = StandIn(create_gate=gate)
    with trio.fail_after(20):
        async with stand_in(app) as url:
            async with corral.open_supervisor(CloudBackend(url, "crl_key")) as sup:
                with trio.move_on_after(5) as scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(sup.create, "job")
                        while not app.sandboxes:  # noqa: ASYNC110 - another task's state
                            await trio.sleep(0.01)
                        nursery.cancel_scope.cancel()  # the server is still starting it
                assert not scope.cancelled_caught and "job" not in sup
                assert not app.sandboxes  # stopped and removed by name on the way out
                assert ("POST", "/v1/sandboxes/by-name/job/stop") in app.requests
            gate.set()

"""corral serve over real HTTP (hypercorn on 127.0.0.1, port 0) with a stub sandbox host.

The stub stands in for corral's supervisor so these tests pin the control plane itself:
routes, statuses, error bodies, auth and org isolation, paging, lifecycle and logs.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from corral.errors import InvalidConfig, Runtime
from corral.protocol import ExecExited, ExecStdout
from corral.server import msb_agent as ma
from corral.server.run import ServeInfo, serve
from corral.server.spec import CreatePlan

QUERY = "?start=true&wait_for=running&wait_timeout=90"


def create_body(name: str, image: str = "host", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": "oci",
        "name": name,
        "runtime": {"workdir": None, "shell": None, "scripts": {}, "entrypoint": None},
        "env": [{"key": "A", "value": "1"}],
        "labels": {},
        "rlimits": [],
        "mounts": [],
        "network": {"enabled": True, "strict": True},
        "init": None,
        "security_profile": "default",
        "lifecycle": {"ephemeral": False, "max_duration_secs": None, "idle_timeout_secs": None},
        "reference": image,
        "resources": {"vcpus": 1, "memory_mib": 512},
        "patches": [],
        "pull_policy": "if_missing",
    }
    body.update(extra)
    return body


class EchoProc:
    def __init__(self, args: list[str]) -> None:
        self.args = args

    async def send_stdin(self, data: bytes) -> None:
        pass

    async def close_stdin(self) -> None:
        pass

    async def signal(self, signum: int) -> None:
        pass

    async def resize(self, rows: int, cols: int) -> None:
        pass

    async def wait(self) -> int:
        return 0

    def __aiter__(self) -> AsyncIterator[Any]:
        send, recv = trio.open_memory_channel[Any](2)
        send.send_nowait(ExecStdout(data=" ".join(self.args).encode() + b"\n"))
        send.send_nowait(ExecExited(exit_code=0))
        send.close()
        return recv.__aiter__()


class EchoTarget:
    @asynccontextmanager
    async def exec_stream(self, cmd: str, args: list[str], **kw: Any) -> AsyncIterator[EchoProc]:
        yield EchoProc(args)


@dataclass
class StubHost:
    started: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    gate: trio.Event | None = None
    stopped: dict[str, trio.Event] = field(default_factory=dict)
    crash: dict[str, str] = field(default_factory=dict)

    async def start(self, sid: str, plan: CreatePlan) -> None:
        if plan.image == "bad":
            raise InvalidConfig("image 'bad' does not exist")
        if plan.image == "boom":
            raise Runtime("bubblewrap exploded")
        if plan.image == "slow" and self.gate is not None:
            await self.gate.wait()
        self.started.append(sid)
        self.stopped[sid] = trio.Event()

    async def stop(self, sid: str) -> None:
        self.stopped[sid].set()

    async def wait(self, sid: str) -> str | None:
        await self.stopped[sid].wait()
        return self.crash.get(sid)

    async def remove(self, sid: str) -> None:
        self.removed.append(sid)

    def target(self, sid: str) -> Any:
        return EchoTarget()


@dataclass
class Server:
    info: ServeInfo
    host: StubHost
    http: httpx.AsyncClient
    data_dir: Path

    def client(self, key: str | None) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.info.url, headers=headers)

    def new_key(self, org: str) -> str:
        from corral.server.store import Store

        store = Store.open(self.data_dir)
        try:
            return store.create_key(org)[1]
        finally:
            store.close()

    @property
    def ws_base(self) -> str:
        return self.info.url.replace("http://", "ws://")


async def upgrade_status(srv: Server, path: str, key: str | None) -> int:
    """The status a plain WebSocket upgrade request gets (101, or the refusal)."""
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    request = (
        f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: Upgrade\r\n"
        "upgrade: websocket\r\nsec-websocket-version: 13\r\n"
        f"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n"
    )
    async with await trio.open_tcp_stream("127.0.0.1", srv.info.port) as stream:
        await stream.send_all(request.encode())
        head = b""
        while b"\r\n" not in head:
            chunk = await stream.receive_some(4096)
            assert chunk, "server closed without a status line"
            head += chunk
    return int(head.split(b" ", 2)[1])


@asynccontextmanager
async def running(tmp_path: Path, host: StubHost | None = None) -> AsyncIterator[Server]:
    stub = host or StubHost()

    @asynccontextmanager
    async def factory() -> AsyncIterator[StubHost]:
        yield stub

    announced: list[str] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            info: ServeInfo = await nursery.start(
                lambda task_status: serve(
                    tmp_path,
                    port=0,
                    sandbox_host=factory,
                    announce=announced.append,
                    task_status=task_status,
                )
            )
            assert info.first_key is not None and announced == [info.first_key]
            async with httpx.AsyncClient(
                base_url=info.url, headers={"authorization": f"Bearer {info.first_key}"}
            ) as http:
                yield Server(info, stub, http, tmp_path)
            nursery.cancel_scope.cancel()


async def test_auth_is_required_and_checked(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        async with srv.client(None) as anon:
            assert (await anon.get("/healthz")).json() == {"message": "ok"}
            r = await anon.get("/v1/sandboxes")
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        async with srv.client("crl_nope_nope") as bad:
            r = await bad.post(f"/v1/sandboxes{QUERY}", json=create_body("x"))
            assert r.status_code == 401 and "invalid" in r.json()["message"]
        r = await srv.http.get("/v1/sandboxes")
        assert r.status_code == 200 and r.json() == {"data": [], "next_cursor": None}
        r = await srv.http.get("/v2/whatever")
        assert r.status_code == 404 and r.json()["code"] == "not_found"


async def test_create_get_list_stop_remove(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        r = await srv.http.post(f"/v1/sandboxes{QUERY}", json=create_body("demo_1"))
        assert r.status_code == 201, r.text
        sb = r.json()
        assert sb["status"] == "running" and sb["name"] == "demo_1" and sb["slug"] == "demo-1"
        assert sb["id"].startswith("sb_") and sb["org_id"].startswith("org_")
        assert sb["created_at"].endswith("Z") and sb["started_at"] is not None
        assert sb["spec"]["env"] == {"A": "1"} and sb["ephemeral"] is False
        assert srv.host.started == [sb["id"]]
        for path in (f"/v1/sandboxes/{sb['id']}", "/v1/sandboxes/by-name/demo_1"):
            assert (await srv.http.get(path)).json() == sb
        r = await srv.http.post(f"/v1/sandboxes{QUERY}", json=create_body("demo_1"))
        assert r.status_code == 409 and r.json()["code"] == "sandbox_already_exists"

        r = await srv.http.delete("/v1/sandboxes/by-name/demo_1")
        assert r.status_code == 409 and r.json()["code"] == "sandbox_still_running"
        assert "stop it first" in r.json()["message"]

        r = await srv.http.post(f"/v1/sandboxes/{sb['id']}/stop", json={})
        assert r.status_code == 200 and r.json()["status"] in ("stopping", "stopped")
        await trio.testing.wait_all_tasks_blocked()
        got = (await srv.http.get("/v1/sandboxes/by-name/demo_1")).json()
        assert got["status"] == "stopped" and got["stopped_at"] is not None
        r = await srv.http.post("/v1/sandboxes/by-name/demo_1/stop", json={})
        assert r.json()["status"] == "stopped"  # idempotent

        r = await srv.http.post("/v1/sandboxes/by-name/demo_1/start?wait_for=running", json={})
        assert r.status_code == 200 and r.json()["status"] == "running"
        assert srv.host.started == [sb["id"], sb["id"]]
        await srv.http.post("/v1/sandboxes/by-name/demo_1/stop", content=b"")
        await trio.testing.wait_all_tasks_blocked()

        r = await srv.http.delete(f"/v1/sandboxes/{sb['id']}")
        assert r.status_code == 200 and r.json() == {"message": "sandbox 'demo_1' removed"}
        await trio.testing.wait_all_tasks_blocked()
        assert sb["id"] in srv.host.removed
        r = await srv.http.get("/v1/sandboxes/by-name/demo_1")
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        r = await srv.http.delete("/v1/sandboxes/by-name/demo_1")
        assert r.status_code == 404


async def test_create_without_start_and_without_waiting(tmp_path: Path) -> None:
    gate = trio.Event()
    async with running(tmp_path, StubHost(gate=gate)) as srv:
        r = await srv.http.post("/v1/sandboxes?start=false", json=create_body("idle"))
        assert r.json()["status"] == "created" and srv.host.started == []
        r = await srv.http.delete("/v1/sandboxes/by-name/idle")
        assert r.status_code == 200
        r = await srv.http.post("/v1/sandboxes", json=create_body("s", image="slow"))
        assert r.json()["status"] == "starting" and r.json()["status_reason"] == "scheduling"
        url = "/v1/sandboxes?wait_for=running&wait_timeout=0"
        r = await srv.http.post(url, json=create_body("s2", image="slow"))
        assert r.json()["status"] == "starting"
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        got = (await srv.http.get("/v1/sandboxes/by-name/s2")).json()
        assert got["status"] == "running" and got["status_reason"] is None


async def test_start_failures(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        r = await srv.http.post(f"/v1/sandboxes{QUERY}", json=create_body("a", image="bad"))
        assert r.status_code == 400 and r.json() == {
            "code": "invalid_config",
            "message": "image 'bad' does not exist",
        }
        r = await srv.http.post(f"/v1/sandboxes{QUERY}", json=create_body("a", image="boom"))
        assert r.status_code == 500 and r.json()["code"] == "start_failed"
        assert "bubblewrap exploded" in r.json()["message"]
        r = await srv.http.post(f"/v1/sandboxes{QUERY}", json=create_body("a"))
        assert r.status_code == 201  # the failed attempts left nothing behind
        r = await srv.http.post("/v1/sandboxes", json=create_body("b", image="boom"))
        await trio.testing.wait_all_tasks_blocked()
        got = (await srv.http.get("/v1/sandboxes/by-name/b")).json()
        assert got["status"] == "failed" and "exploded" in got["last_failure_message"]


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b'{"name": 3}', 400, "invalid_body"),
        (b'{"name": "x", "reference": "host", "surprise": 1}', 400, "invalid_body"),
        (b'{"name": "x", "reference": "host", "runtime": {"workdir": "rel"}}', 400, None),
        (b'{"name": "x", "reference": "host", "mounts": [{}]}', 400, "unsupported_field"),
        (b"{" + b" " * (1024 * 1024) + b"}", 413, "body_too_large"),
    ],
)
async def test_bad_create_bodies(
    tmp_path: Path, content: bytes, status: int, code: str | None
) -> None:
    async with running(tmp_path) as srv:
        r = await srv.http.post(f"/v1/sandboxes{QUERY}", content=content)
        assert r.status_code == status, r.text
        assert set(r.json()) == {"code", "message"} and r.json()["message"]
        if code:
            assert r.json()["code"] == code
        if b"surprise" in content:
            assert "surprise" in r.json()["message"]
        assert (await srv.http.get("/v1/sandboxes")).json()["data"] == []


async def test_bad_queries(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        for url in (
            "/v1/sandboxes?limit=0",
            "/v1/sandboxes?limit=ten",
            "/v1/sandboxes?cursor=bm9wZQ",
            "/v1/sandboxes?labels=notjson",
        ):
            r = await srv.http.get(url)
            assert r.status_code == 400, url
        r = await srv.http.post("/v1/sandboxes?wait_for=stopped", json=create_body("q"))
        assert r.status_code == 400 and "wait_for" in r.json()["message"]
        r = await srv.http.put("/v1/sandboxes")
        assert r.status_code == 405


async def test_paging_is_stable_and_cursors_are_opaque(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        for i in range(45):
            labels = {"even": "yes"} if i % 2 == 0 else {}
            body = create_body(f"s{i:02d}", labels=labels)
            assert (await srv.http.post("/v1/sandboxes?start=false", json=body)).status_code == 201
        names: list[str] = []
        sizes = []
        cursor: str | None = None
        while True:
            params = {"limit": "20"} | ({"cursor": cursor} if cursor else {})
            page = (await srv.http.get("/v1/sandboxes", params=params)).json()
            names += [s["name"] for s in page["data"]]
            sizes.append(len(page["data"]))
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert cursor not in names and cursor.isascii()
            await srv.http.delete(f"/v1/sandboxes/by-name/{names[-1]}")  # churn while paging
        assert sizes == [20, 20, 5] and names == [f"s{i:02d}" for i in range(45)]
        page = (await srv.http.get("/v1/sandboxes?limit=1000")).json()
        assert len(page["data"]) == 43 and page["next_cursor"] is None
        params = {"labels": '{"even":"yes"}', "limit": "100"}
        page = (await srv.http.get("/v1/sandboxes", params=params)).json()
        assert len(page["data"]) == 23  # s00, s02 … s44 (the removed s19 and s39 are odd)


async def test_another_orgs_sandboxes_are_invisible(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        a = (await srv.http.post(f"/v1/sandboxes{QUERY}", json=create_body("shared"))).json()
        async with srv.client(srv.new_key("other")) as other:
            paths = [f"/v1/sandboxes/{a['id']}", "/v1/sandboxes/by-name/shared"]
            for p in paths:
                for method, sub in [
                    ("GET", ""),
                    ("DELETE", ""),
                    ("POST", "/stop"),
                    ("POST", "/start"),
                    ("GET", "/logs"),
                ]:
                    r = await other.request(method, p + sub, json={} if method == "POST" else None)
                    assert r.status_code == 404, (method, p + sub)
                    assert r.json() == {"code": "not_found", "message": "sandbox not found"}
            assert (await other.get("/v1/sandboxes")).json()["data"] == []
            path = f"/v1/sandboxes/{a['id']}/agent"
            assert await upgrade_status(srv, path, srv.new_key("other")) == 404
            assert await upgrade_status(srv, path, srv.info.first_key) == 101
            r = await other.post(f"/v1/sandboxes{QUERY}", json=create_body("shared"))
            assert r.status_code == 201 and r.json()["id"] != a["id"]
        assert (await srv.http.get("/v1/sandboxes/by-name/shared")).json() == a


async def test_agent_websocket_statuses_and_exec(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        sb = (await srv.http.post(f"/v1/sandboxes{QUERY}", json=create_body("ws"))).json()
        path = f"/v1/sandboxes/{sb['id']}/agent"
        url = srv.ws_base + path
        auth = [(b"authorization", f"Bearer {srv.info.first_key}".encode())]
        assert await upgrade_status(srv, path, None) == 401
        assert await upgrade_status(srv, path, "crl_x") == 401
        assert (
            await upgrade_status(srv, path.replace("/agent", "/corral"), srv.info.first_key) == 501
        )
        assert await upgrade_status(srv, path.replace("/agent", "/nope"), srv.info.first_key) == 404

        async with open_websocket_url(url, extra_headers=auth) as ws:
            first = await ws.get_message()
            assert isinstance(first, bytes) and struct.unpack(">II", first[:8]) == (1, 0x2000000)
            dec = ma.FrameDecoder()
            assert ma.decode_envelope(dec.feed(first[8:])[0].body).t == ma.READY
            req = ma.encode_frame(5, ma.EXEC_REQUEST, {"cmd": "echo", "args": ["hi"]}, 2, v=10)
            await ws.send_message(req[:9])
            await ws.send_message(req[9:])
            frames: list[ma.RawFrame] = []
            while not frames or not frames[-1].flags & ma.TERMINAL:
                msg = await ws.get_message()
                assert isinstance(msg, bytes)
                frames += dec.feed(msg)
            payloads = [ma.decode_envelope(f.body).payload for f in frames]
            assert payloads == [{"data": b"hi\n"}, {"code": 0}]

        text = (await srv.http.get(f"/v1/sandboxes/{sb['id']}/logs")).text
        assert '"source":"stdout","data":"hi\\n","session_id":5' in text
        assert '"data":"exec echo hi","session_id":5' in text

        await srv.http.post(f"/v1/sandboxes/{sb['id']}/stop", json={})
        await trio.testing.wait_all_tasks_blocked()
        assert await upgrade_status(srv, path, srv.info.first_key) == 409


async def test_logs_are_server_sent_events_with_last_event_id(tmp_path: Path) -> None:
    async with running(tmp_path) as srv:
        sb = (await srv.http.post(f"/v1/sandboxes{QUERY}", json=create_body("lg"))).json()
        r = await srv.http.get(f"/v1/sandboxes/{sb['id']}/logs")
        assert r.headers["content-type"] == "text/event-stream"
        events = [e for e in r.text.split("\n\n") if e]
        assert events[0].startswith("id: 1\nevent: log\ndata: {")
        assert '"source":"system"' in events[0] and "created sandbox lg" in events[0]
        last = len(events)
        r = await srv.http.get(
            f"/v1/sandboxes/{sb['id']}/logs", headers={"last-event-id": str(last - 1)}
        )
        assert [e for e in r.text.split("\n\n") if e] == events[-1:]

        async with srv.http.stream(
            "GET", "/v1/sandboxes/by-name/lg/logs?follow=true", headers={"last-event-id": str(last)}
        ) as stream:
            lines = stream.aiter_lines()
            await srv.http.post(f"/v1/sandboxes/{sb['id']}/stop", json={})
            seen = []
            async for line in lines:
                if line.startswith("data: "):
                    seen.append(line)
            assert any("stopping" in s for s in seen) and "stopped" in seen[-1]
        r = await srv.http.get(f"/v1/sandboxes/{sb['id']}/logs", headers={"last-event-id": "x1"})
        assert r.status_code == 400

"""Many clients: 1,000 sandboxes across orgs, 200 agent WebSockets open at once.

On the FakeDriver (the control plane is what is measured, not bubblewrap). The
WebSocket clients speak the agent protocol with :mod:`corral.server.msb_agent`, as the
SDK would; the SDK itself is exercised in test_server_client.py.
"""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio
from trio_websocket import open_websocket_url

import corral
from corral.drivers.fake import FakeDriver
from corral.server import msb_agent as ma
from corral.server.host import CorralHost
from corral.server.run import ServeInfo, serve
from corral.server.service import SandboxHost
from corral.server.store import Store

ORGS = 10
PER_ORG = 100
SOCKETS = 200


@asynccontextmanager
async def fake_host() -> AsyncIterator[SandboxHost]:
    async with FakeDriver() as driver, corral.open_supervisor(driver=driver) as sup:
        yield CorralHost(sup)


def body(name: str) -> dict[str, object]:
    return {"name": name, "reference": "host"}


async def exec_over_socket(url: str, key: str, word: str, barrier: list[trio.Event]) -> bytes:
    """Open the agent socket, wait until every socket is open, run ``echo word``."""
    arrived, all_open = barrier
    async with open_websocket_url(
        url, extra_headers=[(b"authorization", f"Bearer {key}".encode())]
    ) as ws:
        dec = ma.FrameDecoder()
        first = await ws.get_message()
        assert isinstance(first, bytes) and struct.unpack(">II", first[:8])[0] == 1
        dec.feed(first[8:])
        arrived.set()
        await all_open.wait()
        frame = ma.encode_frame(1, ma.EXEC_REQUEST, {"cmd": "echo", "args": [word]}, 2, v=10)
        await ws.send_message(frame[:9])
        await ws.send_message(frame[9:])
        out = b""
        while True:
            msg = await ws.get_message()
            assert isinstance(msg, bytes)
            for f in dec.feed(msg):
                env = ma.decode_envelope(f.body)
                if env.t == ma.EXEC_STDOUT:
                    out += env.payload["data"]
                if f.flags & ma.TERMINAL:
                    assert env.t == ma.EXEC_EXITED, env
                    return out


async def test_thousand_sandboxes_and_two_hundred_sockets(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            info: ServeInfo = await nursery.start(
                lambda task_status: serve(
                    tmp_path, port=0, sandbox_host=fake_host, announce=None, task_status=task_status
                )
            )
            store = Store.open(tmp_path)
            keys = [store.create_key(f"org{i}")[1] for i in range(ORGS)]
            store.close()
            limits = httpx.Limits(max_connections=50)
            clients = [
                httpx.AsyncClient(
                    base_url=info.url, headers={"authorization": f"Bearer {k}"}, limits=limits
                )
                for k in keys
            ]
            ids: dict[tuple[int, int], str] = {}
            t0 = time.perf_counter()

            async def create(org: int, i: int, limit: trio.CapacityLimiter) -> None:
                async with limit:
                    r = await clients[org].post(
                        "/v1/sandboxes?wait_for=running", json=body(f"sb{i:03d}")
                    )
                assert r.status_code == 201 and r.json()["status"] == "running", r.text
                ids[org, i] = r.json()["id"]

            limit = trio.CapacityLimiter(50)
            async with trio.open_nursery() as creators:
                for org in range(ORGS):
                    for i in range(PER_ORG):
                        creators.start_soon(create, org, i, limit)
            created = time.perf_counter() - t0

            for org in range(ORGS):  # every org sees exactly its own 100, in order
                names, cursor = [], None
                while True:
                    params = {"limit": "30"} | ({"cursor": cursor} if cursor else {})
                    page = (await clients[org].get("/v1/sandboxes", params=params)).json()
                    names += [s["name"] for s in page["data"]]
                    assert {s["org_id"] for s in page["data"]} <= {page["data"][0]["org_id"]}
                    cursor = page["next_cursor"]
                    if cursor is None:
                        break
                assert sorted(names) == [f"sb{i:03d}" for i in range(PER_ORG)]

            ws_base = info.url.replace("http://", "ws://")
            arrivals = [trio.Event() for _ in range(SOCKETS)]
            all_open = trio.Event()
            results: dict[int, bytes] = {}

            async def one(n: int) -> None:
                org, i = n % ORGS, n // ORGS
                url = f"{ws_base}/v1/sandboxes/{ids[org, i]}/agent"
                results[n] = await exec_over_socket(
                    url, keys[org], f"w{n}", [arrivals[n], all_open]
                )

            t1 = time.perf_counter()
            async with trio.open_nursery() as sockets:
                for n in range(SOCKETS):
                    sockets.start_soon(one, n)
                for ev in arrivals:
                    await ev.wait()
                all_open.set()  # 200 sockets are open at this moment
            ran = time.perf_counter() - t1
            assert results == {n: f"w{n}\n".encode() for n in range(SOCKETS)}
            for c in clients:
                await c.aclose()
            print(
                f"\n1000 sandboxes created (10 orgs, 50 in flight) in {created:.2f}s; "
                f"{SOCKETS} concurrent agent sockets + echo in {ran:.2f}s"
            )
            nursery.cancel_scope.cancel()

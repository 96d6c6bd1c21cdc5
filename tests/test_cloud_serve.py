"""corral's cloud driver against ``corral serve`` (hypercorn on 127.0.0.1, port 0).

The server runs in-process on corral's supervisor over the FakeDriver (scripted
commands, in-memory files), so these are fast; the same flows on real bubblewrap
sandboxes are in test_cloud_local.py. The client side is the public API only:
``open_supervisor(CloudBackend(url, key))``.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.trio import serve as hypercorn_serve
from trio_websocket import open_websocket_url

import corral
from corral.actors.state import SandboxStatus
from corral.backend import CloudBackend
from corral.drivers.cloud import SUBPROTOCOL, CloudDriver
from corral.drivers.fake import FakeDriver
from corral.errors import (
    AgentGone,
    CloudHttpError,
    ExecFailed,
    FsNotFound,
    SandboxAlreadyExists,
    SandboxNotFound,
    Unsupported,
)
from corral.protocol import (
    PROTOCOL_VERSION,
    SESSION_START,
    ErrorReply,
    ExecExited,
    ExecStarted,
    ExecStdout,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Ready,
    Shutdown,
    encode,
)
from corral.server.app import App
from corral.server.host import CorralHost
from corral.server.relay import CorralRelay
from corral.server.run import ServeInfo, hypercorn_config, serve
from corral.server.service import ControlPlane
from corral.server.store import Store


@dataclass
class Served:
    url: str
    key: str
    store: Store
    plane: ControlPlane
    relay: CorralRelay | None
    fake: FakeDriver

    def backend(self, key: str | None = None) -> CloudBackend:
        return CloudBackend(self.url, key or self.key)

    def new_key(self, org: str) -> str:
        return self.store.create_key(org)[1]

    def process(self, name: str, key: str | None = None) -> Any:
        """The fake process behind the caller's sandbox ``name``."""
        org = self.store.authenticate(key or self.key)
        assert org is not None
        rec = self.store.get_by_name(org, name)
        assert rec is not None
        return self.fake.processes[rec.id]


@asynccontextmanager
async def corral_serve(tmp_path: Path, *, relay: bool = True) -> AsyncIterator[Served]:
    """corral serve's parts (as run.serve wires them), keeping hold of the relay."""
    store = Store.open(tmp_path / "srv")
    key = store.create_key("default")[1]
    plane: ControlPlane | None = None
    try:
        async with (
            FakeDriver() as fake,
            corral.open_supervisor(driver=fake) as sup,
            trio.open_nursery() as nursery,
        ):
            host = CorralHost(sup)
            plane = ControlPlane(store, host, nursery)
            hook = CorralRelay(plane, host.connect_agent) if relay else None
            app: Any = App(plane, relay=hook)
            run = partial(hypercorn_serve, app, hypercorn_config("127.0.0.1", 0))
            binds: list[str] = await nursery.start(run)
            yield Served(binds[0], key, store, plane, hook, fake)
            nursery.cancel_scope.cancel()
    finally:
        if plane is not None:
            plane.close()
        store.close()


async def test_lifecycle_exec_and_fs_through_corral_serve(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with corral_serve(tmp_path) as srv:
            async with corral.open_supervisor(srv.backend()) as sup:
                sb = await sup.create("job", env={"A": "1"}, workdir="/work")
                assert sb.status is SandboxStatus.RUNNING
                driver = sup.driver
                assert isinstance(driver, CloudDriver)
                remote = await driver.get_by_name("job")
                assert remote.status == "running"
                sid = remote.id
                with pytest.raises(SandboxAlreadyExists):
                    await sup.create("job")

                out = await sb.exec("echo", ["hello", "cloud"])
                assert (out.exit_code, out.stdout, out.stderr) == (0, b"hello cloud\n", b"")
                assert (await sb.exec("printenv", ["A"])).stdout == b"1\n"
                assert (await sb.exec("pwd")).stdout == b"/work\n"
                assert (await sb.exec("cat", stdin=b"piped")).stdout == b"piped"
                assert (await sb.exec("exit", ["3"])).exit_code == 3
                with pytest.raises(ExecFailed):
                    await sb.exec("no-such-command")

                await sb.fs.write("/work/a.txt", b"data" * 1000)
                assert await sb.fs.read("/work/a.txt") == b"data" * 1000
                assert (await sb.fs.stat("/work/a.txt")).size == 4000
                await sb.fs.mkdir("/work/d/e", parents=True)
                await sb.fs.copy("/work/a.txt", "/work/d/b.txt")
                await sb.fs.rename("/work/d/b.txt", "/work/d/c.txt")
                assert [e.path.rsplit("/", 1)[-1] for e in await sb.fs.list("/work/d")] == [
                    "c.txt",
                    "e",
                ]
                assert await sb.fs.exists("/work/d/c.txt")
                await sb.fs.remove("/work/d", recursive=True)
                assert not await sb.fs.exists("/work/d")
                with pytest.raises(FsNotFound):
                    await sb.fs.read("/work/missing")

                await sb.stop()
                assert str(sb.status) == "stopped"
                with pytest.raises(SandboxNotFound):  # a non-detached sandbox is removed
                    await driver.get(sid)
                await sup.remove("job")
    assert not srv.fake.running


async def test_concurrent_execs_and_large_output_share_one_socket(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with corral_serve(tmp_path) as srv, corral.open_supervisor(srv.backend()) as sup:
            relay = srv.relay
            assert relay is not None
            sb = await sup.create("job")
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i] = (await sb.exec("echo", [str(i)])).stdout

            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(one, i)
                big = await sb.exec("bytes", ["3000000"])  # 3 MB through the exec credit
            assert results == {i: f"{i}\n".encode() for i in range(50)}
            assert len(big.stdout) == 3_000_000
            data = bytes(range(256)) * 8192  # 2 MiB: two fs chunks each way
            await sb.fs.write("/workspace/blob", data)
            assert await sb.fs.read("/workspace/blob") == data
            assert len(relay.live) == 1


async def test_exec_stream_stdin_signals_and_resize(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with corral_serve(tmp_path) as srv, corral.open_supervisor(srv.backend()) as sup:
            sb = await sup.create("job")
            async with sb.exec_stream("cat") as proc:
                await proc.send_stdin(b"one\n")
                await proc.send_stdin(b"two\n")
                await proc.close_stdin()
                events = [ev async for ev in proc]
            assert isinstance(events[0], ExecStarted)
            data = b"".join(ev.data for ev in events if isinstance(ev, ExecStdout))
            assert data == b"one\ntwo\n"
            assert events[-1] == ExecExited(exit_code=0)

            async with sb.exec_stream("sleep", ["30"], tty=True) as proc:
                await proc.resize(40, 100)
                await proc.signal(signal.SIGTERM)
                assert await proc.wait() == 128 + signal.SIGTERM
            fake_exec = srv.process("job").execs[-1]
            assert fake_exec.resizes == [(40, 100)] and fake_exec.signals == [signal.SIGTERM]


async def test_a_bad_api_key_is_a_401_cloud_http_error(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with corral_serve(tmp_path) as srv:
            async with corral.open_supervisor(srv.backend("crl_nope_" + "x" * 43)) as sup:
                with pytest.raises(CloudHttpError) as info:
                    await sup.create("job")
                assert info.value.status == 401 and info.value.error_code == "unauthorized"
                assert "API key" in str(info.value)
                assert "job" not in sup
            assert not srv.fake.spawned


async def test_another_org_cannot_see_stop_exec_or_remove_a_sandbox(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with corral_serve(tmp_path) as srv:
            key_b = srv.new_key("org-b")
            async with (
                corral.open_supervisor(srv.backend()) as sup_a,
                corral.open_supervisor(srv.backend(key_b)) as sup_b,
            ):
                sb_a = await sup_a.create("same")
                driver_a, driver_b = sup_a.driver, sup_b.driver
                assert isinstance(driver_a, CloudDriver) and isinstance(driver_b, CloudDriver)
                sid = (await driver_a.get_by_name("same")).id
                with pytest.raises(SandboxNotFound):
                    await driver_b.get(sid)
                with pytest.raises(SandboxNotFound):
                    await driver_b.get_by_name("same")
                with pytest.raises(SandboxNotFound):
                    await driver_b.stop_sandbox(sid)
                with pytest.raises(SandboxNotFound):
                    await driver_b.delete_sandbox(sid)
                with pytest.raises(SandboxNotFound):
                    await driver_b.connect_agent(sid)
                # org B has its own namespace: the same name is another sandbox
                sb_b = await sup_b.create("same")
                assert (await sb_b.exec("echo", ["b"])).stdout == b"b\n"
                assert (await driver_b.get_by_name("same")).id != sid
                assert sb_a.status is SandboxStatus.RUNNING
                assert (await sb_a.exec("echo", ["a"])).stdout == b"a\n"
                assert srv.process("same").exit_status is None


async def test_a_dropped_websocket_fails_in_flight_requests_and_the_next_reconnects(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with corral_serve(tmp_path) as srv, corral.open_supervisor(srv.backend()) as sup:
            relay = srv.relay
            assert relay is not None
            sb = await sup.create("job")
            assert (await sb.exec("echo", ["first"])).stdout == b"first\n"
            failures: list[BaseException] = []

            async def long_exec() -> None:
                try:
                    await sb.exec("sleep", ["60"])
                except AgentGone as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_exec)
                proc = srv.process("job")
                while not proc.execs or proc.execs[-1].request.cmd != "sleep":  # noqa: ASYNC110
                    await trio.sleep(0.01)
                dropped_at = trio.current_time()
                assert relay.drop_all() == 1
            assert len(failures) == 1  # failed, and at once (not after the 60 s sleep)
            assert trio.current_time() - dropped_at < 2
            assert sb.status is SandboxStatus.RUNNING  # a dropped socket is not a crash
            assert (await sb.exec("echo", ["again"])).stdout == b"again\n"
            assert len(relay.live) == 1  # a new socket
            assert proc.execs[-2].finished.is_set()  # the server ended the orphaned exec


async def test_sandbox_dying_on_the_server_is_a_crash_seen_at_once(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with corral_serve(tmp_path) as srv, corral.open_supervisor(srv.backend()) as sup:
            sb = await sup.create("job")
            await sb.exec("echo", ["x"])  # the agent socket is open
            srv.process("job").crash()
            with trio.fail_after(0.9):  # the socket closing kicks a status poll (idle: 1 s)
                assert await sb.wait_until_stopped() is SandboxStatus.CRASHED


def _whole_response(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return len(body) >= length


async def refused_upgrade(
    srv: Served, path: str, *, key: str | None, protocols: str | None
) -> tuple[int, bytes]:
    """Status and body of a WebSocket upgrade the server refuses (raw HTTP/1.1)."""
    head = [
        f"GET {path} HTTP/1.1",
        "host: 127.0.0.1",
        "connection: Upgrade",
        "upgrade: websocket",
        "sec-websocket-version: 13",
        "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
    ]
    if key is not None:
        head.append(f"authorization: Bearer {key}")
    if protocols is not None:
        head.append(f"sec-websocket-protocol: {protocols}")
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode())
        data = b""
        while not _whole_response(data):
            chunk = await stream.receive_some(4096)
            assert chunk, f"the server closed early: {data!r}"
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


async def test_the_relay_refuses_shutdown_and_foreign_subprotocols(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with corral_serve(tmp_path) as srv, corral.open_supervisor(srv.backend()) as sup:
            await sup.create("job")
            driver = sup.driver
            assert isinstance(driver, CloudDriver)
            sid = (await driver.get_by_name("job")).id
            url = srv.url.replace("http://", "ws://") + f"/v1/sandboxes/{sid}/corral"
            auth = [(b"authorization", f"Bearer {srv.key}".encode())]
            path = f"/v1/sandboxes/{sid}/corral"
            status, body = await refused_upgrade(srv, path, key=srv.key, protocols=None)
            assert status == 400 and b"unsupported_subprotocol" in body
            status, body = await refused_upgrade(srv, path, key=None, protocols=SUBPROTOCOL)
            assert status == 401
            status, body = await refused_upgrade(srv, path, key=srv.key, protocols="corral.v0")
            assert status == 400 and b"'corral.v1'" in body

            async with open_websocket_url(
                url, subprotocols=["other", SUBPROTOCOL], extra_headers=auth
            ) as ws:
                assert ws.subprotocol == SUBPROTOCOL
                decoder = FrameDecoder()

                async def frames(n: int) -> list[Any]:
                    got: list[Any] = []
                    while len(got) < n:
                        message = await ws.get_message()
                        assert isinstance(message, bytes)
                        got.extend(decoder.feed(message))
                    return got

                await ws.send_message(encode(0, Hello(version=PROTOCOL_VERSION)))
                (ready,) = await frames(1)
                assert isinstance(ready.msg, Ready)
                # two frames in one message, one split across two messages
                both = encode(5, Shutdown(grace=0.0), SESSION_START) + encode(
                    6, Ping(), SESSION_START
                )
                await ws.send_message(both[:7])
                await ws.send_message(both[7:])
                replies = {f.id: f.msg for f in await frames(2)}
                assert isinstance(replies[5], ErrorReply) and replies[5].code == "unsupported"
                assert isinstance(replies[6], Pong)
            proc = srv.process("job")
            assert proc.exit_status is None and "shutdown" not in [w for _, w in proc.events]
            assert not any(isinstance(m, Shutdown) for a in proc.agents for m in a.received)


async def test_without_the_corral_route_exec_and_fs_are_unsupported(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with corral_serve(tmp_path, relay=False) as srv:
            async with corral.open_supervisor(srv.backend()) as sup:
                sb = await sup.create("job")  # the lifecycle works as in the seed
                with pytest.raises(Unsupported) as info:
                    await sb.exec("echo", ["x"])
                assert info.value.available_when == "when the control plane is corral serve"
                with pytest.raises(Unsupported):
                    await sb.fs.read("/etc/hostname")
                with pytest.raises(Unsupported):
                    async with sb.exec_stream("cat"):
                        pass
                assert sb.status is SandboxStatus.RUNNING
                await sb.stop()
                assert str(sb.status) == "stopped"
            assert not srv.fake.running


async def test_serve_wires_the_relay(tmp_path: Path) -> None:
    """run.serve (what ``corral serve`` runs) serves the route on a supervisor host."""

    @asynccontextmanager
    async def fake_host() -> AsyncIterator[CorralHost]:
        async with FakeDriver() as fake, corral.open_supervisor(driver=fake) as sup:
            yield CorralHost(sup)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            info: ServeInfo = await nursery.start(
                partial(serve, tmp_path, port=0, sandbox_host=fake_host, announce=None)
            )
            assert info.first_key is not None
            async with corral.open_supervisor(CloudBackend(info.url, info.first_key)) as sup:
                sb = await sup.create("job")
                assert (await sb.exec("echo", ["via", "serve"])).stdout == b"via serve\n"
                await sb.stop()
            nursery.cancel_scope.cancel()

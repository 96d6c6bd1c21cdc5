"""The cloud driver without a network: wire mapping, error mapping, the relay's frame
cutting, and the stop ladder over REST (httpx MockTransport, autojump clock)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio

import corral
from corral.actors.state import SandboxStatus
from corral.backend import CloudBackend
from corral.drivers.base import SandboxSpec
from corral.drivers.cloud import CloudDriver, cloud_status_to_sandbox_status, create_body
from corral.drivers.cloud.wire import error_for_response
from corral.errors import (
    CloudHttpError,
    ProtocolError,
    Runtime,
    SandboxAlreadyExists,
    SandboxNotFound,
    Unsupported,
)
from corral.protocol import (
    SESSION_START,
    TERMINAL,
    ErrorReply,
    Exec,
    FrameDecoder,
    Hello,
    Shutdown,
    encode,
)
from corral.server.relay import FrameCutter, refused_reply

BACKEND = CloudBackend("http://cloud.invalid", "crl_test_key")


# -- the create body and statuses ---------------------------------------------------------


def test_create_body_maps_the_spec_onto_the_microsandbox_wire() -> None:
    spec = SandboxSpec(
        name="job-1",
        image="python:3.12",
        env={"A": "1", "B": "two"},
        workdir="/app",
        cpus=2,
        memory_mib=1024,
        labels={"team": "x"},
    )
    body = create_body(spec)
    assert body["name"] == "job-1" and body["reference"] == "python:3.12"
    assert body["env"] == [{"key": "A", "value": "1"}, {"key": "B", "value": "two"}]
    assert body["runtime"]["workdir"] == "/app"
    assert body["resources"] == {"vcpus": 2, "memory_mib": 1024}
    assert body["labels"] == {"team": "x"}
    assert body["network"] == {"enabled": False, "strict": True}
    assert body["lifecycle"] == {
        "ephemeral": False,
        "max_duration_secs": None,
        "idle_timeout_secs": None,
    }
    assert body["source"] == "oci" and body["pull_policy"] == "if_missing"
    defaults = create_body(SandboxSpec(name="d"))
    assert defaults["resources"] == {"vcpus": 1, "memory_mib": 512}
    assert defaults["reference"] == "host" and defaults["env"] == []
    net = create_body(SandboxSpec(name="n", network=True))["network"]
    assert net["enabled"] is True
    assert net["policy"] == {"default_egress": "allow", "default_ingress": "allow"}


@pytest.mark.skipif(
    "max_duration" not in {f.name for f in dataclasses.fields(SandboxSpec)},
    reason="SandboxSpec has no lifecycle limits in this tree",
)
def test_lifecycle_limits_map_to_whole_seconds() -> None:
    limits: dict[str, Any] = {"ephemeral": True, "max_duration": 1.5, "idle_timeout": 30}
    body = create_body(SandboxSpec(name="l", **limits))
    assert body["lifecycle"] == {
        "ephemeral": True,
        "max_duration_secs": 2,
        "idle_timeout_secs": 30,
    }


def test_create_body_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(Unsupported) as half:
        create_body(SandboxSpec(name="c", cpus=0.5))
    assert "fractional cpus" in half.value.feature and half.value.available_when
    with pytest.raises(Unsupported) as pids:
        create_body(SandboxSpec(name="p", pids_limit=10))
    assert "pids_limit" in pids.value.feature


def test_status_mapping_follows_the_seed() -> None:
    assert [
        cloud_status_to_sandbox_status(s)
        for s in ("created", "starting", "running", "stopping", "stopped", "failed")
    ] == [
        SandboxStatus.CREATED,
        SandboxStatus.STARTING,
        SandboxStatus.RUNNING,
        SandboxStatus.DRAINING,
        SandboxStatus.STOPPED,
        SandboxStatus.CRASHED,
    ]


# -- error mapping -----------------------------------------------------------------------------


def test_http_errors_map_onto_the_error_tree() -> None:
    flat = json.dumps({"code": "quota_exceeded", "message": "too many"}).encode()
    nested = json.dumps({"error": {"code": "boom", "message": "it broke"}}).encode()
    assert isinstance(error_for_response(404, flat, "get x"), SandboxNotFound)
    exists = error_for_response(
        409, b'{"code": "sandbox_already_exists", "message": "exists"}', "create x"
    )
    assert isinstance(exists, SandboxAlreadyExists) and "exists" in str(exists)
    running = error_for_response(409, b'{"code": "sandbox_still_running", "message": "m"}', "rm")
    assert isinstance(running, CloudHttpError) and running.error_code == "sandbox_still_running"
    quota = error_for_response(429, flat, "create x")
    assert isinstance(quota, CloudHttpError)
    assert (quota.status, quota.error_code, quota.detail) == (
        429,
        "quota_exceeded",
        "create x: too many",
    )
    boom = error_for_response(500, nested, "create x")
    assert isinstance(boom, CloudHttpError)
    assert (boom.status, boom.error_code) == (500, "boom") and "it broke" in boom.detail
    key = error_for_response(401, b'{"code": "unauthorized", "message": "invalid key"}', "list")
    assert isinstance(key, CloudHttpError) and key.status == 401
    assert "API key" in key.detail and "invalid key" in key.detail
    garbage = error_for_response(502, b"<html>bad gateway</html>", "get x")
    assert isinstance(garbage, CloudHttpError)
    assert garbage.error_code == "http_502" and "bad gateway" in garbage.detail
    empty = error_for_response(503, b"", "get x")
    assert isinstance(empty, CloudHttpError) and "no error body" in empty.detail


# -- the relay's frame cutting -------------------------------------------------------------------


def test_frame_cutter_returns_whole_frames_across_any_split() -> None:
    frames = [
        encode(0, Hello(version=1)),
        encode(1, Exec(cmd="echo", args=["x" * 3000]), SESSION_START),
        encode(2, Shutdown(grace=1.0), SESSION_START),
    ]
    stream = b"".join(frames)
    for step in (1, 7, 100, len(stream)):
        cutter = FrameCutter()
        got: list[bytes] = []
        for start in range(0, len(stream), step):
            got.extend(cutter.feed(stream[start : start + step]))
        assert got == frames and cutter.buffered == 0


def test_frame_cutter_refuses_oversized_and_short_lengths() -> None:
    with pytest.raises(ProtocolError):
        FrameCutter(max_frame=100).feed((101).to_bytes(4, "big") + b"\0" * 5)
    with pytest.raises(ProtocolError):
        FrameCutter().feed((2).to_bytes(4, "big") + b"\0" * 5)


def test_shutdown_is_answered_by_the_relay_and_never_forwarded() -> None:
    assert refused_reply(encode(3, Exec(cmd="true"), SESSION_START)) is None
    assert refused_reply(encode(0, Hello(version=1))) is None
    reply = refused_reply(encode(7, Shutdown(grace=0.0), SESSION_START))
    assert reply is not None
    (frame,) = FrameDecoder().feed(reply)
    assert frame.id == 7 and frame.flags & TERMINAL
    assert isinstance(frame.msg, ErrorReply) and frame.msg.code == "unsupported"
    with pytest.raises(ProtocolError):
        refused_reply((6).to_bytes(4, "big") + b"\0\0\0\1\0" + b"\xc1")


# -- the stop ladder over REST (MockTransport, autojump clock) ----------------------------------


@dataclass
class FakePlane:
    """A control plane in memory: records requests with trio time."""

    stops_needed: int = 1
    """The sandbox stops once this many POST …/stop have arrived."""
    create_status: str = "running"
    after_create: list[str] = field(default_factory=list)
    """Statuses the next GETs answer after create (then the last one stays)."""
    requests: list[tuple[float, str, str]] = field(default_factory=list)
    status: str = "running"
    stops: int = 0
    deleted: bool = False

    def sandbox(self) -> dict[str, Any]:
        return {
            "id": "sb_1",
            "org_id": "org_1",
            "name": "job",
            "slug": "job",
            "status": self.status,
            "ephemeral": False,
            "created_at": "2026-01-01T00:00:00Z",
            "last_failure_message": "it broke" if self.status == "failed" else None,
        }

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append((trio.current_time(), request.method, path))
        if self.deleted:
            return httpx.Response(404, json={"code": "not_found", "message": "sandbox not found"})
        if request.method == "POST" and path == "/v1/sandboxes":
            self.status = self.create_status
            return httpx.Response(201, json=self.sandbox())
        if request.method == "GET":
            if self.after_create:
                self.status = self.after_create.pop(0)
            return httpx.Response(200, json=self.sandbox())
        if request.method == "POST" and path.endswith("/stop"):
            self.stops += 1
            if self.status not in ("stopped", "failed"):
                self.status = "stopped" if self.stops >= self.stops_needed else "stopping"
            return httpx.Response(200, json=self.sandbox())
        if request.method == "DELETE":
            if self.status not in ("stopped", "failed"):
                return httpx.Response(409, json={"code": "sandbox_still_running", "message": "x"})
            self.deleted = True
            return httpx.Response(200, json={"message": "removed"})
        return httpx.Response(404, json={"code": "not_found", "message": "route not found"})

    def times(self, method: str, suffix: str) -> list[float]:
        return [t for t, m, p in self.requests if m == method and p.endswith(suffix)]


@asynccontextmanager
async def plane_supervisor(plane: FakePlane) -> AsyncIterator[corral.Supervisor]:
    driver = CloudDriver(BACKEND, transport=httpx.MockTransport(plane.handle))
    with trio.fail_after(300):  # virtual seconds (autojump clock)
        async with driver, corral.open_supervisor(driver=driver) as sup:
            yield sup


async def test_stop_ladder_stop_poll_resend_then_kill(autojump_clock: trio.abc.Clock) -> None:
    plane = FakePlane(stops_needed=3)
    async with plane_supervisor(plane) as sup:
        sb = await sup.create("job")
        start = trio.current_time()
        await sb.stop()
        assert sb.status is SandboxStatus.STOPPED
    stops = [t - start for t in plane.times("POST", "/stop")]
    # stop at once, the re-send after the 10 s stop timeout, the "kill" 5 s later
    assert stops == pytest.approx([0.0, 10.0, 15.0], abs=0.15)
    polls = [t - start for t in plane.times("GET", "/v1/sandboxes/sb_1") if t - start < 10]
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert len(polls) >= 90 and max(gaps) <= 0.1 + 1e-6  # every 100 ms while stopping
    assert plane.deleted and plane.times("DELETE", "/v1/sandboxes/sb_1")


async def test_graceful_stop_ends_at_the_first_poll(autojump_clock: trio.abc.Clock) -> None:
    plane = FakePlane()
    async with plane_supervisor(plane) as sup:
        sb = await sup.create("job")
        start = trio.current_time()
        await sb.stop()
        took = trio.current_time() - start
    assert took <= 0.2 and len(plane.times("POST", "/stop")) == 1 and plane.deleted


async def test_ladder_gives_up_with_runtime_when_stop_is_never_observed(
    autojump_clock: trio.abc.Clock,
) -> None:
    plane = FakePlane(stops_needed=99)
    with trio.fail_after(120):
        async with plane_supervisor(plane) as sup:
            sb = await sup.create("job")
            with pytest.raises(Runtime, match="timed out observing stopped state"):
                await sb.stop(timeout=2.0)
            assert len(plane.times("POST", "/stop")) >= 3
            plane.status = "stopped"  # the server gets there in the end: the reaper removes it
    assert plane.deleted


async def test_spawn_waits_for_running_and_reports_a_failed_start(
    autojump_clock: trio.abc.Clock,
) -> None:
    plane = FakePlane(create_status="starting", after_create=["starting", "running"])
    async with plane_supervisor(plane) as sup:
        sb = await sup.create("job")
        assert sb.status is SandboxStatus.RUNNING
        await sb.stop()
    failing = FakePlane(create_status="starting", after_create=["failed"])
    async with plane_supervisor(failing) as sup:
        with pytest.raises(Runtime, match="did not start: it broke"):
            await sup.create("job")
        assert "job" not in sup
    assert failing.deleted  # nothing left behind


async def test_remote_end_without_a_stop_is_a_crash(autojump_clock: trio.abc.Clock) -> None:
    plane = FakePlane()
    async with plane_supervisor(plane) as sup:
        sb = await sup.create("job")
        plane.status = "failed"
        with trio.fail_after(2):  # the idle poll (1 s) notices
            assert await sb.wait_until_stopped() is SandboxStatus.CRASHED
    assert plane.deleted


async def test_detached_sandbox_is_left_running_and_kept(autojump_clock: trio.abc.Clock) -> None:
    plane = FakePlane()
    async with plane_supervisor(plane) as sup:
        await sup.create("job", detached=True)
    assert plane.status == "running" and not plane.times("POST", "/stop") and not plane.deleted


async def test_driver_must_be_entered() -> None:
    driver = CloudDriver(BACKEND)
    with trio.fail_after(5), pytest.raises(Runtime, match="must be entered"):
        await driver.spawn(SandboxSpec(name="x"))


async def test_network_failure_is_a_runtime_error_naming_the_url() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with trio.fail_after(5):
        async with CloudDriver(BACKEND, transport=httpx.MockTransport(refuse)) as driver:
            with pytest.raises(Runtime, match=r"cannot reach the control plane at http://cloud"):
                await driver.get("sb_1")

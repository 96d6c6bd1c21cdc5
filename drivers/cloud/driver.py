"""CloudDriver: sandboxes on a remote control plane (``corral serve`` or microsandbox cloud).

Lifecycle is REST (``shared/reference/microsandbox-cloud-wire.md``); the agent channel is
corral's own frames over the ``/v1/sandboxes/{id}/corral`` WebSocket (subprotocol
``corral.v1``), which ``corral serve`` relays to the sandbox's agent. So exec,
exec_stream and fs work over cloud exactly as locally. Against a server without that
route (404/405/501 on the upgrade), they raise ``Unsupported(..., "when the control
plane is corral serve")``, as the seed does for every cloud exec and fs call.

How the actor's stop ladder runs over cloud (``actors/sandbox.py``), the seed's handle
ladder ("stop, poll every 100 ms, re-send after the stop timeout, then kill"):

1. ``request_stop`` → ``POST …/stop`` (no ``Shutdown`` frame: the relay refuses it, a
   stop goes through the server's lifecycle), and the status poller switches to 100 ms;
   the actor watches ``exit_status`` every 100 ms for the stop timeout (10 s);
2. ``terminate`` → ``POST …/stop`` again (the re-send), watched for 5 s;
3. ``kill`` → ``POST …/stop`` once more: the strongest thing the wire offers (there is
   no forced-stop route; DELETE of a running sandbox is a 409; ``corral serve``'s own
   ladder ends in SIGKILL), watched for 5 s, then ``Runtime("timed out observing ...")``.

Status: a poller per sandbox (in the driver's nursery) GETs the sandbox every
``poll_interval`` (1 s) while it runs, every 100 ms while it starts or once a stop was
asked (the seed's polling), and at once (then every 100 ms for 2 s) when the agent
WebSocket drops. ``stopped`` / ``failed`` / gone (404) end ``wait()``. The idle rate is
not the seed's 100 ms on purpose: thousands of sandboxes at 10 GETs a second each
would be the control plane's whole load.

A lost WebSocket is not a crash (``reconnectable``): the requests in flight fail with
AgentGone at once and the actor connects again for the next request.

``cleanup`` never leaves a remote sandbox running that the user did not ask to keep:
a running sandbox is stopped; a non-detached one is then removed (``DELETE``), at once
if it already stopped, else by a reaper task once it has (``aclose`` waits for reapers,
bounded). Detached sandboxes are left running when the orchestrator goes, and their
records are kept.
"""

from __future__ import annotations

import logging
import math
import ssl
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import trio
from trio_websocket import ConnectionRejected, HandshakeError

from ...backend.kinds import CloudBackend
from ...errors import (
    AgentGone,
    CloudHttpError,
    CorralError,
    InvalidConfig,
    ProtocolError,
    Runtime,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxStillRunning,
    Unsupported,
)
from ..base import Driver, SandboxSpec
from .http import CloudHttp
from .sandbox import ABANDON_TIMEOUT, REAP_TIMEOUT, CloudSandbox
from .websocket import WebSocketStream, hold_websocket
from .wire import SUBPROTOCOL, SandboxWire, create_body, error_for_response

__all__ = ["CloudDriver"]

log = logging.getLogger("corral.drivers.cloud")

IDLE_POLL_INTERVAL = 1.0
"""Status polling while nobody is stopping the sandbox (a crash backstop)."""
SPAWN_TIMEOUT = 90.0
NO_ROUTE = "when the control plane is corral serve"
AGENT_FEATURE = "exec and fs over cloud (the agent channel)"


class CloudDriver(Driver):
    """Sandboxes on a control plane; use as ``async with CloudDriver(backend) as d``.

    ``open_supervisor(CloudBackend(url, key))`` builds and enters one itself.
    """

    kind = "cloud"

    def __init__(
        self,
        backend: CloudBackend,
        *,
        poll_interval: float = IDLE_POLL_INTERVAL,
        spawn_timeout: float = SPAWN_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not isinstance(backend, CloudBackend):
            raise InvalidConfig(f"CloudDriver needs a CloudBackend, got {backend!r}")
        self.backend = backend
        self.poll_interval = poll_interval
        self.spawn_timeout = spawn_timeout
        self._transport = transport
        parts = urlsplit(backend.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        self._ws_base = urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._ssl = ssl_context
        if scheme == "wss" and ssl_context is None:
            self._ssl = ssl.create_default_context()
        self._http: CloudHttp | None = None
        self._nursery: trio.Nursery | None = None
        self._manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._reapers = 0
        self._reaped = trio.Event()
        self.corral_route: bool | None = None
        """Whether the server relays corral frames (None until a connect tells)."""
        self.sandboxes: dict[str, CloudSandbox] = {}
        """Sandboxes this driver spawned or attached, by id, while they are polled."""

    def __repr__(self) -> str:
        return f"<CloudDriver {self.backend.url}>"

    # -- resources -------------------------------------------------------------------------
    async def __aenter__(self) -> CloudDriver:
        self._http = CloudHttp(self.backend, transport=self._transport)
        self._manager = trio.open_nursery()
        self._nursery = await self._manager.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> bool:
        await self.aclose()
        return False

    async def aclose(self) -> None:
        """Let reapers finish (bounded), then close sockets, pollers and the pool."""
        if self._manager is None or self._nursery is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(REAP_TIMEOUT + ABANDON_TIMEOUT):
            while self._reapers:
                await self._reaped.wait()
        manager, self._manager = self._manager, None
        self._nursery.cancel_scope.cancel()
        try:
            await manager.__aexit__(None, None, None)
        finally:
            self._nursery = None
            if self._http is not None:
                with trio.CancelScope(shield=True):
                    await self._http.aclose()

    @property
    def http(self) -> CloudHttp:
        if self._http is None or self._manager is None:
            raise Runtime("CloudDriver must be entered: async with CloudDriver(backend) as d")
        return self._http

    def _start_soon(self, fn: Any, *args: Any) -> None:
        if self._nursery is None:
            raise Runtime("CloudDriver must be entered: async with CloudDriver(backend) as d")
        self._nursery.start_soon(fn, *args)

    # -- REST ------------------------------------------------------------------------------
    async def spawn(self, spec: SandboxSpec) -> CloudSandbox:
        http = self.http
        body = create_body(spec)
        wait = max(1, math.ceil(self.spawn_timeout))
        what = f"create sandbox {spec.name!r}"
        outcome_known = False
        wire: SandboxWire | None = None
        try:
            try:
                wire = await http.sandbox(
                    "POST",
                    "/v1/sandboxes",
                    what=what,
                    json=body,
                    params={"start": "true", "wait_for": "running", "wait_timeout": str(wait)},
                    timeout=wait + 10.0,
                )
            except CorralError as exc:
                # The server answered no: nothing was created. A network error or an
                # unreadable answer leaves the outcome unknown (the sandbox may exist).
                unreadable = (
                    isinstance(exc, CloudHttpError) and exc.error_code == "invalid_response"
                )
                outcome_known = not (unreadable or isinstance(exc, Runtime))
                raise
            outcome_known = True
            proc = CloudSandbox(self, spec, wire)
            self._track(proc)
            await proc.wait_running(self.spawn_timeout)
            return proc
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(ABANDON_TIMEOUT):
                await self._abandon(spec, wire, known=outcome_known)
            raise

    async def _abandon(self, spec: SandboxSpec, wire: SandboxWire | None, *, known: bool) -> None:
        """A spawn failed after the server may have created the sandbox: stop, remove."""
        if wire is None and known:
            return
        if wire is not None:
            proc = self.sandboxes.get(wire.id) or CloudSandbox(self, spec, wire)
            await proc.cleanup()
            return
        # The POST's outcome is unknown (cancelled, network): stop and remove by name.
        path = f"/v1/sandboxes/by-name/{quote(spec.name, safe='')}"
        try:
            got = await self.http.sandbox("POST", f"{path}/stop", what="abandon", json={})
        except CorralError:
            return
        proc = CloudSandbox(self, spec, got)
        self._track(proc)
        await proc.cleanup()

    def _track(self, proc: CloudSandbox) -> None:
        self.sandboxes[proc.id] = proc
        self._start_soon(proc._poll_loop)

    async def attach_remote(self, sandbox_id: str, spec: SandboxSpec | None = None) -> CloudSandbox:
        """A handle on an existing sandbox of this org (``GET /v1/sandboxes/{id}``); it
        counts as detached unless ``spec`` says otherwise (cleanup leaves it running)."""
        wire = await self.get(sandbox_id)
        proc = self.sandboxes.get(wire.id)
        if proc is None:
            proc = CloudSandbox(self, spec or SandboxSpec(name=wire.name, detached=True), wire)
            if not wire.terminal:
                self._track(proc)
        return proc

    async def get(self, sandbox_id: str) -> SandboxWire:
        return await self.http.sandbox(
            "GET", f"/v1/sandboxes/{quote(sandbox_id, safe='')}", what=f"get sandbox {sandbox_id}"
        )

    async def get_by_name(self, name: str) -> SandboxWire:
        return await self.http.sandbox(
            "GET", f"/v1/sandboxes/by-name/{quote(name, safe='')}", what=f"get sandbox {name!r}"
        )

    async def stop_sandbox(self, sandbox_id: str) -> SandboxWire:
        """``POST /v1/sandboxes/{id}/stop``: the server's stop (returns at once)."""
        return await self.http.sandbox(
            "POST",
            f"/v1/sandboxes/{quote(sandbox_id, safe='')}/stop",
            what=f"stop sandbox {sandbox_id}",
            json={},
        )

    async def delete_sandbox(self, sandbox_id: str) -> None:
        """``DELETE /v1/sandboxes/{id}``; SandboxStillRunning while it runs."""
        try:
            await self.http.message(
                "DELETE",
                f"/v1/sandboxes/{quote(sandbox_id, safe='')}",
                what=f"remove sandbox {sandbox_id}",
            )
        except CloudHttpError as exc:
            if exc.status == 409:
                raise SandboxStillRunning(exc.detail) from None
            raise

    async def remove(self, name: str) -> None:
        """Remove a stopped sandbox's record by name (a missing one is fine)."""
        try:
            await self.http.message(
                "DELETE",
                f"/v1/sandboxes/by-name/{quote(name, safe='')}",
                what=f"remove sandbox {name!r}",
            )
        except SandboxNotFound:
            pass
        except CloudHttpError as exc:
            if exc.status == 409:
                raise SandboxStillRunning(exc.detail) from None
            raise

    # -- the agent WebSocket ----------------------------------------------------------------
    async def connect_agent(self, sandbox_id: str, *, on_lost: Any = None) -> WebSocketStream:
        """A new ``corral.v1`` WebSocket to the sandbox's agent, as a byte stream."""
        if self.corral_route is False:
            raise Unsupported(AGENT_FEATURE, NO_ROUTE)
        if self._nursery is None:
            raise Runtime("CloudDriver must be entered: async with CloudDriver(backend) as d")
        url = f"{self._ws_base}/v1/sandboxes/{quote(sandbox_id, safe='')}/corral"
        headers = [(b"authorization", f"Bearer {self.backend.api_key}".encode())]
        hold = partial(
            hold_websocket,
            url,
            headers=headers,
            subprotocol=SUBPROTOCOL,
            ssl_context=self._ssl,
            on_lost=on_lost or (lambda: None),
        )
        try:
            stream: WebSocketStream = await self._nursery.start(hold)
        except ConnectionRejected as exc:
            raise await self._rejected(sandbox_id, exc) from None
        except HandshakeError as exc:
            raise AgentGone(
                f"sandbox {sandbox_id}: cannot open the agent websocket at {url}: {exc!r}"
            ) from None
        except OSError as exc:
            raise AgentGone(f"sandbox {sandbox_id}: cannot reach {url}: {exc}") from None
        if stream.subprotocol != SUBPROTOCOL:
            await stream.aclose()
            self.corral_route = False
            raise Unsupported(AGENT_FEATURE, NO_ROUTE)
        self.corral_route = True
        return stream

    async def _rejected(self, sandbox_id: str, exc: ConnectionRejected) -> CorralError:
        status = int(exc.status_code)
        body = bytes(exc.body or b"")
        what = f"open the agent websocket of sandbox {sandbox_id}"
        if status == 404:
            # A missing sandbox, or a server without the route: ask the REST side.
            await self.get(sandbox_id)  # SandboxNotFound when the sandbox is not there
            self.corral_route = False
            return Unsupported(AGENT_FEATURE, NO_ROUTE)
        if status in (405, 501):
            self.corral_route = False
            return Unsupported(AGENT_FEATURE, NO_ROUTE)
        error = error_for_response(status, body, what)
        if status == 409:
            return SandboxNotRunning(str(error))
        if isinstance(error, CloudHttpError) and error.error_code == "unsupported_subprotocol":
            return ProtocolError(f"{what}: the server does not speak {SUBPROTOCOL}: {error}")
        return error

"""Run the control plane: hypercorn on trio, in front of corral's supervisor.

``serve()`` is what ``corral serve`` runs and what tests start with ``nursery.start``;
it reports a :class:`ServeInfo` (the bound URL, so port 0 works) once it accepts
connections. On first start (no API key in the data dir) it creates a key for the
``default`` org and hands it to ``announce`` once; only its hash is kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from . import msb_agent
from .app import App
from .host import CorralHost
from .relay import relay_for
from .service import MAX_SANDBOXES_PER_ORG, ControlPlane, SandboxHost
from .store import Store

DEFAULT_PORT = 8780
FIRST_ORG = "default"

log = logging.getLogger("corral.server")


@dataclass(frozen=True)
class ServeInfo:
    url: str
    port: int
    data_dir: Path
    first_key: str | None
    """The API key created on this start (first start only), else None."""


def default_data_dir() -> Path:
    home = os.environ.get("CORRAL_HOME") or os.path.join(os.path.expanduser("~"), ".corral")
    return Path(home) / "server"


def hypercorn_config(host: str, port: int) -> Config:
    config = Config()
    bind_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    config.bind = [f"{bind_host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("corral.server.hypercorn")
    # A client frame is at most 4 MiB (+ header) and arrives as one WebSocket message.
    config.websocket_max_message_size = msb_agent.MAX_LEN + 64 * 1024
    # Inbound back-pressure: at most this many messages wait for the app per connection.
    config.max_app_queue_size = 4
    config.graceful_timeout = 5.0
    return config


@asynccontextmanager
async def corral_host(driver: Any = None) -> AsyncIterator[SandboxHost]:
    import corral

    async with corral.open_supervisor(driver=driver) as sup:
        yield CorralHost(sup)


def print_first_key(key: str) -> None:
    print(
        f"corral serve: created the first API key (org {FIRST_ORG!r}); it is shown only once:\n"
        f"  {key}",
        flush=True,
    )


async def serve(
    data_dir: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    driver: Any = None,
    sandbox_host: Callable[[], AbstractAsyncContextManager[SandboxHost]] | None = None,
    allow_network: bool = False,
    max_per_org: int = MAX_SANDBOXES_PER_ORG,
    announce: Callable[[str], None] | None = print_first_key,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[ServeInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled, or until ``shutdown_trigger`` returns.

    ``sandbox_host`` builds where sandboxes run (default: ``corral.open_supervisor``
    with ``driver``, the local driver when None).
    """
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    store = Store.open(path)
    first_key: str | None = None
    if not store.has_keys():
        _, first_key = store.create_key(FIRST_ORG, "created on first start")
        if announce is not None:
            announce(first_key)
    plane: ControlPlane | None = None
    make_host = sandbox_host or partial(corral_host, driver)
    try:
        async with make_host() as sandboxes, trio.open_nursery() as nursery:
            plane = ControlPlane(
                store, sandboxes, nursery, allow_network=allow_network, max_per_org=max_per_org
            )
            # hypercorn's ASGI types are narrower than the protocol
            app: Any = App(plane, relay=relay_for(plane, sandboxes))
            run = partial(hypercorn_serve, app, hypercorn_config(host, port))
            binds: list[str] = await nursery.start(run)
            url = binds[0]
            bound = int(url.rsplit(":", 1)[1])
            log.info("corral serve listening on %s (data dir %s)", url, path)
            task_status.started(ServeInfo(url, bound, path, first_key))
            await _wait_forever_or(shutdown_trigger)
            nursery.cancel_scope.cancel()
    finally:
        if plane is not None:
            plane.close()
        store.close()


async def _wait_forever_or(trigger: Callable[[], Awaitable[None]] | None) -> None:
    if trigger is None:
        await trio.sleep_forever()
    else:
        await trigger()

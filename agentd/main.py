"""Entry point of ``corral-agentd``, the first process inside every sandbox.

Configuration comes from the environment it is started with (these variables are then
removed, so commands never see them):

- ``CORRAL_AGENT_SOCKET``: the Unix socket to listen on (default ``/run/agent/agent.sock``).
- ``CORRAL_READY_FD``: an inherited fd; once listening, the agent writes ``b"R"`` to it
  and closes it.
- ``CORRAL_LOG_RING_BYTES``: the size of the log ring (see :mod:`.logring`).

It imports only the standard library, ``msgspec``, ``corral.protocol`` and
``corral.errors``: the sandbox holds nothing else.
"""

from __future__ import annotations

import asyncio
import os
import socket

from .agent import Agent
from .logring import RING_BYTES

DEFAULT_SOCKET = "/run/agent/agent.sock"


def listen(path: str) -> socket.socket:
    """Bind a fresh listening socket at ``path`` (mode 0600), replacing a stale one."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def main() -> None:
    environ = os.environ
    path = environ.get("CORRAL_AGENT_SOCKET") or DEFAULT_SOCKET
    ready = environ.get("CORRAL_READY_FD")
    ring = environ.get("CORRAL_LOG_RING_BYTES", "").strip()
    for key in [k for k in environ if k.startswith("CORRAL_")]:
        del environ[key]
    ready_fd = int(ready) if ready and ready.strip().isdigit() else None
    sock = listen(path)
    ino = os.stat(path).st_ino
    loop = asyncio.new_event_loop()
    agent = Agent(loop, dict(environ), log_bytes=int(ring) if ring.isdigit() else RING_BYTES)
    try:
        loop.run_until_complete(agent.serve(sock, ready_fd))
    finally:
        try:
            if os.stat(path).st_ino == ino:
                os.unlink(path)
        except OSError:
            pass
        sock.close()
    if agent.threads_busy:  # a tree copy still running must not hold the exit
        os._exit(0)
    loop.close()

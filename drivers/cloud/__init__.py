"""The cloud driver: sandboxes on a remote control plane (REST + the corral.v1 WebSocket).

See :mod:`corral.drivers.cloud.driver` for the lifecycle and the stop ladder over cloud.
"""

from .driver import CloudDriver
from .sandbox import CloudSandbox
from .websocket import WebSocketStream
from .wire import SUBPROTOCOL, SandboxWire, cloud_status_to_sandbox_status, create_body

__all__ = [
    "SUBPROTOCOL",
    "CloudDriver",
    "CloudSandbox",
    "SandboxWire",
    "WebSocketStream",
    "cloud_status_to_sandbox_status",
    "create_body",
]

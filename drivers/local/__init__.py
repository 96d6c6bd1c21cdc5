"""The local driver: hardened bubblewrap sandboxes on this host."""

from .driver import LocalDriver, LocalSandbox

__all__ = ["LocalDriver", "LocalSandbox"]

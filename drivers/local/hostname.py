"""Setting the hostname of a running sandbox from the host (for the warm pool's rename).

bwrap sets a sandbox's hostname (``--hostname``) when it starts; nothing inside may
change it (every capability is dropped). A warm pool's sandbox is started under an
internal name and renamed when a create claims it, so its UTS namespace gets the new
name from outside: the calling thread joins the namespace of the sandbox's init
(``setns``), calls ``sethostname`` and returns to its own namespace. Namespaces are
per thread, so nothing else in the process sees the switch, and no ``await`` happens in
between. It needs ``CAP_SYS_ADMIN`` (host root); without it :func:`set_hostname`
returns False and the sandbox keeps the name it was started with.
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = ["HOST_NAME_MAX", "set_hostname"]

log = logging.getLogger(__name__)

HOST_NAME_MAX = 64
_CLONE_NEWUTS = 0x04000000
_libc: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def set_hostname(init_pid: int | None, name: str) -> bool:
    """Set the hostname of the UTS namespace ``init_pid`` is in; True if it was set."""
    if init_pid is None or os.geteuid() != 0:
        return False
    libc = _load()
    raw = name[:HOST_NAME_MAX].encode()
    try:
        own = os.open("/proc/thread-self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("corral: own UTS namespace: %s", exc)
        return False
    try:
        target = os.open(f"/proc/{init_pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(own)
        log.debug("corral: UTS namespace of pid %d: %s", init_pid, exc)
        return False
    try:
        if os.readlink(f"/proc/{init_pid}/ns/uts") == os.readlink("/proc/thread-self/ns/uts"):
            return False  # not a sandbox of its own: never rename the host
        if libc.setns(target, _CLONE_NEWUTS) != 0:
            log.debug("corral: setns(uts): %s", os.strerror(ctypes.get_errno()))
            return False
        try:
            done = bool(libc.sethostname(raw, len(raw)) == 0)
        finally:
            if libc.setns(own, _CLONE_NEWUTS) != 0:  # cannot happen: it is where we were
                raise OSError(ctypes.get_errno(), "cannot return to the host UTS namespace")
        return done
    finally:
        os.close(target)
        os.close(own)

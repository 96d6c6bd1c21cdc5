"""Host-side hardening around a sandbox's start: the fd limit and the OOM killer.

**File descriptors.** The orchestrator holds about four fds per live sandbox (the agent
socket, the process, pipes), so a soft ``RLIMIT_NOFILE`` of 1024 ends ``create`` at
~250 sandboxes. :func:`raise_fd_limit` raises the soft limit to the hard one, once per
process (the local driver calls it when it opens), and logs it. The sandboxes do not
inherit the raised limit: :func:`nofile_prefix` is an ``sh -c 'ulimit -Sn N'`` hop that
gives them back the soft limit the process started with (the hard one is unchanged, so
a command may still raise its own soft limit, as before).

**The OOM killer.** A sandbox that fills its tmpfs up to its memory limit leaves pages
that belong to no process, so the kernel's OOM killer picks the largest process of the
sandbox: usually the agent, and the whole sandbox would end. Two layers keep it alive:

- :func:`protect` writes ``-1000`` (never chosen) to ``/proc/PID/oom_score_adj`` of the
  outer bwrap, the sandbox's init and the agent, right after the agent is ready. Going
  below 0 needs ``CAP_SYS_RESOURCE`` on the host (root normally has it; containers
  often drop it): without it this is skipped, with one log line.
- The agent starts every command at ``oom_score_adj`` 500 (``agentd.execs``), a value
  anyone may raise to, so the OOM killer takes a command before the agent even when the
  host could not protect it. A command may lower its own value again, down to the
  agent's floor: that is the host's -1000 when protected (``oom_score_adj_min`` is
  inherited), which can only make it harder to kill within its own memory limit.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from pathlib import Path

__all__ = [
    "PROTECTED_OOM_SCORE_ADJ",
    "agent_pid",
    "nofile_prefix",
    "protect",
    "raise_fd_limit",
    "reset_for_tests",
]

log = logging.getLogger(__name__)

PROTECTED_OOM_SCORE_ADJ = -1000
"""The agent's score when the host may lower it: the OOM killer never picks it."""

_original_soft: int | None = None
"""The soft RLIMIT_NOFILE before :func:`raise_fd_limit` raised it (None: not raised)."""
_fd_limit_checked = False
_protect_refused = False


def raise_fd_limit() -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (once per process; logged)."""
    global _fd_limit_checked, _original_soft
    if _fd_limit_checked:
        return
    _fd_limit_checked = True
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("corral: cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
        return
    _original_soft = soft
    log.info(
        "corral: raised the open-files soft limit from %d to %d (about 4 per sandbox); "
        "sandboxes still start with %d",
        soft,
        hard,
        soft,
    )


def nofile_prefix() -> list[str]:
    """argv prefix that gives a sandbox the soft fd limit this process started with
    (``[]`` when :func:`raise_fd_limit` changed nothing)."""
    if _original_soft is None:
        return []
    return ["/bin/sh", "-c", f'ulimit -Sn {_original_soft} && exec "$@"', "corral-nofile"]


def agent_pid(init_pid: int) -> int | None:
    """The sandbox's agent: the only child of its pid-namespace init (None if gone)."""
    try:
        children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


def protect(pids: list[int | None]) -> bool:
    """Make ``pids`` the OOM killer's last choice (see the module docstring).

    False when the host may not lower a score (no ``CAP_SYS_RESOURCE``: logged once);
    a process that is already gone is skipped.
    """
    global _protect_refused
    if _protect_refused:
        return False
    value = str(PROTECTED_OOM_SCORE_ADJ).encode()
    for pid in pids:
        if pid is None:
            continue
        try:
            fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            return _refused(exc)
        try:
            os.write(fd, value)
        except ProcessLookupError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                return _refused(exc)
            raise
        finally:
            os.close(fd)
    return True


def _refused(exc: OSError) -> bool:
    global _protect_refused
    _protect_refused = True
    log.info(
        "corral: cannot lower oom_score_adj (%s; needs CAP_SYS_RESOURCE): sandbox agents "
        "are protected from the OOM killer only by their commands' higher score",
        exc.strerror,
    )
    return False


def reset_for_tests() -> None:
    """Forget what this process did (tests: raise the fd limit again, retry protect)."""
    global _fd_limit_checked, _original_soft, _protect_refused
    _fd_limit_checked = False
    _original_soft = None
    _protect_refused = False

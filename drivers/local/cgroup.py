"""A cgroup per sandbox: cpu, memory and pids limits, OOM accounting, kill, cleanup.

**Layouts.** :func:`detect` reads ``/proc/self/mountinfo`` and ``/proc/self/cgroup``
once and maps each controller we use to the hierarchy that has it: pure cgroup v2 (a
fresh Debian), pure v1, or a v1/v2 hybrid (controllers on v1 mounts under
``/sys/fs/cgroup/<ctrl>`` and an otherwise empty v2 at ``/sys/fs/cgroup/unified``).
``cpu``, ``memory`` and ``pids`` are required; ``cpuacct``/``blkio`` (v1) and ``io``
(v2) are used for metrics when present. A writable v2 hierarchy is used even when it
has no controllers: it gives ``cgroup.kill`` (race-free kill of a whole tree) and
``cpu.stat``. It then probes by creating and removing a cgroup; :func:`why_unavailable`
says why not when that fails (not root and no delegated subtree, controllers missing,
v2's no-internal-processes rule...).

**Where.** A sandbox's cgroup is ``<parent>/<name>-<ourpid>-<hex>`` in every hierarchy
used. The parent is ``/corral`` from the v2 root (the root cgroup is exempt from v2's
no-internal-processes rule) and ``corral`` *under our own cgroup* on v1 hierarchies, so
a sandbox stays inside whatever budget and bookkeeping the caller itself is under.
``CORRAL_CGROUP_PARENT`` overrides both (absolute = from the hierarchy's root, relative
= under our own cgroup); ``CORRAL_CGROUPS=off`` disables cgroups (rlimit fallback). An
emptied parent is removed with the last sandbox cgroup, so nothing is left behind.

**Limits** (checked by :func:`validate_limits`, :class:`corral.errors.InvalidConfig`
otherwise): ``cpus`` from 0.01 to the number of CPUs this process may run on (a larger
quota could never be used, so it is a configuration mistake, not something to cap
silently), as a CFS quota over a 100 ms period; ``memory_mib`` >= 16, with swap off for
the sandbox (v2 ``memory.swap.max=0``, v1 ``memsw`` = the memory limit); ``pids_limit``
from 8 to 4194304 (a fork past it fails with EAGAIN inside the sandbox). v2's
``memory.oom_group`` stays off: the OOM killer ends the offending process (SIGKILL, 137
in a shell), not the whole sandbox; :meth:`SandboxCgroup.oom_kills` counts the kills.

**Without cgroup rights**: :func:`rlimit_prefix` / :func:`apply_rlimits` set
RLIMIT_DATA and RLIMIT_NPROC instead, with one logged warning per process.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import resource
import secrets
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from corral.errors import InvalidConfig, Runtime, Unsupported

from .cgroup_layout import ENV_PARENT, REQUIRED, CgroupLayout, Hierarchy, plan_layout

__all__ = [
    "CgroupLayout",
    "Hierarchy",
    "SandboxCgroup",
    "apply_rlimits",
    "detect",
    "keyed",
    "pid_exists",
    "plan_layout",
    "probe",
    "reap_stale",
    "reset_detection",
    "rlimit_prefix",
    "validate_limits",
    "why_unavailable",
]

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
MIN_CPUS = 0.01
MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 1 << 30  # 1 PiB
MIN_PIDS = 8
MAX_PIDS = 4_194_304  # the kernel's PID_MAX_LIMIT
ENV_SWITCH = "CORRAL_CGROUPS"
V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as 9223372036854771712
_NAME_RE = re.compile(r"^(?P<name>.+)-(?P<pid>\d+)-(?P<uniq>[0-9a-f]{6})$")
_DRAIN_POLL = 0.005


def validate_limits(cpus: float | None, memory_mib: int | None, pids_limit: int | None) -> None:
    """Raise :class:`InvalidConfig` unless the limits are usable (None = no limit)."""
    if cpus is not None:
        if isinstance(cpus, bool) or not isinstance(cpus, int | float) or not math.isfinite(cpus):
            raise InvalidConfig(f"cpus must be a number, got {cpus!r}")
        most = len(os.sched_getaffinity(0))
        if not MIN_CPUS <= cpus <= most:
            raise InvalidConfig(f"cpus must be between {MIN_CPUS} and {most} here, got {cpus}")
    for label, value, low, high in (
        ("memory_mib", memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB),
        ("pids_limit", pids_limit, MIN_PIDS, MAX_PIDS),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfig(f"{label} must be an integer, got {value!r}")
        if not low <= value <= high:
            raise InvalidConfig(f"{label} must be between {low} and {high}, got {value}")


_detected: tuple[CgroupLayout | None, str | None] | None = None


def probe(parent: str | None = None) -> tuple[CgroupLayout | None, str | None]:
    """Plan the layout of this host and prove it by making and removing a cgroup."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "off", "no", "false"):
        return None, f"cgroups are disabled by {ENV_SWITCH}"
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        own = Path("/proc/self/cgroup").read_text()
    except OSError as exc:
        return None, f"cannot read /proc: {exc}"
    layout, reason = plan_layout(mountinfo, own, parent or os.environ.get(ENV_PARENT) or None)
    if layout is None:
        return None, reason
    try:
        SandboxCgroup.create("probe", layout=layout)._remove_now()
    except (Runtime, OSError) as exc:
        return None, str(exc)
    return layout, None


def detect() -> CgroupLayout | None:
    """This host's usable cgroup layout (probed once per process), or None."""
    global _detected
    if _detected is None:
        _detected = probe()
        if _detected[0] is not None:
            log.debug("corral: %s", _detected[0].describe())
    return _detected[0]


def why_unavailable() -> str | None:
    """None when :func:`detect` found a layout, else the reason it did not."""
    detect()
    return None if _detected is None else _detected[1]


def reset_detection() -> None:
    global _detected
    _detected = None


# ---------------------------------------------------------------------------- files


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise Runtime(f"cannot write {value.strip()!r} to {path}: {exc.strerror}") from exc


def keyed(text: str | None, key: str) -> int | None:
    """The number after ``key`` in a ``key value`` per line file (memory.events...)."""
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return None


def _enable_v2(level: Path, controllers: frozenset[str]) -> None:
    current = set((_read(level / "cgroup.subtree_control") or "").split())
    for name in sorted(controllers - current):
        try:
            (level / "cgroup.subtree_control").write_text(f"+{name}")
        except OSError as exc:
            if name not in REQUIRED:
                continue  # io is for metrics only
            hint = ""
            if exc.errno == errno.EBUSY:
                hint = " (it has processes: cgroup v2 allows controllers only above leaves)"
            raise Runtime(f"cannot enable {name} in {level}: {exc.strerror}{hint}") from exc


def _ensure_parent(h: Hierarchy) -> None:
    if h.version == 1:
        h.parent.mkdir(parents=True, exist_ok=True)
        return
    level = h.mount
    for part in h.parent.relative_to(h.mount).parts:
        _enable_v2(level, h.controllers)
        level = level / part
        level.mkdir(exist_ok=True)
    _enable_v2(level, h.controllers)


def _rmdir_tree(path: Path) -> bool:
    """rmdir ``path`` and any child cgroups; True when it is gone."""
    try:
        for sub in sorted(p for p in path.rglob("*") if p.is_dir())[::-1]:
            sub.rmdir()
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise Runtime(f"cannot remove cgroup {path}: {exc.strerror}") from exc
    return True


# ---------------------------------------------------------------------------- cgroup


class SandboxCgroup:
    """The cgroup of one sandbox (one directory per hierarchy of the layout)."""

    def __init__(self, layout: CgroupLayout, name: str, dirs: dict[Hierarchy, Path]) -> None:
        self.layout = layout
        self.name = name
        self.dirs = dirs
        self.removed = False

    @classmethod
    def create(
        cls,
        name: str,
        *,
        cpus: float | None = None,
        memory_mib: int | None = None,
        pids_limit: int | None = None,
        layout: CgroupLayout | None = None,
        owner_pid: int | None = None,
    ) -> SandboxCgroup:
        """Make the cgroup and set its limits (None = unlimited).

        ``owner_pid`` (default: this process) goes into the name: once that process is
        gone, an empty cgroup is stale (:func:`reap_stale`). A detached sandbox's is its
        keeper's."""
        validate_limits(cpus, memory_mib, pids_limit)
        if layout is None:
            layout = detect()
            if layout is None:
                raise Unsupported(
                    "per-sandbox cgroups", f"with cgroup rights; here: {why_unavailable()}"
                )
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:48] or "sandbox"
        owner = os.getpid() if owner_pid is None else owner_pid
        leaf = f"{safe}-{owner}-{secrets.token_hex(3)}"
        cgroup = cls(layout, leaf, {})
        try:
            for h in layout.hierarchies:
                for attempt in range(3):  # a concurrent remove may drop an empty parent
                    _ensure_parent(h)
                    try:
                        (h.parent / leaf).mkdir()
                        break
                    except FileNotFoundError:
                        if attempt == 2:
                            raise
                cgroup.dirs[h] = h.parent / leaf
            cgroup._set_limits(cpus, memory_mib, pids_limit)
        except BaseException as exc:
            try:
                cgroup._remove_now()  # nothing runs in it yet: plain rmdirs
            except Runtime as undo:
                log.warning("corral: %s", undo)
            if isinstance(exc, OSError):
                raise Runtime(f"cannot create cgroup {leaf}: {exc}") from exc
            raise
        return cgroup

    def _set_limits(self, cpus: float | None, memory_mib: int | None, pids: int | None) -> None:
        if memory_mib is not None:
            size = str(memory_mib << 20)
            if self.version_of("memory") == 2:
                self._put("memory", "memory.max", size)
                self._put("memory", "memory.swap.max", "0", optional=True)
            else:
                self._put("memory", "memory.limit_in_bytes", size)
                self._put("memory", "memory.memsw.limit_in_bytes", size, optional=True)
        if cpus is not None:
            quota = str(max(1000, round(cpus * CPU_PERIOD_US)))
            if self.version_of("cpu") == 2:
                self._put("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}")
            else:
                self._put("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US))
                self._put("cpu", "cpu.cfs_quota_us", quota)
        if pids is not None:
            self._put("pids", "pids.max", str(pids))

    def _put(self, controller: str, filename: str, value: str, *, optional: bool = False) -> None:
        where = self.dir_for(controller)
        if where is None:
            raise Runtime(f"cgroup {self.name}: no {controller} controller")
        if optional and not (where / filename).exists():
            return
        _write(where / filename, value)

    # -- lookups
    def dir_for(self, controller: str) -> Path | None:
        h = self.layout.for_controller(controller)
        return None if h is None else self.dirs.get(h)

    def version_of(self, controller: str) -> int | None:
        h = self.layout.for_controller(controller)
        return None if h is None else h.version

    def read(self, controller: str, filename: str) -> str | None:
        """The text of ``filename`` in the ``controller`` hierarchy ("" controller = v2)."""
        where = self.unified_dir if controller == "" else self.dir_for(controller)
        return None if where is None else _read(where / filename)

    @property
    def unified_dir(self) -> Path | None:
        h = self.layout.unified
        return None if h is None else self.dirs.get(h)

    @property
    def path(self) -> Path:
        """The main directory (memory's), for messages."""
        return self.dir_for("memory") or next(iter(self.dirs.values()))

    # -- membership
    def wrap_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that the process joins this cgroup before it execs.

        Race-free, unlike :meth:`add` after spawn (bwrap may fork before we move it):
        ``/bin/sh`` writes its own pid to every ``cgroup.procs``, then execs ``argv``
        (exit 125 with the error on stderr when it cannot). Use it outermost, before
        ``setpriv`` drops root.
        """
        script = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
        script += 'exec "$@"'
        procs = [str(d / "cgroup.procs") for d in self.dirs.values()]
        return ["/bin/sh", "-c", script, "corral-cgroup", *procs, "--", *argv]

    def add(self, pid: int) -> None:
        """Move ``pid`` in (its later children follow; already-forked ones do not)."""
        for where in self.dirs.values():
            try:
                (where / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError as exc:
                raise Runtime(f"cannot move pid {pid} to {where}: it is gone") from exc
            except OSError as exc:
                raise Runtime(f"cannot move pid {pid} to {where}: {exc.strerror}") from exc

    def pids(self) -> list[int]:
        """Every process in the cgroup (union over the hierarchies)."""
        found: set[int] = set()
        for where in self.dirs.values():
            found.update(int(p) for p in (_read(where / "cgroup.procs") or "").split())
        return sorted(found)

    # -- accounting
    def oom_kills(self) -> int:
        """Processes the OOM killer ended in this cgroup (v2 memory.events, v1 oom_control)."""
        if self.version_of("memory") == 2:
            return keyed(self.read("memory", "memory.events"), "oom_kill") or 0
        return keyed(self.read("memory", "memory.oom_control"), "oom_kill") or 0

    def pids_limit_hits(self) -> int:
        """Forks refused at ``pids.max`` (pids.events ``max``)."""
        return keyed(self.read("pids", "pids.events"), "max") or 0

    def limit_report(self) -> str | None:
        """What the sandbox ran into, for its record (None when it hit no limit)."""
        notes = []
        if kills := self.oom_kills():
            limit = self.memory_limit_bytes()
            cap = "" if limit is None else f" of {limit >> 20} MiB"
            notes.append(
                f"out of memory: the memory limit{cap} made the kernel kill {kills} "
                f"process{'es' if kills > 1 else ''} (SIGKILL, exit 137)"
            )
        if hits := self.pids_limit_hits():
            cap = (self.read("pids", "pids.max") or "").strip()
            notes.append(f"pids limit {cap} refused {hits} fork{'s' if hits > 1 else ''}")
        return "; ".join(notes) or None

    def memory_limit_bytes(self) -> int | None:
        if self.version_of("memory") == 2:
            raw = (self.read("memory", "memory.max") or "").strip()
            return int(raw) if raw.isdigit() else None
        raw = (self.read("memory", "memory.limit_in_bytes") or "").strip()
        return int(raw) if raw.isdigit() and int(raw) < V1_UNLIMITED else None

    # -- ending
    def _signal_all(self) -> None:
        kill_file = None if self.unified_dir is None else self.unified_dir / "cgroup.kill"
        if kill_file is not None and kill_file.exists():
            _write(kill_file, "1")  # the kernel kills the whole tree, forks included
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL everything in the cgroup and wait until it is empty.

        v2 ``cgroup.kill`` when present, else SIGKILL each pid of ``cgroup.procs`` again
        and again (new forks included) until none is left. Raises :class:`Runtime` if
        processes remain after ``timeout`` seconds (stuck in the kernel).
        """
        with trio.move_on_after(timeout):
            while self.pids():
                self._signal_all()
                await trio.sleep(_DRAIN_POLL)
            return
        raise Runtime(f"cgroup {self.name}: processes {self.pids()} outlived SIGKILL")

    async def remove(self, timeout: float = 5.0) -> None:
        """Kill what still runs, then remove every directory (idempotent).

        Retries while killed processes drain; removes the corral parent too when it is
        empty. Raises :class:`Runtime` if a directory is still there after ``timeout``.
        """
        if self.removed:
            return
        with trio.move_on_after(timeout):
            while not self._remove_now():
                self._signal_all()
                await trio.sleep(_DRAIN_POLL)
            return
        left = [str(d) for d in self.dirs.values() if d.exists()]
        raise Runtime(f"cgroup {self.name}: cannot remove {left}; pids {self.pids()}")

    def _remove_now(self) -> bool:
        gone = [_rmdir_tree(where) for where in self.dirs.values()]
        if not all(gone):
            return False
        self.removed = True
        for h in self.dirs:
            try:
                h.parent.rmdir()  # only when empty: other sandboxes keep it
            except OSError:
                pass
        return True


def reap_stale(prefix: str = "", *, layout: CgroupLayout | None = None) -> list[Path]:
    """Remove empty leftover sandbox cgroups whose owning corral process is gone.

    Only directories named ``<prefix>...-<pid>-<hex>`` (as :meth:`SandboxCgroup.create`
    names them) whose ``pid`` no longer exists. A name with a process in any hierarchy
    is left everywhere (and logged). Returns the removed directories.
    """
    layout = layout or detect()
    found: dict[str, list[Path]] = {}
    for h in layout.hierarchies if layout else ():
        try:
            entries = sorted(p for p in h.parent.iterdir() if p.is_dir())
        except OSError:
            continue
        for entry in entries:
            match = _NAME_RE.match(entry.name)
            if entry.name.startswith(prefix) and match and not pid_exists(int(match["pid"])):
                found.setdefault(entry.name, []).append(entry)
    removed: list[Path] = []
    for name, dirs in found.items():
        if any((_read(d / "cgroup.procs") or "").split() for d in dirs):
            log.warning("corral: stale cgroup %s still has processes; left in place", name)
            continue
        removed.extend(d for d in dirs if _rmdir_tree(d))
    for h in layout.hierarchies if layout else ():
        try:
            h.parent.rmdir()
        except OSError:
            pass
    return removed


def pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (zombies included; EPERM means it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------- fallback

_warned = False
_PY_EXEC = (
    "import os,resource as r,sys\n"
    "d,n=int(sys.argv[1]),int(sys.argv[2])\n"
    "if d>=0: r.setrlimit(r.RLIMIT_DATA,(d,d))\n"
    "if n>=0: r.setrlimit(r.RLIMIT_NPROC,(n,n))\n"
    "os.execv(sys.argv[3],sys.argv[3:])\n"
)


def _warn_fallback(cpus: float | None) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    reason = why_unavailable() or "cgroups not in use"
    log.warning(
        "corral: no per-sandbox cgroups (%s); limits fall back to rlimits, which are "
        "weaker: memory_mib caps each process's data size (RLIMIT_DATA, no OOM kill: "
        "allocations fail), pids_limit counts every process of the sandbox uid "
        "(RLIMIT_NPROC)%s",
        reason,
        ", and cpus is not enforced" if cpus is not None else "",
    )


def rlimit_prefix(
    memory_mib: int | None, pids_limit: int | None, *, cpus: float | None = None
) -> list[str]:
    """argv prefix applying the fallback limits before exec (``[]`` when none are set).

    ``prlimit --data=BYTES --nproc=N --`` (util-linux), or a tiny Python exec shim when
    prlimit is missing. Put it first, before ``setpriv``: children inherit the limits.
    RLIMIT_DATA rather than RLIMIT_AS: runtimes that reserve large address ranges
    (V8, Go, the JVM) still start, while heap growth beyond the limit fails.
    """
    validate_limits(cpus, memory_mib, pids_limit)
    if memory_mib is None and pids_limit is None and cpus is None:
        return []
    _warn_fallback(cpus)
    data = -1 if memory_mib is None else memory_mib << 20
    nproc = -1 if pids_limit is None else pids_limit
    if data < 0 and nproc < 0:
        return []
    tool = shutil.which("prlimit", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if tool is not None:
        opts = ([f"--data={data}"] if data >= 0 else []) + (
            [f"--nproc={nproc}"] if nproc >= 0 else []
        )
        return [tool, *opts, "--"]
    return [sys.executable, "-c", _PY_EXEC, str(data), str(nproc)]


def apply_rlimits(
    pid: int, memory_mib: int | None, pids_limit: int | None, *, cpus: float | None = None
) -> None:
    """Set the fallback limits on a running process (its later children inherit them)."""
    validate_limits(cpus, memory_mib, pids_limit)
    if memory_mib is None and pids_limit is None and cpus is None:
        return
    _warn_fallback(cpus)
    try:
        if memory_mib is not None:
            size = memory_mib << 20
            resource.prlimit(pid, resource.RLIMIT_DATA, (size, size))
        if pids_limit is not None:
            resource.prlimit(pid, resource.RLIMIT_NPROC, (pids_limit, pids_limit))
    except ProcessLookupError as exc:
        raise Runtime(f"cannot limit pid {pid}: it is gone") from exc
    except OSError as exc:
        raise Runtime(f"cannot limit pid {pid}: {exc.strerror}") from exc

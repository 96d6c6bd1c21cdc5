"""Which cgroup hierarchies to use: parse mountinfo and /proc/self/cgroup (no writes).

See :mod:`corral.drivers.local.cgroup` for the layouts (v2, v1, hybrid) and where the
corral parent goes in each hierarchy. Pure functions of their inputs plus
``cgroup.controllers`` of a v2 mount and write-access checks.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["ENV_PARENT", "REQUIRED", "CgroupLayout", "Hierarchy", "plan_layout"]

REQUIRED = ("cpu", "memory", "pids")
_V1_WANTED = frozenset({*REQUIRED, "cpuacct", "blkio"})
_V2_WANTED = frozenset({*REQUIRED, "io"})
ENV_PARENT = "CORRAL_CGROUP_PARENT"


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and corral's parent directory inside it."""

    version: Literal[1, 2]
    mount: Path
    controllers: frozenset[str]
    parent: Path

    @property
    def label(self) -> str:
        names = ",".join(sorted(self.controllers)) or "no controllers"
        return f"v{self.version}({names}) at {self.parent}"


@dataclass(frozen=True)
class CgroupLayout:
    hierarchies: tuple[Hierarchy, ...]

    def for_controller(self, controller: str) -> Hierarchy | None:
        for h in self.hierarchies:
            if controller in h.controllers:
                return h
        return None

    @property
    def unified(self) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.version == 2), None)

    @property
    def version(self) -> str:
        """``"v2"``, ``"v1"`` or ``"hybrid"``: where the required controllers live."""
        found = {h.version for c in REQUIRED if (h := self.for_controller(c)) is not None}
        if not found:  # a layout for process tracking only (tests, v2 without controllers)
            found = {h.version for h in self.hierarchies}
        return "hybrid" if len(found) > 1 else f"v{min(found, default=2)}"

    def describe(self) -> str:
        return f"cgroup {self.version}: " + "; ".join(h.label for h in self.hierarchies)


@dataclass(frozen=True)
class _Mount:
    version: Literal[1, 2]
    point: Path
    root: str
    controllers: frozenset[str]
    device: str


def _parse_mountinfo(text: str) -> list[_Mount]:
    mounts: list[_Mount] = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, extra = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(extra) < 3 or extra[0] not in ("cgroup", "cgroup2"):
            continue
        point = Path(fields[4].replace("\\040", " "))
        if extra[0] == "cgroup2":
            mounts.append(_Mount(2, point, fields[3], frozenset(), fields[2]))
        else:
            names = frozenset(extra[2].split(",")) & _V1_WANTED
            mounts.append(_Mount(1, point, fields[3], names, fields[2]))
    return mounts


def _parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        for name in parts[1].split(","):
            if name:
                v1[name] = parts[2]
    return v1, v2


def _dir_in(mount: _Mount, own: str | None, parent: str) -> Path | None:
    rel = posixpath.normpath(parent if parent.startswith("/") else f"{own or '/'}/{parent}")
    if mount.root != "/":
        if rel == mount.root or rel.startswith(mount.root + "/"):
            rel = rel[len(mount.root) :]
        elif not parent.startswith("/"):
            return None  # our own cgroup is not visible through this mount
    rel = rel.lstrip("/")
    if rel == ".." or rel.startswith("../"):
        return None
    return mount.point / rel if rel not in ("", ".") else mount.point


def _may_write(path: Path, mount: Path) -> bool:
    while not path.exists() and path != mount:
        path = path.parent
    return os.access(path, os.W_OK)


def plan_layout(
    mountinfo: str, proc_cgroup: str, parent: str | None = None
) -> tuple[CgroupLayout | None, str | None]:
    """Pick the hierarchies to use (no probing): ``(layout, None)`` or ``(None, reason)``."""
    mounts = _parse_mountinfo(mountinfo)
    own_v1, own_v2 = _parse_proc_cgroup(proc_cgroup)
    if not mounts:
        return None, "no cgroup filesystem is mounted"
    chosen: list[Hierarchy] = []
    problems: list[str] = []
    devices: set[str] = set()
    for mount in mounts:
        if mount.device in devices or (mount.version == 1 and not mount.controllers):
            continue
        if mount.version == 2 and any(h.version == 2 for h in chosen):
            continue
        devices.add(mount.device)
        if mount.version == 2:
            offered = (mount.point / "cgroup.controllers").read_text() if _exists(mount) else ""
            controllers = frozenset(offered.split()) & _V2_WANTED
            own = own_v2
            where = parent or "/corral"
        else:
            controllers = mount.controllers
            own = own_v1.get(next(iter(controllers)))
            where = parent or "corral"
        if any(c in h.controllers for h in chosen for c in controllers):
            continue
        target = _dir_in(mount, own, where)
        if target is None:
            problems.append(f"{mount.point}: parent {where!r} is outside this mount")
            continue
        if not _may_write(target, mount.point):
            if controllers & set(REQUIRED):
                problems.append(f"no write access to {target}")
            continue
        chosen.append(Hierarchy(mount.version, mount.point, controllers, target))
    have = {c for h in chosen for c in h.controllers}
    missing = [c for c in REQUIRED if c not in have]
    if missing:
        reason = f"cgroup controllers missing or not writable: {', '.join(missing)}"
        if problems:
            reason += f" ({'; '.join(problems)})"
        if os.geteuid() != 0:
            reason += f"; corral is not root: delegate a cgroup and set {ENV_PARENT} to it"
        return None, reason
    return CgroupLayout(tuple(chosen)), None


def _exists(mount: _Mount) -> bool:
    return (mount.point / "cgroup.controllers").is_file()

"""Build the bubblewrap command line (and the fds it needs) for one sandbox.

:func:`plan_sandbox` returns a :class:`BwrapPlan`: ``argv``, the fds to pass
(``pass_fds``) and the read end of bwrap's ``--info-fd`` pipe. ``launch.start_bwrap``
runs it; the plan closes every fd it opened (``close()``, idempotent, or use it as a
context manager). A plan is for one start: bwrap consumes the fds it is given.

The sandbox (``image="host"``): a tmpfs root holding a read-only view of the host's
``/usr`` (``/bin``, ``/sbin``, ``/lib*`` mirrored as symlinks on merged-usr hosts, bound
otherwise), a safe subset of ``/etc`` (``ETC_FILES``, world-readable entries only:
small files copied in, directories bound; never shadow, gshadow, sudoers, ssh, pip/npm
configs with tokens), fresh ``/proc``, ``/dev``, ``/dev/shm``, ``/tmp``, ``/run``, the
caller's socket dir read-write at ``/run/agent``, the caller's workdir read-write at
``workdir``, then ``--remount-ro /dev`` and ``--remount-ro /``. Flags:
``--unshare-all --unshare-user --disable-userns --cap-drop ALL --die-with-parent
--new-session --hostname NAME --seccomp FD --clearenv``, ``--share-net`` only with
``network=True``, ``--uid``/``--gid`` the same as outside, ``--info-fd FD`` (bwrap
writes ``{"child-pid": N, ...}``).

**tmpfs sizes.** ``/tmp``, ``/dev/shm`` and ``/run`` are tmpfs mounts of their own,
each capped with ``--size`` when the caller gives a size (``tmp_size_mib``,
``shm_size_mib``, ``run_size_mib``; without one a tmpfs may grow to half the host's
RAM): a write past the size fails with ENOSPC inside. ``--dev`` makes ``/dev`` a tmpfs
without a size (bwrap 0.8 takes ``--size`` for ``--tmpfs`` only) owned by the sandbox
uid, with ``/dev/shm`` a plain directory in it, so ``/dev/shm`` gets its own tmpfs and
``/dev`` itself is remounted read-only (the device nodes, ``/dev/pts`` and ``/dev/shm``
are mounts of their own and stay writable). tmpfs pages are also charged to the
sandbox's memory cgroup.

**Running as root.** The sandbox runs as an unprivileged uid (``launch.sandbox_credentials``):
as real root bwrap would keep every capability and map sandbox root to host root. So
``argv`` starts with ``setpriv --reuid=U --regid=G --clear-groups --inh-caps=-all
--bounding-set=-all --no-new-privs --`` (rather than ``Popen(user=...)``: that forces
``fork()`` of the whole orchestrator, ~5 ms of blocked event loop, where ``setpriv``
keeps ``vfork()``).

bwrap resolves every bind source with ``realpath()`` under the sandbox uid, including
the ``/proc/self/fd/N`` of ``--bind-fd``/``--ro-bind-fd`` (bubblewrap.c,
``resolve_symlinks_in_ops``, still so in 0.11), so an fd opened by root does *not* get
a path under ``/root`` (mode 0700) into the sandbox: bwrap fails with "Can't find
source path /proc/self/fd/N: Permission denied". Sources the sandbox uid cannot reach
(checked from the mode bits of every parent directory) are therefore *staged* (see
``_stage``): before dropping privileges, the same process enters a private mount
namespace and binds each of them under ``STAGE_DIR`` (a tmpfs there), then bwrap binds
from ``STAGE_DIR/N``. Only those sources become reachable, and file permissions are
still checked against the sandbox uid. Keep the parents of bind sources root-owned (a
sandbox owning the parent of its workdir could swap it for a symlink before a restart).

**OCI images** (``image_root``, an :class:`ImageRoot` prepared by the driver): the
image's root filesystem at ``/`` instead of the host view, then the same ``/proc``,
``/dev``, ``/tmp``, ``/run``, socket dir, workdir and agent runtime binds (the host's
Python under ``/.corral/host``, see ``runtime.image_agent_runtime``). bwrap 0.8 has no
``--overlay``, so the per-sandbox writable layer is an overlayfs mounted by the staging
step above (as root, in the sandbox's own mount namespace, never visible on the host):
``lowerdir`` = the cached image rootfs, ``upperdir``/``workdir`` = per-sandbox
directories; bwrap binds it at ``/``. Without root (or when asked), the layer is a
per-sandbox copy of the rootfs bound at ``/``. Either way bwrap creates its mount
points in that layer, never in the cache, and ``--remount-ro /`` ends the setup unless
``ImageRoot.writable``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from corral.errors import InvalidConfig, Runtime, Unsupported

from .runtime import RuntimeView
from .seccomp import build_filter

__all__ = [
    "DEFAULT_PATH",
    "ETC_FILES",
    "SOCKET_DIR",
    "STAGE_DIR",
    "BwrapPlan",
    "ImageRoot",
    "can_reach",
    "find_tool",
    "plan_sandbox",
]

SOCKET_DIR = "/run/agent"
STAGE_DIR = "/run/corral-stage"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_LANG = "C.UTF-8"
TOP_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
ETC_FILES = (
    "passwd",
    "group",
    "hosts",
    "host.conf",
    "nsswitch.conf",
    "resolv.conf",
    "gai.conf",
    "networks",
    "protocols",
    "services",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "pki",
    "crypto-policies",
    "alternatives",
    "localtime",
    "timezone",
    "os-release",
    "debian_version",
    "lsb-release",
    "mime.types",
    "magic",
    "shells",
    "locale.alias",
    "locale.conf",
    "terminfo",
    "python3",
    "python3.11",
    "python3.12",
    "python3.13",
)
_NEVER = frozenset({"shadow", "gshadow", "shadow-", "gshadow-", "sudoers", "sudoers.d", "ssh"})
_SEARCH_PATH = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")
_COPY_LIMIT = 1 << 20
_OVERLAY_BAD = frozenset(",:\\ \t\n")


@dataclass(frozen=True, kw_only=True)
class ImageRoot:
    """An image's root filesystem for one sandbox.

    With ``upper`` and ``work`` (root only): an overlay of ``path`` (read-only, never
    written) under the per-sandbox ``upper``; else ``path`` is the sandbox's own copy,
    bound at ``/``. ``writable=False`` remounts ``/`` read-only once bwrap made its
    mount points.
    """

    path: str
    upper: str | None = None
    work: str | None = None
    writable: bool = True

    @property
    def overlay(self) -> bool:
        return self.upper is not None

    def overlay_options(self) -> str:
        dirs = {"lowerdir": self.path, "upperdir": self.upper, "workdir": self.work}
        for key, value in dirs.items():
            if value is None or not os.path.isabs(value) or _OVERLAY_BAD & set(value):
                raise InvalidConfig(f"overlay {key} {value!r}: need an absolute plain path")
        return ",".join(f"{key}={value}" for key, value in dirs.items())


def find_tool(name: str) -> str | None:
    """Absolute path of a system tool (the standard dirs first, then PATH)."""
    for directory in _SEARCH_PATH:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which(name)


def can_reach(path: str, uid: int, gid: int) -> bool:
    """Whether uid/gid (no supplementary groups) may search every directory above ``path``.

    Mode bits only: an ACL that denies this uid explicitly is not seen (bwrap then fails
    with a clear message rather than exposing anything).
    """
    for parent in reversed(Path(path).parents):
        st = os.stat(parent)
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


@dataclass(eq=False)
class BwrapPlan:
    """bwrap's argv plus the fds it reads; start it with ``launch.start_bwrap``.

    ``pass_fds`` are for the child only (``O_CLOEXEC`` here; ``subprocess`` keeps them
    open across the exec); ``release_child_fds()`` closes our copies once bwrap is
    running. ``info_fd`` is the read end of the ``--info-fd`` pipe (``launch.read_info``).
    ``staged`` lists (host source, staging path) pairs of the root staging hop.
    ``extra_fds`` given to ``plan_sandbox`` stay the caller's to close; an fd handed
    over with ``adopt_child_fd`` is the plan's (closed by ``release_child_fds``).
    """

    argv: list[str]
    pass_fds: tuple[int, ...]
    info_fd: int
    uid: int
    gid: int
    staged: tuple[tuple[str, str], ...] = ()
    _open: set[int] = field(default_factory=set, repr=False)
    _child_fds: frozenset[int] = field(default_factory=frozenset, repr=False)

    def release_child_fds(self) -> None:
        """Close our copies of the plan-owned fds passed to bwrap (idempotent)."""
        for fd in self.pass_fds:
            self._close_fd(fd)

    def adopt_child_fd(self, fd: int) -> None:
        """Pass ``fd`` to the sandbox too, and let the plan close it once bwrap runs."""
        if fd in self._open:
            return
        self.pass_fds = (*self.pass_fds, fd)
        self._open.add(fd)
        self._child_fds = self._child_fds | {fd}

    def close(self) -> None:
        """Close every fd the plan opened (idempotent)."""
        for fd in sorted(self._open):
            self._close_fd(fd)

    @property
    def closed(self) -> bool:
        return not self._open

    @property
    def startable(self) -> bool:
        """Every fd bwrap needs is still open (not started yet, not closed)."""
        return self._child_fds <= self._open and self.info_fd in self._open

    def _close_fd(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)

    def __enter__(self) -> BwrapPlan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Builder:
    """Collects fds so a failure half-way closes what was opened."""

    def __init__(self) -> None:
        self.fds: set[int] = set()

    def memfd(self, name: str, data: bytes) -> int:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self.fds.add(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def open(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        self.fds.add(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidConfig(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return fd

    def pipe(self) -> tuple[int, int]:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self.fds.update((read_end, write_end))
        return read_end, write_end

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _host_image(args: list[str], builder: _Builder) -> list[int]:
    """The ``host`` image's mounts; returns the fds of /etc files copied in with --file.

    Small regular /etc files are copied into the sandbox's root (bwrap reads an fd we
    opened) rather than bound: a bind costs bwrap a mount plus a mountinfo parse, about
    0.15 ms each, and there are ~20 of them. Only world-readable entries are shown.
    """
    args += ["--ro-bind", "/usr", "/usr"]
    for name in TOP_LINKS:
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--dir", "/etc"]
    fds: list[int] = []
    for name in ETC_FILES:
        path = f"/etc/{name}"
        if name in _NEVER or not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        st = os.stat(real)
        if not st.st_mode & stat.S_IROTH:
            continue
        if stat.S_ISDIR(st.st_mode):
            if st.st_mode & stat.S_IXOTH:
                args += ["--ro-bind", real, path]
        elif stat.S_ISREG(st.st_mode) and st.st_size <= _COPY_LIMIT:
            fd = builder.open(real)
            fds.append(fd)
            args += ["--perms", "0444", "--file", str(fd), path]
    args += ["--symlink", "../proc/self/mounts", "/etc/mtab"]
    return fds


def _check_image_paths(rootfs: str, dests: Sequence[str]) -> None:
    """Refuse an image where a path bwrap creates or mounts on goes through a symlink.

    bwrap follows symlinks in destinations while it sets up, before the new root is its
    ``/`` (the host's root is then at ``/oldroot``), so an image's ``/run -> ...`` would
    send a mount or a ``mkdir`` somewhere else than meant. Refused up front, with a clear
    error, rather than reasoned about. Checked on the image's root as the sandbox starts
    from it (its writable layer is new, so the image alone decides).
    """
    for dest in dests:
        link = _symlink_on_path(rootfs, dest)
        if link is not None:
            raise InvalidConfig(f"the image has a symlink at {link}: corral mounts there")


def _symlink_on_path(rootfs: str, dest: str) -> str | None:
    """The first symlink on the way to ``dest`` inside ``rootfs`` (``dest`` included)."""
    current = rootfs
    for part in Path(dest).parts[1:]:
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return "/" + os.path.relpath(current, rootfs)
    return None


def _image_dns(rootfs: str, args: list[str], builder: _Builder) -> list[int]:
    """With the network on, the host's resolv.conf and hosts replace the image's (as
    docker does); skipped where the image has a symlink. Returns the fds to pass."""
    fds: list[int] = []
    for name in ("resolv.conf", "hosts"):
        path = f"/etc/{name}"
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
        except OSError:
            continue
        usable = stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IROTH
        if usable and st.st_size <= _COPY_LIMIT and _symlink_on_path(rootfs, path) is None:
            fd = builder.open(real)
            fds.append(fd)
            args += ["--perms", "0444", "--file", str(fd), path]
    return fds


def _tmpfs(dest: str, size_mib: int | None) -> list[str]:
    """bwrap arguments for a tmpfs at ``dest``, capped at ``size_mib`` when given."""
    if size_mib is None:
        return ["--tmpfs", dest]
    if isinstance(size_mib, bool) or not isinstance(size_mib, int) or size_mib < 1:
        raise InvalidConfig(f"tmpfs size for {dest} must be a whole number of MiB >= 1")
    return ["--size", str(size_mib << 20), "--tmpfs", dest]


def _check_dest(dest: str) -> str:
    if not dest.startswith("/") or "\0" in dest or ".." in Path(dest).parts:
        raise InvalidConfig(f"sandbox paths must be absolute and plain: {dest!r}")
    return dest


def _host_dir(path: str | os.PathLike[str], what: str) -> str:
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise InvalidConfig(f"{what} {os.fspath(path)!r} is not a directory")
    return real


_STAGE_SCRIPT = 'm=$1 t=$2; shift 2; "$m" -a -T "$t" && exec "$@"'


def _fstab_escape(path: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def _stage(
    binds: list[tuple[str, str, bool]],
    uid: int,
    gid: int,
    builder: _Builder,
    overlay: ImageRoot | None = None,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Rewrite unreachable bind sources to staged paths.

    Returns the argv prefix and the (source, staged path) pairs. The fstab is a memfd of
    ours that ``mount`` reads as ``/proc/<our pid>/fd/N`` (root may), so no extra fd
    goes down the chain into the sandbox (dash cannot close fds above 9). It is closed
    with the plan: keep the plan open until ``read_info`` returned (bwrap only reports
    after the staging is done).

    One process, no fork: ``unshare --mount`` execs ``sh``, which runs ``mount -a`` on a
    generated fstab (a tmpfs on STAGE_DIR, then one bind per source, read-only unless
    the sandbox writes there) and execs the rest of the argv (``setpriv ... bwrap``). So
    bwrap's parent stays the orchestrator's thread and ``--die-with-parent`` keeps
    working (a root bwrap in between would not do: its monitor drops every capability
    and may no longer signal the sandbox uid, so its death would not kill the sandbox).
    """
    unshare, sh, mount = find_tool("unshare"), find_tool("sh"), find_tool("mount")
    if unshare is None or sh is None or mount is None:
        raise Runtime("unshare, sh and mount (util-linux) are needed to start sandboxes as root")
    lines = [f"corral-stage {STAGE_DIR} tmpfs mode=0755,size=64k,nosuid,nodev 0 0"]
    if overlay is not None:  # the image's writable layer, bound at / by bwrap
        options = _fstab_escape(overlay.overlay_options())
        lines.append(f"corral-image {STAGE_DIR}/root overlay {options},X-mount.mkdir 0 0")
    spots: dict[tuple[str, bool], str] = {}
    staged: list[tuple[str, str]] = []
    for index, (src, dest, writable) in enumerate(binds):
        if can_reach(src, uid, gid):
            continue
        # a file is staged through its directory: mount points made here are dirs
        folder, leaf = (src, "") if os.path.isdir(src) else os.path.split(src)
        key = (folder, writable)
        if key not in spots:
            spots[key] = f"{STAGE_DIR}/{len(spots)}"
            options = "bind,X-mount.mkdir" + ("" if writable else ",ro")
            lines.append(f"{_fstab_escape(folder)} {spots[key]} none {options} 0 0")
            staged.append((folder, spots[key]))
        binds[index] = (f"{spots[key]}/{leaf}" if leaf else spots[key], dest, writable)
    fstab = builder.memfd("corral-stage-fstab", ("\n".join(lines) + "\n").encode())
    with contextlib.suppress(FileExistsError):
        os.mkdir(STAGE_DIR, 0o755)
    argv = [unshare, "--mount", "--propagation", "slave", "--", sh, "-c", _STAGE_SCRIPT]
    argv += ["corral-stage", mount, f"/proc/{os.getpid()}/fd/{fstab}"]
    return argv, staged


def plan_sandbox(
    *,
    name: str,
    command: Sequence[str],
    socket_dir: str | os.PathLike[str],
    workdir_host: str | os.PathLike[str],
    uid: int,
    gid: int,
    workdir: str = "/workspace",
    env: Mapping[str, str] | None = None,
    network: bool = False,
    image: str = "host",
    image_root: ImageRoot | None = None,
    chdir: str | None = None,
    runtime: RuntimeView | None = None,
    extra_ro_binds: Mapping[str, str] | None = None,
    extra_binds: Mapping[str, str] | None = None,
    seccomp: bytes | None = None,
    extra_fds: Sequence[int] = (),
    tmp_size_mib: int | None = None,
    shm_size_mib: int | None = None,
    run_size_mib: int | None = None,
) -> BwrapPlan:
    """Plan one sandbox running ``command`` (see the module docstring for the layout).

    ``socket_dir`` and ``workdir_host`` are host directories the sandbox uid can write
    (the caller creates and chowns them); ``extra_*binds`` map host path -> sandbox path;
    ``extra_fds`` are caller-owned fds to pass through to the sandbox command.
    ``image_root`` is required for any ``image`` but ``"host"`` (the driver pulls it);
    ``chdir`` (default ``workdir``) is where the command starts, created if missing in
    an image root. ``*_size_mib`` cap the tmpfs mounts (None: no ``--size``).
    """
    if image != "host" and image_root is None:
        raise Unsupported(f"image {image!r} without its root in the bwrap planner", "")
    if not command:
        raise InvalidConfig("empty sandbox command")
    if not name or len(name) > 64 or "\0" in name:
        raise InvalidConfig(f"bad sandbox hostname {name!r}")
    bwrap = find_tool("bwrap")
    if bwrap is None:
        raise Runtime("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    _check_dest(workdir)

    binds: list[tuple[str, str, bool]] = [
        (_host_dir(socket_dir, "socket dir"), SOCKET_DIR, True),
        (_host_dir(workdir_host, "workdir"), workdir, True),
    ]
    if runtime is not None:
        binds += [(os.path.realpath(src), dest, False) for src, dest in runtime.ro_binds]
    for mapping, writable in ((extra_ro_binds, False), (extra_binds, True)):
        for src, dest in (mapping or {}).items():
            if not os.path.exists(src):
                raise InvalidConfig(f"bind source {src!r} does not exist")
            binds.append((os.path.realpath(src), dest, writable))
    for _, dest, _ in binds:
        _check_dest(dest)

    root = os.geteuid() == 0
    if root and uid == 0:
        raise InvalidConfig("refusing to run a sandbox as host root (uid 0)")
    overlay = image_root if image_root is not None and image_root.overlay else None
    if overlay is not None:
        overlay.overlay_options()
        if not root:
            raise InvalidConfig("an overlay image layer needs root; use a copy of the rootfs")
    elif image_root is not None:  # the sandbox's own copy, bound first (staged if need be)
        binds.insert(0, (_host_dir(image_root.path, "image root"), "/", True))
    stage = root and (
        overlay is not None or any(not can_reach(src, uid, gid) for src, _, _ in binds)
    )

    environ = {"PATH": DEFAULT_PATH, "HOME": workdir, "LANG": DEFAULT_LANG, **(env or {})}
    builder = _Builder()
    try:
        seccomp_fd = builder.memfd("corral-seccomp", build_filter() if seccomp is None else seccomp)
        info_read, info_write = builder.pipe()
        empty_files = runtime.empty_files if runtime else ()
        file_fds = [builder.memfd("corral-file", b"") for _ in empty_files]

        outer: list[str] = []
        staged: list[tuple[str, str]] = []
        child_fds = [seccomp_fd, info_write, *file_fds]
        if stage:
            outer, staged = _stage(binds, uid, gid, builder, overlay)
        if root:
            setpriv = find_tool("setpriv")
            if setpriv is None:
                raise Runtime("setpriv (util-linux) is needed to start sandboxes as root")
            outer += [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
            outer += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]

        args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
        args += ["--cap-drop", "ALL", "--die-with-parent", "--new-session"]
        if network:
            args.append("--share-net")
        args += ["--hostname", name, "--uid", str(uid), "--gid", str(gid)]
        args += ["--seccomp", str(seccomp_fd), "--info-fd", str(info_write)]
        if image_root is None:
            child_fds += _host_image(args, builder)
        elif overlay is not None:
            args += ["--bind", f"{STAGE_DIR}/root", "/"]
        else:
            args += ["--bind", binds.pop(0)[0], "/"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += _tmpfs("/dev/shm", shm_size_mib)
        args += _tmpfs("/tmp", tmp_size_mib) + _tmpfs("/run", run_size_mib)
        if image_root is None:
            args += ["--dir", "/var", "--symlink", "../tmp", "/var/tmp"]
        for src, dest, writable in binds:
            args += ["--bind" if writable else "--ro-bind", src, dest]
        for fd, dest in zip(file_fds, empty_files, strict=True):
            args += ["--perms", "0444", "--file", str(fd), _check_dest(dest)]
        start = workdir if chdir is None else _check_dest(chdir)
        if image_root is not None:
            mounts = ["/proc", "/dev", "/tmp", "/run", start, *empty_files]
            _check_image_paths(image_root.path, mounts + [dest for _, dest, _ in binds])
            if network:
                child_fds += _image_dns(image_root.path, args, builder)
            if start != workdir:
                args += ["--dir", start]
        args += ["--remount-ro", "/dev"]  # its tmpfs has no size: see the module docstring
        if image_root is None or not image_root.writable:
            args += ["--remount-ro", "/"]
        args += ["--clearenv"]
        for key, value in environ.items():
            if not key or "=" in key or "\0" in key + value:
                raise InvalidConfig(f"bad environment variable {key!r}")
            args += ["--setenv", key, value]
        args += ["--chdir", start, "--", *command]

        plan = BwrapPlan(
            argv=outer + args,
            pass_fds=(*child_fds, *extra_fds),
            info_fd=info_read,
            uid=uid,
            gid=gid,
            staged=tuple(staged),
            _open=set(builder.fds),
            _child_fds=frozenset(child_fds),
        )
    except BaseException:
        builder.close()
        raise
    return plan

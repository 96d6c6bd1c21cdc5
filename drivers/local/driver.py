"""The local driver: each sandbox is a hardened bubblewrap sandbox running ``agentd``.

Per sandbox, under ``<home>/sandboxes/<name>/``: ``run/`` (the agent's socket dir,
bound at ``/run/agent``), ``work/`` (the writable workdir) and ``agent.log`` (the
agent's own stdout/stderr). The agent signals readiness on a pipe, so spawn never
polls for the socket. Killing is by the sandbox's pid-namespace init: when it dies,
the kernel kills every process of the sandbox; ``--die-with-parent`` does the same if
the orchestrator dies.

Images other than ``host`` are OCI references, pulled once into ``<home>/images``
(:class:`~.images.ImageStore`, single-flight) and shown at ``/`` under a writable layer
of the sandbox's own, ``layer/`` in its directory: an overlay (``image_layer="overlay"``,
needs root) or a copy of the rootfs (``"copy"``); ``"auto"`` (the default, or
``$CORRAL_IMAGE_LAYER``) picks the overlay as root. The image config's ``Env`` is the
base of the sandbox environment and its ``WorkingDir`` the start directory when the
caller kept the default workdir. ``image`` in the sandbox dir names the manifest digest
in use, so ``corral image rm`` keeps that rootfs.

**Defaults and restarts.** Limits a spec leaves None take the backend's defaults
(``LocalBackend.default_cpus``, ``default_memory_mib``, ``default_pids_limit`` (with
cgroups only: an rlimit would count every process of the sandbox uid on the host) and
``default_tmp_size_mib``; see :meth:`LocalDriver.with_defaults`). ``sandbox-id`` in the
sandbox dir holds the ``state_id`` of the sandbox it belongs to: a spawn for that same
sandbox (a restart) keeps ``work/``, ``logs/``, ``agent.log`` and the image layer (when
the image is still the same digest); any other spawn starts from an empty dir. ``run/``
is always new. After the agent is ready, the host makes the sandbox's own processes the
OOM killer's last choice (:mod:`.hardening`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import posixpath
import resource
import shutil
import signal
from pathlib import Path

import trio

from ...backend import LocalBackend
from ...errors import Runtime
from ..base import DEFAULT_WORKDIR, Driver, ExitStatus, ProcessIds, SandboxProcess, SandboxSpec
from . import cgroup as cgroups
from . import hardening, launch
from .attach import HeldProcess, attach_local, open_keeper
from .bwrap import SOCKET_DIR, BwrapPlan, ImageRoot, find_tool, plan_sandbox
from .hostname import set_hostname
from .images import HOST_IMAGE, Image, ImageStore
from .images.rootfs import force_rmtree
from .keeper import process_start
from .metrics import MetricsSampler, SandboxMetrics
from .runtime import RuntimeView, agent_runtime, image_agent_runtime, precompile_agent

log = logging.getLogger(__name__)

READY_TIMEOUT = 15.0
AGENT_SOCKET = f"{SOCKET_DIR}/agent.sock"
READY_FD_ENV = "CORRAL_READY_FD"
IMAGE_LAYER_ENV = "CORRAL_IMAGE_LAYER"
IMAGE_LAYERS = ("auto", "overlay", "copy")
ID_FILE = "sandbox-id"
"""In the sandbox dir: the ``state_id`` of the sandbox it holds (see the module docstring)."""


class LocalSandbox(SandboxProcess):
    """One running bubblewrap sandbox."""

    def __init__(
        self,
        spec: SandboxSpec,
        root: Path,
        process: trio.Process | HeldProcess,
        plan: BwrapPlan,
        cgroup: cgroups.SandboxCgroup | None,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.root = root
        self.pid = process.pid
        self.init_pid: int | None = None
        self.cgroup = cgroup
        self._process = process
        self._plan = plan
        self._sampler: MetricsSampler | None = None
        self._cleaned = False

    def process_ids(self) -> ProcessIds:
        held = self._process if isinstance(self._process, HeldProcess) else None
        return ProcessIds(
            pid=self.pid,
            pid_start=process_start(self.pid),
            init_pid=self.init_pid,
            init_start=process_start(self.init_pid),
            keeper_pid=None if held is None else held.keeper_pid,
            keeper_start=None if held is None else held.keeper_start,
        )

    def limit_report(self) -> str | None:
        """Why the kernel killed something in this sandbox (OOM, pids limit), if it did."""
        return None if self.cgroup is None else self.cgroup.limit_report()

    async def metrics(self) -> SandboxMetrics:
        if self._sampler is None:
            limit = self.spec.memory_mib
            self._sampler = MetricsSampler(
                cgroup=self.cgroup,
                init_pid=self.init_pid,
                memory_limit_bytes=None if limit is None else limit << 20,
            )
        await trio.lowlevel.checkpoint()
        return self._sampler.sample()

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "agent.sock"

    async def connect(self) -> trio.abc.Stream:
        # Connect through an O_PATH fd of the socket dir: the full path may exceed the
        # 108-byte AF_UNIX limit (long homes, 128-character names).
        try:
            fd = os.open(self.root / "run", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise Runtime(f"sandbox {self.name!r}: its socket dir is gone: {exc}") from exc
        try:
            return await trio.open_unix_socket(f"/proc/self/fd/{fd}/agent.sock")
        except OSError as exc:
            raise Runtime(f"sandbox {self.name!r}: cannot reach its agent: {exc}") from exc
        finally:
            os.close(fd)

    def _signal_all(self, sig: int) -> None:
        if self.init_pid is None:
            return
        for pid in launch.sandbox_pids(self.init_pid):
            _kill(pid, sig)

    async def terminate(self) -> None:
        self._signal_all(signal.SIGTERM)

    async def kill(self) -> None:
        # The init of the sandbox's pid namespace takes every process with it, and the
        # outer bwrap then reaps it and exits by itself (killing bwrap too would orphan
        # the init as a zombie). Without a known init, kill bwrap.
        target = self.init_pid if self.init_pid is not None else self._process.pid
        if self._process.returncode is None:
            _kill(target, signal.SIGKILL)

    @property
    def exit_status(self) -> ExitStatus | None:
        code = self._process.poll()
        return None if code is None else _status(code)

    async def wait(self) -> ExitStatus:
        return _status(await self._process.wait())

    async def cleanup(self) -> None:
        if self._cleaned:
            return
        with trio.CancelScope(shield=True):
            if self._process.returncode is None:
                await self.kill()
                with trio.move_on_after(2.0):
                    await self._process.wait()
            if self._process.returncode is None:
                _kill(self._process.pid, signal.SIGKILL)
                with trio.move_on_after(3.0):
                    await self._process.wait()
            if self.cgroup is not None:
                self.exit_reason = self.cgroup.limit_report()
                await self.cgroup.kill_all()
                await self.cgroup.remove()
            self._plan.close()
            shutil.rmtree(self.root / "run", ignore_errors=True)
        self._cleaned = True


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise


def _read(path: Path) -> str | None:
    """A small marker file's text, stripped (None when missing)."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _write_id(root: Path, state_id: str) -> None:
    """Mark ``root`` as the directory of the sandbox with this ``state_id``."""
    path = root / ID_FILE
    if state_id:
        path.write_text(state_id + "\n")
    else:
        path.unlink(missing_ok=True)


def _status(code: int) -> ExitStatus:
    return ExitStatus(None, -code) if code < 0 else ExitStatus(code, None)


class LocalDriver(Driver):
    """Starts bubblewrap sandboxes on this host."""

    kind = "local"

    def __init__(
        self,
        backend: LocalBackend | None = None,
        *,
        image_layer: str | None = None,
        image_writable: bool = True,
        images: ImageStore | None = None,
    ) -> None:
        self.backend = backend or LocalBackend()
        layer = image_layer or os.environ.get(IMAGE_LAYER_ENV) or "auto"
        if layer not in IMAGE_LAYERS:
            raise Runtime(f"image layer {layer!r}: want one of {', '.join(IMAGE_LAYERS)}")
        if layer == "auto":
            layer = "overlay" if os.geteuid() == 0 else "copy"
        self.image_layer = layer
        self.image_writable = image_writable
        self._images = images
        reason = launch.bwrap_available()
        if reason is not None:
            raise Runtime(f"the local driver cannot start sandboxes here: {reason}")
        self.uid, self.gid = launch.sandbox_credentials()
        precompile_agent()
        hardening.raise_fd_limit()
        self.cgroups = cgroups.detect()
        if self.cgroups is not None:
            cgroups.reap_stale(layout=self.cgroups)
        else:
            log.info("corral: no per-sandbox cgroups: %s", cgroups.why_unavailable())

    def sandbox_dir(self, name: str) -> Path:
        path: Path = self.backend.sandboxes_dir / name
        return path

    @property
    def images(self) -> ImageStore:
        """The image store under the backend's ``images_dir`` (made on first use)."""
        if self._images is None:
            self._images = ImageStore(self.backend.images_dir, owner=(self.uid, self.gid))
        return self._images

    async def _image_root(self, root: Path, image: Image, *, fresh: bool) -> ImageRoot:
        """The sandbox's writable layer over ``image`` (see the module docstring); a
        restart keeps the one it has when the image is the same digest."""
        layer = root / "layer"
        marker = root / "image"
        digest = image.record.digest
        upper, work, copy = layer / "upper", layer / "work", layer / "rootfs"
        overlay = self.image_layer == "overlay"
        if not fresh and _read(marker) == digest:
            if overlay and upper.is_dir() and work.is_dir():
                return ImageRoot(
                    path=str(image.rootfs),
                    upper=str(upper),
                    work=str(work),
                    writable=self.image_writable,
                )
            if not overlay and copy.is_dir():
                return ImageRoot(path=str(copy), writable=self.image_writable)
        if layer.exists():
            force_rmtree(layer)
        marker.write_text(digest + "\n")
        layer.mkdir(mode=0o700)
        mode = os.stat(image.rootfs).st_mode & 0o7777
        if overlay:
            upper.mkdir(mode=mode)
            work.mkdir(mode=0o700)
            os.chmod(upper, mode)  # the overlay's / takes the upper dir's owner and mode
            if os.geteuid() == 0:
                os.chown(upper, self.uid, self.gid)
            return ImageRoot(
                path=str(image.rootfs),
                upper=str(upper),
                work=str(work),
                writable=self.image_writable,
            )
        argv = [find_tool("cp") or "cp", "-a", "--reflink=auto", "--", str(image.rootfs), str(copy)]
        result = await trio.run_process(argv, capture_stderr=True, check=False)
        if result.returncode != 0:
            raise Runtime(f"copying the image rootfs failed: {result.stderr.decode()[-500:]}")
        return ImageRoot(path=str(copy), writable=self.image_writable)

    def with_defaults(self, spec: SandboxSpec) -> SandboxSpec:
        """``spec`` with the backend's defaults for the limits it leaves None (the
        default cpus capped at the CPUs this process may use)."""
        backend = self.backend
        cpus = spec.cpus
        if cpus is None:
            cpus = min(backend.default_cpus, len(os.sched_getaffinity(0)))
        pids = spec.pids_limit
        if pids is None and self.cgroups is not None:
            pids = backend.default_pids_limit
        return dataclasses.replace(
            spec,
            cpus=cpus,
            memory_mib=backend.default_memory_mib if spec.memory_mib is None else spec.memory_mib,
            pids_limit=pids,
            tmp_size_mib=(
                backend.default_tmp_size_mib if spec.tmp_size_mib is None else spec.tmp_size_mib
            ),
        )

    async def spawn(self, spec: SandboxSpec) -> SandboxProcess:
        """Start ``spec`` with the backend's defaults; an OSError (out of fds...) is a
        :class:`~corral.errors.Runtime` naming the sandbox."""
        spec = self.with_defaults(spec)
        try:
            return await self._spawn(spec)
        except OSError as exc:
            hint = ""
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                hint = (
                    f" (open-files limit {soft}, hard {hard}: a sandbox holds about 4 fds "
                    "of the orchestrator; raise the hard limit, e.g. ulimit -Hn)"
                )
            raise Runtime(f"cannot start sandbox {spec.name!r}: {exc}{hint}") from exc

    async def _spawn(self, spec: SandboxSpec) -> SandboxProcess:
        cgroups.validate_limits(spec.cpus, spec.memory_mib, spec.pids_limit)
        root = self.sandbox_dir(spec.name)
        fresh = self._prepare_dirs(root, spec.state_id)
        cgroup: cgroups.SandboxCgroup | None = None
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        env = dict(spec.env)
        env[READY_FD_ENV] = str(ready_w)
        process: trio.Process | HeldProcess | None = None
        plan: BwrapPlan | None = None
        try:
            runtime: RuntimeView
            image_root: ImageRoot | None = None
            chdir: str | None = None
            if spec.image == HOST_IMAGE:
                runtime = agent_runtime()
            else:
                image = await self.images.ensure(spec.image)
                image_root = await self._image_root(root, image, fresh=fresh)
                runtime = image_agent_runtime()
                env = {**image.defaults.env_map(), **env}
                if spec.workdir == DEFAULT_WORKDIR and image.defaults.workdir:
                    chdir = posixpath.normpath(posixpath.join("/", image.defaults.workdir))
            plan = plan_sandbox(
                name=spec.name[:64],
                command=runtime.argv,
                socket_dir=root / "run",
                workdir_host=root / "work",
                uid=self.uid,
                gid=self.gid,
                workdir=spec.workdir,
                env=env,
                network=spec.network,
                image=spec.image,
                image_root=image_root,
                chdir=chdir,
                runtime=runtime,
                tmp_size_mib=spec.tmp_size_mib,
                shm_size_mib=self.backend.shm_size_mib,
                run_size_mib=self.backend.run_size_mib,
            )
            # The plan owns the ready pipe's write end from here: it is closed with the
            # other child-side fds once bwrap runs.
            plan.adopt_child_fd(ready_w)
            ready_w = -1
            if spec.detached:  # a keeper holds it (.keeper); it gets the argv below
                process = open_keeper(plan, spec=spec, root=root, db_path=self.backend.db_path)
            if self.cgroups is not None:
                cgroup = cgroups.SandboxCgroup.create(
                    spec.name,
                    cpus=spec.cpus,
                    memory_mib=spec.memory_mib,
                    pids_limit=spec.pids_limit,
                    layout=self.cgroups,
                    owner_pid=process.keeper_pid if isinstance(process, HeldProcess) else None,
                )
                plan.argv = cgroup.wrap_argv(plan.argv)
            else:
                limits = (spec.memory_mib, spec.pids_limit)
                plan.argv = cgroups.rlimit_prefix(*limits, cpus=spec.cpus) + plan.argv
            plan.argv = hardening.nofile_prefix() + plan.argv
            log = os.open(root / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                if isinstance(process, HeldProcess):
                    await process.hand_over(plan.argv, cgroup)
                else:
                    process = await launch.start_bwrap(plan, stdout=log, stderr=log)
            finally:
                os.close(log)
            sandbox = LocalSandbox(spec, root, process, plan, cgroup)
            await self._wait_ready(sandbox, ready_r)
            sandbox.init_pid = await launch.read_info(plan.info_fd)
            if cgroup is not None:  # bounded by its memory cgroup: see hardening.py
                agent = hardening.agent_pid(sandbox.init_pid)
                hardening.protect([process.pid, sandbox.init_pid, agent])
            if spec.detached:
                plan.close()  # what is left is ours alone; the sandbox may outlive us
            return sandbox
        except BaseException:
            with trio.CancelScope(shield=True):
                if process is not None and process.returncode is None:
                    process.kill()
                    with trio.move_on_after(5.0):
                        await process.wait()
                if cgroup is not None:
                    await cgroup.kill_all()
                    await cgroup.remove()
                if plan is not None:
                    plan.close()
                if fresh:
                    shutil.rmtree(root, ignore_errors=True)
                else:  # a failed restart keeps the sandbox's disk
                    shutil.rmtree(root / "run", ignore_errors=True)
            raise
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)

    async def _wait_ready(self, sandbox: LocalSandbox, ready_fd: int) -> None:
        stream = trio.lowlevel.FdStream(os.dup(ready_fd))
        async with stream:
            with trio.move_on_after(READY_TIMEOUT):
                data = await stream.receive_some(1)
                if data == b"R":
                    return
                raise Runtime(
                    f"sandbox {sandbox.name!r} failed to start: {self._log_tail(sandbox.root)}"
                )
        raise Runtime(f"sandbox {sandbox.name!r}: agent not ready within {READY_TIMEOUT:g}s")

    @staticmethod
    def _log_tail(root: Path) -> str:
        try:
            text = (root / "agent.log").read_bytes()[-2000:].decode(errors="replace").strip()
        except OSError:
            text = ""
        return text or "the sandbox exited before its agent was ready"

    def _prepare_dirs(self, root: Path, state_id: str) -> bool:
        """A new ``run/``, and an empty sandbox dir unless this is a restart of the
        sandbox it holds (then ``work/`` and the rest stay). True when new."""
        self.backend.ensure_dirs()
        fresh = not state_id or _read(root / ID_FILE) != state_id
        if fresh:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(mode=0o755)
        else:
            shutil.rmtree(root / "run", ignore_errors=True)
        for sub in ("run", "work"):
            path = root / sub
            if sub == "work" and not fresh and path.is_dir() and not path.is_symlink():
                continue
            path.mkdir(mode=0o700)
            if os.geteuid() == 0:
                os.chown(path, self.uid, self.gid)
        if fresh:
            _write_id(root, state_id)
        return fresh

    def rename(self, proc: SandboxProcess, spec: SandboxSpec) -> None:
        """A warm pool's sandbox becomes ``spec.name``: its directory is renamed (the
        sandbox's mounts and open files follow the inodes) and, as root, its hostname
        set (:mod:`.hostname`). Its cgroup keeps the internal name."""
        if not isinstance(proc, LocalSandbox):
            raise Runtime(f"cannot rename {proc!r}: not a local sandbox")
        root = self.sandbox_dir(spec.name)
        try:
            os.rename(proc.root, root)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise Runtime(f"renaming sandbox {proc.name!r}: {exc}") from exc
            with contextlib.suppress(OSError):  # a leftover dir of a removed sandbox
                force_rmtree(root / "layer")
            shutil.rmtree(root, ignore_errors=True)
            try:
                os.rename(proc.root, root)
            except OSError as again:
                raise Runtime(f"renaming sandbox {proc.name!r}: {again}") from again
        proc.root = root
        _write_id(root, spec.state_id)  # its restarts keep its disk (ID_FILE)
        proc.name = spec.name
        proc.spec = dataclasses.replace(proc.spec, name=spec.name)
        set_hostname(proc.init_pid, spec.name)

    async def attach(self, spec: SandboxSpec, ids: ProcessIds) -> SandboxProcess:
        """A running sandbox of the state db (another process's, or a detached one)."""
        return await attach_local(spec, self.sandbox_dir(spec.name), ids, self.backend.db_path)

    async def remove(self, name: str) -> None:
        with contextlib.suppress(OSError):  # a copied rootfs may hold read-only dirs
            force_rmtree(self.sandbox_dir(name) / "layer")
        shutil.rmtree(self.sandbox_dir(name), ignore_errors=True)

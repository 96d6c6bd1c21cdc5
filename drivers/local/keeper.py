"""The keeper of one detached local sandbox: ``python -I -S keeper.py`` (stdlib only).

``LocalDriver.spawn`` starts a keeper for a ``detached=True`` sandbox, in a session of
its own, passing it the bwrap plan's fds. The keeper starts bwrap itself, so bwrap's
``--die-with-parent`` ties the sandbox to the keeper, not to the process that created
it: the creator may exit, the sandbox stays. Any process can then find the sandbox in
the state db, attach to its agent socket, stop it and remove it.

Protocol with the creator:

1. stdin: one ``marshal``-ed dict, then EOF: ``argv`` (bwrap's, cgroup-wrapped,
   ``argv[0]`` absolute), ``pass_fds``, ``env``, ``log`` (the sandbox's ``agent.log``),
   ``db``, ``name``, ``id`` (the record id), ``root`` (the sandbox dir), ``cgroup_dirs``,
   ``max_duration``, ``ephemeral``, ``stop_timeout``, ``kill_timeout``.
2. The keeper starts bwrap (stdout/stderr to the log, as its own stderr), writes
   ``"<bwrap pid> <its start time>\\n"`` to stdout and closes it, then writes its own pid
   and bwrap's, with their start times, into the record.
3. It waits for bwrap. A SIGTERM to the keeper, or ``max_duration``, stops the sandbox:
   the record is marked stop-requested, every process of the sandbox gets SIGTERM (the
   agent shuts down gracefully), the sandbox's init SIGKILL after ``stop_timeout``, bwrap
   SIGKILL after ``kill_timeout`` more.
4. Once bwrap has exited: what is left in the sandbox's cgroup is killed and the cgroup
   removed, the socket dir removed, and the end recorded (``stopped`` if a stop was
   requested, else ``crashed``, with the exit code or signal). An ephemeral sandbox's
   record and directory are deleted instead (when it was stopped, or its restart policy
   is ``temporary``: nobody restarts it). The keeper exits with bwrap's status (its exit
   code, or 128 + the signal).

Every db write names the record id and this keeper's pid, so a keeper never touches a
newer sandbox of the same name. The SQL follows ``corral.actors.registry``'s schema.

Lean on purpose (it runs once per detached sandbox and its start-up is on the create
path): builtin modules only until bwrap runs (``marshal``, ``posix_spawn``); sqlite3,
json and shutil load afterwards. Also imported for ``process_start`` and ``read_exit``.
"""

from __future__ import annotations

import marshal
import os
import select
import sys
import time

# ``typing`` would cost ~8 ms and ``signal`` ~5 ms (it loads ``enum``): annotations are not
# evaluated at run time, and the builtin ``_signal`` has the same functions and constants.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    import sqlite3
    from typing import Any
else:
    import _signal as signal

__all__ = ["process_start", "read_exit", "sandbox_tree"]

BUSY_TIMEOUT = 5.0


def process_start(pid: int | None) -> int | None:
    """Start time of ``pid`` (``/proc/PID/stat`` field 22); None if gone or a zombie."""
    if pid is None or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return found


def sandbox_tree(top: int) -> list[int]:
    """``top``'s live descendants, parents first (``top`` itself left out)."""
    found: list[int] = []
    todo = _children(top)
    while todo:
        pid = todo.pop(0)
        if pid in found or process_start(pid) is None:
            continue
        found.append(pid)
        todo.extend(_children(pid))
    return found


def _connect(db: str) -> sqlite3.Connection:
    import sqlite3

    return sqlite3.connect(db, timeout=BUSY_TIMEOUT, isolation_level=None)


def read_exit(db: str | os.PathLike[str], name: str, id: str) -> tuple[int | None, int | None]:
    """(exit_code, exit_signal) recorded for the record ``name``/``id``; (None, None) when
    there is none (yet, or the record is gone)."""
    import sqlite3

    try:
        con = _connect(os.fspath(db))
        try:
            row = con.execute(
                "SELECT exit_code, exit_signal FROM sandbox WHERE name = ? AND id = ?", (name, id)
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None, None
    return (None, None) if row is None else (row[0], row[1])


def _now_us() -> int:
    return time.time_ns() // 1000


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except OSError:
        pass


class Keeper:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.name: str = config["name"]
        self.id: str = config["id"]
        self.root: str = config["root"]
        self.pid = os.getpid()
        self.bwrap = 0
        self.code: int | None = None
        self.stop_asked = False

    # -- the db
    def _write(self, sql: str, *args: Any) -> int:
        import sqlite3

        try:
            con = _connect(self.config["db"])
            try:
                return con.execute(sql, args).rowcount
            finally:
                con.close()
        except sqlite3.Error as exc:
            print(f"corral-keeper: state db: {exc}", file=sys.stderr)
            return 0

    def record_start(self, bwrap_start: int | None) -> None:
        self._write(
            "UPDATE sandbox SET keeper_pid = ?, keeper_start = ?, pid = ?, pid_start = ?, "
            "updated_at = ? WHERE name = ? AND id = ?",
            self.pid,
            process_start(self.pid),
            self.bwrap,
            bwrap_start,
            _now_us(),
            self.name,
            self.id,
        )

    def record_stop_request(self, reason: str) -> None:
        self._write(
            "UPDATE sandbox SET stop_requested = 1, last_error = COALESCE(last_error, ?), "
            "status = CASE WHEN status = 'running' THEN 'draining' ELSE status END, "
            "updated_at = ? WHERE name = ? AND id = ? AND keeper_pid = ?",
            reason,
            _now_us(),
            self.name,
            self.id,
            self.pid,
        )

    def record_end(self, code: int) -> None:
        exit_code, exit_signal = (None, -code) if code < 0 else (code, None)
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        if self.config.get("ephemeral") and self._nobody_restarts():
            self._write(
                "DELETE FROM sandbox WHERE name = ? AND id = ? AND keeper_pid = ?",
                self.name,
                self.id,
                self.pid,
            )
            import shutil

            shutil.rmtree(self.root, ignore_errors=True)
            return
        now = _now_us()
        self._write(
            "UPDATE sandbox SET "
            "status = CASE WHEN stop_requested THEN 'stopped' ELSE 'crashed' END, "
            "last_error = CASE WHEN stop_requested THEN last_error "
            "ELSE COALESCE(last_error, ?) END, "
            "exit_code = ?, exit_signal = ?, stopped_at = ?, updated_at = ? "
            "WHERE name = ? AND id = ? AND keeper_pid = ?",
            f"its process {how}",
            exit_code,
            exit_signal,
            now,
            now,
            self.name,
            self.id,
            self.pid,
        )

    def _nobody_restarts(self) -> bool:
        import json
        import sqlite3

        try:
            con = _connect(self.config["db"])
            try:
                row = con.execute(
                    "SELECT stop_requested, policy FROM sandbox WHERE name = ? AND id = ?",
                    (self.name, self.id),
                ).fetchone()
            finally:
                con.close()
        except sqlite3.Error:
            return True
        if row is None or row[0]:
            return True
        try:
            return bool(json.loads(row[1]).get("restart", "temporary") == "temporary")
        except (ValueError, AttributeError):
            return True

    # -- the sandbox
    def start(self) -> int:
        """posix_spawn bwrap: it inherits exactly stdio and ``pass_fds`` (every other fd
        here is close-on-exec)."""
        config = self.config
        log = os.open(config["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 2)
        argv = list(config["argv"])
        self.bwrap = os.posix_spawn(
            argv[0],
            argv,
            config["env"],
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log, 1),
                (os.POSIX_SPAWN_DUP2, log, 2),
            ],
        )
        os.close(log)
        for fd in config["pass_fds"]:
            _quietly(os.close, int(fd))
        return self.bwrap

    def _poll(self) -> int | None:
        if self.code is None:
            try:
                pid, status = os.waitpid(self.bwrap, os.WNOHANG)
            except ChildProcessError:
                return self.code
            if pid == self.bwrap:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def _signal_init(self, sig: int) -> None:
        tree = sandbox_tree(self.bwrap)
        for pid in tree if sig == signal.SIGTERM else tree[:1]:
            _quietly(os.kill, pid, sig)

    def wait(self) -> int:
        """Wait for bwrap, stopping the sandbox on SIGTERM or at ``max_duration``."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        poller = select.poll()
        pidfd = os.pidfd_open(self.bwrap)
        poller.register(pidfd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        max_duration = self.config.get("max_duration")
        deadline = None if max_duration is None else time.monotonic() + float(max_duration)
        phase = "running"
        while self._poll() is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            poller.poll(None if left is None else int(left * 1000) + 1)
            _quietly(os.read, wake_r, 512)
            if self._poll() is not None:
                break
            now = time.monotonic()
            if phase == "running" and self.stop_asked:
                deadline = self._begin_stop("its keeper was asked to stop it (SIGTERM)")
                phase = "stopping"
            elif deadline is not None and now >= deadline:
                if phase == "running":
                    deadline = self._begin_stop(f"ran for {max_duration:g}s (max_duration)")
                    phase = "stopping"
                elif phase == "stopping":
                    self._signal_init(signal.SIGKILL)
                    deadline = now + float(self.config.get("kill_timeout", 5.0))
                    phase = "killing"
                else:
                    _quietly(os.kill, self.bwrap, signal.SIGKILL)
                    deadline = None
        os.close(pidfd)
        assert self.code is not None
        return self.code

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stop_asked = True

    def _begin_stop(self, reason: str) -> float:
        self.record_stop_request(reason)
        self._signal_init(signal.SIGTERM)
        return time.monotonic() + float(self.config.get("stop_timeout", 10.0))

    def clean_up(self) -> None:
        dirs: list[str] = list(self.config.get("cgroup_dirs", []))
        give_up = time.monotonic() + 5.0
        while dirs and time.monotonic() < give_up:
            for d in dirs:
                kill = os.path.join(d, "cgroup.kill")
                if os.path.exists(kill):
                    _quietly(_write_file, kill, "1")
                    continue
                try:
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        pids = f.read().split()
                except OSError:
                    pids = []
                for pid in pids:
                    _quietly(os.kill, int(pid), signal.SIGKILL)
            left = []
            for d in dirs:
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError:
                    left.append(d)
            dirs = left
            if dirs:
                time.sleep(0.01)
        for d in self.config.get("cgroup_dirs", []):
            _quietly(os.rmdir, os.path.dirname(d))  # only when empty: others keep it
        import shutil

        shutil.rmtree(os.path.join(self.root, "run"), ignore_errors=True)


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def main() -> int:
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    config = marshal.loads(sys.stdin.buffer.read())
    keeper = Keeper(config)
    bwrap = keeper.start()
    start = process_start(bwrap)
    _quietly(os.write, 1, f"{bwrap} {-1 if start is None else start}\n".encode())
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    keeper.record_start(start)
    code = keeper.wait()
    keeper.clean_up()
    keeper.record_end(code)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())

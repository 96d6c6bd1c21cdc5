"""The benchmark runner.

``python -m corral.bench [--quick] [--only NAME,...] [--big] [--out PATH]``

Runs each benchmark family in turn, prints the table and writes it as Markdown (with the
date, the machine and the exact command). Every family cleans up what it started; after
each one the runner checks /proc that nothing it started is left (and ends what is).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import trio

from corral.testing import processes_matching

from .ask import run_ask
from .cloud import run_cloud
from .context import Context
from .execs import run_exec, run_fanout, run_reference
from .memory import run_memory
from .procs import wait_no_leftovers
from .report import Row, Unit, markdown, table
from .spawn import run_create, run_pool
from .stream import run_stream

__all__ = ["FAMILIES", "DEFAULT_OUT", "main", "parse_args"]

Family = Callable[[Context], Awaitable[None]]

FAMILIES: dict[str, Family] = {
    "create": run_create,
    "pool": run_pool,
    "exec": run_exec,
    "ask": run_ask,
    "fanout": run_fanout,
    "stream": run_stream,
    "memory": run_memory,
    "reference": run_reference,
    "cloud": run_cloud,
}
DEFAULT_OUT = Path(__file__).with_name("RESULTS.md")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m corral.bench",
        description="corral's benchmarks: ratios against baselines measured in the same run.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples, smaller sizes (< 60 s)"
    )
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME...]",
        help=f"run only these families: {', '.join(FAMILIES)}",
    )
    parser.add_argument("--big", action="store_true", help="also measure 1,000 live sandboxes")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="Markdown results file (default: bench/RESULTS.md)",
    )
    args = parser.parse_args(argv)
    names = list(FAMILIES)
    if args.only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in FAMILIES]
        if unknown:
            parser.error(
                f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(FAMILIES)}"
            )
    args.families = names
    return args


def _raise_fd_limit() -> None:
    """Many live sandboxes hold several fds each: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _revision() -> str:
    """The code measured: git HEAD of the package's checkout, and whether it is dirty."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    changed = len(status.splitlines())
    return f"git {head}" + (f" + uncommitted changes in {changed} files" if changed else "")


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and the children it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return "unknown"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _run(ctx: Context, names: Sequence[str], problems: list[str]) -> None:
    for name in names:
        _say(f"== {name} ...")
        start = time.perf_counter()
        shown = len(ctx.rows)
        try:
            await FAMILIES[name](ctx)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            ctx.emit(
                Row(
                    name,
                    f"{name} (failed)",
                    Unit.SECONDS,
                    skipped=f"failed: {type(exc).__name__}: {exc}"[:200],
                )
            )
            problems.append(f"{name} failed: {type(exc).__name__}: {exc}")
        for row in ctx.rows[shown:]:
            _say("   " + " | ".join(cell for cell in row.cells() if cell))
        left = await wait_no_leftovers(str(ctx.root))
        if left:
            # End only what names this run's dir (surely ours); report the rest.
            ours = set(processes_matching(str(ctx.root)))
            problems.append(
                f"{name} left processes behind: {left} (killed: {sorted(ours) or 'none'})"
            )
            for pid in ours:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _say(f"   ({time.perf_counter() - start:.1f} s)")


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, possibly wrapped in trio's exception groups (nothing else in them)."""
    if isinstance(exc, BaseExceptionGroup):
        _match, rest = exc.split(lambda e: isinstance(e, KeyboardInterrupt | trio.Cancelled))
        return rest is None
    return isinstance(exc, KeyboardInterrupt)


async def _main(ctx: Context, names: Sequence[str], problems: list[str]) -> bool:
    """Run the families; SIGTERM cancels them like Ctrl-C would. True if interrupted."""
    interrupted = False

    async def on_sigterm(
        scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        nonlocal interrupted
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                interrupted = True
                scope.cancel()

    async with trio.open_nursery() as nursery:
        if threading.current_thread() is threading.main_thread():  # signals need it
            await nursery.start(on_sigterm, nursery.cancel_scope)
        await _run(ctx, names, problems)
        nursery.cancel_scope.cancel()
    return interrupted


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "corral.bench", *argv])
    _raise_fd_limit()
    started = datetime.now(UTC)
    load_start = _loadavg()
    root = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    os.chmod(root, 0o755)
    ctx = Context(quick=args.quick, big=args.big, root=root)
    problems: list[str] = []
    clock = time.perf_counter()
    busy, own = _busy_seconds(), _own_seconds()
    try:
        interrupted = trio.run(_main, ctx, args.families, problems)
    except BaseException as exc:
        if not _is_interrupt(exc):
            raise
        interrupted = True
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if interrupted:
        print(table(ctx.rows))
        _say("interrupted: partial results above, nothing written")
        return 130
    took = time.perf_counter() - clock
    others = max(0.0, (_busy_seconds() - busy) - (_own_seconds() - own))
    print(table(ctx.rows))
    checks = [
        f"Code measured: {_revision()}.",
        "",
        f"Load average (1 min) at the start {load_start}, at the end {_loadavg()}. Processes "
        f"other than this run and its children used about {others / took:.2f} of the "
        f"{os.cpu_count()} cores on average ({others:.0f} CPU-s in {took:.0f} s): such work "
        "shows as noise, and the ratios to same-run baselines are what to quote.",
        "",
        f"Run time: {took:.0f} s. Processes left behind after each benchmark "
        "(descendants of the runner, or naming its temp dir, checked in /proc): "
        + ("none." if not any("left processes" in p for p in problems) else "SOME, see below."),
    ]
    checks += [f"- problem: {problem}" for problem in problems]
    text = markdown(ctx.rows, command=command, started=started, extra=checks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    for problem in problems:
        _say(f"problem: {problem}")
    _say(f"wrote {args.out} ({took:.0f} s)")
    return 1 if problems else 0

"""The sandbox commands: ``corral create / start / exec / ls / inspect / stop / kill /
drain / rm / logs / metrics``.

They work across processes: ``corral create`` makes a *detached* sandbox (it outlives
the command, recorded in the state db under ``CORRAL_HOME``) and every other command
finds it by name in a new process. Each command opens a supervisor on the default
backend, does one thing, and leaves (detached sandboxes keep running).

Output is a readable table or text for people; ``--json`` prints JSON for scripts (one
document, or one object per line for the streaming ``logs -f`` and ``metrics --watch``).
Errors exit with status 1 and ``corral: <Type>: message`` on stderr; ``exec`` exits with
the command's own status.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import msgspec
import trio

from ..errors import CorralError, InvalidConfig, Unsupported
from .run import parse_pairs
from .show import emit_json, metrics_row, print_info, print_log_record, print_table, to_json

__all__ = ["add_parser"]

Handler = Callable[[Any, argparse.Namespace], Awaitable[int]]
"""An async command body: (supervisor, parsed args) -> exit code."""

STOP_TIMEOUT = 10.0


# -- parsers ---------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("create", help="create and start a sandbox that outlives the command")
    p.add_argument("name", nargs="?", help="sandbox name (default: sb-<random>)")
    p.add_argument("--image", default="host", help="image (default: host)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.add_argument("-w", "--workdir", help="working directory inside the sandbox")
    p.add_argument("--net", action="store_true", help="give the sandbox network access")
    p.add_argument("--cpus", type=float, help="CPU limit (cores)")
    p.add_argument("--memory", type=int, metavar="MIB", help="memory limit in MiB")
    p.add_argument("--pids", type=int, metavar="N", help="process limit")
    p.add_argument("-l", "--label", action="append", default=[], metavar="K=V")
    p.add_argument("--no-start", action="store_true", help="create it stopped (corral start)")
    p.add_argument(
        "--restart",
        choices=["temporary", "transient", "permanent"],
        help="restart policy after a crash (default: temporary, never)",
    )
    p.add_argument("--max-restarts", type=int, metavar="N", help="restarts allowed per window")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS", help="stop when idle")
    p.add_argument("--max-duration", type=float, metavar="SECONDS", help="stop after SECONDS")
    _json_flag(p)
    _bind(p, do_create)

    p = subparsers.add_parser("start", help="start created, stopped or crashed sandboxes")
    p.add_argument("names", nargs="+", metavar="NAME")
    _bind(p, do_start)

    p = subparsers.add_parser(
        "exec",
        help="run a command in a running sandbox",
        description="Run CMD in sandbox NAME with its output on this terminal; exit with "
        "CMD's exit status. -i forwards stdin, -t gives it a terminal (-it: interactive). "
        "Options may also come between NAME and --.",
    )
    _exec_options(p)
    p.add_argument("name", metavar="NAME")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]")
    _bind(p, do_exec)

    p = subparsers.add_parser("ls", help="list sandboxes")
    p.add_argument("-q", "--quiet", action="store_true", help="names only")
    _json_flag(p)
    _bind(p, do_ls)

    p = subparsers.add_parser("inspect", help="show everything known about a sandbox")
    p.add_argument("name", metavar="NAME")
    _json_flag(p)
    _bind(p, do_inspect)

    p = subparsers.add_parser("stop", help="stop sandboxes (Shutdown, then SIGTERM, SIGKILL)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-t", "--timeout", type=float, default=STOP_TIMEOUT, metavar="SECONDS")
    _bind(p, do_stop)

    p = subparsers.add_parser("kill", help="SIGKILL sandboxes now")
    p.add_argument("names", nargs="+", metavar="NAME")
    _bind(p, do_kill)

    p = subparsers.add_parser("drain", help="refuse new work, let running work end, stop")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop anyway after SECONDS")
    _bind(p, do_drain)

    p = subparsers.add_parser("rm", help="remove stopped sandboxes")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-f", "--force", action="store_true", help="kill running ones first")
    _bind(p, do_rm)

    p = subparsers.add_parser("logs", help="show a sandbox's log")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-n", "--tail", type=int, metavar="N", help="only the last N entries")
    p.add_argument("--since", metavar="WHEN", help="a duration (30s, 5m, 2h, 1d) or ISO time")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    p.add_argument("--timestamps", action="store_true", help="prefix each entry's time")
    _json_flag(p)
    _bind(p, do_logs)

    p = subparsers.add_parser("metrics", help="show a sandbox's resource usage")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--watch", action="store_true", help="keep printing samples")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N samples")
    _json_flag(p)
    _bind(p, do_metrics)


def _exec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--interactive", action="store_true", help="forward stdin")
    parser.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    parser.add_argument("-w", "--workdir", help="working directory for CMD")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="kill CMD after SECONDS")


class _OptionError(Exception):
    pass


class _LateOptions(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _OptionError(message)


def exec_command(args: argparse.Namespace) -> list[str]:
    """The command of ``corral exec``, taking options written between NAME and ``--``
    (``corral exec x -e A=1 -- cmd``) into ``args``."""
    cmd = list(args.cmd)
    if not cmd or not cmd[0].startswith("-"):
        return cmd
    if "--" not in cmd:
        raise InvalidConfig(
            f"corral exec: {cmd[0]!r} is not a command; end options after NAME with --"
        )
    split = cmd.index("--")
    head, cmd = cmd[:split], cmd[split + 1 :]
    if head:
        late = _LateOptions(prog="corral exec", add_help=False)
        _exec_options(late)
        try:
            extra = late.parse_args(head)
        except _OptionError as exc:
            raise InvalidConfig(f"corral exec: {exc} (before --)") from None
        args.interactive = args.interactive or extra.interactive
        args.tty = args.tty or extra.tty
        args.env = [*args.env, *extra.env]
        args.workdir = extra.workdir if extra.workdir is not None else args.workdir
        args.timeout = extra.timeout if extra.timeout is not None else args.timeout
    return cmd


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _bind(parser: argparse.ArgumentParser, handler: Handler) -> None:
    parser.set_defaults(func=functools.partial(run_command, handler))


# -- running a command -----------------------------------------------------------------------


def run_command(handler: Handler, args: argparse.Namespace) -> int:
    """``trio.run`` the handler inside a supervisor on the default backend."""
    return trio.run(_supervised, handler, args)


async def _supervised(handler: Handler, args: argparse.Namespace) -> int:
    from .. import open_supervisor

    try:
        async with open_supervisor() as sup:
            return await handler(sup, args)
    except BaseExceptionGroup as group:  # a nursery's wrapping of one error: unwrap it
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], CorralError | KeyboardInterrupt):
            raise leaves[0] from group
        raise


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


async def _maybe(value: Any) -> Any:
    """``sup.get`` / ``sup.list`` are becoming async (they read the state db)."""
    if inspect.isawaitable(value):
        return await value
    return value


async def get_sandbox(sup: Any, name: str) -> Any:
    return await _maybe(sup.get(name))


async def list_all(sup: Any) -> list[Any]:
    """Every page of ``sup.list()`` (a page has ``next_cursor``; a plain list is all)."""
    page = await _maybe(sup.list())
    infos = list(page)
    cursor = getattr(page, "next_cursor", None)
    while cursor:
        page = await sup.list(cursor=cursor)
        infos.extend(page)
        cursor = page.next_cursor
    return infos


async def _close(stream: Any) -> None:
    """End an async iterator we stop reading early (an async generator must be closed)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def _each(names: Sequence[str], fn: Callable[[str], Awaitable[None]]) -> int:
    """Apply ``fn`` to every name; report each failure, exit 1 if any failed."""
    code = 0
    for name in names:
        try:
            await fn(name)
        except CorralError as exc:
            print(f"corral: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        else:
            print(name)
    return code


# -- lifecycle -------------------------------------------------------------------------------


async def do_create(sup: Any, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {
        "image": args.image,
        "env": parse_pairs(args.env),
        "workdir": args.workdir,
        "network": args.net,
        "cpus": args.cpus,
        "memory_mib": args.memory,
        "pids_limit": args.pids,
        "labels": parse_pairs(args.label, "--label"),
        "detached": True,
    }
    if args.no_start:
        options["start"] = False
    for option in ("restart", "max_restarts", "idle_timeout", "max_duration"):
        if getattr(args, option) is not None:  # only what was asked: older APIs lack them
            options[option] = getattr(args, option)
    name = args.name or f"sb-{uuid.uuid4().hex[:10]}"
    sb = await sup.create(name, **options)
    if args.json:
        emit_json(await sb.info())
    else:
        print(sb.name)
    return 0


async def do_start(sup: Any, args: argparse.Namespace) -> int:
    async def start(name: str) -> None:
        sb = await get_sandbox(sup, name)
        await sb.start()

    return await _each(args.names, start)


async def do_stop(sup: Any, args: argparse.Namespace) -> int:
    async def stop(name: str) -> None:
        sb = await get_sandbox(sup, name)
        await sb.stop(timeout=args.timeout)

    return await _each(args.names, stop)


async def do_kill(sup: Any, args: argparse.Namespace) -> int:
    async def kill(name: str) -> None:
        sb = await get_sandbox(sup, name)
        await sb.kill()

    return await _each(args.names, kill)


async def do_drain(sup: Any, args: argparse.Namespace) -> int:
    sb = await get_sandbox(sup, args.name)
    await sb.drain(timeout=args.timeout)
    print(sb.name)
    return 0


async def do_rm(sup: Any, args: argparse.Namespace) -> int:
    async def remove(name: str) -> None:
        if args.force:
            sb = await get_sandbox(sup, name)
            if not sb.status.terminal:
                await sb.kill()
        await sup.remove(name)

    return await _each(args.names, remove)


# -- looking -----------------------------------------------------------------------------------


def _age(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


async def do_ls(sup: Any, args: argparse.Namespace) -> int:
    infos = sorted(await list_all(sup), key=lambda i: i.name)
    if args.json:
        emit_json(infos)
    elif args.quiet:
        for info in infos:
            print(info.name)
    else:
        now = datetime.now(UTC)
        rows = [
            [
                info.name,
                str(info.status),
                info.image,
                _age(info.created_at, now),
                "-" if info.pid is None else str(info.pid),
                "yes" if info.detached else "no",
            ]
            for info in infos
        ]
        print_table(["NAME", "STATUS", "IMAGE", "CREATED", "PID", "DETACHED"], rows)
    return 0


async def do_inspect(sup: Any, args: argparse.Namespace) -> int:
    sb = await get_sandbox(sup, args.name)
    info = await sb.info()
    if args.json:
        emit_json(info)
    else:
        print_info(to_json(info))
    return 0


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """``30s`` / ``5m`` / ``2h`` / ``1d`` ago, or an ISO 8601 time (local if naive)."""
    if text is None:
        return None
    match = _DURATION.match(text.strip())
    if match:
        ago = float(match.group(1)) * _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=ago)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidConfig(
            f"--since wants a duration like 30s, 5m, 2h, 1d or an ISO time, got {text!r}"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()


def _method(sb: Any, name: str, feature: str) -> Any:
    fn = getattr(sb, name, None)
    if fn is None:
        raise Unsupported(feature, "when sandbox logs and metrics land")
    return fn


async def do_logs(sup: Any, args: argparse.Namespace) -> int:
    if args.tail is not None and args.tail < 0:
        raise InvalidConfig(f"--tail wants a number >= 0, got {args.tail}")
    since = parse_since(args.since)
    sb = await get_sandbox(sup, args.name)
    show = functools.partial(print_log_record, json=args.json, timestamps=args.timestamps)
    if args.follow:
        stream = _method(sb, "log_stream", "corral logs -f")(tail=args.tail, since=since)
        try:
            async for record in stream:
                show(record)
        finally:
            await _close(stream)
    else:
        for record in await _method(sb, "logs", "corral logs")(tail=args.tail, since=since):
            show(record)
    return 0


async def do_metrics(sup: Any, args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise InvalidConfig(f"--interval must be greater than 0, got {args.interval}")
    if args.count is not None and args.count < 1:
        raise InvalidConfig(f"--count must be at least 1, got {args.count}")
    sb = await get_sandbox(sup, args.name)
    if not args.watch:
        sample = await _method(sb, "metrics", "corral metrics")()
        _print_metrics(sample, args.json, header=True, single=True)
        return 0
    stream = _method(sb, "metrics_stream", "corral metrics --watch")(interval=args.interval)
    seen = 0
    try:
        async for sample in stream:
            _print_metrics(sample, args.json, header=seen == 0, single=False)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    finally:
        await _close(stream)
    return 0


def _print_metrics(sample: Any, as_json: bool, *, header: bool, single: bool) -> None:
    if as_json:
        if single:
            emit_json(sample)
        else:
            print(msgspec.json.encode(to_json(sample)).decode(), flush=True)
        return
    headers, row = metrics_row(sample)
    print_table(headers, [row], header=header)
    sys.stdout.flush()


# -- exec ------------------------------------------------------------------------------------


async def do_exec(sup: Any, args: argparse.Namespace) -> int:
    cmd = exec_command(args)
    if not cmd:
        raise InvalidConfig("corral exec needs a command: corral exec NAME -- CMD [ARG ...]")
    env = parse_pairs(args.env)
    sb = await get_sandbox(sup, args.name)
    if args.tty:
        if args.timeout is not None:
            raise InvalidConfig("corral exec: --timeout does not go with -t")
        from .attach import attach

        return await attach(sb, cmd[0], cmd[1:], tty=True, env=env, cwd=args.workdir)
    return await stream_exec(
        sb, cmd, env=env, cwd=args.workdir, timeout=args.timeout, stdin=args.interactive
    )


async def stream_exec(
    sb: Any,
    cmd: list[str],
    *,
    env: dict[str, str],
    cwd: str | None,
    timeout: float | None,
    stdin: bool,
) -> int:
    """Run ``cmd`` with its output on our stdout/stderr (and our stdin, if asked)."""
    from ..protocol import ExecExited, ExecStderr, ExecStdout

    out = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    err = trio.lowlevel.FdStream(os.dup(sys.stderr.fileno()))
    code = 1
    async with out, err, sb.exec_stream(cmd[0], cmd[1:], env=env, cwd=cwd, timeout=timeout) as proc:
        async with trio.open_nursery() as nursery:
            if stdin:
                nursery.start_soon(_pump_stdin, proc)
            else:
                await proc.close_stdin()
            async for event in proc:
                if isinstance(event, ExecStdout):
                    await out.send_all(event.data)
                elif isinstance(event, ExecStderr):
                    await err.send_all(event.data)
                elif isinstance(event, ExecExited):
                    code = event.exit_code
                    if event.timed_out:
                        note = f"corral: ExecTimeout: {cmd[0]}: killed after {timeout:g}s\n"
                        await err.send_all(note.encode())
            nursery.cancel_scope.cancel()
    return code


async def _pump_stdin(proc: Any) -> None:
    """Our stdin to the command, read in a thread (a file, a pipe or a terminal)."""
    fd = sys.stdin.fileno()
    while True:
        data = await trio.to_thread.run_sync(os.read, fd, 65536, abandon_on_cancel=True)
        if not data:
            break
        await proc.send_stdin(data)
    await proc.close_stdin()

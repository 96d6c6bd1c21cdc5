"""``corral run``: run one command in a fresh sandbox, stream its output, exit with its code."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import trio

from ..errors import InvalidConfig


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a command in a new sandbox and remove it afterwards",
        description="Create a sandbox, run CMD in it with its output streamed to this "
        "terminal, exit with CMD's exit code, and remove the sandbox.",
    )
    p.add_argument("--name", help="sandbox name (default: run-<random>)")
    p.add_argument("--image", default="host", help="image (default: host)")
    p.add_argument(
        "-e", "--env", action="append", default=[], metavar="K=V", help="environment variable"
    )
    p.add_argument("-w", "--workdir", help="working directory inside the sandbox")
    p.add_argument("--net", action="store_true", help="give the sandbox network access")
    p.add_argument("--timeout", type=float, help="kill the command after SECONDS")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]")
    p.set_defaults(func=cmd_run)


def parse_pairs(items: list[str], what: str = "--env") -> dict[str, str]:
    """``KEY=VALUE`` options (``--env``, ``--label``) as a dict."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidConfig(f"{what} wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise InvalidConfig("corral run needs a command: corral run -- CMD [ARG ...]")
    options: dict[str, Any] = {
        "name": args.name or f"run-{uuid.uuid4().hex[:10]}",
        "image": args.image,
        "env": parse_pairs(args.env),
        "workdir": args.workdir,
        "network": args.net,
        "timeout": args.timeout,
    }
    return trio.run(run_command, cmd, options)


async def run_command(cmd: list[str], options: dict[str, Any]) -> int:
    from .. import open_supervisor
    from .sandboxes import stream_exec

    async with open_supervisor() as sup:
        sb = await sup.create(
            options["name"],
            image=options["image"],
            env=options["env"],
            workdir=options["workdir"],
            network=options["network"],
        )
        try:
            return await stream_exec(
                sb, cmd, env={}, cwd=None, timeout=options["timeout"], stdin=False
            )
        finally:
            with trio.CancelScope(shield=True):
                await sb.stop(timeout=2.0)
                await sup.remove(sb.name)

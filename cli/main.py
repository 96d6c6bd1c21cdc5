"""The ``corral`` command line.

Each sub-command module exposes ``add_parser(subparsers)`` and stores its handler as
``func`` on its parser; a handler returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import CorralError

# Sub-command modules; ones not written yet are skipped.
COMMAND_MODULES = (
    "corral.cli.run",
    "corral.cli.sandboxes",
    "corral.cli.profile",
    "corral.cli.images",
    "corral.server.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral", description="Run untrusted code in fast, hardened sandboxes."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = sub.add_parser("version", help="print corral's version")
    version.set_defaults(func=cmd_version)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.add_parser(sub)
    return parser


def cmd_version(args: argparse.Namespace) -> int:
    from .. import __version__

    print(f"corral {__version__}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = func(args)
    except KeyboardInterrupt:
        return 130
    except CorralError as exc:
        print(f"corral: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main())

"""``corral serve``: the control plane, and its API keys.

* ``corral serve [--host H] [--port P] [--data-dir D] [--sandbox-network none|host]``
  -- serve the microsandbox cloud API. The first start creates an API key for the
  ``default`` org and prints it once.
* ``corral serve keys create [--org ORG] [--label TEXT]`` -- a new key (printed once).
* ``corral serve keys list [--org ORG]`` -- key ids, orgs, labels, revocation.
* ``corral serve keys revoke KEY_ID`` -- revoke at once (the server checks every request).

The data dir defaults to ``$CORRAL_HOME/server`` (``~/.corral/server``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import msgspec
import trio

from .run import DEFAULT_PORT, FIRST_ORG, default_data_dir, serve
from .store import Store

__all__ = ["add_parser", "cmd_keys_create", "cmd_keys_list", "cmd_keys_revoke", "cmd_serve"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve`` and its ``keys create|list|revoke`` sub-commands."""
    parser = subparsers.add_parser(
        "serve",
        help="serve the microsandbox-compatible cloud API",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port, 0 for any ({DEFAULT_PORT})"
    )
    _data_dir_flag(parser, None)
    parser.add_argument(
        "--sandbox-network",
        choices=("none", "host"),
        default="none",
        help="network for sandboxes that ask for the SDK default: none, or the host's",
    )
    parser.add_argument("--max-sandboxes-per-org", type=int, default=1000)
    parser.set_defaults(func=cmd_serve)

    commands = parser.add_subparsers(dest="serve_command", metavar="COMMAND")
    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    create = key_commands.add_parser("create", help="create an API key (shown once)")
    create.add_argument("--org", default=FIRST_ORG, help=f"organisation ({FIRST_ORG})")
    create.add_argument("--label", default="", help="a note to recognise the key by")
    _data_dir_flag(create, argparse.SUPPRESS)
    _json_flag(create)
    create.set_defaults(func=cmd_keys_create)

    listing = key_commands.add_parser("list", aliases=["ls"], help="list API keys")
    listing.add_argument("--org", default=None, help="only this organisation")
    _data_dir_flag(listing, argparse.SUPPRESS)
    _json_flag(listing)
    listing.set_defaults(func=cmd_keys_list)

    revoke = key_commands.add_parser("revoke", help="revoke an API key")
    revoke.add_argument("key_id", help="the key id (from `keys list`, or crl_<id>_…)")
    _data_dir_flag(revoke, argparse.SUPPRESS)
    revoke.set_defaults(func=cmd_keys_revoke)


def _data_dir_flag(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=default, help="state directory ($CORRAL_HOME/server)"
    )


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )


def _data_dir(args: argparse.Namespace) -> Path:
    value = getattr(args, "data_dir", None)
    return Path(value) if value is not None else default_data_dir()


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; then stop every sandbox and exit 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def on_signal() -> None:
                async for signum in signals:
                    logging.getLogger("corral.server").info(
                        "%s: shutting down", signal.Signals(signum).name
                    )
                    return

            await serve(
                _data_dir(args),
                host=args.host,
                port=args.port,
                allow_network=args.sandbox_network == "host",
                max_per_org=args.max_sandboxes_per_org,
                shutdown_trigger=on_signal,
            )

    trio.run(main)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    store = Store.open(_data_dir(args))
    try:
        info, key = store.create_key(args.org, args.label)
    finally:
        store.close()
    if getattr(args, "json", False):
        out = {"id": info.id, "org": info.org_name, "label": info.label, "key": key}
        print(msgspec.json.encode(out).decode())
    else:
        print(f"created key {info.id} for org {info.org_name!r}; it is shown only once:")
        print(f"  {key}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    store = Store.open(_data_dir(args))
    try:
        keys = store.list_keys(args.org)
    finally:
        store.close()
    if getattr(args, "json", False):
        print(msgspec.json.encode(keys).decode())
        return 0
    if not keys:
        print("no API keys")
        return 0
    print(f"{'ID':<14} {'ORG':<20} {'CREATED':<28} {'STATUS':<8} LABEL")
    for k in keys:
        status = "revoked" if k.revoked_at else "active"
        print(f"{k.id:<14} {k.org_name:<20} {k.created_at:<28} {status:<8} {k.label}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    key_id: str = args.key_id
    if key_id.startswith("crl_"):
        key_id = key_id[4:].split("_", 1)[0]
    store = Store.open(_data_dir(args))
    try:
        done = store.revoke_key(key_id)
    finally:
        store.close()
    if not done:
        print(f"corral serve: no active key with id {key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked key {key_id}")
    return 0

"""``corral image``: pull, list and remove OCI images in ``$CORRAL_HOME/images``.

* ``corral image pull REF [--insecure] [--username U --password-stdin] [--json]`` --
  resolve ``REF`` at its registry (a moved tag is followed) and pull what is missing.
  Without ``--username``, credentials come from docker's ``config.json`` if it has some.
* ``corral image ls [-a] [--json]`` -- the pulled references, newest first (a tag's
  ``@digest`` aliases only with ``-a`` or ``--json``).
* ``corral image rm REF|DIGEST... [--json]`` -- forget references and free what no
  reference and no sandbox still uses.
* ``corral image gc [--json]`` -- free what no reference and no sandbox uses.

Exit codes: 0 on success, 1 on an error (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import msgspec
import trio

from ..backend import LocalBackend
from ..drivers.local.images import ImageRecord, ImageStore

__all__ = ["add_parser", "cmd_gc", "cmd_ls", "cmd_pull", "cmd_rm", "in_use"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "image",
        help="pull, list and remove OCI images",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    commands = parser.add_subparsers(dest="image_command", metavar="COMMAND", required=True)

    pull = commands.add_parser("pull", help="pull an image from its registry")
    pull.add_argument("reference", help="image reference, e.g. 127.0.0.1:5000/team/app:1")
    pull.add_argument(
        "--insecure", action="store_true", help="allow plain http to a non-loopback registry"
    )
    pull.add_argument("--username", help="registry user name (password from stdin)")
    pull.add_argument(
        "--password-stdin", action="store_true", help="read the registry password from stdin"
    )
    _json_flag(pull)
    pull.set_defaults(func=cmd_pull)

    listing = commands.add_parser("ls", aliases=["list"], help="list pulled images")
    listing.add_argument(
        "-a", "--all", action="store_true", help="also the @digest aliases of pulled tags"
    )
    _json_flag(listing)
    listing.set_defaults(func=cmd_ls)

    remove = commands.add_parser("rm", aliases=["remove"], help="remove pulled images")
    remove.add_argument("references", nargs="+", metavar="REF", help="reference or digest")
    _json_flag(remove)
    remove.set_defaults(func=cmd_rm)

    gc = commands.add_parser("gc", help="free cached layers no image or sandbox uses")
    _json_flag(gc)
    gc.set_defaults(func=cmd_gc)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )


def _store(**options: Any) -> tuple[LocalBackend, ImageStore]:
    backend = LocalBackend.from_env()
    backend.ensure_dirs()
    return backend, ImageStore(backend.images_dir, **options)


def in_use(backend: LocalBackend) -> set[str]:
    """Manifest digests the sandboxes under ``backend`` run on (their ``image`` files)."""
    found: set[str] = set()
    if not backend.sandboxes_dir.is_dir():
        return found
    for marker in backend.sandboxes_dir.glob("*/image"):
        try:
            digest = marker.read_text().strip()
        except OSError:
            continue
        if digest.startswith("sha256:"):
            found.add(digest)
    return found


def _emit(value: Any) -> None:
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def _row(record: ImageRecord) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(record)
    return out


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def cmd_pull(args: argparse.Namespace) -> int:
    credentials: dict[str, tuple[str, str]] = {}
    if args.username or args.password_stdin:
        if not (args.username and args.password_stdin):
            print("corral: --username and --password-stdin go together", file=sys.stderr)
            return 1
        from ..drivers.local.images import parse_reference

        password = sys.stdin.readline().rstrip("\n")
        credentials[parse_reference(args.reference).registry] = (args.username, password)
    _, store = _store(insecure=args.insecure, credentials=credentials)
    image = trio.run(store.pull, args.reference)
    if getattr(args, "json", False):
        _emit(_row(image.record))
    else:
        record = image.record
        print(f"{record.reference}: {record.digest} ({record.platform}, {_size(record.size)})")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    _, store = _store()
    records = sorted(store.list_images(), key=lambda r: r.pulled_at, reverse=True)
    if getattr(args, "json", False):
        _emit([_row(r) for r in records])
        return 0
    if not args.all:  # a digest reference that a pulled tag also names is an alias
        tagged = {r.digest for r in records if "@" not in r.reference}
        records = [r for r in records if "@" not in r.reference or r.digest not in tagged]
    rows = [("REFERENCE", "DIGEST", "PLATFORM", "SIZE", "PULLED")]
    for r in records:
        pulled = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.pulled_at))
        rows.append((r.reference, r.digest[:19], r.platform, _size(r.size), pulled))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    backend, store = _store()
    busy = in_use(backend)
    removed: list[str] = []
    for reference in args.references:
        removed += store.remove(reference, in_use=busy)
    if getattr(args, "json", False):
        _emit({"removed": removed})
    else:
        for ref in removed:
            print(f"removed {ref}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    backend, store = _store()
    freed = store.gc(in_use=in_use(backend))
    if getattr(args, "json", False):
        _emit({"freed": freed})
    else:
        print(f"freed {freed} cache entries")
    return 0

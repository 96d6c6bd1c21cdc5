"""``corral profile``: list, show and select backend profiles.

Profiles live in the microsandbox config file (``MSB_CONFIG_PATH``, default
``~/.microsandbox/config.json``); see :mod:`corral.backend.profile` for the schema.

* ``corral profile list [--json]`` -- every profile, the active one marked ``*``.
* ``corral profile show [NAME] [--json]`` -- one profile (default: the active one);
  ``inline:`` API keys are printed as ``inline:<redacted>``.
* ``corral profile use NAME [--json]`` -- set ``active_profile``; every other key of
  the file is kept as it was.

Each handler is registered as ``func`` on its sub-parser (``args.func(args)``) and
returns the exit code: 0 on success, 1 on a configuration error (message on stderr,
as ``{"error": {...}}`` with ``--json``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import msgspec

from corral.backend.kinds import API_KEY_ENV, API_URL_ENV, BackendKind
from corral.backend.profile import (
    BACKEND_ENV,
    PROFILE_ENV,
    Profile,
    SdkConfig,
    config_path,
    load_sdk_config,
    redact_api_key_ref,
    set_active_profile,
)
from corral.errors import CorralError, InvalidConfig

__all__ = ["add_parser", "cmd_list", "cmd_show", "cmd_use"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``profile`` and its ``list`` / ``show`` / ``use`` sub-commands."""
    parser = subparsers.add_parser(
        "profile",
        help="list, show and select backend profiles",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    commands = parser.add_subparsers(dest="profile_command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", aliases=["ls"], help="list configured profiles")
    _json_flag(listing)
    listing.set_defaults(func=cmd_list)

    show = commands.add_parser("show", help="show one profile (secrets redacted)")
    show.add_argument("name", nargs="?", help="profile name (default: the active profile)")
    _json_flag(show)
    show.set_defaults(func=cmd_show)

    use = commands.add_parser("use", help="set the active profile")
    use.add_argument("name", help="profile to activate")
    _json_flag(use)
    use.set_defaults(func=cmd_use)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: never overwrite a --json the top-level parser may already have set.
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )


def _wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _emit_json(value: Any, stream: Any = None) -> None:
    text = msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
    print(text, file=stream if stream is not None else sys.stdout)


def _fail(args: argparse.Namespace, exc: CorralError) -> int:
    if _wants_json(args):
        _emit_json({"error": {"code": exc.code, "message": str(exc)}}, sys.stderr)
    else:
        print(f"error: {exc}", file=sys.stderr)
    return 1


def _describe(name: str, profile: Profile, active: bool) -> dict[str, Any]:
    ref = profile.api_key_ref
    return {
        "name": name,
        "active": active,
        "backend": profile.backend.value,
        "url": profile.url,
        "api_key_ref": redact_api_key_ref(ref) if ref is not None else None,
    }


def _overrides() -> list[str]:
    """Environment variables that currently take precedence over ``active_profile``."""
    found = []
    if os.environ.get(BACKEND_ENV, "").strip().lower() == "local":
        found.append(BACKEND_ENV)
    if os.environ.get(API_URL_ENV, "").strip() and os.environ.get(API_KEY_ENV, "").strip():
        found.append(f"{API_URL_ENV}+{API_KEY_ENV}")
    if os.environ.get(PROFILE_ENV, "").strip():
        found.append(PROFILE_ENV)
    return found


def cmd_list(args: argparse.Namespace) -> int:
    """``corral profile list``."""
    path = config_path()
    try:
        cfg = load_sdk_config(path)
    except CorralError as exc:
        return _fail(args, exc)
    rows = [
        _describe(name, cfg.profiles[name], name == cfg.active_profile)
        for name in sorted(cfg.profiles)
    ]
    if _wants_json(args):
        _emit_json(
            {"config_path": str(path), "active_profile": cfg.active_profile, "profiles": rows}
        )
        return 0
    if not rows:
        print(f"no profiles configured in {path}")
        print('  add one under "profiles", for example:')
        print(
            '  {"active_profile": "prod", "profiles": {"prod": {"backend": "cloud", '
            '"url": "https://msb.example.com", "api_key_ref": "env:MSB_API_KEY"}}}'
        )
        return 0
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        marker = "*" if row["active"] else " "
        where = f"  {row['url'] or '(no url!)'}" if row["backend"] == BackendKind.CLOUD else ""
        print(f"{marker} {row['name']:<{width}}  {row['backend']}{where}")
    return 0


def _active_name(cfg: SdkConfig) -> str | None:
    name = (cfg.active_profile or "").strip()
    return name or None


def cmd_show(args: argparse.Namespace) -> int:
    """``corral profile show [NAME]``."""
    path = config_path()
    try:
        cfg = load_sdk_config(path)
    except CorralError as exc:
        return _fail(args, exc)
    name: str | None = args.name or _active_name(cfg)
    if name is None:
        return _fail(
            args,
            InvalidConfig(
                f"no profile name given and no active profile set in {path}: "
                "pass NAME or run `corral profile use NAME`"
            ),
        )
    profile = cfg.profiles.get(name)
    if profile is None:
        known = ", ".join(sorted(cfg.profiles)) or "none"
        return _fail(
            args, InvalidConfig(f"profile {name!r} is not in {path} (profiles there: {known})")
        )
    row = _describe(name, profile, name == cfg.active_profile)
    if _wants_json(args):
        _emit_json({**row, "config_path": str(path)})
        return 0
    print(f"{'* ' if row['active'] else '  '}{name}")
    print(f"  backend      {row['backend']}")
    if profile.backend is BackendKind.CLOUD or row["url"] or row["api_key_ref"]:
        print(f"  url          {row['url'] or '(missing!)'}")
        print(f"  api_key_ref  {row['api_key_ref'] or '(missing!)'}")
    return 0


def cmd_use(args: argparse.Namespace) -> int:
    """``corral profile use NAME``."""
    path = config_path()
    try:
        set_active_profile(args.name, path)
    except CorralError as exc:
        return _fail(args, exc)
    overrides = _overrides()
    if _wants_json(args):
        _emit_json(
            {"active_profile": args.name, "config_path": str(path), "overridden_by": overrides}
        )
        return 0
    print(f"active profile set to {args.name!r} in {path}")
    if overrides:
        print(f"note: {', '.join(overrides)} in this environment take precedence over it")
    return 0

"""``corral serve`` argument parsing and ``corral serve keys create|list|revoke``."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from corral.server import cli
from corral.server.run import ServeInfo, serve
from corral.server.store import Store


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="corral")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


def run(*argv: str) -> int:
    args = parse(*argv)
    code: int = args.func(args)
    return code


def test_serve_arguments() -> None:
    args = parse("serve", "--port", "0", "--host", "::1", "--sandbox-network", "host")
    assert args.func is cli.cmd_serve
    assert (args.port, args.host, args.sandbox_network, args.data_dir) == (0, "::1", "host", None)
    args = parse("serve", "--data-dir", "/x", "keys", "list")
    assert args.func is cli.cmd_keys_list and args.data_dir == Path("/x")
    with pytest.raises(SystemExit):
        parse("serve", "keys")


def test_keys_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    assert run("serve", "keys", "create", "--org", "acme", "--label", "ci", "--data-dir", d) == 0
    out = capsys.readouterr().out
    key = out.split()[-1]
    assert key.startswith("crl_") and "shown only once" in out
    assert run("serve", "keys", "create", "--org", "acme", "--json", "--data-dir", d) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["org"] == "acme" and created["key"].startswith("crl_")

    assert run("serve", "keys", "list", "--json", "--data-dir", d) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["org_name"] for k in listed] == ["acme", "acme"]
    assert all(key not in json.dumps(k) for k in listed)  # the secret is never listed

    assert run("serve", "keys", "revoke", key, "--data-dir", d) == 0  # by full key
    assert run("serve", "keys", "revoke", created["id"], "--data-dir", d) == 0  # by id
    assert run("serve", "keys", "revoke", created["id"], "--data-dir", d) == 1
    capsys.readouterr()
    assert run("serve", "keys", "list", "--data-dir", d) == 0
    table = capsys.readouterr().out
    assert table.count("revoked") == 2 and "ci" in table
    store = Store.open(tmp_path)
    assert store.authenticate(key) is None and store.authenticate(created["key"]) is None
    store.close()


class NoHost:
    async def start(self, sid: str, plan: Any) -> None: ...
    async def stop(self, sid: str) -> None: ...
    async def wait(self, sid: str) -> str | None: ...
    async def remove(self, sid: str) -> None: ...
    def target(self, sid: str) -> Any: ...


@asynccontextmanager
async def no_host() -> AsyncIterator[NoHost]:
    yield NoHost()


async def test_first_start_prints_a_key_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed = []
    for _ in range(2):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                info: ServeInfo = await nursery.start(
                    lambda task_status: serve(
                        tmp_path, port=0, sandbox_host=no_host, task_status=task_status
                    )
                )
                nursery.cancel_scope.cancel()
        printed.append(capsys.readouterr().out)
    assert "shown only once" in printed[0] and "crl_" in printed[0]
    assert printed[1] == "" and info.first_key is None
    store = Store.open(tmp_path)
    assert [k.org_name for k in store.list_keys()] == ["default"]
    store.close()

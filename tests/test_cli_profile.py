"""`corral profile list / show / use`."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.cli.profile import add_parser

_ENV = (
    "MSB_BACKEND",
    "MSB_API_URL",
    "MSB_API_KEY",
    "MSB_PROFILE",
    "MSB_CONFIG_PATH",
    "MSB_HOME",
    "CORRAL_HOME",
)

SECRET = "msb_live_TOPSECRET"
DOC: dict[str, Any] = {
    "home": "/opt/microsandbox",
    "database": {"max_connections": 9},
    "active_profile": "prod",
    "profiles": {
        "prod": {"backend": "cloud", "url": "https://msb.example.com", "api_key_ref": "env:K"},
        "ci": {
            "backend": "cloud",
            "url": "https://ci.example.com",
            "api_key_ref": f"inline:{SECRET}",
        },
        "dev": {"backend": "local", "note": "kept"},
    },
}


@pytest.fixture(autouse=True)
def config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "msb" / "config.json"
    monkeypatch.setenv("MSB_CONFIG_PATH", str(path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield path


def write(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=4))


def run(*argv: str, top_level_json: bool = False) -> int:
    parser = argparse.ArgumentParser(prog="corral")
    if top_level_json:
        parser.add_argument("--json", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser(commands)
    args = parser.parse_args(argv)
    code = args.func(args)
    assert isinstance(code, int)
    return code


def test_list_empty(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    assert run("profile", "list") == 0
    out = capsys.readouterr().out
    assert f"no profiles configured in {config_file}" in out
    assert '"profiles"' in out


def test_list_text_marks_active(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    write(config_file, DOC)
    assert run("profile", "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "  ci    cloud  https://ci.example.com",
        "  dev   local",
        "* prod  cloud  https://msb.example.com",
    ]


def test_list_json_redacts(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    write(config_file, DOC)
    assert run("profile", "list", "--json") == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    data = json.loads(out)
    assert data["config_path"] == str(config_file)
    assert data["active_profile"] == "prod"
    assert [p["name"] for p in data["profiles"]] == ["ci", "dev", "prod"]
    assert data["profiles"][0] == {
        "name": "ci",
        "active": False,
        "backend": "cloud",
        "url": "https://ci.example.com",
        "api_key_ref": "inline:<redacted>",
    }
    assert data["profiles"][2]["active"] is True
    assert data["profiles"][2]["api_key_ref"] == "env:K"


def test_top_level_json_flag_is_not_clobbered(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    write(config_file, DOC)
    assert run("--json", "profile", "list", top_level_json=True) == 0
    assert json.loads(capsys.readouterr().out)["active_profile"] == "prod"


def test_show_defaults_to_active(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    write(config_file, DOC)
    assert run("profile", "show") == 0
    assert capsys.readouterr().out.splitlines() == [
        "* prod",
        "  backend      cloud",
        "  url          https://msb.example.com",
        "  api_key_ref  env:K",
    ]


def test_show_redacts_inline_key(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    write(config_file, DOC)
    assert run("profile", "show", "ci") == 0
    text = capsys.readouterr().out
    assert SECRET not in text
    assert "api_key_ref  inline:<redacted>" in text
    assert run("profile", "show", "ci", "--json") == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    data = json.loads(out)
    assert data["api_key_ref"] == "inline:<redacted>" and data["active"] is False


def test_show_local(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    write(config_file, DOC)
    assert run("profile", "show", "dev") == 0
    assert capsys.readouterr().out.splitlines() == ["  dev", "  backend      local"]


def test_show_errors(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    assert run("profile", "show") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no profile name given and no active profile")
    write(config_file, DOC)
    assert run("profile", "show", "nope", "--json") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    error = json.loads(captured.err)["error"]
    assert error["code"] == "invalid_config"
    assert "'nope'" in error["message"] and "ci, dev, prod" in error["message"]


def test_use_keeps_every_other_key(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    write(config_file, DOC)
    os.chmod(config_file, 0o600)
    assert run("profile", "use", "dev") == 0
    assert "active profile set to 'dev'" in capsys.readouterr().out
    raw = json.loads(config_file.read_text())
    assert raw == {**DOC, "active_profile": "dev"}
    assert list(raw) == list(DOC)  # key order kept too
    assert os.stat(config_file).st_mode & 0o777 == 0o600
    assert run("profile", "list") == 0
    assert "* dev" in capsys.readouterr().out


def test_use_unknown_profile_leaves_file_alone(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    write(config_file, DOC)
    before = config_file.read_bytes()
    assert run("profile", "use", "nope") == 1
    assert "'nope'" in capsys.readouterr().err
    assert config_file.read_bytes() == before


def test_use_on_malformed_config(capsys: pytest.CaptureFixture[str], config_file: Path) -> None:
    write(config_file, "{oops")
    assert run("profile", "use", "dev") == 1
    assert "is not valid JSON" in capsys.readouterr().err
    assert config_file.read_text() == "{oops"
    write(config_file, {"profiles": {"dev": {"backend": "kubernetes"}}})
    assert run("profile", "list") == 1
    assert "profile 'dev': Invalid enum value 'kubernetes'" in capsys.readouterr().err


def test_use_json_reports_env_overrides(
    capsys: pytest.CaptureFixture[str], config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(config_file, DOC)
    monkeypatch.setenv("MSB_PROFILE", "ci")
    assert run("profile", "use", "dev", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {
        "active_profile": "dev",
        "config_path": str(config_file),
        "overridden_by": ["MSB_PROFILE"],
    }
    monkeypatch.setenv("MSB_BACKEND", "local")
    assert run("profile", "use", "prod") == 0
    assert "note: MSB_BACKEND, MSB_PROFILE in this environment" in capsys.readouterr().out


def test_profile_requires_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run("profile")
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err

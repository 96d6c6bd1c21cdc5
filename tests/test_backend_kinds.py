"""LocalBackend / CloudBackend configuration objects."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.backend import BackendKind, CloudBackend, LocalBackend, default_home
from corral.errors import InvalidConfig

_ENV = ("CORRAL_HOME", "MSB_API_URL", "MSB_API_KEY", "MSB_BACKEND", "MSB_PROFILE", "MSB_HOME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MSB_CONFIG_PATH", str(tmp_path / "msb" / "config.json"))
    yield


def test_backend_kind_parse() -> None:
    assert BackendKind.parse(" Cloud ") is BackendKind.CLOUD
    assert BackendKind.parse(BackendKind.LOCAL) is BackendKind.LOCAL
    assert str(BackendKind.LOCAL) == "local"
    with pytest.raises(InvalidConfig, match="MSB_BACKEND must be 'local' or 'cloud'"):
        BackendKind.parse("remote", source="MSB_BACKEND")


def test_local_defaults_follow_home_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "state"
    monkeypatch.setenv("CORRAL_HOME", str(home))
    b = LocalBackend()
    assert b.kind is BackendKind.LOCAL
    assert b.home == home
    assert b.sandboxes_dir == home / "sandboxes"
    assert b.images_dir == home / "images"
    assert b.volumes_dir == home / "volumes"
    assert b.logs_dir == home / "logs"
    assert b.db_path == home / "state.db"
    assert (b.default_cpus, b.default_memory_mib) == (1, 512)
    assert (b.shell, b.workdir) == ("/bin/sh", "/workspace")
    assert b.metrics_sample_interval_ms == 1000
    assert b.disable_metrics_sample is False and b.metrics_enabled
    assert LocalBackend.from_env() == b


def test_local_default_home_without_env(tmp_path: Path) -> None:
    assert default_home() == tmp_path / "home" / ".corral"
    assert LocalBackend().home == tmp_path / "home" / ".corral"


def test_local_relative_and_tilde_paths_become_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert LocalBackend(home="rel").home == tmp_path / "rel"
    assert LocalBackend(home="~/x").home == tmp_path / "home" / "x"
    monkeypatch.setenv("CORRAL_HOME", "  ")
    assert LocalBackend().home == tmp_path / "home" / ".corral"


def test_local_overrides(tmp_path: Path) -> None:
    b = LocalBackend(
        home=tmp_path,
        sandboxes_dir=tmp_path / "sb",
        db_path=tmp_path / "db" / "x.db",
        default_cpus=4,
        default_memory_mib=2048,
        shell="/bin/bash",
        workdir="/work",
        metrics_sample_interval_ms=0,
    )
    assert b.sandboxes_dir == tmp_path / "sb"
    assert b.volumes_dir == tmp_path / "volumes"
    assert b.db_path == tmp_path / "db" / "x.db"
    assert (b.default_cpus, b.default_memory_mib, b.shell, b.workdir) == (
        4,
        2048,
        "/bin/bash",
        "/work",
    )
    assert not b.metrics_enabled
    assert not LocalBackend(home=tmp_path, disable_metrics_sample=True).metrics_enabled
    assert LocalBackend.from_env(default_cpus=3).default_cpus == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"default_cpus": 0}, "default_cpus must be between 1 and 255"),
        ({"default_cpus": 256}, "default_cpus must be between 1 and 255"),
        ({"default_cpus": True}, "default_cpus must be an integer"),
        ({"default_memory_mib": 0}, "default_memory_mib must be between"),
        ({"metrics_sample_interval_ms": -1}, "metrics_sample_interval_ms must be between"),
        ({"shell": "sh"}, "shell must be an absolute path"),
        ({"workdir": "work"}, "workdir must be an absolute path"),
        ({"disable_metrics_sample": 1}, "disable_metrics_sample must be True or False"),
    ],
)
def test_local_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidConfig, match=message):
        LocalBackend(**kwargs)  # type: ignore[arg-type]


def test_local_is_frozen_and_hashable(tmp_path: Path) -> None:
    b = LocalBackend(home=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.default_cpus = 2  # type: ignore[misc]
    assert hash(b) == hash(LocalBackend(home=tmp_path))
    assert LocalBackend(home=tmp_path / "a") != b
    assert dataclasses.replace(b, default_cpus=2).default_cpus == 2


def test_local_ensure_dirs(tmp_path: Path) -> None:
    b = LocalBackend(home=tmp_path / "h", logs_dir=tmp_path / "elsewhere" / "logs")
    b.ensure_dirs()
    for path in (b.home, b.sandboxes_dir, b.images_dir, b.volumes_dir, b.logs_dir):
        assert path.is_dir()
    assert os.stat(b.home).st_mode & 0o777 == 0o700
    b.ensure_dirs()  # idempotent


def test_cloud_normalises_and_redacts() -> None:
    b = CloudBackend(" https://msb.example.com/api/ ", "  msb_live_SECRET \n")
    assert b.kind is BackendKind.CLOUD
    assert b.url == "https://msb.example.com/api"
    assert b.api_key == "msb_live_SECRET"
    assert "SECRET" not in repr(b) and "SECRET" not in str(b)
    assert "<redacted>" in repr(b)
    assert CloudBackend("http://h:8080", "k", profile="p") == CloudBackend("http://h:8080/", "k")
    assert "profile='p'" in repr(CloudBackend("http://h", "k", profile="p"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "cloud URL is empty"),
        ("ftp://h.example.com", "must start with http:// or https://"),
        ("msb.example.com", "must start with http:// or https://"),
        ("https://", "has no host"),
        ("https://h.example.com/?a=1", "must not carry a query"),
        ("https://h.example.com:notaport", "is malformed"),
    ],
)
def test_cloud_url_validation(url: str, message: str) -> None:
    with pytest.raises(InvalidConfig, match=message):
        CloudBackend(url, "key")


@pytest.mark.parametrize(
    ("key", "message"),
    [("", "API key is empty"), ("   ", "API key is empty"), ("ab cd", "whitespace")],
)
def test_cloud_key_validation(key: str, message: str) -> None:
    with pytest.raises(InvalidConfig, match=message) as info:
        CloudBackend("https://h.example.com", key)
    if key.strip():
        assert key not in str(info.value)


def test_cloud_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidConfig, match="needs MSB_API_URL and MSB_API_KEY"):
        CloudBackend.from_env()
    monkeypatch.setenv("MSB_API_URL", "https://h.example.com")
    with pytest.raises(InvalidConfig, match="needs MSB_API_KEY: set"):
        CloudBackend.from_env()
    monkeypatch.setenv("MSB_API_KEY", "k1")
    assert CloudBackend.from_env() == CloudBackend("https://h.example.com", "k1")
    monkeypatch.setenv("MSB_API_URL", "gopher://h")
    with pytest.raises(InvalidConfig, match="MSB_API_URL/MSB_API_KEY: cloud URL"):
        CloudBackend.from_env()

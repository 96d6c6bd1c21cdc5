"""SdkConfig parsing, api_key_ref forms (keyring included) and the resolution ladder."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
import keyring.backends.fail
import keyring.errors
import pytest

from corral.backend import (
    BackendKind,
    CloudBackend,
    LocalBackend,
    Profile,
    SdkConfig,
    cloud_backend_from_profile,
    config_path,
    load_sdk_config,
    redact_api_key_ref,
    resolve_api_key_ref,
    resolve_default_backend,
    save_sdk_config,
    set_active_profile,
)
from corral.errors import InvalidConfig

_ENV = (
    "MSB_BACKEND",
    "MSB_API_URL",
    "MSB_API_KEY",
    "MSB_PROFILE",
    "MSB_CONFIG_PATH",
    "MSB_HOME",
    "CORRAL_HOME",
)


@pytest.fixture(autouse=True)
def config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An isolated environment; returns the (not yet existing) config file path."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "msb" / "config.json"
    monkeypatch.setenv("MSB_CONFIG_PATH", str(path))
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "corral"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield path


def write(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))


CLOUD = {"backend": "cloud", "url": "https://msb.example.com", "api_key_ref": "env:PROD_KEY"}
STAGING = {"backend": "cloud", "url": "https://staging.example.com", "api_key_ref": "inline:stg"}


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A real keyring backend that keeps entries in a dict."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.entries.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError(username)


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    ring = MemoryKeyring()
    keyring.set_keyring(ring)
    try:
        yield ring
    finally:
        keyring.set_keyring(previous)


# ------------------------------------------------------------------ config path


def test_config_path_ladder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert config_path() == tmp_path / "msb" / "config.json"
    monkeypatch.setenv("MSB_CONFIG_PATH", "")
    assert config_path() == tmp_path / "home" / ".microsandbox" / "config.json"
    monkeypatch.setenv("MSB_HOME", str(tmp_path / "msbhome"))
    assert config_path() == tmp_path / "msbhome" / "config.json"
    monkeypatch.setenv("MSB_CONFIG_PATH", str(tmp_path / "x.json"))
    assert config_path() == tmp_path / "x.json"


# ------------------------------------------------------------------ parsing


def test_missing_file_is_empty_config() -> None:
    cfg = load_sdk_config()
    assert cfg.active_profile is None and cfg.profiles == {}


def test_parses_schema_and_ignores_foreign_keys(config_file: Path) -> None:
    write(
        config_file,
        {
            "home": "/opt/microsandbox",
            "log_level": "info",
            "active_profile": "prod",
            "profiles": {"prod": CLOUD, "dev": {"backend": "local", "future": 1}},
        },
    )
    cfg = load_sdk_config()
    assert cfg.active_profile == "prod"
    assert cfg.profiles["prod"] == Profile(
        backend=BackendKind.CLOUD, url="https://msb.example.com", api_key_ref="env:PROD_KEY"
    )
    assert cfg.profiles["dev"] == Profile(backend=BackendKind.LOCAL)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ({"profiles": {"p": {"backend": "k8s"}}}, r"profile 'p': Invalid enum value 'k8s'"),
        ({"profiles": {"p": {"url": "https://x"}}}, "profile 'p': .*missing required field"),
        ({"profiles": {"p": {"backend": "cloud", "url": 5}}}, r"profile 'p': .*\$\.url"),
        ({"profiles": {"p": "local"}}, "profile 'p': Expected `object`"),
        ({"profiles": ["p"]}, "'profiles' must be an object"),
        ({"active_profile": 3}, "'active_profile' must be a profile name"),
    ],
)
def test_bad_files_are_invalid_config(config_file: Path, doc: Any, message: str) -> None:
    write(config_file, doc)
    with pytest.raises(InvalidConfig, match=message) as info:
        load_sdk_config()
    assert str(config_file) in str(info.value)


def test_unreadable_file_is_invalid_config(config_file: Path) -> None:
    config_file.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(InvalidConfig, match="cannot read config file"):
        load_sdk_config()


# ------------------------------------------------------------------ writing


def test_save_keeps_unknown_keys_and_mode(config_file: Path) -> None:
    write(
        config_file,
        {
            "home": "/opt/msb",
            "paths": {"logs": "/var/log/msb"},
            "profiles": {"prod": {**CLOUD, "region": "eu"}, "old": {"backend": "local"}},
        },
    )
    os.chmod(config_file, 0o640)
    cfg = load_sdk_config()
    cfg.active_profile = "prod"
    cfg.profiles["prod"].api_key_ref = None
    del cfg.profiles["old"]
    cfg.profiles["new"] = Profile(backend=BackendKind.LOCAL)
    save_sdk_config(cfg)

    raw = json.loads(config_file.read_text())
    assert raw["home"] == "/opt/msb" and raw["paths"] == {"logs": "/var/log/msb"}
    assert raw["active_profile"] == "prod"
    assert raw["profiles"] == {
        "prod": {"backend": "cloud", "url": "https://msb.example.com", "region": "eu"},
        "new": {"backend": "local"},
    }
    assert os.stat(config_file).st_mode & 0o777 == 0o640
    assert load_sdk_config().profiles["new"].backend is BackendKind.LOCAL


def test_save_creates_new_file_private(config_file: Path) -> None:
    save_sdk_config(SdkConfig(profiles={"l": Profile(backend=BackendKind.LOCAL)}))
    assert json.loads(config_file.read_text()) == {"profiles": {"l": {"backend": "local"}}}
    assert os.stat(config_file).st_mode & 0o777 == 0o600
    assert [p.name for p in config_file.parent.iterdir()] == ["config.json"]  # no temp left


def test_set_active_profile_roundtrip(config_file: Path) -> None:
    doc = {"z_first": [1, 2], "profiles": {"a": {"backend": "local", "x": {"y": None}}}, "n": 1.5}
    write(config_file, doc)
    set_active_profile("a")
    raw = json.loads(config_file.read_text())
    assert raw == {**doc, "active_profile": "a"}
    assert list(raw) == ["z_first", "profiles", "n", "active_profile"]
    with pytest.raises(InvalidConfig, match=r"profile 'b' .* \(profiles there: a\)"):
        set_active_profile("b")
    assert json.loads(config_file.read_text())["active_profile"] == "a"


def test_set_active_profile_follows_symlink(config_file: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    write(real, {"profiles": {"a": {"backend": "local"}}})
    config_file.parent.mkdir(parents=True)
    config_file.symlink_to(real)
    set_active_profile("a")
    assert config_file.is_symlink()
    assert json.loads(real.read_text())["active_profile"] == "a"


# ------------------------------------------------------------------ api_key_ref


def test_env_ref(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "  k-123 ")
    assert resolve_api_key_ref("p", "env:MY_KEY") == "k-123"
    monkeypatch.setenv("MY_KEY", "   ")
    with pytest.raises(InvalidConfig, match="MY_KEY is unset or empty"):
        resolve_api_key_ref("p", "env:MY_KEY")
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(InvalidConfig, match="MY_KEY is unset or empty"):
        resolve_api_key_ref("p", "env:MY_KEY")
    with pytest.raises(InvalidConfig, match="must name a variable"):
        resolve_api_key_ref("p", "env: ")


def test_inline_ref_logs_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="corral.backend"):
        assert resolve_api_key_ref("dev", "inline:  msb_live_abc ") == "msb_live_abc"
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "'dev'" in record.getMessage()
    assert "msb_live_abc" not in record.getMessage()
    with pytest.raises(InvalidConfig, match="must be followed by the API key"):
        resolve_api_key_ref("dev", "inline:   ")


@pytest.mark.parametrize("ref", ["vault:foo", "plaintext", "ENV:X", ""])
def test_unknown_ref_scheme(ref: str) -> None:
    with pytest.raises(InvalidConfig, match="must start with 'env:', 'inline:' or 'keyring:'"):
        resolve_api_key_ref("p", ref)


def test_redaction() -> None:
    assert redact_api_key_ref("inline:msb_secret") == "inline:<redacted>"
    assert redact_api_key_ref("  inline:msb_secret") == "inline:<redacted>"
    assert redact_api_key_ref("env:MSB_API_KEY") == "env:MSB_API_KEY"
    assert redact_api_key_ref("keyring:prod") == "keyring:prod"


def test_keyring_ref_short_and_explicit_service(memory_keyring: MemoryKeyring) -> None:
    memory_keyring.set_password("corral", "prod", " k-short ")
    memory_keyring.set_password("msb", "prod", "k-msb")
    memory_keyring.set_password("corral", "a:b", "k-colon")
    assert resolve_api_key_ref("p", "keyring:prod") == "k-short"
    assert resolve_api_key_ref("p", "keyring:msb:prod") == "k-msb"
    assert resolve_api_key_ref("p", "keyring:corral:a:b") == "k-colon"


def test_keyring_missing_entry(memory_keyring: MemoryKeyring) -> None:
    with pytest.raises(InvalidConfig, match="store it with `keyring set corral prod`"):
        resolve_api_key_ref("p", "keyring:prod")
    memory_keyring.set_password("corral", "blank", "  ")
    with pytest.raises(InvalidConfig, match="no entry 'blank'"):
        resolve_api_key_ref("p", "keyring:blank")


@pytest.mark.parametrize("ref", ["keyring:", "keyring:svc:", "keyring::name"])
def test_keyring_malformed_ref(ref: str) -> None:
    with pytest.raises(InvalidConfig, match="needs an entry name"):
        resolve_api_key_ref("p", ref)


def test_keyring_without_backend() -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())  # type: ignore[no-untyped-call]
    try:
        with pytest.raises(InvalidConfig, match="install or configure a keyring backend") as info:
            resolve_api_key_ref("p", "keyring:prod")
    finally:
        keyring.set_keyring(previous)
    assert isinstance(info.value.__cause__, keyring.errors.NoKeyringError)


def test_keyring_profile_resolves_to_cloud(
    config_file: Path, memory_keyring: MemoryKeyring
) -> None:
    memory_keyring.set_password("corral", "prod", "k-ring")
    write(
        config_file,
        {
            "active_profile": "prod",
            "profiles": {"prod": {**CLOUD, "api_key_ref": "keyring:prod"}},
        },
    )
    backend = resolve_default_backend()
    assert backend == CloudBackend("https://msb.example.com", "k-ring")
    assert isinstance(backend, CloudBackend) and backend.profile == "prod"


# ------------------------------------------------------------------ ladder


def test_rung5_nothing_configured_is_local(tmp_path: Path) -> None:
    assert resolve_default_backend() == LocalBackend(home=tmp_path / "corral")


def test_rung1_msb_backend_local_wins_over_everything(
    monkeypatch: pytest.MonkeyPatch, config_file: Path
) -> None:
    monkeypatch.setenv("MSB_BACKEND", " Local ")
    monkeypatch.setenv("MSB_API_URL", "https://direct.example.com")
    monkeypatch.setenv("MSB_API_KEY", "direct")
    monkeypatch.setenv("MSB_PROFILE", "prod")
    write(config_file, "{broken")  # never read when MSB_BACKEND=local
    assert resolve_default_backend().kind is BackendKind.LOCAL


def test_rung1_msb_backend_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSB_BACKEND", "k8s")
    with pytest.raises(InvalidConfig, match="MSB_BACKEND must be 'local' or 'cloud', got 'k8s'"):
        resolve_default_backend()


def test_rung1_empty_msb_backend_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSB_BACKEND", "  ")
    assert resolve_default_backend().kind is BackendKind.LOCAL


def test_rung2_direct_env_wins_over_profiles(
    monkeypatch: pytest.MonkeyPatch, config_file: Path
) -> None:
    write(config_file, {"active_profile": "dev", "profiles": {"dev": {"backend": "local"}}})
    monkeypatch.setenv("MSB_PROFILE", "dev")
    monkeypatch.setenv("MSB_API_URL", " https://direct.example.com/ ")
    monkeypatch.setenv("MSB_API_KEY", " direct-key ")
    backend = resolve_default_backend()
    assert backend == CloudBackend("https://direct.example.com", "direct-key")
    assert isinstance(backend, CloudBackend) and backend.profile is None


@pytest.mark.parametrize("only", ["MSB_API_URL", "MSB_API_KEY"])
def test_rung2_needs_both_vars(monkeypatch: pytest.MonkeyPatch, only: str) -> None:
    monkeypatch.setenv(only, "https://direct.example.com")
    assert resolve_default_backend().kind is BackendKind.LOCAL


def test_rung2_bad_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSB_API_URL", "direct.example.com")
    monkeypatch.setenv("MSB_API_KEY", "k")
    with pytest.raises(InvalidConfig, match=r"MSB_API_URL.*http:// or https://"):
        resolve_default_backend()


def test_rung3_msb_profile_beats_active_profile(
    monkeypatch: pytest.MonkeyPatch, config_file: Path
) -> None:
    write(config_file, {"active_profile": "prod", "profiles": {"prod": CLOUD, "stg": STAGING}})
    monkeypatch.setenv("PROD_KEY", "k-prod")
    monkeypatch.setenv("MSB_PROFILE", " stg ")
    assert resolve_default_backend() == CloudBackend("https://staging.example.com", "stg")


def test_rung3_msb_profile_unknown(monkeypatch: pytest.MonkeyPatch, config_file: Path) -> None:
    write(config_file, {"profiles": {"prod": CLOUD, "stg": STAGING}})
    monkeypatch.setenv("MSB_PROFILE", "qa")
    with pytest.raises(InvalidConfig, match=r"'qa' \(from MSB_PROFILE\).*prod, stg"):
        resolve_default_backend()


def test_rung4_active_profile(monkeypatch: pytest.MonkeyPatch, config_file: Path) -> None:
    write(config_file, {"active_profile": "prod", "profiles": {"prod": CLOUD}})
    monkeypatch.setenv("PROD_KEY", "k-prod")
    assert resolve_default_backend() == CloudBackend("https://msb.example.com", "k-prod")


def test_rung4_active_profile_missing_key(config_file: Path) -> None:
    write(config_file, {"active_profile": "prod", "profiles": {"prod": CLOUD}})
    with pytest.raises(InvalidConfig, match="profile 'prod': environment variable PROD_KEY"):
        resolve_default_backend()


def test_rung4_active_profile_dangling(config_file: Path) -> None:
    write(config_file, {"active_profile": "gone", "profiles": {}})
    with pytest.raises(
        InvalidConfig, match=r"'gone' \(from active_profile\).*profiles there: none"
    ):
        resolve_default_backend()


def test_local_profile_gives_local(
    monkeypatch: pytest.MonkeyPatch, config_file: Path, tmp_path: Path
) -> None:
    write(config_file, {"active_profile": "dev", "profiles": {"dev": {"backend": "local"}}})
    assert resolve_default_backend() == LocalBackend(home=tmp_path / "corral")


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"backend": "cloud", "api_key_ref": "env:X"}, "no 'url'"),
        ({"backend": "cloud", "url": "https://x.example.com"}, "no 'api_key_ref'"),
        ({"backend": "cloud", "url": "x.example.com", "api_key_ref": "inline:k"}, "http://"),
        ({"backend": "cloud", "url": "https://x.example.com", "api_key_ref": "k"}, "must start"),
    ],
)
def test_bad_cloud_profiles(config_file: Path, profile: dict[str, str], message: str) -> None:
    write(config_file, {"active_profile": "bad", "profiles": {"bad": profile}})
    with pytest.raises(InvalidConfig, match=message) as info:
        resolve_default_backend()
    assert "'bad'" in str(info.value)


def test_explicit_cloud_without_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSB_BACKEND", "cloud")
    monkeypatch.setenv("MSB_API_KEY", "k")
    with pytest.raises(InvalidConfig, match=r"MSB_BACKEND=cloud .*\(MSB_API_URL unset"):
        resolve_default_backend()


def test_explicit_cloud_refuses_local_profile(
    monkeypatch: pytest.MonkeyPatch, config_file: Path
) -> None:
    monkeypatch.setenv("MSB_BACKEND", "cloud")
    write(config_file, {"active_profile": "dev", "profiles": {"dev": {"backend": "local"}}})
    with pytest.raises(InvalidConfig, match="MSB_BACKEND=cloud but profile 'dev'"):
        resolve_default_backend()


def test_explicit_cloud_with_direct_env_or_profile(
    monkeypatch: pytest.MonkeyPatch, config_file: Path
) -> None:
    monkeypatch.setenv("MSB_BACKEND", "CLOUD")
    write(config_file, {"active_profile": "stg", "profiles": {"stg": STAGING}})
    assert resolve_default_backend() == CloudBackend("https://staging.example.com", "stg")
    monkeypatch.setenv("MSB_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("MSB_API_KEY", "direct")
    assert resolve_default_backend() == CloudBackend("http://127.0.0.1:9", "direct")


def test_cloud_backend_from_profile(monkeypatch: pytest.MonkeyPatch, config_file: Path) -> None:
    write(config_file, {"profiles": {"prod": CLOUD, "dev": {"backend": "local"}}})
    monkeypatch.setenv("PROD_KEY", "k")
    assert CloudBackend.from_profile("prod") == CloudBackend("https://msb.example.com", "k")
    assert cloud_backend_from_profile("prod", config_file).profile == "prod"
    with pytest.raises(InvalidConfig, match="'dev' is a local profile, not a cloud one"):
        CloudBackend.from_profile("dev")
    with pytest.raises(InvalidConfig, match="'nope'"):
        CloudBackend.from_profile("nope")

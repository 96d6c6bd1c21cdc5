"""The ambient default backend: lazy ladder, set/swap, and task-following scopes."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from corral.backend import (
    Backend,
    BackendKind,
    CloudBackend,
    LocalBackend,
    backend_scope,
    build_backend,
    default_backend,
    default_backend_kind,
    reset_default_backend,
    set_default_backend,
    swap_default_backend,
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

A = CloudBackend("https://a.example.com", "key-a")
B = CloudBackend("https://b.example.com", "key-b")


@pytest.fixture(autouse=True)
def config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "msb" / "config.json"
    monkeypatch.setenv("MSB_CONFIG_PATH", str(path))
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "corral"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    reset_default_backend()
    yield path
    reset_default_backend()


def write(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


# ------------------------------------------------------------------ lazy ladder


def test_first_use_runs_the_ladder_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSB_API_URL", "https://direct.example.com")
    monkeypatch.setenv("MSB_API_KEY", "k")
    assert default_backend() == CloudBackend("https://direct.example.com", "k")
    assert default_backend_kind() is BackendKind.CLOUD
    monkeypatch.setenv("MSB_BACKEND", "local")
    assert default_backend_kind() is BackendKind.CLOUD  # cached
    reset_default_backend()
    assert default_backend_kind() is BackendKind.LOCAL


def test_unconfigured_default_is_local(tmp_path: Path) -> None:
    assert default_backend() == LocalBackend(home=tmp_path / "corral")


def test_resolution_error_falls_back_to_local_and_logs(
    config_file: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    write(config_file, {"active_profile": "missing", "profiles": {}})
    with caplog.at_level(logging.WARNING, logger="corral.backend"):
        backend = default_backend()
    assert backend == LocalBackend(home=tmp_path / "corral")
    [record] = caplog.records
    assert "falling back to local" in record.getMessage()
    assert "'missing'" in record.getMessage()


# ------------------------------------------------------------------ set / swap


def test_set_default_backend_object_and_kind_forms(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    set_default_backend(A)
    assert default_backend() is A
    set_default_backend(BackendKind.CLOUD, url="https://c.example.com", api_key="kc")
    assert default_backend() == CloudBackend("https://c.example.com", "kc")
    set_default_backend("local")
    assert default_backend() == LocalBackend(home=tmp_path / "corral")
    write(
        config_file,
        {
            "profiles": {
                "prod": {
                    "backend": "cloud",
                    "url": "https://p.example.com",
                    "api_key_ref": "env:PK",
                }
            }
        },
    )
    monkeypatch.setenv("PK", "kp")
    set_default_backend("Cloud", profile="prod")
    assert default_backend() == CloudBackend("https://p.example.com", "kp")


def test_set_default_backend_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSB_BACKEND", "local")
    set_default_backend(A)
    assert default_backend() is A


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("local",), {"url": "https://x.example.com"}, "local backend takes no url"),
        (("cloud",), {"url": "https://x.example.com"}, "needs api_key"),
        (("cloud",), {}, "needs url and api_key"),
        (("cloud",), {"profile": "p", "api_key": "k"}, "either profile=... or url="),
        (("k8s",), {}, "must be 'local' or 'cloud'"),
        (("cloud",), {"url": "x.example.com", "api_key": "k"}, "http:// or https://"),
    ],
)
def test_set_default_backend_rejects_bad_input(
    args: tuple[str], kwargs: dict[str, str], message: str
) -> None:
    set_default_backend(A)
    with pytest.raises(InvalidConfig, match=message):
        set_default_backend(*args, **kwargs)
    assert default_backend() is A  # unchanged


def test_set_default_backend_type_errors() -> None:
    with pytest.raises(TypeError, match="only go with a backend kind"):
        set_default_backend(A, url="https://x.example.com")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="expected a LocalBackend"):
        set_default_backend(42)  # type: ignore[call-overload]


def test_build_backend_profile_must_be_cloud(config_file: Path) -> None:
    write(config_file, {"profiles": {"dev": {"backend": "local"}}})
    with pytest.raises(InvalidConfig, match="not a cloud one"):
        build_backend("cloud", profile="dev")


def test_swap_returns_previous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSB_API_URL", "https://direct.example.com")
    monkeypatch.setenv("MSB_API_KEY", "k")
    resolved = swap_default_backend(A)  # nothing installed yet: the ladder's answer
    assert resolved == CloudBackend("https://direct.example.com", "k")
    assert default_backend() is A
    assert swap_default_backend(B) is A
    set_default_backend(resolved)
    assert default_backend() == resolved


# ------------------------------------------------------------------ scopes


def test_scope_nests_and_restores() -> None:
    set_default_backend(A)
    with backend_scope(B) as scoped:
        assert scoped is B and default_backend() is B
        with backend_scope("cloud", url="https://c.example.com", api_key="kc"):
            assert default_backend().kind is BackendKind.CLOUD
            assert default_backend() == CloudBackend("https://c.example.com", "kc")
        assert default_backend() is B
        set_default_backend(LocalBackend())  # global change does not beat the scope
        assert default_backend() is B
    assert default_backend().kind is BackendKind.LOCAL


def test_scope_restores_on_error() -> None:
    set_default_backend(A)
    with pytest.raises(RuntimeError), backend_scope(B):
        raise RuntimeError("boom")
    assert default_backend() is A


def test_bad_scope_arguments_leave_nothing_behind() -> None:
    set_default_backend(A)
    with pytest.raises(InvalidConfig):
        backend_scope("cloud", url="https://x.example.com")
    assert default_backend() is A


async def test_scope_follows_tasks_started_inside_it() -> None:
    set_default_backend(A)
    seen: dict[str, Backend] = {}
    go = trio.Event()

    async def observe(label: str) -> None:
        await go.wait()
        seen[label] = default_backend()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:  # opened OUTSIDE the scope
            nursery.start_soon(observe, "started-before-scope")
            await trio.testing.wait_all_tasks_blocked()
            with backend_scope(B):
                nursery.start_soon(observe, "started-inside-scope")
                async with trio.open_nursery() as inner:
                    inner.start_soon(observe, "inner-nursery")
                    await trio.testing.wait_all_tasks_blocked()
                    go.set()
            # The parent left the scope; the tasks keep the context they started with.
    assert seen == {
        "started-before-scope": A,
        "started-inside-scope": B,
        "inner-nursery": B,
    }


async def test_concurrent_scopes_are_isolated() -> None:
    set_default_backend(LocalBackend())
    both_inside = trio.Event()
    entered = 0
    seen: dict[str, list[Backend]] = {"a": [], "b": []}

    async def worker(label: str, backend: Backend) -> None:
        nonlocal entered
        with backend_scope(backend):
            entered += 1
            if entered == 2:
                both_inside.set()
            await both_inside.wait()
            seen[label].append(default_backend())
            await trio.lowlevel.checkpoint()
            seen[label].append(default_backend())
        seen[label].append(default_backend())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker, "a", A)
            nursery.start_soon(worker, "b", B)
    assert seen["a"][:2] == [A, A] and seen["b"][:2] == [B, B]
    assert seen["a"][2].kind is BackendKind.LOCAL and seen["b"][2].kind is BackendKind.LOCAL
    assert default_backend().kind is BackendKind.LOCAL

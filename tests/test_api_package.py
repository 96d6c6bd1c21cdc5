"""The public surface of ``import corral``."""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest

import corral
import corral.errors
import corral.protocol


def test_every_public_name_resolves() -> None:
    for name in corral.__all__:
        assert getattr(corral, name) is not None, name


def test_every_error_class_is_exported_as_the_same_object() -> None:
    assert "errors" in corral.__all__ and corral.errors.__name__ == "corral.errors"
    classes = [
        obj
        for obj in vars(corral.errors).values()
        if inspect.isclass(obj) and issubclass(obj, corral.errors.CorralError)
    ]
    assert len(classes) >= 20
    for cls in classes:
        assert getattr(corral, cls.__name__) is cls, cls.__name__
        assert cls.__name__ in corral.__all__


def test_message_structs_users_send() -> None:
    for name in [
        "Exec",
        "FsRead",
        "FsWrite",
        "FsStat",
        "FsList",
        "FsMkdir",
        "FsRemove",
        "FsCopy",
        "FsRename",
        "Ping",
        "Shutdown",
    ]:
        assert getattr(corral, name) is getattr(corral.protocol, name)
    # corral.FsAlreadyExists is the error; corral.FsExists the request.
    assert corral.FsAlreadyExists is corral.errors.FsAlreadyExists
    assert corral.FsExists is corral.protocol.FsExists


def test_version_comes_from_package_metadata() -> None:
    assert corral.__version__ == importlib.metadata.version("corral")


def test_backend_names_load_lazily() -> None:
    import corral.backend as backend

    assert corral.default_backend is backend.default_backend
    assert corral.set_default_backend is backend.set_default_backend
    assert corral.backend_scope is backend.backend_scope


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = corral.nope


def test_status_and_api_objects() -> None:
    assert str(corral.SandboxStatus.RUNNING) == "running"
    assert callable(corral.open_supervisor)
    assert corral.DEFAULT_STOP_TIMEOUT == 10.0 and corral.DEFAULT_KILL_TIMEOUT == 5.0

"""Shared fixtures: a private CORRAL_HOME per test and the local-sandbox gate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import corral
from corral.backend import LocalBackend
from corral.testing import local_unavailable


@pytest.fixture
def corral_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private CORRAL_HOME (tmp_path may be unreachable for the sandbox uid: that is
    the real situation under /root, so the driver has to cope)."""
    home = tmp_path / "corral-home"
    monkeypatch.setenv("CORRAL_HOME", str(home))
    yield home


@pytest.fixture
def local_backend(corral_home: Path) -> LocalBackend:
    reason = local_unavailable()
    if reason is not None:
        pytest.skip(f"real sandboxes unavailable: {reason}")
    return LocalBackend(home=corral_home)


@pytest.fixture
async def local_sup(local_backend: LocalBackend) -> AsyncIterator[corral.Supervisor]:
    """A supervisor on the real local (bubblewrap) driver."""
    async with corral.open_supervisor(local_backend) as sup:
        yield sup

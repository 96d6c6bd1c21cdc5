"""``corral run`` and ``corral version`` as a user runs them: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.backend import LocalBackend

pytestmark = pytest.mark.integration


def corral(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "CORRAL_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "corral.cli.main", *args],
        env=env,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def test_run_echo_hello(local_backend: LocalBackend) -> None:
    done = corral("run", "--", "echo", "hello", home=local_backend.home)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello\n"
    assert list((local_backend.home / "sandboxes").iterdir()) == []  # removed afterwards


def test_run_streams_both_streams_and_exits_with_the_code(local_backend: LocalBackend) -> None:
    done = corral(
        "run",
        "-e",
        "X=42",
        "--",
        "sh",
        "-c",
        'echo "x=$X"; echo oops >&2; exit 7',
        home=local_backend.home,
    )
    assert done.returncode == 7
    assert done.stdout == b"x=42\n"
    assert done.stderr == b"oops\n"


def test_run_timeout_and_bad_usage(local_backend: LocalBackend) -> None:
    slow = corral("run", "--timeout", "0.5", "--", "sleep", "30", home=local_backend.home)
    assert slow.returncode == 137
    assert b"ExecTimeout" in slow.stderr
    empty = corral("run", home=local_backend.home)
    assert empty.returncode == 1
    assert b"InvalidConfig" in empty.stderr
    bad_env = corral("run", "-e", "novalue", "--", "true", home=local_backend.home)
    assert bad_env.returncode == 1 and b"KEY=VALUE" in bad_env.stderr


def test_version(corral_home: Path) -> None:
    done = corral("version", home=corral_home)
    assert done.returncode == 0
    assert done.stdout.startswith(b"corral ")

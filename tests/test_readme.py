"""The README's Python example runs as written (on real sandboxes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from corral.backend import LocalBackend

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(local_backend: LocalBackend, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "CORRAL_HOME": str(local_backend.home)},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"ExecExited" in done.stdout and b"done\\n" in done.stdout
    assert list((local_backend.home / "sandboxes").iterdir()) == []

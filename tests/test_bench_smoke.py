"""``python -m corral.bench --quick --only ask,exec``: the runner end to end (real sandboxes)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import trio

from corral.testing import local_unavailable

NUMBER = r"[0-9][0-9.,]* (?:ns|µs|ms|s)"


@pytest.mark.integration
async def test_quick_ask_exec(tmp_path: Path) -> None:
    reason = local_unavailable()
    if reason is not None:
        pytest.skip(f"real sandboxes unavailable: {reason}")
    out = tmp_path / "results" / "RESULTS.md"
    argv = ["--quick", "--only", "ask,exec", "--out", str(out)]
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, "-m", "corral.bench", *argv],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=tmp_path,
        )
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, f"{stdout}\n{stderr}"
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["benchmark", "p50", "p99"]
    rows = {
        "actor ask, no I/O (Describe)": "trio memory-channel round trip",
        "exec `true` round trip": "host trio.run_process",
    }
    for name, baseline in rows.items():
        (line,) = [line for line in lines if line.startswith(name)]
        # p50, p99 and the baseline's p50 are numbers; the ratio is printed as N.NNx
        assert len(re.findall(NUMBER, line)) >= 3, line
        assert re.search(r"\b[0-9]+\.[0-9]{2}x\b", line), line
        assert baseline in line and re.search(r"\b(met|MISSED)\s*$", line), line
    assert "create" not in stdout.split("notes:")[0].lower()  # --only was honoured
    text = out.read_text()
    assert f"`python -m corral.bench {' '.join(argv)}`" in text
    assert re.search(r"nproc \d+", text) and "kernel" in text and "python 3" in text
    for name in rows:
        assert f"| {name} |" in text
    assert "Processes left behind" in text and "none." in text

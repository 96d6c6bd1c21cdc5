"""`corral image pull / ls / rm` against a real registry (docker-registry on 127.0.0.1)."""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from corral.cli.main import main
from corral.drivers.local.images.testing import Member, layer, push_image, run_registry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    addr = os.environ.get("CORRAL_TEST_REGISTRY")
    if addr:
        yield addr
        return
    if shutil.which("docker-registry") is None:
        pytest.skip("no registry: CORRAL_TEST_REGISTRY is unset and docker-registry is missing")
    with run_registry(tmp_path_factory.mktemp("registry")) as started:
        yield started


def test_pull_ls_rm(
    registry: str,
    corral_home: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"test/cli-{uuid.uuid4().hex[:8]}"
    pushed = trio.run(push_image, registry, name, "1", [layer([Member("etc/motd", b"hi\n")])])

    assert main(["image", "pull", pushed.reference]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{pushed.reference}: {pushed.digest} (linux/")
    assert (corral_home / "images" / "rootfs" / pushed.digest[7:] / "etc" / "motd").exists()

    assert main(["image", "ls", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["reference"] for r in rows} == {
        pushed.reference,
        f"{registry}/{name}@{pushed.digest}",
    }
    assert all(r["digest"] == pushed.digest for r in rows)
    assert main(["image", "ls"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["REFERENCE", "DIGEST", "PLATFORM", "SIZE", "PULLED"]
    assert len(table) == 2 and table[1].split()[0] == pushed.reference
    assert main(["image", "ls", "-a"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3

    # a sandbox dir naming the digest keeps its rootfs through rm
    rootfs = corral_home / "images" / "rootfs" / pushed.digest[7:]
    busy = corral_home / "sandboxes" / "box"
    busy.mkdir(parents=True)
    (busy / "image").write_text(pushed.digest + "\n")
    assert main(["image", "rm", "--json", pushed.reference]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": [pushed.reference]}
    assert main(["image", "rm", pushed.digest]) == 0
    assert capsys.readouterr().out == f"removed {registry}/{name}@{pushed.digest}\n"
    assert rootfs.is_dir()
    assert main(["image", "gc", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"freed": 0}
    assert rootfs.is_dir()
    (busy / "image").unlink()
    assert main(["image", "gc"]) == 0
    assert capsys.readouterr().out == "freed 1 cache entries\n"
    assert not rootfs.exists()
    assert main(["image", "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []

    assert main(["image", "rm", pushed.reference]) == 1
    assert "ImageNotFound" in capsys.readouterr().err
    assert main(["image", "pull", f"{registry}/{name}:missing"]) == 1
    assert "ImageNotFound" in capsys.readouterr().err

    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    assert main(["image", "pull", "--username", "u", pushed.reference]) == 1
    assert "go together" in capsys.readouterr().err

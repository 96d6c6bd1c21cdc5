"""The machine that scripts/setup.sh prepares: what the other tests rely on.

These fail loudly when the set-up is broken (no bubblewrap, no user namespaces, the
throw-away registry from scripts/check.sh not answering) instead of letting the real
tests skip or fail in confusing ways.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest
import trio


def test_bubblewrap_can_make_a_user_namespace() -> None:
    bwrap = shutil.which("bwrap")
    assert bwrap is not None, "bubblewrap missing: run `bash scripts/setup.sh`"
    done = subprocess.run(
        [bwrap, "--unshare-user", "--unshare-pid", "--ro-bind", "/", "/", "--", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, f"bwrap cannot sandbox here: {done.stderr.strip()}"


async def test_test_registry_answers_the_v2_api() -> None:
    addr = os.environ.get("CORRAL_TEST_REGISTRY")
    if not addr:
        pytest.skip("CORRAL_TEST_REGISTRY unset (scripts/check.sh starts one)")
    with trio.fail_after(10):
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://{addr}/v2/")
    assert response.status_code == 200
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"

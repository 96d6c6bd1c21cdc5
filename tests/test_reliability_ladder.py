"""The stop ladder's timings on real sandboxes, within 100 ms of the configured values.

The ladder (``actors/sandbox.py``, after the seed's ``stop_with_timeout``): ``Shutdown``
with grace ``timeout - min(1, timeout / 2)`` to the agent, whose exit is polled every
``POLL_INTERVAL`` (100 ms) up to ``timeout``; then SIGTERM to every process of the
sandbox, polled up to ``DEFAULT_KILL_TIMEOUT`` (5 s); then SIGKILL, polled the same. A
command that ignores SIGTERM is the agent's to SIGKILL at the end of the grace; an
agent that cannot answer (here: SIGSTOPped) meets the SIGTERM rung at ``timeout`` and
the SIGKILL rung ``DEFAULT_KILL_TIMEOUT`` later.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import trio

import corral
from corral.actors.sandbox import DEFAULT_KILL_TIMEOUT, POLL_INTERVAL, SandboxActor
from corral.drivers.local.driver import LocalSandbox
from corral.drivers.local.launch import sandbox_pids
from corral.testing import processes_matching, wait_until

pytestmark = pytest.mark.integration

TOLERANCE = 0.1

RECORDER = """
import signal, sys, time
def on_term(signum, frame):
    with open("/workspace/term", "a") as f:
        f.write(f"{time.time()!r}\\n")
signal.signal(signal.SIGTERM, on_term)
print("armed", flush=True)
while True:
    time.sleep(0.01)
"""
"""A command that notes (wall clock) every SIGTERM it gets and keeps running."""


def local(sb: corral.Sandbox) -> LocalSandbox:
    actor = sb._actor
    assert isinstance(actor, SandboxActor) and isinstance(actor.proc, LocalSandbox)
    return actor.proc


def agent_pid(sb: corral.Sandbox) -> int:
    init = local(sb).init_pid
    assert init is not None
    for pid in sandbox_pids(init):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"bwrap" not in argv[0] and any(b"corral.agentd" in a for a in argv):
            return pid
    raise AssertionError("no agent found")


def term_times(sb: corral.Sandbox) -> list[float]:
    try:
        text = (local(sb).root / "work" / "term").read_text()
    except FileNotFoundError:
        return []
    return [float(line) for line in text.split()]


async def arm_recorder(sb: corral.Sandbox, marker: str) -> None:
    """Start RECORDER in the background (it outlives this call) and wait for it."""
    script = RECORDER + f"# {marker}\n"
    await sb.fs.write("/workspace/recorder.py", script)
    await sb.exec("sh", ["-c", "python3 /workspace/recorder.py > /workspace/armed 2>&1 &"])
    armed = local(sb).root / "work" / "armed"
    assert await wait_until(lambda: armed.exists() and b"armed" in armed.read_bytes(), timeout=10)


async def test_an_idle_sandbox_stops_at_the_first_poll(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(30):
        sb = await local_sup.create(f"ld{uuid.uuid4().hex[:8]}")
        t0 = time.monotonic()
        await sb.stop(timeout=3)
        elapsed = time.monotonic() - t0
        assert sb.status is corral.SandboxStatus.STOPPED
        # the agent exits at once; the ladder sees it at its first 100 ms poll
        assert elapsed <= POLL_INTERVAL + TOLERANCE, elapsed


async def test_kill_is_seen_at_the_first_poll(local_sup: corral.Supervisor) -> None:
    with trio.fail_after(30):
        sb = await local_sup.create(f"lk{uuid.uuid4().hex[:8]}")
        t0 = time.monotonic()
        await sb.kill()
        elapsed = time.monotonic() - t0
        assert sb.status is corral.SandboxStatus.STOPPED
        assert elapsed <= POLL_INTERVAL + TOLERANCE, elapsed


async def test_a_command_ignoring_sigterm_is_killed_at_the_end_of_the_grace(
    local_sup: corral.Supervisor,
) -> None:
    timeout = 2.0
    grace = timeout - min(1.0, timeout / 2)
    marker = f"lg{uuid.uuid4().hex[:8]}"
    with trio.fail_after(30):
        sb = await local_sup.create(marker)
        await arm_recorder(sb, marker)
        wall0, t0 = time.time(), time.monotonic()
        await sb.stop(timeout=timeout)
        elapsed = time.monotonic() - t0
        terms = term_times(sb)
    # the agent passes the Shutdown on as SIGTERM at once...
    assert len(terms) == 1 and 0 <= terms[0] - wall0 <= TOLERANCE, [t - wall0 for t in terms]
    # ...and SIGKILLs the command at the end of the grace; the next poll sees the exit
    assert grace - TOLERANCE <= elapsed <= grace + POLL_INTERVAL + TOLERANCE, elapsed
    assert sb.status is corral.SandboxStatus.STOPPED
    assert not processes_matching(marker)


async def test_a_frozen_agent_meets_sigterm_at_the_timeout_and_sigkill_after_the_kill_timeout(
    local_sup: corral.Supervisor,
) -> None:
    timeout = 1.0
    marker = f"lf{uuid.uuid4().hex[:8]}"
    with trio.fail_after(60):
        sb = await local_sup.create(marker)
        await arm_recorder(sb, marker)
        agent = agent_pid(sb)
        os.kill(agent, signal.SIGSTOP)  # it can no longer answer the Shutdown
        try:
            wall0, t0 = time.time(), time.monotonic()
            await sb.stop(timeout=timeout)
            elapsed = time.monotonic() - t0
        finally:
            try:
                os.kill(agent, signal.SIGKILL)
            except ProcessLookupError:
                pass
        terms = [t - wall0 for t in term_times(sb)]
    # SIGTERM to every process of the sandbox at the stop timeout...
    assert len(terms) == 1 and abs(terms[0] - timeout) <= TOLERANCE, terms
    # ...nothing ends (the frozen agent's SIGTERM stays pending), SIGKILL after 5 s more
    expected = timeout + DEFAULT_KILL_TIMEOUT
    assert expected - TOLERANCE <= elapsed <= expected + POLL_INTERVAL + TOLERANCE, elapsed
    assert sb.status is corral.SandboxStatus.STOPPED
    assert await wait_until(lambda: not processes_matching(marker), timeout=2)

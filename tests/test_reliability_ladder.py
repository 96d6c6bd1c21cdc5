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
from typing import Any

import pytest
import trio

import corral
from corral.actors.sandbox import DEFAULT_KILL_TIMEOUT, POLL_INTERVAL, SandboxActor
from corral.drivers.local.driver import LocalSandbox
from corral.drivers.local.launch import sandbox_pids
from corral.testing import processes_matching, wait_until

pytestmark = pytest.mark.integration

TOLERANCE = 0.1
TEARDOWN = 0.5
"""Allowance for other processes to act on a signal (the agent, a command's handler,
the kernel and bwrap tearing the sandbox down), which a loaded host delays. The ladder's
own timings (when it sends what) are held to TOLERANCE."""

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


def record_signals(sb: corral.Sandbox, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[float]]:
    """When the ladder calls the driver's terminate and kill (monotonic times)."""
    proc = local(sb)
    calls: dict[str, list[float]] = {"terminate": [], "kill": []}
    for name in calls:
        real = getattr(proc, name)

        async def wrapper(name: str = name, real: Any = real) -> None:
            calls[name].append(time.monotonic())
            await real()

        monkeypatch.setattr(proc, name, wrapper)
    return calls


async def test_an_idle_sandbox_stops_at_the_first_poll(
    local_sup: corral.Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(30):
        sb = await local_sup.create(f"ld{uuid.uuid4().hex[:8]}")
        calls = record_signals(sb, monkeypatch)
        t0 = time.monotonic()
        await sb.stop(timeout=3)
        elapsed = time.monotonic() - t0
        assert sb.status is corral.SandboxStatus.STOPPED
    # the agent exits at once on Shutdown: no signal rung, seen at the first 100 ms poll
    assert calls["terminate"] == [] and calls["kill"] == [], calls
    assert elapsed <= POLL_INTERVAL + TOLERANCE + TEARDOWN, elapsed


async def test_kill_is_seen_at_the_first_poll(
    local_sup: corral.Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(30):
        sb = await local_sup.create(f"lk{uuid.uuid4().hex[:8]}")
        calls = record_signals(sb, monkeypatch)
        t0 = time.monotonic()
        await sb.kill()
        elapsed = time.monotonic() - t0
        assert sb.status is corral.SandboxStatus.STOPPED
    assert calls["kill"] and calls["kill"][0] - t0 <= TOLERANCE, calls
    assert elapsed <= POLL_INTERVAL + TOLERANCE + TEARDOWN, elapsed


async def test_a_command_ignoring_sigterm_is_killed_at_the_end_of_the_grace(
    local_sup: corral.Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout = 2.0
    grace = timeout - min(1.0, timeout / 2)
    marker = f"lg{uuid.uuid4().hex[:8]}"
    with trio.fail_after(30):
        sb = await local_sup.create(marker)
        await arm_recorder(sb, marker)
        calls = record_signals(sb, monkeypatch)
        wall0, t0 = time.time(), time.monotonic()
        await sb.stop(timeout=timeout)
        elapsed = time.monotonic() - t0
        terms = term_times(sb)
    # the agent passes the Shutdown on as SIGTERM at once...
    assert len(terms) == 1 and 0 <= terms[0] - wall0 <= TOLERANCE + TEARDOWN, terms
    # ...and SIGKILLs the command at the end of the grace, then exits: no signal rung
    assert calls["terminate"] == [] and calls["kill"] == [], calls
    assert grace - TOLERANCE <= elapsed <= grace + POLL_INTERVAL + TOLERANCE + TEARDOWN, elapsed
    assert sb.status is corral.SandboxStatus.STOPPED
    assert not processes_matching(marker)


async def test_a_frozen_agent_meets_sigterm_at_the_timeout_and_sigkill_after_the_kill_timeout(
    local_sup: corral.Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout = 1.0
    marker = f"lf{uuid.uuid4().hex[:8]}"
    with trio.fail_after(60):
        sb = await local_sup.create(marker)
        await arm_recorder(sb, marker)
        calls = record_signals(sb, monkeypatch)
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
    term_at = [t - t0 for t in calls["terminate"]]
    kill_at = [t - t0 for t in calls["kill"]]
    # SIGTERM to every process of the sandbox at the stop timeout (and it arrives)...
    assert len(term_at) == 1 and abs(term_at[0] - timeout) <= TOLERANCE, term_at
    assert len(terms) == 1 and -TOLERANCE <= terms[0] - timeout <= TOLERANCE + TEARDOWN, terms
    # ...nothing ends (the frozen agent's SIGTERM stays pending): SIGKILL 5 s later
    expected = timeout + DEFAULT_KILL_TIMEOUT
    assert kill_at and abs(kill_at[0] - expected) <= TOLERANCE, kill_at
    # the stop returns once the sandbox is seen gone: the next poll, plus the time the
    # kernel and bwrap take to tear the sandbox down (slow on a loaded host)
    assert expected - TOLERANCE <= elapsed <= expected + POLL_INTERVAL + TEARDOWN, elapsed
    assert sb.status is corral.SandboxStatus.STOPPED
    assert await wait_until(lambda: not processes_matching(marker), timeout=2)

"""The OOM killer takes a sandbox's commands, not its agent.

Commands (execs, exec streams with a tty, jobs) start at ``oom_score_adj`` 500 while the
agent keeps its own value: the host lowers it to -1000 when it may (CAP_SYS_RESOURCE),
else it stays what it inherited. A sandbox filling its memory through ``/tmp`` gets the
writer killed (or ENOSPC); the agent survives and the sandbox keeps working.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

import corral
from corral.actors.sandbox import SandboxActor
from corral.agentd.oomscore import COMMAND_OOM_SCORE_ADJ, OomScore
from corral.drivers.local import cgroup as cgroups
from corral.drivers.local import hardening
from corral.drivers.local.driver import LocalSandbox

pytestmark = pytest.mark.integration

STEP = 60
CAP_SYS_RESOURCE = 24


def may_lower_scores() -> bool:
    """Has this process CAP_SYS_RESOURCE (needed to set an oom_score_adj below 0)?"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def score(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def local(sb: corral.Sandbox) -> LocalSandbox:
    actor = sb._actor
    assert isinstance(actor, SandboxActor) and isinstance(actor.proc, LocalSandbox)
    return actor.proc


@pytest.fixture
def need_cgroups() -> None:
    if cgroups.detect() is None:
        pytest.skip(f"no per-sandbox cgroups here: {cgroups.why_unavailable()}")


# -- the pieces ------------------------------------------------------------------------------


def test_a_child_spawned_in_for_command_starts_at_the_command_score() -> None:
    oom = OomScore()
    own = oom.current()
    assert own is not None and own == score_of_self()
    with oom.for_command():
        child = subprocess.run(["cat", "/proc/self/oom_score_adj"], capture_output=True, check=True)
    assert int(child.stdout) == max(own, COMMAND_OOM_SCORE_ADJ)
    assert oom.current() == own  # back to what it was


def score_of_self() -> int:
    return int(Path("/proc/self/oom_score_adj").read_text())


def test_for_command_without_procfs_changes_nothing(tmp_path: Path) -> None:
    oom = OomScore(str(tmp_path / "missing"))
    assert oom.current() is None
    with oom.for_command():
        pass
    assert score_of_self() == score_of_self()


def test_protect_sets_minus_1000_exactly_when_the_host_may() -> None:
    hardening.reset_for_tests()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        done = hardening.protect([child.pid, None, 2**22 + 1])  # None and a gone pid: skipped
        assert done == may_lower_scores()
        assert score(child.pid) == (hardening.PROTECTED_OOM_SCORE_ADJ if done else 0)
    finally:
        child.kill()
        child.wait()
        hardening.reset_for_tests()


# -- on real sandboxes ---------------------------------------------------------------------------


async def test_commands_jobs_and_ttys_start_at_500_the_agent_keeps_its_score(
    local_sup: corral.Supervisor, need_cgroups: None
) -> None:
    with trio.fail_after(STEP):
        sb = await local_sup.create(f"oomscore-{uuid.uuid4().hex[:6]}")
        proc = local(sb)
        assert proc.init_pid is not None
        agent = hardening.agent_pid(proc.init_pid)
        assert agent is not None
        protected = may_lower_scores()
        expected_agent = hardening.PROTECTED_OOM_SCORE_ADJ if protected else score_of_self()
        for pid in (proc.pid, proc.init_pid, agent):
            assert pid is not None and score(pid) == expected_agent
        out = await sb.exec("cat", ["/proc/self/oom_score_adj"])
        assert out.stdout == b"500\n"
        async with sb.exec_stream("cat", ["/proc/self/oom_score_adj"], tty=True) as stream:
            seen = b""
            async for event in stream:
                if isinstance(event, corral.protocol.ExecStdout):
                    seen += event.data
        assert seen.strip() == b"500"
        job = await sb.exec_detached("sh", ["-c", "cat /proc/self/oom_score_adj"])
        assert await job.wait() == 0
        texts = [r.text.strip() for r in await sb.logs() if r.stream == "stdout"]
        assert "500" in texts
        assert score(agent) == expected_agent  # the agent went back after each spawn


async def test_filling_tmp_up_to_the_memory_limit_kills_the_writer_not_the_agent(
    local_sup: corral.Supervisor, need_cgroups: None
) -> None:
    with trio.fail_after(STEP):
        sb = await local_sup.create(
            f"oomfill-{uuid.uuid4().hex[:6]}", memory_mib=64, tmp_size_mib=512
        )
        proc = local(sb)
        assert proc.init_pid is not None
        agent = hardening.agent_pid(proc.init_pid)
        out = await sb.exec("sh", ["-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=256 2>&1"])
        assert out.exit_code != 0, out  # killed (137) or refused: never 256 MiB in 64
        assert "out of memory" in (proc.limit_report() or "")
        assert hardening.agent_pid(proc.init_pid) == agent  # the same agent process
        assert sb.status is corral.SandboxStatus.RUNNING
        await sb.fs.remove("/tmp/fill")
        assert (await sb.exec("echo", ["alive"])).stdout == b"alive\n"
        await sb.fs.write("/tmp/again", b"x" * (8 << 20))  # the memory is back
        assert (await sb.fs.stat("/tmp/again")).size == 8 << 20

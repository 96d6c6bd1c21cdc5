"""The sandbox commands of the ``corral`` CLI.

``main([...])`` in-process for parsing, output shapes and errors; command bodies called
directly with a supervisor of the test's own (fake driver, or real sandboxes for exec);
and one run of real ``corral`` processes (create in one, exec in another) once detached
sandboxes and the state db are in."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

import corral
from corral.cli import sandboxes
from corral.cli.main import build_parser, main
from corral.drivers.fake import FakeDriver

MSB_ENV = ("MSB_BACKEND", "MSB_API_URL", "MSB_API_KEY", "MSB_PROFILE", "MSB_CONFIG_PATH")


@pytest.fixture(autouse=True)
def local_default(corral_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The default backend is local, in a private CORRAL_HOME."""
    for name in MSB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MSB_CONFIG_PATH", str(corral_home / "no-config.json"))
    yield corral_home


def parse(argv: list[str]) -> tuple[sandboxes.Handler, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    return args.func.args[0], args


async def call(sup: Any, argv: list[str]) -> int:
    handler, args = parse(argv)
    return await handler(sup, args)


@asynccontextmanager
async def fake_sup() -> AsyncIterator[corral.Supervisor]:
    async with FakeDriver() as driver, corral.open_supervisor(driver=driver) as sup:
        yield sup


# -- main(), in-process ------------------------------------------------------------------------


def test_ls_on_an_empty_home(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["ls"]) == 0
    assert capsys.readouterr().out.split() == [
        "NAME",
        "STATUS",
        "IMAGE",
        "CREATED",
        "PID",
        "DETACHED",
    ]
    assert main(["ls", "-q"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "nope", "--", "echo", "hi"],
        ["inspect", "nope"],
        ["inspect", "nope", "--json"],
        ["start", "nope"],
        ["stop", "nope"],
        ["kill", "nope"],
        ["drain", "nope"],
        ["rm", "nope"],
        ["rm", "-f", "nope"],
        ["logs", "nope"],
        ["metrics", "nope"],
    ],
)
def test_unknown_name_exits_1_with_a_clear_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "corral: SandboxNotFound: sandbox 'nope' not found" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["exec", "x"], "corral exec needs a command"),
        (["exec", "x", "--"], "corral exec needs a command"),
        (["exec", "-e", "NOEQUALS", "x", "--", "true"], "--env wants KEY=VALUE"),
        (["exec", "x", "-e", "NOEQUALS", "--", "true"], "--env wants KEY=VALUE"),
        (["exec", "x", "--bogus", "--", "true"], "unrecognized arguments: --bogus"),
        (["exec", "x", "-i", "stray", "--", "true"], "unrecognized arguments: stray"),
        (["create", "y", "--label", "bad"], "--label wants KEY=VALUE"),
        (["create", "Bad Name!"], "InvalidConfig"),
        (["create", "z", "--cpus", "0"], "cpus must be greater than 0"),
        (["create", "z", "--idle-timeout", "-1"], "idle_timeout"),
        (["logs", "x", "--since", "5x"], "--since wants a duration"),
        (["logs", "x", "--tail", "-1"], "--tail wants a number"),
        (["metrics", "x", "--interval", "0"], "--interval must be greater than 0"),
        (["metrics", "x", "--watch", "--count", "0"], "--count must be at least 1"),
    ],
)
def test_bad_input_exits_1_with_its_typed_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("corral: InvalidConfig: ") and message in err


@pytest.mark.parametrize(
    "argv", [["exec"], ["rm"], ["stop"], ["logs"], ["create", "--memory", "x"]]
)
def test_usage_errors_are_argparse_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_exec_options_after_the_name() -> None:
    _, args = parse(["exec", "-e", "A=1", "x", "-i", "-e", "B=2", "--timeout", "3", "--", "ls"])
    assert sandboxes.exec_command(args) == ["ls"]
    assert (args.env, args.interactive, args.tty, args.timeout) == (["A=1", "B=2"], True, False, 3)
    _, args = parse(["exec", "x", "--", "sh", "-c", "echo -- -e"])
    assert sandboxes.exec_command(args) == ["sh", "-c", "echo -- -e"]
    assert args.env == []
    _, args = parse(["exec", "x", "sh", "--", "-e"])  # no options first: "--" is CMD's
    assert sandboxes.exec_command(args) == ["sh", "--", "-e"]
    _, args = parse(["exec", "x", "-e", "A=1", "ls"])
    with pytest.raises(corral.InvalidConfig, match="end options after NAME with --"):
        sandboxes.exec_command(args)


def test_parse_since() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert sandboxes.parse_since("90s", now) == now - timedelta(seconds=90)
    assert sandboxes.parse_since("1.5h", now) == now - timedelta(minutes=90)
    assert sandboxes.parse_since("2d", now) == now - timedelta(days=2)
    assert sandboxes.parse_since("2024-05-01T10:00:00+00:00", now) == now - timedelta(hours=2)
    naive = sandboxes.parse_since("2024-05-01T10:00:00", now)
    assert naive is not None and naive.tzinfo is not None
    assert sandboxes.parse_since(None, now) is None


# -- command bodies on a fake supervisor ----------------------------------------------------------


async def test_create_ls_inspect_json_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(10):
        async with fake_sup() as sup:
            argv = ["create", "job-1", "-e", "A=1", "--label", "team=x", "--json"]
            assert await call(sup, argv) == 0
            created = json.loads(capsys.readouterr().out)
            assert created["name"] == "job-1" and created["status"] == "running"
            assert created["detached"] is True and created["image"] == "host"
            datetime.fromisoformat(created["created_at"])
            assert await call(sup, ["create"]) == 0
            generated = capsys.readouterr().out.strip()
            assert generated.startswith("sb-") and generated in sup

            assert await call(sup, ["ls", "--json"]) == 0
            listed = json.loads(capsys.readouterr().out)
            assert [i["name"] for i in listed] == sorted(["job-1", generated])
            assert {"name", "status", "image", "created_at", "detached", "pid"} <= set(listed[0])

            assert await call(sup, ["ls"]) == 0
            lines = capsys.readouterr().out.splitlines()
            assert lines[0].split() == ["NAME", "STATUS", "IMAGE", "CREATED", "PID", "DETACHED"]
            row = lines[1 + sorted(["job-1", generated]).index("job-1")].split()
            assert row[:3] == ["job-1", "running", "host"] and row[-1] == "yes"

            assert await call(sup, ["inspect", "job-1", "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["name"] == "job-1"
            assert await call(sup, ["inspect", "job-1"]) == 0
            human = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
            assert human["name"].strip() == "job-1" and human["status"].strip() == "running"


async def test_create_stopped_then_start(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(10):
        async with fake_sup() as sup:
            argv = ["create", "later", "--no-start", "--restart", "transient", "--json"]
            assert await call(sup, argv) == 0
            assert json.loads(capsys.readouterr().out)["status"] == "created"
            assert await call(sup, ["start", "later"]) == 0
            assert capsys.readouterr().out == "later\n"
            assert str((await sandboxes.get_sandbox(sup, "later")).status) == "running"
            assert await call(sup, ["start", "nope"]) == 1
            assert "SandboxNotFound" in capsys.readouterr().err


async def test_stop_kill_drain_rm(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(20):
        async with fake_sup() as sup:
            for name in ("a", "b", "c", "d"):
                await sup.create(name, detached=True)
            capsys.readouterr()
            assert await call(sup, ["rm", "a"]) == 1
            assert (
                "corral: SandboxStillRunning: cannot remove sandbox 'a'" in capsys.readouterr().err
            )
            assert "a" in sup
            assert await call(sup, ["stop", "a", "missing", "b", "-t", "2"]) == 1
            out, err = capsys.readouterr()
            assert out.split() == ["a", "b"] and "SandboxNotFound" in err
            assert await call(sup, ["kill", "c"]) == 0
            assert await call(sup, ["drain", "d", "--timeout", "1"]) == 0
            statuses = {i.name: str(i.status) for i in await sandboxes.list_all(sup)}
            assert statuses == dict.fromkeys("abcd", "stopped")
            assert await call(sup, ["rm", "a", "b", "c", "d"]) == 0
            assert len(sup) == 0
            await sup.create("e", detached=True)
            assert await call(sup, ["rm", "--force", "e"]) == 0
            assert "e" not in sup


class StubSandbox:
    """A sandbox with the logs/metrics API (until the real one is in)."""

    name = "stub"

    def __init__(self, records: list[Any], samples: list[Any]) -> None:
        self.records = records
        self.samples = samples
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def logs(self, **kw: Any) -> list[Any]:
        self.calls.append(("logs", kw))
        await trio.lowlevel.checkpoint()
        return self.records

    async def log_stream(self, **kw: Any) -> AsyncIterator[Any]:
        self.calls.append(("log_stream", kw))
        for record in self.records:
            await trio.lowlevel.checkpoint()
            yield record

    async def metrics(self) -> Any:
        await trio.lowlevel.checkpoint()
        return self.samples[0]

    async def metrics_stream(self, **kw: Any) -> AsyncIterator[Any]:
        self.calls.append(("metrics_stream", kw))
        for sample in self.samples:
            await trio.lowlevel.checkpoint()
            yield sample


class StubSup:
    def __init__(self, sb: Any) -> None:
        self.sb = sb

    async def get(self, name: str) -> Any:
        await trio.lowlevel.checkpoint()
        if name != self.sb.name:
            raise corral.SandboxNotFound(f"sandbox {name!r} not found")
        return self.sb


def _record(seq: int, stream: str, data: bytes) -> types.SimpleNamespace:
    return types.SimpleNamespace(seq=seq, timestamp=1_700_000_000.0 + seq, stream=stream, data=data)


async def test_logs_text_json_and_follow(capfd: pytest.CaptureFixture[str]) -> None:
    from corral.actors.logs import LogRecord

    records = [
        LogRecord(seq=1, timestamp=1_700_000_001.0, stream="stdout", data=b"out line\n"),
        LogRecord(seq=2, timestamp=1_700_000_002.0, stream="stderr", data=b"err line\n"),
        LogRecord(seq=3, timestamp=1_700_000_003.0, stream="system", data=b"job 1 exited"),
    ]
    sb = StubSandbox(records, [])
    sup = StubSup(sb)
    with trio.fail_after(10):
        assert await call(sup, ["logs", "stub", "--tail", "3", "--since", "1h"]) == 0
        out, err = capfd.readouterr()
        assert out == "out line\n" and err == "err line\n[system] job 1 exited\n"
        name, kw = sb.calls[-1]
        assert name == "logs" and kw["tail"] == 3 and isinstance(kw["since"], datetime)
        assert await call(sup, ["logs", "stub", "--json", "-f"]) == 0
        lines = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
        assert [(r["seq"], r["stream"], r["data"]) for r in lines] == [
            (1, "stdout", "out line\n"),
            (2, "stderr", "err line\n"),
            (3, "system", "job 1 exited"),
        ]
        assert sb.calls[-1] == ("log_stream", {"tail": None, "since": None})
        assert await call(sup, ["logs", "stub", "--timestamps"]) == 0
        out = capfd.readouterr().out
        stamp = (
            datetime.fromtimestamp(1_700_000_001.0).astimezone().isoformat(timespec="milliseconds")
        )
        assert out == f"{stamp} out line\n"


async def test_metrics_once_and_watch(capsys: pytest.CaptureFixture[str]) -> None:
    from corral.drivers.local.metrics import SandboxMetrics

    samples = [
        SandboxMetrics(
            cpu_percent=12.5,
            memory_bytes=50 << 20,
            memory_limit_bytes=1 << 30,
            pids=4,
            uptime_s=75.0,
        ),
        SandboxMetrics(cpu_percent=0.0, memory_bytes=1024, pids=1, source="proc"),
        SandboxMetrics(),
    ]
    sb = StubSandbox([], samples)
    sup = StubSup(sb)
    with trio.fail_after(10):
        assert await call(sup, ["metrics", "stub"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split()[:2] == ["CPU%", "MEMORY"]
        assert lines[1].split()[:5] == ["12.5", "50.0MiB", "/", "1.0GiB", "4"]
        assert "1:15" in lines[1]
        assert await call(sup, ["metrics", "stub", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["memory_bytes"] == 50 << 20
        argv = ["metrics", "stub", "--watch", "--interval", "0.5", "--count", "2", "--json"]
        assert await call(sup, argv) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [json.loads(line)["cpu_percent"] for line in lines] == [12.5, 0.0]
        assert sb.calls[-1] == ("metrics_stream", {"interval": 0.5})
        assert await call(sup, ["metrics", "stub", "--watch"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 4 and lines[0].startswith("CPU%")  # one header, three samples
        assert lines[3].split()[0] == "-"


async def test_logs_and_metrics_without_the_api_are_unsupported() -> None:
    sup = StubSup(types.SimpleNamespace(name="stub"))
    with trio.fail_after(10):
        with pytest.raises(corral.Unsupported):
            await call(sup, ["logs", "stub"])
        with pytest.raises(corral.Unsupported):
            await call(sup, ["metrics", "stub", "--watch"])


async def test_exec_tty_goes_through_attach(monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.cli import attach as attach_module

    seen: list[tuple[Any, ...]] = []

    async def attach(sb: Any, cmd: str, args: list[str], *, tty: bool, **kw: Any) -> int:
        await trio.lowlevel.checkpoint()
        seen.append((sb, cmd, args, tty, kw))
        return 7

    monkeypatch.setattr(attach_module, "attach", attach)
    sb = types.SimpleNamespace(name="stub")
    with trio.fail_after(10):
        argv = ["exec", "-it", "-e", "A=1", "stub", "-w", "/tmp", "--", "sh", "-l"]
        assert await call(StubSup(sb), argv) == 7
        assert seen == [(sb, "sh", ["-l"], True, {"env": {"A": "1"}, "cwd": "/tmp"})]
        with pytest.raises(corral.InvalidConfig, match="--timeout does not go with -t"):
            await call(StubSup(sb), ["exec", "-t", "--timeout", "1", "stub", "--", "sh"])


# -- exec on real sandboxes ----------------------------------------------------------------------


@pytest.mark.integration
async def test_exec_streams_output_stdin_and_exit_code(
    local_sup: corral.Supervisor,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(60):
        await local_sup.create("cli-exec")
        argv = ["exec", "-e", "GREETING=hi", "cli-exec", "-w", "/tmp", "--", "sh", "-c"]
        argv.append('echo "$GREETING from $(pwd)"; echo oops >&2; exit 3')
        assert await call(local_sup, argv) == 3
        out, err = capfd.readouterr()
        assert out == "hi from /tmp\n" and err == "oops\n"
        # without -i the command's stdin is closed at once: cat ends
        assert await call(local_sup, ["exec", "cli-exec", "--", "cat"]) == 0
        assert capfd.readouterr().out == ""
        feed = tmp_path / "stdin"
        feed.write_bytes(b"line one\nline two\n")
        with feed.open("rb") as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)
            assert await call(local_sup, ["exec", "-i", "cli-exec", "--", "wc", "-l"]) == 0
        assert capfd.readouterr().out.strip() == "2"
        argv = ["exec", "cli-exec", "--timeout", "0.5", "--", "sleep", "30"]
        assert await call(local_sup, argv) == 137
        assert "corral: ExecTimeout: sleep: killed after 0.5s" in capfd.readouterr().err


@pytest.mark.integration
async def test_logs_and_metrics_of_a_real_sandbox(
    local_sup: corral.Supervisor, capfd: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(60):
        await local_sup.create("cli-look")
        capfd.readouterr()
        assert await call(local_sup, ["logs", "cli-look", "--json"]) == 0
        records = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
        assert records and records[0]["stream"] == "system"
        assert "started" in records[0]["data"]
        assert await call(local_sup, ["logs", "cli-look"]) == 0
        assert "[system] sandbox started" in capfd.readouterr().err
        assert await call(local_sup, ["metrics", "cli-look", "--json"]) == 0
        sample = json.loads(capfd.readouterr().out)
        assert sample["memory_bytes"] > 0 and sample["pids"] >= 1
        argv = ["metrics", "cli-look", "--watch", "--interval", "0.1", "--count", "2"]
        assert await call(local_sup, argv) == 0
        lines = capfd.readouterr().out.splitlines()
        assert len(lines) == 3 and lines[0].split()[0] == "CPU%"


# -- separate processes -------------------------------------------------------------------------


def _corral(
    *argv: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli.main", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.integration
def test_create_exec_ls_rm_across_processes(local_backend: Any, corral_home: Path) -> None:
    env = {**os.environ, "CORRAL_HOME": str(corral_home)}
    name = f"cli-{uuid.uuid4().hex[:6]}"
    try:
        created = _corral("create", name, "--json", env=env)
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["name"] == name
        ran = _corral("exec", name, "--", "sh", "-c", "echo hi; exit 4", env=env)
        assert (ran.returncode, ran.stdout) == (4, "hi\n"), ran.stderr
        listed = _corral("ls", "--json", env=env)
        assert [(i["name"], i["status"]) for i in json.loads(listed.stdout)] == [(name, "running")]
        refused = _corral("rm", name, env=env)
        assert refused.returncode == 1
        assert f"corral: SandboxStillRunning: cannot remove sandbox {name!r}" in refused.stderr
        assert _corral("stop", name, env=env).returncode == 0
        assert _corral("rm", name, env=env).returncode == 0
        assert json.loads(_corral("ls", "--json", env=env).stdout) == []
    finally:
        _corral("rm", "-f", name, env=env)

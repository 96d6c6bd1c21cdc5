"""The benchmark runner's pieces that need no sandbox: Stat, formatting, rows, the CLI,
the /proc readers, the ask family on the fake driver, and the runner's failure path."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

import corral.bench.run as bench_run
from corral.bench.context import Context
from corral.bench.procs import leftovers, self_rss, tree_memory
from corral.bench.report import (
    MIB,
    Row,
    Unit,
    at_least,
    at_most,
    fmt,
    markdown,
    ratio_at_most,
    table,
)
from corral.bench.spawn import pool_supported
from corral.bench.stat import Stat, paired, percentile, sample


def test_percentile_interpolates() -> None:
    data = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(data, 0.5) == pytest.approx(50.5)
    assert percentile(data, 0.99) == pytest.approx(99.01)
    assert percentile(data, 0.0) == 1.0 and percentile(data, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_stat_of_unsorted_samples() -> None:
    stat = Stat.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stat.n, stat.p50, stat.min, stat.max) == (5, 3.0, 1.0, 5.0)
    assert 4.9 < stat.p99 <= 5.0
    assert 1.0 <= stat.p01 < 1.1


async def test_sample_skips_warmup_and_paired_alternates() -> None:
    calls: list[str] = []

    async def a() -> None:
        calls.append("a")

    async def b() -> None:
        calls.append("b")

    times = await sample(a, 3, warmup=2)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert calls == ["a"] * 5
    calls.clear()
    ta, tb = await paired(a, b, 2, warmup=1)
    assert (len(ta), len(tb)) == (2, 2)
    assert calls == ["a", "b"] * 3


def test_fmt_units() -> None:
    assert fmt(0.0925, Unit.SECONDS) == "92.5 ms"
    assert fmt(15.7e-6, Unit.SECONDS) == "15.7 µs"
    assert fmt(2.5, Unit.SECONDS) == "2.5 s"
    assert fmt(1550.4, Unit.PER_SECOND) == "1,550 /s"
    assert fmt(822e6, Unit.BYTES_PER_SECOND) == "822 MB/s"
    assert fmt(4 * MIB, Unit.BYTES) == "4.00 MiB"


def test_row_ratio_and_targets() -> None:
    row = Row(
        "x", "cold", Unit.SECONDS, Stat.of([0.09]), "bwrap", Stat.of([0.03]), ratio_at_most(3.0)
    )
    assert row.ratio == pytest.approx(3.0) and row.met is True
    row.value = Stat.of([0.1])
    assert [row.met, row.cells()[-1], row.cells()[5]] == [False, "MISSED", "3.33x"]
    noise = Row("x", "drop", Unit.BYTES, Stat.of([5.0 * MIB]), "bare", Stat.of([-0.1 * MIB]))
    assert noise.ratio is None and noise.cells()[5] == ""
    fast = Row("x", "ask", Unit.SECONDS, Stat.of([15e-6]), target=at_most(20e-6, Unit.SECONDS))
    assert fast.met is True and fast.ratio is None
    rate = Row(
        "x",
        "fan",
        Unit.PER_SECOND,
        Stat.of([900.0, 1100.0, 1200.0]),
        target=at_least(1000, Unit.PER_SECOND),
    )
    assert rate.met is True
    # for rates the tail shown is the slow one
    assert rate.cells()[2] == fmt(Stat.of([900.0, 1100.0, 1200.0]).p01, Unit.PER_SECOND)
    skipped = Row(
        "x", "pool", Unit.SECONDS, target=at_most(1e-3, Unit.SECONDS), skipped="n/a (no pool yet)"
    )
    assert skipped.met is None and skipped.cells()[1] == "n/a (no pool yet)"
    assert skipped.cells()[-1] == "n/a"


def test_table_and_markdown_carry_rows_notes_and_command() -> None:
    from datetime import UTC, datetime

    rows = [
        Row(
            "a",
            "exec `true` round trip",
            Unit.SECONDS,
            Stat.of([1e-3]),
            "host | pipe",
            Stat.of([8e-4]),
            ratio_at_most(1.5),
            note="a note",
        ),
        Row("b", "podman", Unit.SECONDS, skipped="skipped: podman is not installed"),
    ]
    text = table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("benchmark") and "met" in lines[0]
    assert "exec `true` round trip" in text and "1.25x" in text and "a note" in text
    md = markdown(
        rows, command="python -m corral.bench --quick", started=datetime.now(UTC), extra=["done."]
    )
    assert "`python -m corral.bench --quick`" in md
    assert "nproc" in md and "kernel" in md and "python" in md
    assert "| exec `true` round trip | 1 ms |" in md
    assert "host \\| pipe" in md  # pipes inside cells are escaped
    assert md.rstrip().endswith("done.")


def test_parse_args() -> None:
    args = bench_run.parse_args(["--quick", "--only", "ask, exec"])
    assert args.quick and not args.big and args.families == ["ask", "exec"]
    assert args.out == bench_run.DEFAULT_OUT
    assert bench_run.parse_args([]).families == list(bench_run.FAMILIES)
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--only", "nope"])


def test_proc_readers() -> None:
    mine = tree_memory([os.getpid()])
    assert mine.processes == 1 and mine.rss > MIB and 0 < mine.pss <= mine.rss
    assert self_rss() > MIB
    assert tree_memory([2**22 + 12345]).processes == 0  # no such pid
    assert leftovers("/no/such/marker/for/corral-bench") == []


def _ctx(tmp_path: Path, *, quick: bool = True) -> Context:
    return Context(quick=quick, big=False, root=tmp_path)


async def test_ask_family_on_the_fake_driver(tmp_path: Path) -> None:
    from corral.bench.ask import run_ask

    ctx = _ctx(tmp_path)
    with trio.fail_after(60):
        await run_ask(ctx)
    names = [row.name for row in ctx.rows]
    assert names == [
        "actor ask, no I/O (Describe)",
        "actor ask Ping (fake agent, in-memory stream)",
    ]
    for row in ctx.rows:
        assert row.value is not None and row.baseline is not None
        assert row.value.n > 100 and 0 < row.value.p50 < 0.05
        assert row.ratio is not None and row.ratio > 0


def test_pool_row_is_measured_now_that_the_pool_exists() -> None:
    # The runner only prints "n/a (no pool yet)" when open_supervisor lacks pool=.
    assert pool_supported()


def test_a_failing_family_is_reported_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(ctx: Context) -> None:
        raise RuntimeError("boom")

    async def fine(ctx: Context) -> None:
        ctx.emit(Row("fine", "fine row", Unit.SECONDS, Stat.of([1e-3])))

    monkeypatch.setattr(bench_run, "FAMILIES", {"broken": broken, "fine": fine})
    out = tmp_path / "RESULTS.md"
    code = bench_run.main(["--quick", "--out", str(out)])  # its own trio.run
    assert code == 1
    printed = capsys.readouterr().out
    assert "broken (failed)" in printed and "failed: RuntimeError: boom" in printed
    assert "fine row" in printed
    text = out.read_text()
    assert "problem: broken failed: RuntimeError: boom" in text
    assert "`python -m corral.bench --quick --out " in text


def test_sigterm_cancels_the_run_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cleaned: list[str] = []

    async def first(ctx: Context) -> None:
        ctx.emit(Row("first", "first row", Unit.SECONDS, Stat.of([1e-3])))

    async def stuck(ctx: Context) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            await trio.sleep_forever()
        finally:
            cleaned.append("stuck")

    async def never(ctx: Context) -> None:
        raise AssertionError("the run should have stopped")

    monkeypatch.setattr(bench_run, "FAMILIES", {"first": first, "stuck": stuck, "never": never})
    out = tmp_path / "RESULTS.md"
    assert bench_run.main(["--quick", "--out", str(out)]) == 130
    assert cleaned == ["stuck"] and not out.exists()
    assert "first row" in capsys.readouterr().out


async def test_memory_is_skipped_with_a_reason_when_it_would_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import corral.bench.memory as memory

    ctx = Context(quick=True, big=True, root=tmp_path)
    ctx.__dict__["local_reason"] = None
    monkeypatch.setattr(memory, "mem_available", lambda: memory.GIB)

    async def no_sandboxes(ctx: Context, count: int) -> memory.Tally:
        raise AssertionError("must not start sandboxes that do not fit")

    monkeypatch.setattr(memory, "_sandboxes", no_sandboxes)
    await memory.run_memory(ctx)
    assert [row.name for row in ctx.rows] == [
        "memory per live sandbox, PSS (10 live)",
        "memory per live sandbox, PSS (1000 live)",
    ]
    for row in ctx.rows:
        assert row.skipped is not None and row.skipped.startswith("skipped: needs ~")
        assert "1.0 GiB available" in row.skipped and row.met is None

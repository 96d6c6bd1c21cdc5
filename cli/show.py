"""Output for the sandbox commands: JSON for scripts, aligned text for people."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

__all__ = [
    "emit_json",
    "format_bytes",
    "metrics_row",
    "print_info",
    "print_log_record",
    "print_table",
    "to_json",
]


def _enc_hook(value: Any) -> Any:
    return str(value)  # enums (SandboxStatus), paths, anything else printable


def _texts(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _texts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_texts(v) for v in value]
    return value


def to_json(value: Any) -> Any:
    """Plain JSON-ready data: Structs and dataclasses as objects, datetimes ISO 8601,
    bytes as UTF-8 text (invalid bytes replaced: log data is for reading)."""
    raw = msgspec.to_builtins(
        value, builtin_types=(bytes, bytearray, memoryview), enc_hook=_enc_hook
    )
    return _texts(raw)


def emit_json(value: Any) -> None:
    text = msgspec.json.format(msgspec.json.encode(to_json(value)), indent=2).decode()
    print(text)


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, header: bool = True
) -> None:
    """Left-aligned columns, two spaces apart (a row wider than its header widens it)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ([list(headers)] if header else []) + [list(r) for r in rows]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def print_info(data: Any) -> None:
    """``key: value`` lines (nested mappings as ``key.sub``), for ``corral inspect``."""
    flat: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            if not value:
                flat.append((prefix, "-"))
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        elif isinstance(value, list):
            flat.append((prefix, ", ".join(str(v) for v in value) or "-"))
        else:
            flat.append((prefix, "-" if value is None else str(value)))

    walk("", data)
    width = max((len(k) for k, _ in flat), default=0)
    for key, value in flat:
        print(f"{key + ':':<{width + 1}}  {value}")


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(value)
    hours, rest = divmod(value, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def metrics_row(sample: Any) -> tuple[list[str], list[str]]:
    """Headers and cells for one metrics sample (fields the sample lacks show ``-``)."""

    def get(name: str) -> Any:
        return getattr(sample, name, None)

    cpu = get("cpu_percent")
    limit = get("memory_limit_bytes")
    memory = format_bytes(get("memory_bytes"))
    if limit is not None:
        memory += f" / {format_bytes(limit)}"
    cells = {
        "CPU%": "-" if cpu is None else f"{cpu:.1f}",
        "MEMORY": memory,
        "PIDS": "-" if get("pids") is None else str(get("pids")),
        "UPTIME": _seconds(get("uptime_s")),
        "DISK R/W": f"{format_bytes(get('disk_read_bytes'))} / "
        f"{format_bytes(get('disk_write_bytes'))}",
        "NET RX/TX": f"{format_bytes(get('net_rx_bytes'))} / {format_bytes(get('net_tx_bytes'))}",
    }
    return list(cells), list(cells.values())


def _record_time(record: Any) -> str:
    ts = getattr(record, "timestamp", None)
    if ts is None:
        ts = getattr(record, "ts", None)
    if ts is None:
        return "-"
    return datetime.fromtimestamp(float(ts)).astimezone().isoformat(timespec="milliseconds")


def print_log_record(record: Any, *, json: bool, timestamps: bool) -> None:
    """One log entry: stdout entries to stdout, stderr and system entries to stderr."""
    stream = str(getattr(record, "stream", "stdout"))
    if json:
        line = msgspec.json.encode(to_json(record)).decode()
        print(line, flush=True)
        return
    data: bytes = getattr(record, "data", b"")
    target = sys.stdout if stream == "stdout" else sys.stderr
    prefix = f"{_record_time(record)} " if timestamps else ""
    if stream == "system":
        prefix += "[system] "
    if prefix:
        data = prefix.encode() + data
        if not data.endswith(b"\n"):
            data += b"\n"
    target.flush()
    target.buffer.write(data)
    target.buffer.flush()

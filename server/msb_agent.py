"""microsandbox's agent protocol (generation 7), sans-I/O: what the released client speaks.

This is the byte format the unmodified microsandbox SDK (PyPI ``microsandbox`` 0.7.11)
speaks over ``GET /v1/sandboxes/{id}/agent`` (see
``shared/reference/microsandbox-agent-protocol.md``). It is *not* corral's own agent
protocol (:mod:`corral.protocol`, msgpack); the server translates between the two in
:mod:`corral.server.msb_session`.

Frame layout (big-endian)::

    u32 len = 5 + body length | u32 id | u8 flags | body: CBOR {v, t, p}

``p`` is a CBOR *byte string* that holds a separately encoded CBOR payload. The server
speaks first: 8 bytes of id range (``id_min``, ``id_max``), then a ``core.ready`` frame
whose ``v`` is the generation we claim (7: plain fs messages, no bulk sub-protocol).

Nothing here does I/O: :class:`FrameDecoder` takes bytes as they arrive (a WebSocket
message is not a frame) and returns whole frames; the ``encode_*`` helpers return bytes.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple, TypeVar

import cbor2
import msgspec

from ..errors import FrameTooLarge, ProtocolError

GENERATION = 7
"""The protocol generation the server claims in ``core.ready`` (2..7 = plain fs)."""

ID_MIN = 1
ID_MAX = 0x0200_0000
"""Correlation ids the client may use: ``[ID_MIN, ID_MAX)``. Keep ``ID_MIN >= 1`` and
``ID_MAX > 4 MiB``, or the client reads the range as the pre-0.5 handshake."""

MAX_LEN = 4 * 1024 * 1024
"""Largest ``len`` field either side accepts (4 MiB)."""

FS_DATA_CHUNK = 1024 * 1024
"""Largest file chunk the server puts in one ``core.fs.data`` frame."""

TERMINAL = 1
SESSION_START = 2
SHUTDOWN = 4
BULK = 8

T = TypeVar("T")

HEADER = struct.Struct(">IIB")
HEADER_SIZE = HEADER.size  # 9

# message types ---------------------------------------------------------------------------
READY = "core.ready"
EXEC_REQUEST = "core.exec.request"
EXEC_STDIN = "core.exec.stdin"
EXEC_RESIZE = "core.exec.resize"
EXEC_SIGNAL = "core.exec.signal"
EXEC_STARTED = "core.exec.started"
EXEC_STDOUT = "core.exec.stdout"
EXEC_STDERR = "core.exec.stderr"
EXEC_STDIN_ERROR = "core.exec.stdin.error"
EXEC_EXITED = "core.exec.exited"
EXEC_FAILED = "core.exec.failed"
FS_REQUEST = "core.fs.request"
FS_RESPONSE = "core.fs.response"
FS_DATA = "core.fs.data"
ERROR = "core.error"

EXEC_FAILED_KINDS = frozenset(
    {
        "not_found",
        "permission_denied",
        "not_executable",
        "bad_cwd",
        "bad_args",
        "resource_limit",
        "user_setup_failed",
        "out_of_memory",
        "pty_setup_failed",
        "other",
    }
)


class RawFrame(NamedTuple):
    id: int
    flags: int
    body: bytes


class Envelope(NamedTuple):
    v: int
    t: str
    payload: Any
    """The decoded CBOR payload (usually a dict), ``None`` when ``p`` was absent."""


# -- payloads the client sends (decoded leniently: unknown keys are ignored) ----------------


class Rlimit(msgspec.Struct):
    resource: str
    soft: int
    hard: int


class ExecRequest(msgspec.Struct, kw_only=True):
    cmd: str
    args: list[str] = []
    env: list[str] = []
    cwd: str | None = None
    user: str | None = None
    tty: bool = False
    rows: int = 24
    cols: int = 80
    rlimits: list[Rlimit] = []

    def env_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.env:
            key, sep, value = item.partition("=")
            if sep and key:
                out[key] = value
        return out


class ExecStdin(msgspec.Struct):
    data: bytes = b""


class ExecResize(msgspec.Struct):
    rows: int
    cols: int


class ExecSignal(msgspec.Struct):
    signal: int


class FsData(msgspec.Struct):
    data: bytes = b""


class OpenOptions(msgspec.Struct, kw_only=True, frozen=True):
    read: bool = False
    write: bool = False
    append: bool = False
    create: bool = False
    truncate: bool = False
    create_new: bool = False
    mode: int | None = None
    user: str | None = None


class OpenFile(msgspec.Struct, kw_only=True):
    path: str
    options: OpenOptions = OpenOptions()


class Write(msgspec.Struct, kw_only=True):
    handle: int
    offset: int = 0
    len: int | None = None


class Read(msgspec.Struct, kw_only=True):
    handle: int
    offset: int = 0
    len: int | None = None


class CloseHandle(msgspec.Struct):
    handle: int


class List(msgspec.Struct):
    path: str


class Stat(msgspec.Struct, kw_only=True):
    path: str
    follow_symlink: bool = True


class Mkdir(msgspec.Struct, kw_only=True):
    path: str
    mode: int | None = None
    user: str | None = None


class Remove(msgspec.Struct):
    path: str


class RemoveDir(msgspec.Struct, kw_only=True):
    path: str
    recursive: bool = True


class Copy(msgspec.Struct):
    src: str
    dst: str


class Rename(msgspec.Struct):
    src: str
    dst: str


FsOp = (
    OpenFile | Write | Read | CloseHandle | List | Stat | Mkdir | Remove | RemoveDir | Copy | Rename
)

FS_OPS: dict[str, type[FsOp]] = {
    cls.__name__: cls
    for cls in (
        OpenFile,
        Write,
        Read,
        CloseHandle,
        List,
        Stat,
        Mkdir,
        Remove,
        RemoveDir,
        Copy,
        Rename,
    )
}


class UnknownFsOp(ProtocolError):
    """A ``core.fs.request`` for an op this server does not serve (answered, not dropped)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unsupported fs op {name!r}")
        self.op_name = name


def parse_payload(payload: Any, cls: type[T]) -> T:
    """Validate a decoded payload into ``cls`` (raises ProtocolError)."""
    try:
        return msgspec.convert(payload, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"bad {cls.__name__} payload: {exc}") from None


def parse_fs_op(payload: Any) -> FsOp:
    """``{op: {<Variant>: {fields}}}`` → the variant's Struct.

    Raises :class:`UnknownFsOp` for a well-formed but unknown variant and
    :class:`ProtocolError` for anything malformed.
    """
    op = payload.get("op") if isinstance(payload, dict) else None
    if not isinstance(op, dict) or len(op) != 1:
        raise ProtocolError("core.fs.request without a single-variant 'op' map")
    ((name, fields),) = op.items()
    if not isinstance(name, str):
        raise ProtocolError("core.fs.request op name is not text")
    cls = FS_OPS.get(name)
    if cls is None:
        raise UnknownFsOp(name)
    return parse_payload(fields if fields is not None else {}, cls)


# -- encoding ----------------------------------------------------------------------------------


def encode_frame(id: int, t: str, payload: Any, flags: int = 0, *, v: int = GENERATION) -> bytes:
    """One whole frame: header + CBOR envelope ``{v, t, p}`` (p = CBOR of payload)."""
    body = cbor2.dumps({"v": v, "t": t, "p": cbor2.dumps(payload)})
    length = len(body) + 5
    if length > MAX_LEN:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {MAX_LEN}-byte limit")
    return HEADER.pack(length, id, flags) + body


def encode_handshake(
    *,
    boot_time_ns: int,
    init_time_ns: int,
    ready_time_ns: int,
    agent_version: str | None = None,
    id_min: int = ID_MIN,
    id_max: int = ID_MAX,
) -> bytes:
    """What the server sends first: the id range, then the ``core.ready`` frame."""
    ready: dict[str, Any] = {
        "boot_time_ns": boot_time_ns,
        "init_time_ns": init_time_ns,
        "ready_time_ns": ready_time_ns,
    }
    if agent_version is not None:
        ready["agent_version"] = agent_version
    return struct.pack(">II", id_min, id_max) + encode_frame(0, READY, ready)


def exec_started(id: int, pid: int) -> bytes:
    return encode_frame(id, EXEC_STARTED, {"pid": pid})


def exec_stdout(id: int, data: bytes) -> bytes:
    return encode_frame(id, EXEC_STDOUT, {"data": data})


def exec_stderr(id: int, data: bytes) -> bytes:
    return encode_frame(id, EXEC_STDERR, {"data": data})


def exec_exited(id: int, code: int) -> bytes:
    return encode_frame(id, EXEC_EXITED, {"code": code}, TERMINAL)


def exec_failed(
    id: int,
    *,
    kind: str,
    message: str,
    errno: int | None = None,
    errno_name: str | None = None,
    stage: str | None = None,
) -> bytes:
    if kind not in EXEC_FAILED_KINDS:
        kind = "other"  # an unknown kind makes the client drop the frame
    payload = {
        "kind": kind,
        "errno": errno,
        "errno_name": errno_name,
        "message": message,
        "stage": stage,
    }
    return encode_frame(id, EXEC_FAILED, payload, TERMINAL)


def exec_stdin_error(
    id: int, message: str, errno: int | None = None, errno_name: str | None = None
) -> bytes:
    payload = {"errno": errno, "errno_name": errno_name, "message": message}
    return encode_frame(id, EXEC_STDIN_ERROR, payload)


def fs_data(id: int, data: bytes) -> bytes:
    return encode_frame(id, FS_DATA, {"data": data})


def fs_response(id: int, *, ok: bool = True, error: str | None = None, data: Any = None) -> bytes:
    return encode_frame(id, FS_RESPONSE, {"ok": ok, "error": error, "data": data}, TERMINAL)


def fs_entry(
    *,
    path: str,
    kind: str,
    size: int,
    mode: int,
    uid: int = 0,
    gid: int = 0,
    mtime: float | None = None,
) -> dict[str, Any]:
    """An fs entry as the client wants it (``uid``/``gid`` are required by the client)."""
    seconds = None if mtime is None else int(mtime)
    return {
        "path": path,
        "kind": kind if kind in ("file", "dir", "symlink") else "other",
        "size": size,
        "mode": mode,
        "uid": uid,
        "gid": gid,
        "modified": seconds,
        "mtime": seconds,
    }


# -- decoding ----------------------------------------------------------------------------------


def decode_envelope(body: bytes) -> Envelope:
    """Decode ``{v, t, p}`` and the payload inside ``p`` (raises ProtocolError)."""
    try:
        outer = cbor2.loads(body)
        if not isinstance(outer, dict):
            raise ProtocolError("envelope is not a map")
        v, t, p = outer.get("v", 0), outer.get("t"), outer.get("p")
        if not isinstance(t, str) or not isinstance(v, int):
            raise ProtocolError("envelope without a text 't' and an integer 'v'")
        if p is None:
            payload: Any = None
        elif isinstance(p, bytes):
            payload = cbor2.loads(p) if p else None
        else:
            raise ProtocolError("envelope 'p' is not a byte string")
    except ProtocolError:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError) as exc:
        raise ProtocolError(f"undecodable frame body: {exc}") from None
    return Envelope(v, t, payload)


class FrameDecoder:
    """Incremental frame decoder: ``feed`` any byte chunks, get whole frames back.

    Holds at most one partial frame (``len`` is checked before the body is buffered,
    so the buffer never exceeds ``MAX_LEN + 4`` plus one fed chunk). A ``len`` out of
    range is fatal: it raises and the decoder stays failed.
    """

    def __init__(self, max_len: int = MAX_LEN) -> None:
        self._buf = bytearray()
        self._max = max_len
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[RawFrame]:
        if self._failed is not None:
            raise self._failed
        self._buf += data
        buf = self._buf
        frames: list[RawFrame] = []
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            length, id, flags = HEADER.unpack_from(buf, pos)
            if length < 5 or length > self._max:
                self._buf = bytearray()
                cls = FrameTooLarge if length > self._max else ProtocolError
                self._failed = cls(f"frame length {length} outside [5, {self._max}]")
                raise self._failed
            end = pos + 4 + length
            if len(buf) < end:
                break
            frames.append(RawFrame(id, flags, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames

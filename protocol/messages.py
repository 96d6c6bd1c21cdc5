"""Messages spoken between the orchestrator and the in-sandbox agent.

One vocabulary end to end: the same Structs go into an actor's mailbox, over the
agent's Unix socket, and over the cloud websocket. Every message is a tagged msgspec
Struct (tag field ``t`` = the class name), so a single decoder of the union below
reads any of them.

Conversations are keyed by a request id carried in the frame header (see
:mod:`corral.protocol.framing`). The host opens a conversation with a request
(flag SESSION_START); the agent's last frame for that id carries flag TERMINAL.

Exec output is flow controlled: the agent never has more than ``Exec.window``
output bytes in flight for one exec; the host returns credit with ``ExecCredit``
as its consumer takes data. A slow reader therefore blocks the command on its
pipe, not the agent's or the orchestrator's memory.
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; checked by the Hello/Ready handshake."""

EXEC_WINDOW = 1 << 20
"""Default output credit (bytes) an exec may have in flight."""

EXEC_CHUNK = 64 * 1024
"""Largest stdout/stderr chunk the agent sends in one frame."""

FS_CHUNK = 1 << 20
"""Largest file chunk moved in one FsRead reply or FsWrite request."""


class Message(msgspec.Struct, tag_field="t", tag=True, omit_defaults=True, kw_only=True):
    """Base of every message."""


# -- handshake ---------------------------------------------------------------------------


class Hello(Message):
    version: int
    """Required, so it is always on the wire (defaults are omitted when encoding)."""


class Ready(Message):
    version: int
    agent_version: str
    pid: int


# -- generic replies ---------------------------------------------------------------------


class Ok(Message):
    """A request succeeded and has nothing to return."""


class ErrorReply(Message):
    """A request failed; ``code`` names a class of :mod:`corral.errors`."""

    code: str
    message: str
    errno: int | None = None


class Ping(Message):
    pass


class Pong(Message):
    pass


class Cancel(Message):
    """Abandon the conversation with this frame's id (the agent ends it, then replies)."""


class Shutdown(Message):
    """Stop the sandbox cleanly: SIGTERM every session, wait up to ``grace``, exit."""

    grace: float = 5.0


# -- exec ----------------------------------------------------------------------------------


class Exec(Message):
    cmd: str
    args: list[str] = []
    env: dict[str, str] = {}
    cwd: str | None = None
    user: str | None = None
    timeout: float | None = None
    stdin: bytes | None = None
    """Bytes written to the command's stdin before it is closed (when not interactive)."""
    interactive: bool = False
    """Keep stdin open for ExecStdin frames (exec_stream)."""
    tty: bool = False
    rows: int = 24
    cols: int = 80
    window: int = EXEC_WINDOW


class ExecStdin(Message):
    data: bytes = b""
    eof: bool = False


class ExecSignal(Message):
    signal: int


class ExecResize(Message):
    rows: int
    cols: int


class ExecCredit(Message):
    bytes: int


class ExecStarted(Message):
    pid: int


class ExecStdout(Message):
    data: bytes


class ExecStderr(Message):
    data: bytes


class ExecExited(Message):
    exit_code: int
    """The exit status, or 128 + signal number when a signal ended the process."""
    signal: int | None = None
    timed_out: bool = False


class ExecStartFailed(Message):
    kind: str
    message: str
    errno: int | None = None


# -- detached jobs ---------------------------------------------------------------------------
#
# A job is a command the agent runs on its own: it outlives the connection that started it
# (any connection may list, wait for or kill it), and its output goes to the sandbox log.

LOG_WINDOW = 256 * 1024
"""Default log credit: bytes (data + LOG_ENTRY_COST per entry) unacknowledged at once."""

LOG_ENTRY_COST = 64
"""What one log entry counts against the window (and the agent's ring) beyond its data."""


class JobStart(Message):
    """Start a detached job; replies JobStarted, or ExecStartFailed / ErrorReply."""

    cmd: str
    args: list[str] = []
    env: dict[str, str] = {}
    cwd: str | None = None
    user: str | None = None
    timeout: float | None = None
    stdin: bytes | None = None


class JobStarted(Message):
    id: int
    pid: int


class JobInfo(msgspec.Struct, omit_defaults=True, kw_only=True):
    id: int
    cmd: str
    args: list[str] = []
    pid: int = 0
    status: str = "running"
    """``running`` or ``exited``."""
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    started_at: float = 0.0
    """Unix time (the agent's clock)."""
    ended_at: float | None = None


class JobList(Message):
    pass


class JobListReply(Message):
    jobs: list[JobInfo]


class JobWait(Message):
    """Wait for job ``id`` to end (at once if it has); replies JobExited (job_not_found)."""

    id: int


class JobExited(Message):
    id: int
    exit_code: int
    signal: int | None = None
    timed_out: bool = False


class JobKill(Message):
    """Send ``signal`` to job ``id``'s process group; Ok (also when it already ended)."""

    id: int
    signal: int = 9


# -- sandbox log -----------------------------------------------------------------------------
#
# The agent keeps job output and its own events (``system``) in a bounded ring and pushes
# them to one subscriber (the host, which owns the log files) under credit: entries stay in
# the ring until acknowledged by LogAck, at most ``window`` bytes of them unacknowledged. A
# new subscription replaces the old one and resends what was not acknowledged after
# ``after``. With nobody subscribed the ring drops its oldest entries and says so in a
# ``system`` entry ("dropped N bytes ...").


class LogSubscribe(Message):
    after: int = 0
    """The last entry seq the host already has (0: everything the ring holds)."""
    window: int = LOG_WINDOW


class LogEntry(Message):
    seq: int
    ts: float
    stream: str
    """``stdout``, ``stderr`` (a job's output) or ``system`` (the agent's events)."""
    data: bytes
    job: int | None = None
    exit_code: int | None = None
    """On a job's "exited" system entry."""


class LogAck(Message):
    """Follow-up: the host has stored every entry up to ``seq``."""

    seq: int


# -- filesystem ------------------------------------------------------------------------------


class FsEntry(msgspec.Struct, omit_defaults=True, kw_only=True):
    name: str
    path: str
    kind: str
    """``file``, ``dir``, ``symlink`` or ``other``."""
    size: int
    mode: int
    mtime: float
    uid: int = 0
    gid: int = 0
    target: str | None = None


class FsRead(Message):
    path: str
    offset: int = 0
    length: int | None = None


class FsData(Message):
    """A file chunk; ``eof`` when the file ends within it."""

    data: bytes
    eof: bool = False


class FsWrite(Message):
    path: str
    data: bytes
    offset: int = 0
    truncate: bool = True
    append: bool = False
    mode: int | None = None


class FsWritten(Message):
    written: int


class FsStat(Message):
    path: str
    follow_symlinks: bool = True


class FsStatReply(Message):
    entry: FsEntry


class FsList(Message):
    path: str


class FsListReply(Message):
    entries: list[FsEntry]


class FsMkdir(Message):
    path: str
    parents: bool = False
    mode: int | None = None


class FsRemove(Message):
    path: str
    recursive: bool = False


class FsCopy(Message):
    src: str
    dst: str


class FsRename(Message):
    src: str
    dst: str


class FsExists(Message):
    path: str


class FsExistsReply(Message):
    exists: bool


class FsSymlink(Message):
    """Create a symlink at ``path`` pointing at ``target`` (stored verbatim); Ok."""

    target: str
    path: str


AnyMessage = (
    Hello
    | Ready
    | Ok
    | ErrorReply
    | Ping
    | Pong
    | Cancel
    | Shutdown
    | Exec
    | ExecStdin
    | ExecSignal
    | ExecResize
    | ExecCredit
    | ExecStarted
    | ExecStdout
    | ExecStderr
    | ExecExited
    | ExecStartFailed
    | JobStart
    | JobStarted
    | JobList
    | JobListReply
    | JobWait
    | JobExited
    | JobKill
    | LogSubscribe
    | LogEntry
    | LogAck
    | FsRead
    | FsData
    | FsWrite
    | FsWritten
    | FsStat
    | FsStatReply
    | FsList
    | FsListReply
    | FsMkdir
    | FsRemove
    | FsCopy
    | FsRename
    | FsExists
    | FsExistsReply
    | FsSymlink
)

"""Filesystem requests over an agent channel: whole-file reads and any-size writes.

Frames are capped at 4 MiB, so file contents move in ``FS_CHUNK`` pieces. A read loops:
each ``FsRead`` conversation yields one or more ``FsData`` chunks (an agent may stream
the whole rest of the file in one conversation, or answer one chunk per request); the
host asks again from the next offset until a chunk says ``eof`` or ``length`` is met. A
write goes out as consecutive ``FsWrite`` requests of at most ``FS_CHUNK`` bytes.

Streaming (``sb.fs.read_stream`` / ``write_stream``) sits one level up, on the handle
side: :class:`FsReadStream` asks the actor for one ``FsRead(offset, length)`` per chunk
and :func:`write_chunks` sends one ``FsWrite`` per chunk, so at most one chunk of a file
is in the orchestrator's memory at a time, whatever its size.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import TypeVar

from ..errors import InvalidConfig, ProtocolError
from ..protocol import (
    FS_CHUNK,
    FsCopy,
    FsData,
    FsExists,
    FsExistsReply,
    FsList,
    FsListReply,
    FsMkdir,
    FsRead,
    FsRemove,
    FsRename,
    FsStat,
    FsStatReply,
    FsSymlink,
    FsWrite,
    FsWritten,
    Message,
    Ok,
    Ping,
    Pong,
)
from .channel import AgentChannel

__all__ = [
    "REPLY_TYPES",
    "FsReadStream",
    "check_chunk_size",
    "read_file",
    "simple_request",
    "write_chunks",
    "write_file",
]

M = TypeVar("M", bound=Message)

REPLY_TYPES: dict[type[Message], type[Message]] = {
    FsStat: FsStatReply,
    FsList: FsListReply,
    FsMkdir: Ok,
    FsRemove: Ok,
    FsCopy: Ok,
    FsRename: Ok,
    FsExists: FsExistsReply,
    FsSymlink: Ok,
    Ping: Pong,
}
"""Requests answered by exactly one reply, and that reply's type."""


def _expect(msg: Message, kind: type[M], request: Message) -> M:
    if not isinstance(msg, kind):
        raise ProtocolError(
            f"agent answered {type(request).__name__} with {type(msg).__name__}, "
            f"expected {kind.__name__}"
        )
    return msg


async def simple_request(channel: AgentChannel, request: Message) -> Message:
    """One request, one reply of the type :data:`REPLY_TYPES` names."""
    reply = await channel.request(request)
    return _expect(reply, REPLY_TYPES[type(request)], request)


async def read_file(channel: AgentChannel, request: FsRead) -> FsData:
    """Read from ``offset`` to the end (or ``length`` bytes); one FsData with it all."""
    parts: list[bytes] = []
    offset = request.offset
    remaining = request.length
    eof = False
    while not eof and (remaining is None or remaining > 0):
        got = 0
        ask = FsRead(path=request.path, offset=offset, length=remaining)
        async with channel.conversation(ask) as conv:
            while not conv.done:
                reply = await conv.receive()
                if isinstance(reply, Ok):
                    continue
                chunk = _expect(reply, FsData, request)
                if remaining is not None and len(chunk.data) > remaining:
                    raise ProtocolError(f"agent sent more than the {remaining} bytes asked")
                parts.append(chunk.data)
                got += len(chunk.data)
                offset += len(chunk.data)
                if remaining is not None:
                    remaining -= len(chunk.data)
                eof = eof or chunk.eof
        if not got and not eof:
            raise ProtocolError(f"agent answered a read of {request.path} with no data, no eof")
    return FsData(data=b"".join(parts), eof=eof)


async def write_file(channel: AgentChannel, request: FsWrite) -> FsWritten:
    """Write ``data`` in chunks of at most FS_CHUNK bytes; FsWritten counts them all."""
    data = request.data
    if len(data) <= FS_CHUNK:
        reply = await channel.request(request)
        return _expect(reply, FsWritten, request)
    view = memoryview(data)
    written = 0
    for start in range(0, len(data), FS_CHUNK):
        first = start == 0
        part = FsWrite(
            path=request.path,
            data=bytes(view[start : start + FS_CHUNK]),
            offset=request.offset + start,
            truncate=request.truncate and first,
            append=request.append,
            mode=request.mode if first else None,
        )
        reply = _expect(await channel.request(part), FsWritten, request)
        written += reply.written
    return FsWritten(written=written)


# -- streaming, on the handle side (one actor ask per chunk) ---------------------------------

AskRead = Callable[[FsRead], Awaitable[FsData]]
AskWrite = Callable[[FsWrite], Awaitable[FsWritten]]


def check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise InvalidConfig(f"chunk_size must be a whole number, got {chunk_size!r}")
    if not 0 < chunk_size <= FS_CHUNK:
        raise InvalidConfig(f"chunk_size must be between 1 and {FS_CHUNK} bytes, got {chunk_size}")
    return chunk_size


class FsReadStream:
    """``async for chunk in sb.fs.read_stream(path)``: bytes, ``chunk_size`` at most each.

    Each step is one ``FsRead(path, offset, length=chunk_size)``; nothing is read ahead,
    so an abandoned stream holds nothing. Errors (``FsNotFound``...) come on the first
    step. An empty file yields no chunk.
    """

    def __init__(
        self, ask: AskRead, path: str, *, chunk_size: int, offset: int, length: int | None
    ) -> None:
        self._ask = ask
        self.path = path
        self.chunk_size = chunk_size
        self.offset = offset
        self.remaining = length
        self.done = length == 0

    def __aiter__(self) -> FsReadStream:
        return self

    async def __anext__(self) -> bytes:
        if self.done:
            raise StopAsyncIteration
        want = self.chunk_size if self.remaining is None else min(self.chunk_size, self.remaining)
        reply = await self._ask(FsRead(path=self.path, offset=self.offset, length=want))
        data = reply.data
        if len(data) > want:
            raise ProtocolError(f"agent sent {len(data)} bytes of {self.path}, {want} were asked")
        self.offset += len(data)
        if self.remaining is not None:
            self.remaining -= len(data)
        # read_file only returns short of ``want`` at the end of the file.
        self.done = reply.eof or len(data) < want or self.remaining == 0
        if not data:
            raise StopAsyncIteration
        return data


async def write_chunks(
    ask: AskWrite,
    path: str,
    chunks: AsyncIterable[bytes] | Iterable[bytes],
    *,
    chunk_size: int,
    mode: int | None,
) -> int:
    """Write what ``chunks`` yields to ``path`` (replacing it) in ``chunk_size`` writes.

    The first write truncates; a short final write always goes out, so an empty
    iterable leaves an empty file. ``mode`` is exact on the last write; until then the
    file stays writable by its owner (a 0o444 file is still written in many requests).
    Not atomic: a failure part-way leaves a partial file.
    """
    written = 0
    buffer = bytearray()
    first = True

    async def send(data: bytes, last: bool) -> None:
        nonlocal written, first
        part_mode = mode if last or mode is None else mode | 0o200
        request = FsWrite(
            path=path,
            data=data,
            offset=written,
            truncate=first,
            mode=part_mode if first or last else None,
        )
        reply = await ask(request)
        if reply.written != len(data):
            raise ProtocolError(f"agent wrote {reply.written} of {len(data)} bytes to {path}")
        written += len(data)
        first = False

    async def take(piece: object) -> None:
        if not isinstance(piece, bytes | bytearray | memoryview):
            raise InvalidConfig(f"write_stream chunks must be bytes, got {type(piece).__name__}")
        buffer.extend(piece)
        while len(buffer) > chunk_size:
            await send(bytes(buffer[:chunk_size]), False)
            del buffer[:chunk_size]

    source: object = chunks  # callers' iterables are not checked statically
    if isinstance(source, bytes | bytearray | memoryview | str):
        raise InvalidConfig("write_stream wants an iterable of byte chunks; use write() for bytes")
    if isinstance(source, AsyncIterable):
        async for piece in source:
            await take(piece)
    elif isinstance(source, Iterable):
        for piece in source:
            await take(piece)
    else:
        raise InvalidConfig(f"write_stream wants an (async) iterable, got {type(source).__name__}")
    await send(bytes(buffer), True)
    return written

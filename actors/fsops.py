"""Filesystem requests over an agent channel: whole-file reads and any-size writes.

Frames are capped at 4 MiB, so file contents move in ``FS_CHUNK`` pieces. A read loops:
each ``FsRead`` conversation yields one or more ``FsData`` chunks (an agent may stream
the whole rest of the file in one conversation, or answer one chunk per request); the
host asks again from the next offset until a chunk says ``eof`` or ``length`` is met. A
write goes out as consecutive ``FsWrite`` requests of at most ``FS_CHUNK`` bytes.
"""

from __future__ import annotations

from typing import TypeVar

from ..errors import ProtocolError
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
    FsWrite,
    FsWritten,
    Message,
    Ok,
    Ping,
    Pong,
)
from .channel import AgentChannel

__all__ = ["REPLY_TYPES", "read_file", "simple_request", "write_file"]

M = TypeVar("M", bound=Message)

REPLY_TYPES: dict[type[Message], type[Message]] = {
    FsStat: FsStatReply,
    FsList: FsListReply,
    FsMkdir: Ok,
    FsRemove: Ok,
    FsCopy: Ok,
    FsRename: Ok,
    FsExists: FsExistsReply,
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

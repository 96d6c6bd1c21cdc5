"""Length-prefixed frames: sans-I/O encoder and incremental decoder.

Layout (big-endian, the same header shape as microsandbox's agent protocol)::

    offset 0  u32  len    = 5 + body length (does not count itself)
    offset 4  u32  id     request id; 0 is the handshake
    offset 8  u8   flags  TERMINAL=1, SESSION_START=2
    offset 9  ...  body   msgpack of one tagged Message

``len`` may not exceed :data:`MAX_FRAME`. Garbage, a truncated stream at close, an
oversized length or an undecodable body raise :class:`corral.errors.ProtocolError`;
after an error the decoder stays failed, so nothing half-read is ever delivered.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import msgspec

from ..errors import FrameTooLarge, ProtocolError
from .messages import AnyMessage, Message

MAX_FRAME = 4 * 1024 * 1024
"""Largest ``len`` field accepted (4 MiB)."""

HEADER = struct.Struct(">IIB")
HEADER_SIZE = HEADER.size

TERMINAL = 1
SESSION_START = 2

MAX_ID = 0xFFFFFFFF

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[AnyMessage] = msgspec.msgpack.Decoder(AnyMessage)


class Frame(NamedTuple):
    id: int
    flags: int
    msg: Message

    @property
    def terminal(self) -> bool:
        return bool(self.flags & TERMINAL)


def encode(id: int, msg: Message, flags: int = 0) -> bytes:
    """Encode one frame. Raises FrameTooLarge when the body would not fit."""
    body = _encoder.encode(msg)
    length = len(body) + 5
    if length > MAX_FRAME:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    if not 0 <= id <= MAX_ID:
        raise ProtocolError(f"request id {id} out of range")
    return HEADER.pack(length, id, flags) + body


def decode_body(body: bytes | memoryview) -> Message:
    """Decode one message body (raises ProtocolError)."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"undecodable frame body: {exc}") from None


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get whole frames back."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._failed is not None:
            raise self._failed
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= HEADER_SIZE:
                length, id, flags = HEADER.unpack_from(buf, pos)
                if length < 5:
                    raise ProtocolError(f"frame length {length} is shorter than its header")
                if length > self._max:
                    raise FrameTooLarge(
                        f"frame of {length} bytes exceeds the {self._max}-byte limit"
                    )
                end = pos + 4 + length
                if len(buf) < end:
                    break
                msg = decode_body(memoryview(buf)[pos + HEADER_SIZE : end])
                frames.append(Frame(id, flags, msg))
                pos = end
        except ProtocolError as exc:
            self._failed = exc
            self._buf = bytearray()
            raise
        if pos:
            del buf[:pos]
        return frames

    def close(self) -> None:
        """Declare end of stream: leftover bytes are a truncated frame."""
        if self._failed is not None:
            raise self._failed
        if self._buf:
            n = len(self._buf)
            self._buf = bytearray()
            self._failed = ProtocolError(f"stream ended inside a frame ({n} bytes left over)")
            raise self._failed

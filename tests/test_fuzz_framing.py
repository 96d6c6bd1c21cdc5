"""Fuzzing the orchestrator's side of the agent protocol (hypothesis).

The frame decoder (:mod:`corral.protocol.framing`) and the channel above it
(:class:`corral.actors.channel.AgentChannel`) get garbage, truncated, huge and
out-of-order input. Every case must end in a typed error (``ProtocolError`` /
``AgentGone``) or a normal result, never another exception and never a hang; after
an error the decoder stays failed and the channel is closed for every conversation.
"""

from __future__ import annotations

import itertools
import os
import struct

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.actors.channel import AgentChannel
from corral.actors.execs import ExecResult, run_exec
from corral.actors.fsops import read_file, simple_request
from corral.errors import AgentGone, CorralError, FrameTooLarge, ProtocolError
from corral.protocol import (
    HEADER_SIZE,
    MAX_FRAME,
    PROTOCOL_VERSION,
    SESSION_START,
    TERMINAL,
    Cancel,
    ErrorReply,
    Exec,
    ExecCredit,
    ExecExited,
    ExecStarted,
    ExecStderr,
    ExecStdout,
    FrameDecoder,
    FsData,
    FsRead,
    FsStat,
    FsWritten,
    Message,
    Ok,
    Ping,
    Pong,
    Ready,
    encode,
)

SOAK = bool(os.environ.get("CORRAL_SLOW"))
FUZZ = settings(
    # CI: a fixed, modest set of examples (same every run); CORRAL_SLOW=1: explore
    max_examples=150 * (50 if SOAK else 1),
    derandomize=not SOAK,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STEP = 5.0
"""Bound on any one fuzz example that touches trio (they finish in milliseconds)."""

# -- strategies ----------------------------------------------------------------------------

small_bytes = st.binary(max_size=64)
small_text = st.text(max_size=16)
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ok),
    st.builds(Pong),
    st.builds(Ping),
    st.builds(Cancel),
    st.builds(ErrorReply, code=small_text, message=small_text),
    st.builds(
        ErrorReply, code=st.sampled_from(["fs_not_found", "protocol_error"]), message=small_text
    ),
    st.builds(ExecStarted, pid=st.integers(0, 2**31)),
    st.builds(ExecStdout, data=small_bytes),
    st.builds(ExecStderr, data=small_bytes),
    st.builds(ExecExited, exit_code=st.integers(-300, 300), signal=st.none() | st.integers(0, 64)),
    st.builds(ExecCredit, bytes=st.integers(0, 2**31)),
    st.builds(FsData, data=small_bytes, eof=st.booleans()),
    st.builds(FsWritten, written=st.integers(0, 2**31)),
    st.builds(FsStat, path=small_text),
    st.builds(Ready, version=st.integers(0, 3), agent_version=small_text, pid=st.integers(0, 99)),
)


@st.composite
def frames(draw: st.DrawFn, ids: st.SearchStrategy[int] | None = None) -> bytes:
    msg = draw(messages)
    frame_id = draw(ids if ids is not None else st.integers(0, 2**32 - 1))
    flags = draw(st.sampled_from([0, TERMINAL, SESSION_START, TERMINAL | SESSION_START, 0xFF]))
    return encode(frame_id, msg, flags)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (sorted, deduplicated, clamped)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def header(length: int, frame_id: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">IIB", length, frame_id, flags)


AgentEnd = trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]


def largest_data(eof: bool = False) -> bytes:
    """FsData payload whose frame is exactly MAX_FRAME long (``len`` field)."""
    probe = 1 << 17  # past 64 KiB: msgpack bin32, the same header as at 4 MiB
    overhead = len(encode(1, FsData(data=b"z" * probe, eof=eof))) - 4 - probe
    return b"z" * (MAX_FRAME - overhead)


# -- the decoder ---------------------------------------------------------------------------


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), messages, st.integers(0, 3)), max_size=12),
    st.lists(st.integers(0, 4096), max_size=20),
)
def test_valid_frames_survive_any_chunking(
    items: list[tuple[int, Message, int]], cuts: list[int]
) -> None:
    stream = b"".join(encode(i, m, f) for i, m, f in items)
    decoder = FrameDecoder()
    got = []
    for chunk in split(stream, cuts):
        got.extend(decoder.feed(chunk))
    decoder.close()
    assert [(f.id, f.msg, f.flags) for f in got] == [(i, m, f) for i, m, f in items]
    assert decoder.buffered == 0


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(0, 2048), max_size=10))
def test_garbage_gives_frames_or_a_protocol_error_and_then_stays_failed(
    garbage: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder()
    error: ProtocolError | None = None
    for chunk in split(garbage, cuts):
        try:
            decoder.feed(chunk)
        except ProtocolError as exc:
            error = exc
            break
        # a pending frame is never more than its header plus the largest body
        assert decoder.buffered < HEADER_SIZE + MAX_FRAME
    if error is None:
        try:
            decoder.close()
        except ProtocolError as exc:
            error = exc
        else:
            return  # the garbage happened to be whole frames
    assert decoder.buffered == 0  # nothing half-read is kept
    with pytest.raises(ProtocolError):
        decoder.feed(encode(1, Ping()))  # failed for good: valid input no longer parses
    with pytest.raises(ProtocolError):
        decoder.close()


@FUZZ
@given(
    st.lists(frames(), min_size=1, max_size=6),
    st.data(),
)
def test_a_stream_cut_inside_a_frame_is_a_protocol_error_at_close(
    parts: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(parts)
    ends = [sum(len(p) for p in parts[: i + 1]) for i in range(len(parts))]
    cut = data.draw(st.integers(1, len(stream) - 1).filter(lambda c: c not in ends))
    whole = sum(1 for end in ends if end <= cut)
    decoder = FrameDecoder()
    assert len(decoder.feed(stream[:cut])) == whole  # frames before the cut arrive
    with pytest.raises(ProtocolError, match="inside a frame"):
        decoder.close()


@FUZZ
@given(
    st.integers(MAX_FRAME + 1, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
)
def test_an_oversized_length_fails_at_its_header_without_buffering(
    length: int, frame_id: int, tail: bytes
) -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        decoder.feed(header(length, frame_id) + tail)
    assert decoder.buffered == 0


@FUZZ
@given(st.integers(0, 4), st.binary(max_size=16))
def test_a_length_shorter_than_the_header_is_an_error(length: int, tail: bytes) -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="shorter than its header"):
        decoder.feed(header(length) + tail)


@FUZZ
@given(st.binary(min_size=1, max_size=256), st.integers(0, 2**32 - 1))
def test_a_well_framed_garbage_body_is_a_protocol_error(body: bytes, frame_id: int) -> None:
    decoder = FrameDecoder()
    try:
        got = decoder.feed(header(len(body) + 5, frame_id) + body)
    except ProtocolError:
        return
    assert len(got) == 1  # the body was a valid message by chance: exactly that one


def test_the_largest_frame_is_accepted_and_one_byte_more_is_not() -> None:
    data = largest_data()
    frame = encode(1, FsData(data=data))
    assert len(frame) - 4 == MAX_FRAME
    assert FrameDecoder().feed(frame)[0].msg == FsData(data=data)
    with pytest.raises(FrameTooLarge):
        encode(1, FsData(data=data + b"x"))
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(header(MAX_FRAME + 1))


# -- the channel -----------------------------------------------------------------------------


async def _handshaken() -> tuple[AgentChannel, AgentEnd]:
    """A channel whose handshake a scripted agent has answered; returns (channel, agent end)."""
    host, agent = trio.testing.memory_stream_pair()
    channel = AgentChannel(host, label="fuzz")

    async def answer() -> None:
        decoder = FrameDecoder()
        while not decoder.feed(await agent.receive_some()):
            pass
        ready = Ready(version=PROTOCOL_VERSION, agent_version="fuzz", pid=1)
        await agent.send_all(encode(0, ready, TERMINAL))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        await channel.handshake(timeout=STEP)
    return channel, agent


async def _drain(stream: trio.abc.Stream) -> None:
    """Read and drop what the host sends (requests, credit, Cancel) until it closes."""
    try:
        while await stream.receive_some():
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@FUZZ
@given(st.binary(max_size=512), st.lists(st.integers(0, 512), max_size=6))
async def test_handshake_on_garbage_fails_typed_and_never_hangs(
    garbage: bytes, cuts: list[int]
) -> None:
    host, agent = trio.testing.memory_stream_pair()
    channel = AgentChannel(host, label="fuzz")

    async def agent_side() -> None:
        for chunk in split(garbage, cuts):
            await agent.send_all(chunk)
        await agent.send_stream.aclose()
        await _drain(agent)

    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent_side)
            try:
                ready = await channel.handshake(timeout=STEP / 2)
            except CorralError:
                pass  # ProtocolError, AgentGone, or the error an ErrorReply named
            else:
                assert ready.version == PROTOCOL_VERSION  # the garbage began with a Ready
            await channel.aclose()
    assert not channel.alive


@FUZZ
@given(st.binary(min_size=1, max_size=1024), st.lists(st.integers(0, 1024), max_size=8))
async def test_garbage_after_the_handshake_fails_every_conversation(
    garbage: bytes, cuts: list[int]
) -> None:
    with trio.fail_after(STEP):
        channel, agent = await _handshaken()
        outcomes: list[BaseException | Message] = []

        async def ask() -> None:
            try:
                outcomes.append(await channel.request(Ping()))
            except CorralError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            for _ in range(3):
                nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            # The agent side reads the three requests, then answers with garbage.
            for chunk in split(garbage, cuts):
                await agent.send_all(chunk)
            await agent.send_stream.aclose()
            await channel.closed.wait()
        assert not channel.alive
        assert len(outcomes) == 3
        for outcome in outcomes:
            # a Pong only if the garbage happened to contain one for that request
            assert isinstance(outcome, ProtocolError | AgentGone | Pong), outcome
        with pytest.raises(CorralError):
            await channel.request(Ping())  # a dead channel refuses new work at once
        await channel.aclose()


@FUZZ
@given(st.lists(frames(ids=st.integers(0, 6)), max_size=25), st.booleans())
async def test_out_of_order_replies_end_every_caller_with_a_result_or_a_typed_error(
    replies: list[bytes], trailing_garbage: bool
) -> None:
    """Three concurrent callers (an exec, a file read, a stat) get frames for ids in any
    order: replies before requests, for unknown ids, after TERMINAL, of the wrong type.
    Then the agent hangs up. Each caller must return or raise a CorralError."""
    with trio.fail_after(STEP):
        channel, agent = await _handshaken()
        outcomes: dict[str, object] = {}

        async def call(label: str, fn: object) -> None:
            try:
                outcomes[label] = await fn()  # type: ignore[operator]
            except CorralError as exc:
                outcomes[label] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            nursery.start_soon(call, "exec", lambda: run_exec(channel, Exec(cmd="x")))
            nursery.start_soon(call, "read", lambda: read_file(channel, FsRead(path="/f")))
            nursery.start_soon(call, "stat", lambda: simple_request(channel, FsStat(path="/f")))
            await trio.testing.wait_all_tasks_blocked()
            for frame in replies:
                await agent.send_all(frame)
                await trio.testing.wait_all_tasks_blocked()
            if trailing_garbage:
                await agent.send_all(header(3))
            await agent.send_stream.aclose()
        assert set(outcomes) == {"exec", "read", "stat"}
        for label, outcome in outcomes.items():
            assert isinstance(outcome, CorralError | ExecResult | FsData | Message), (
                label,
                outcome,
            )
        assert not channel.alive
        assert channel.in_flight == 0
        await channel.aclose()


async def test_an_oversized_frame_from_the_agent_fails_the_channel_at_its_header() -> None:
    with trio.fail_after(STEP):
        channel, agent = await _handshaken()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            with pytest.raises(FrameTooLarge):
                async with channel.conversation(Ping()) as conv:
                    # only the header of a 4 GiB frame: the channel must not wait for it
                    await agent.send_all(header(2**32 - 1, conv.id))
                    await conv.receive()
            await channel.closed.wait()
            with pytest.raises(FrameTooLarge):
                await channel.request(Ping())
            await channel.aclose()


async def test_a_frame_of_the_largest_size_passes_the_channel() -> None:
    data = largest_data(eof=True)
    with trio.fail_after(STEP):
        channel, agent = await _handshaken()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            async with channel.conversation(FsRead(path="/big")) as conv:
                await agent.send_all(encode(conv.id, FsData(data=data, eof=True), TERMINAL))
                reply = await conv.receive()
            assert reply == FsData(data=data, eof=True)
            assert channel.alive
            await channel.aclose()


async def test_a_connection_lost_inside_a_frame_is_agent_gone() -> None:
    """The agent dying part-way through a frame is a lost agent, not a protocol error
    (found killing the agent in the middle of a large file read)."""
    with trio.fail_after(STEP):
        channel, agent = await _handshaken()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            async with channel.conversation(FsRead(path="/big")) as conv:
                frame = encode(conv.id, FsData(data=b"x" * 1000, eof=True), TERMINAL)
                await agent.send_all(frame[:500])
                await agent.send_stream.aclose()
                with pytest.raises(AgentGone, match="inside a frame"):
                    await conv.receive()
            await channel.aclose()

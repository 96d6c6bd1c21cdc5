"""AgentChannel fixes made with the actor layer: whole-frame sends under cancellation."""

from __future__ import annotations

import pytest
import trio

from corral.actors import channel as channel_module
from corral.actors.channel import AgentChannel
from corral.drivers.base import SandboxSpec
from corral.drivers.fake import FakeDriver
from corral.errors import AgentGone
from corral.protocol import Ping, Pong


class SlowSend(trio.abc.Stream):
    """Sends each buffer in two halves with a pause between (a slow socket)."""

    def __init__(self, inner: trio.abc.Stream, pause: float) -> None:
        self.inner = inner
        self.pause = pause

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        half = len(data) // 2
        await self.inner.send_all(data[:half])
        await trio.sleep(self.pause)
        await self.inner.send_all(data[half:])

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_sender_cancelled_mid_frame_does_not_corrupt_the_stream(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with FakeDriver() as driver:
        proc = await driver.spawn(SandboxSpec(name="a"))
        stream = SlowSend(await proc.connect(), pause=1.0)
        async with AgentChannel.open(stream) as channel:
            with trio.move_on_after(0.5) as scope:
                await channel.request(Ping())  # cancelled half-way through its frame
            assert scope.cancelled_caught
            with trio.fail_after(10):
                assert isinstance(await channel.request(Ping()), Pong)
            assert channel.alive


async def test_an_agent_that_stops_reading_counts_as_gone(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_module, "SEND_TIMEOUT", 5.0)
    async with FakeDriver() as driver:
        proc = await driver.spawn(SandboxSpec(name="a"))
        stream = SlowSend(await proc.connect(), pause=0.0)
        async with AgentChannel.open(stream) as channel:
            stream.pause = 60.0  # the peer no longer drains the socket
            t0 = trio.current_time()
            with pytest.raises(AgentGone, match="stopped reading"):
                await channel.request(Ping())
            assert trio.current_time() - t0 == pytest.approx(5.0)
            assert not channel.alive

"""Actor ``ask`` with no I/O, on the fake driver, against a bare trio channel round trip."""

from __future__ import annotations

import trio

import corral
from corral.actors.sandbox import Describe
from corral.drivers.fake import FakeDriver

from .context import Context
from .report import Row, Unit, at_most
from .stat import Stat, paired

__all__ = ["run_ask"]

BASELINE = "trio memory-channel round trip, 2 tasks"


async def run_ask(ctx: Context) -> None:
    n = ctx.n(20_000, 3_000)
    request_send, request_recv = trio.open_memory_channel[object](0)
    reply_send, reply_recv = trio.open_memory_channel[object](0)

    async def echo() -> None:
        async for msg in request_recv:
            await reply_send.send(msg)

    async def channel_round_trip() -> None:
        await request_send.send(None)
        await reply_recv.receive()

    async with FakeDriver() as driver, corral.open_supervisor(driver=driver) as sup:
        await sup.create("ask")

        async def describe() -> None:
            await sup.ask("ask", Describe())

        async def ping() -> None:
            await sup.ask("ask", corral.Ping())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            asks, base = await paired(describe, channel_round_trip, n, warmup=200)
            pings, base2 = await paired(ping, channel_round_trip, n // 4, warmup=50)
            await request_send.aclose()
    ctx.emit(
        Row(
            "ask",
            "actor ask, no I/O (Describe)",
            Unit.SECONDS,
            Stat.of(asks),
            BASELINE,
            Stat.of(base),
            at_most(20e-6, Unit.SECONDS),
            note="sup.ask(name, Describe()) on a FakeDriver sandbox: mailbox, inline "
            "handler, reply event; no agent I/O",
        )
    )
    ctx.emit(
        Row(
            "ask",
            "actor ask Ping (fake agent, in-memory stream)",
            Unit.SECONDS,
            Stat.of(pings),
            BASELINE,
            Stat.of(base2),
            note="sup.ask(name, corral.Ping()): through the agent channel (framing, msgspec) "
            "to the FakeDriver's in-memory agent",
        )
    )

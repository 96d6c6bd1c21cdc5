"""The Actor base: ask/tell, typed errors, ActorDead, concurrency, cancellation, cost."""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from corral.actors.mailbox import Actor, Handler, Reply
from corral.errors import ActorDead, FsNotFound, InvalidConfig


class Echo:
    def __init__(self, value: object) -> None:
        self.value = value


class Fail:
    def __init__(self, error: Exception) -> None:
        self.error = error


class Block:
    """Handled concurrently: waits until ``release`` is set."""

    def __init__(self, release: trio.Event, value: object = None) -> None:
        self.release = release
        self.value = value


class SlowInline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class Resource:
    def __init__(self) -> None:
        self.discarded = False

    def discard(self) -> None:
        self.discarded = True


def discarded(resource: Resource) -> bool:
    return resource.discarded  # a call: no type narrowing across awaits


class GiveResource:
    def __init__(self, resource: Resource) -> None:
        self.resource = resource


class Fixed:
    def __init__(self, resource: Resource) -> None:
        self.resource = resource


class TestActor(Actor):
    __test__ = False  # not a pytest class
    mailbox_size = 4

    def __init__(self) -> None:
        super().__init__("test")
        self.told: list[object] = []
        self.cancelled: list[str] = []
        self.completed: list[str] = []

    def handler_for(self, msg: object) -> Handler:
        if isinstance(msg, Echo | Fail):
            return Handler(self._echo)
        if isinstance(msg, Block):
            return Handler(self._block, concurrent=True)
        if isinstance(msg, SlowInline):
            return Handler(self._slow, cancellable=False)
        if isinstance(msg, GiveResource):
            return Handler(self._give, concurrent=True)
        if isinstance(msg, Fixed):
            return Handler(self._fixed, concurrent=True, cancellable=False)
        if isinstance(msg, str):
            return Handler(self._tell)
        raise InvalidConfig(f"no handler for {type(msg).__name__}")

    async def _echo(self, msg: Echo | Fail) -> object:
        if isinstance(msg, Fail):
            raise msg.error
        return msg.value

    async def _block(self, msg: Block) -> object:
        try:
            await msg.release.wait()
        except trio.Cancelled:
            self.cancelled.append("block")
            raise
        return msg.value

    async def _slow(self, msg: SlowInline) -> str:
        await trio.sleep(msg.seconds)
        self.completed.append("slow")
        return "slow"

    async def _give(self, msg: GiveResource) -> Resource:
        return msg.resource

    async def _fixed(self, msg: Fixed) -> Resource:
        await trio.sleep(1)
        self.completed.append("fixed")
        return msg.resource

    async def _tell(self, msg: str) -> None:
        if msg == "boom":
            raise RuntimeError("boom")
        self.told.append(msg)


@asynccontextmanager
async def running_actor() -> AsyncIterator[TestActor]:
    actor = TestActor()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        yield actor
        actor.close()


async def test_ask_returns_the_handlers_value() -> None:
    async with running_actor() as actor:
        assert await actor.ask(Echo(42)) == 42
        assert await actor.ask_as(Echo("x"), str) == "x"


async def test_ask_raises_the_handlers_typed_error() -> None:
    async with running_actor() as actor:
        error = FsNotFound("gone", path="/x")
        with pytest.raises(FsNotFound) as info:
            await actor.ask(Fail(error))
        assert info.value is error
        with pytest.raises(InvalidConfig, match="no handler for int"):
            await actor.ask(5)
        # The actor survives its handlers' errors.
        assert await actor.ask(Echo(1)) == 1


async def test_tell_is_fire_and_forget_and_logs_errors(caplog: pytest.LogCaptureFixture) -> None:
    async with running_actor() as actor:
        await actor.tell("a")
        await actor.tell("boom")
        await actor.tell("b")
        await trio.testing.wait_all_tasks_blocked()
        assert actor.told == ["a", "b"]
        assert "boom" in caplog.text


async def test_ask_on_a_closed_actor_raises_actor_dead() -> None:
    async with running_actor() as actor:
        pass
    with trio.fail_after(1):
        await actor.finished.wait()
    with pytest.raises(ActorDead):
        await actor.ask(Echo(1))
    with pytest.raises(ActorDead):
        await actor.tell("late")


async def test_queued_and_in_flight_asks_fail_with_actor_dead_when_the_actor_dies() -> None:
    actor = TestActor()
    results: dict[str, BaseException | object] = {}

    async def ask(key: str, msg: object) -> None:
        try:
            results[key] = await actor.ask(msg)
        except ActorDead as exc:
            results[key] = exc

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as actor_nursery:
            await actor_nursery.start(actor.run)
            outer.start_soon(ask, "in-flight", Block(trio.Event()))
            outer.start_soon(ask, "inline", SlowInline(100))
            await trio.testing.wait_all_tasks_blocked()
            outer.start_soon(ask, "queued", Echo(1))
            await trio.testing.wait_all_tasks_blocked()
            actor_nursery.cancel_scope.cancel()
    assert set(results) == {"in-flight", "inline", "queued"}
    assert all(isinstance(v, ActorDead) for v in results.values()), results


async def test_concurrent_handlers_overlap_and_route_replies_to_their_askers() -> None:
    async with running_actor() as actor:
        releases = [trio.Event() for _ in range(50)]
        got: dict[int, object] = {}

        async def ask(n: int) -> None:
            got[n] = await actor.ask(Block(releases[n], value=n * 10))

        async with trio.open_nursery() as nursery:
            for n in range(50):
                nursery.start_soon(ask, n)
            await trio.testing.wait_all_tasks_blocked()
            assert got == {}  # all 50 are in flight at once
            for release in reversed(releases):
                release.set()
        assert got == {n: n * 10 for n in range(50)}


async def test_a_cancelled_asker_cancels_a_cancellable_handler() -> None:
    async with running_actor() as actor:
        with trio.move_on_after(1) as scope:
            await actor.ask(Block(trio.Event()))
        assert scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        assert actor.cancelled == ["block"]


async def test_a_non_cancellable_handler_completes_after_its_asker_left(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running_actor() as actor:
        with trio.move_on_after(0.5):
            await actor.ask(Fixed(Resource()))
        assert actor.completed == []
        await trio.sleep(1)
        assert actor.completed == ["fixed"]


def test_reply_discards_a_value_nobody_will_claim() -> None:
    early, late, kept = Resource(), Resource(), Resource()
    reply = Reply()
    reply.resolve(early)
    reply.abandon()  # resolved, then the asker was cancelled before it woke
    assert early.discarded
    reply = Reply()
    reply.abandon()
    reply.resolve(late)  # the asker left, then a non-cancellable handler finished
    assert late.discarded
    reply = Reply()
    reply.resolve(kept)
    assert not kept.discarded and reply.value is kept


async def test_a_resource_made_after_its_asker_left_is_discarded(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running_actor() as actor:
        resource = Resource()
        with trio.move_on_after(0.5):
            await actor.ask(Fixed(resource))
        assert not resource.discarded
        await trio.sleep(1)
        assert actor.completed == ["fixed"]
        assert discarded(resource)
        kept = Resource()
        assert await actor.ask(GiveResource(kept)) is kept
        assert not kept.discarded


async def test_a_full_mailbox_pushes_back_on_senders(autojump_clock: trio.abc.Clock) -> None:
    async with running_actor() as actor:
        # The loop is busy with a slow inline handler; 4 more fit in the mailbox.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(actor.ask, SlowInline(10))
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(4):
                nursery.start_soon(actor.tell, "queued")
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await actor.tell("one too many")
            assert trio.current_time() - start == pytest.approx(10)
        await trio.testing.wait_all_tasks_blocked()
        assert actor.told == ["queued"] * 4 + ["one too many"]


def _median_ask_us(actor: Actor, msg: object, n: int) -> Any:
    async def measure() -> float:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await actor.ask(msg)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e6

    return measure()


async def test_ask_round_trip_cost() -> None:
    """The no-I/O ask round trip (median of 10k); the bound is loose, the print is the number."""
    async with running_actor() as actor:
        median = await _median_ask_us(actor, Echo(1), 10_000)
    print(f"\nask round trip (bare actor, inline handler): median {median:.1f} us")
    assert median < 500


class Control:
    pass


class LimitedActor(TestActor):
    max_concurrency = 2
    priority = frozenset({Control})

    def handler_for(self, msg: object) -> Handler:
        if isinstance(msg, Control):
            return Handler(self._control)
        return super().handler_for(msg)

    async def _control(self, msg: Control) -> str:
        return "control"


async def test_priority_messages_pass_a_full_set_of_slots() -> None:
    actor = LimitedActor()
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        for _ in range(4):  # two run, two wait for a slot (the main loop blocks)
            nursery.start_soon(actor.ask, Block(release))
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(1):
            assert await actor.ask(Control()) == "control"
        with trio.move_on_after(0.1) as scope:
            await actor.ask(Echo(1))  # ordinary work waits behind the blocked ones
        assert scope.cancelled_caught
        release.set()
        with trio.fail_after(1):
            assert await actor.ask(Echo(2)) == 2
        actor.close()

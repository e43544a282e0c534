"""Middleware (asyncstreams.middleware) against a real redis-server: what it wraps, the
outcome it hears for every way an entry can end, and that a broken one loses nothing."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import msgspec
import pytest
import redis.asyncio as aioredis

from asyncstreams import App, Call, ConfigurationError, Message, Middleware, Outcome

from .conftest import Names
from .helpers import eventually, fill, pending_count, wait_drained

pytestmark = pytest.mark.anyio


class Item(msgspec.Struct):
    n: int


class Recorder(Middleware):
    """Remembers every settled call: (handler, outcome, ids, error type, duration)."""

    def __init__(self) -> None:
        self.settles: list[tuple[str, Outcome, list[str], str | None, float]] = []

    def settled(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
        ids = [entry_id for _, entry_id in call.ids]
        kind = type(error).__name__ if error is not None else None
        self.settles.append((call.handler, outcome, ids, kind, call.duration))

    def outcomes(self) -> Counter[Outcome]:
        counts: Counter[Outcome] = Counter()
        for _, outcome, ids, _, _ in self.settles:
            counts[outcome] += len(ids)
        return counts


class Around(Middleware):
    """Records the order calls enter and leave, and the messages it saw."""

    def __init__(self, name: str, trail: list[str]) -> None:
        self.name = name
        self.trail = trail
        self.seen: list[Message] = []

    async def around(self, call: Call, proceed: object) -> None:
        assert callable(proceed)
        self.seen.extend(call.messages)
        self.trail.append(f"{self.name} in")
        await proceed()
        self.trail.append(f"{self.name} out")


async def test_around_runs_outermost_first_and_sees_each_message(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    ids = await fill(client, names.stream, 3)
    trail: list[str] = []
    outer, inner = Around("outer", trail), Around("inner", trail)
    app = App(redis_url, middleware=[outer])
    app.add_middleware(inner)

    @app.consumer(names.stream, group=names.group, concurrency=1)
    async def handle(item: Item) -> None:
        trail.append(f"handler {item.n}")

    async with app:
        await wait_drained(client, names.stream, names.group)
    assert trail[:5] == ["outer in", "inner in", "handler 0", "inner out", "outer out"]
    assert [m.id for m in outer.seen] == ids
    assert [m.stream for m in inner.seen] == [names.stream] * 3
    assert all(m.group == names.group and m.deliveries == 1 for m in inner.seen)


async def test_every_outcome_is_heard_once_per_entry(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """acked, retried then acked, retried then dead-lettered, undecodable: dead-lettered."""
    ok = await client.xadd(names.stream, {"n": "1"})
    flaky = await client.xadd(names.stream, {"n": "2"})
    poison = await client.xadd(names.stream, {"n": "3"})
    undecodable = await client.xadd(names.stream, {"n": "three"})
    recorder = Recorder()
    app = App(redis_url, middleware=[recorder])
    failures = Counter[int]()

    @app.consumer(names.stream, group=names.group, retry_delay=0.01, max_deliveries=2)
    async def handle(item: Item) -> None:
        if (item.n == 2 and failures[2] == 0) or item.n == 3:
            failures[item.n] += 1
            raise ValueError(f"no {item.n}")

    async with app:
        await wait_drained(client, names.stream, names.group)
        await eventually(lambda: _true(len(recorder.settles) == 6), what="six settles")
    by_id: dict[str, list[tuple[Outcome, str | None]]] = {}
    for handler, outcome, ids, error, duration in recorder.settles:
        assert handler.endswith("handle")
        assert duration >= 0
        for entry_id in ids:
            by_id.setdefault(entry_id, []).append((outcome, error))
    assert by_id == {
        ok: [("acked", None)],
        flaky: [("retried", "ValueError"), ("acked", None)],
        poison: [("retried", "ValueError"), ("dead_lettered", "ValueError")],
        undecodable: [("dead_lettered", "DecodeError")],
    }
    assert await client.xlen(f"{names.stream}:dead-letter") == 2


async def _true(value: bool) -> bool:
    return value


async def test_parked_without_a_dead_letter_stream(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    entry_id = await client.xadd(names.stream, {"n": "x"})
    recorder = Recorder()
    app = App(redis_url, middleware=[recorder])

    @app.consumer(names.stream, group=names.group, dead_letter=None)
    async def handle(item: Item) -> None:
        pass

    async with app:
        await eventually(lambda: _true(bool(recorder.settles)), what="a settle")
    assert [(o, ids) for _, o, ids, _, _ in recorder.settles] == [("parked", [entry_id])]
    assert await pending_count(client, names.stream, names.group) == 1


async def test_a_batch_call_is_one_call_and_its_unfit_entries_their_own(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await fill(client, names.stream, 1)  # a consumer's first read takes one entry
    good = await fill(client, names.stream, 5)
    bad = await client.xadd(names.stream, {"n": "nope"})
    recorder = Recorder()
    sizes: list[int] = []

    class Sizes(Middleware):
        async def around(self, call: Call, proceed: object) -> None:
            sizes.append(len(call))
            assert callable(proceed)
            await proceed()

    app = App(redis_url, middleware=[Sizes(), recorder])

    @app.consumer(names.stream, group=names.group)
    async def load(items: list[Item]) -> None:
        pass

    async with app:
        await wait_drained(client, names.stream, names.group)
        await eventually(lambda: _true(recorder.outcomes()["acked"] == 6), what="six acked")
    assert recorder.outcomes() == Counter({"acked": 6, "dead_lettered": 1})
    assert sum(sizes) == 6  # the undecodable entry never reached the handler
    unfit = [(o, ids, e) for _, o, ids, e, _ in recorder.settles if o == "dead_lettered"]
    assert unfit == [("dead_lettered", [bad], "DecodeError")]
    assert any(set(good) <= set(ids) for _, o, ids, _, _ in recorder.settles if o == "acked")


async def test_what_around_raises_fails_the_entry_and_nothing_is_lost(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    ids = await fill(client, names.stream, 4)
    recorder = Recorder()
    handled: list[int] = []

    class Flaky(Middleware):
        def __init__(self) -> None:
            self.calls = 0

        async def around(self, call: Call, proceed: object) -> None:
            self.calls += 1
            if self.calls % 2:
                raise RuntimeError("middleware broke")
            assert callable(proceed)
            await proceed()

    app = App(redis_url, middleware=[Flaky(), recorder])

    @app.consumer(names.stream, group=names.group, retry_delay=0.01, concurrency=1)
    async def handle(item: Item) -> None:
        handled.append(item.n)

    async with app:
        await wait_drained(client, names.stream, names.group)
    assert sorted(handled) == [0, 1, 2, 3]
    assert recorder.outcomes() == Counter({"retried": 4, "acked": 4})
    assert all(e == "RuntimeError" for _, o, _, e, _ in recorder.settles if o == "retried")
    assert await client.xlen(f"{names.stream}:dead-letter") == 0
    assert len(ids) == 4


async def test_a_settled_that_raises_is_logged_once_and_changes_nothing(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await fill(client, names.stream, 20)
    handled: list[int] = []

    class Broken(Middleware):
        def settled(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
            raise KeyError("bug")

    app = App(redis_url, middleware=[Broken()])

    @app.consumer(names.stream, group=names.group)
    async def handle(item: Item) -> None:
        handled.append(item.n)

    with caplog.at_level(logging.ERROR, logger="asyncstreams.middleware"):
        async with app:
            await wait_drained(client, names.stream, names.group)
    assert sorted(handled) == list(range(20))
    broken = [r for r in caplog.records if "Broken.settled raised" in r.getMessage()]
    assert len(broken) == 1


async def test_a_stopped_handler_is_heard_as_cancelled(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    entry_id = await client.xadd(names.stream, {"n": "1"})
    recorder = Recorder()
    started = asyncio.Event()
    app = App(redis_url, grace_period=0.05, middleware=[recorder])

    @app.consumer(names.stream, group=names.group)
    async def handle(item: Item) -> None:
        started.set()
        await asyncio.sleep(60)

    async with app:
        await asyncio.wait_for(started.wait(), 10)
    assert [(o, ids, e) for _, o, ids, e, _ in recorder.settles] == [
        ("cancelled", [entry_id], "CancelledError")
    ]
    assert await pending_count(client, names.stream, names.group) == 1


async def test_entries_claimed_after_their_last_delivery_are_heard_dead_lettered(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """Delivered to a consumer that died, as often as max_deliveries allows: the consumer
    that claims it moves it to the dead-letter stream without a handler call."""
    await client.xgroup_create(names.stream, names.group, id="0", mkstream=True)
    entry_id = await client.xadd(names.stream, {"n": "1"})
    await client.xreadgroup(names.group, "gone", {names.stream: ">"})  # delivery 1
    await client.xclaim(names.stream, names.group, "gone", 0, [entry_id])  # delivery 2
    recorder = Recorder()
    app = App(redis_url, middleware=[recorder])
    calls: list[int] = []

    @app.consumer(names.stream, group=names.group, max_deliveries=2, claim_idle_ms=100)
    async def handle(item: Item) -> None:
        calls.append(item.n)

    async with app:
        await eventually(lambda: _true(bool(recorder.settles)), timeout=10, what="a settle")
    assert calls == []
    assert [(o, ids, d) for _, o, ids, _, d in recorder.settles] == [
        ("dead_lettered", [entry_id], 0.0)
    ]


def test_only_middleware_instances_are_taken(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"found type .*pass an instance"):
        App(redis_url, middleware=[Recorder])  # type: ignore[list-item]
    app = App(redis_url)
    with pytest.raises(ConfigurationError, match=r"instance of asyncstreams\.Middleware"):
        app.add_middleware(object())  # type: ignore[arg-type]


async def test_middleware_cannot_be_added_to_a_running_app(redis_url: str, names: Names) -> None:
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group)
    async def handle(msg: Message) -> None:
        pass

    async with app:
        with pytest.raises(ConfigurationError, match="found it running"):
            app.add_middleware(Recorder())
    assert app.middleware == ()


@pytest.mark.parametrize("batch", [False, True])
async def test_an_around_that_skips_the_handler_acks_the_entries(
    redis_url: str, names: Names, client: aioredis.Redis, batch: bool
) -> None:
    await fill(client, names.stream, 5)
    calls: list[int] = []

    class Skip(Middleware):
        async def around(self, call: Call, proceed: object) -> None:
            return None

    recorder = Recorder()
    app = App(redis_url, middleware=[Skip(), recorder])
    if batch:

        @app.consumer(names.stream, group=names.group)
        async def load(items: list[Item]) -> None:
            calls.extend(item.n for item in items)

    else:

        @app.consumer(names.stream, group=names.group)
        async def handle(item: Item) -> None:
            calls.append(item.n)

    async with app:
        await wait_drained(client, names.stream, names.group)
    assert calls == []
    assert recorder.outcomes() == Counter({"acked": 5})

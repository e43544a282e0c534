"""The failure path against a real redis-server: the bound holds while every entry fails, an
outage pauses the consumer instead of spending the backlog's deliveries, failure logs stay
bounded, and whatever a handler raises (CancelledError and BaseException included) is a
failure of its entry, never of the consumer."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from asyncstreams import App, Message
from asyncstreams._transport import create_client
from asyncstreams.failures import Failures
from asyncstreams.ledger import Ledger
from asyncstreams.message import entry
from asyncstreams.options import ConsumerOptions

from .conftest import Names
from .helpers import eventually, fill, pending_count, wait_drained

pytestmark = pytest.mark.anyio


class DatabaseDown(Exception):
    """What a handler raises while its database is down."""


class Fatal(BaseException):
    """A BaseException of the handler's own, not an Exception."""


class Numbers(msgspec.Struct):
    values: list[int]


async def _true(value: bool) -> bool:
    return value


async def _dead_letter_count(client: aioredis.Redis, names: Names) -> int:
    return int(await client.xlen(f"{names.stream}:dead-letter"))


# -- bug 1: the bound holds while every entry fails -------------------------------------


async def test_entries_waiting_for_a_retry_count_against_the_bound(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """A handler that raises for every entry: the consumer holds concurrency + batch_size
    entries, retried over and over, and never asks Redis for more."""
    await fill(client, names.stream, 3000)
    app = App(redis_url)
    calls: Counter[str] = Counter()

    @app.consumer(
        names.stream,
        group=names.group,
        concurrency=4,
        batch_size=4,
        retry_delay=0.01,
        retry_max_delay=0.02,
        max_deliveries=None,
        pause_after_failures=None,
    )
    async def handle(msg: Message) -> None:
        calls[msg.id] += 1
        raise DatabaseDown("connection refused")

    async with app:
        # 200 runs: the 8 held entries, each retried about 25 times. Were retries not
        # counted, the reader would have taken the backlog in after the first 8 failures.
        await eventually(lambda: _true(calls.total() >= 200), what="200 handler runs")
        assert len(calls) == 8
        assert await pending_count(client, names.stream, names.group) == 8


async def test_an_outage_pauses_the_consumer_instead_of_dead_lettering_the_backlog(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """The database is down: after `pause_after_failures` failed runs the consumer pauses.
    It reads nothing new and tries one held entry at a time, the one with the fewest
    deliveries, so deliveries are spent one probe at a time, spread over the held entries,
    and nothing reaches the dead-letter stream. Once the database is back, all is handled."""
    await fill(client, names.stream, 300)
    app = App(redis_url)
    database_up = False
    runs: list[tuple[str, int]] = []
    running = 0
    most_running_while_paused = 0
    handled: set[str] = set()

    @app.consumer(
        names.stream,
        group=names.group,
        concurrency=4,
        batch_size=4,
        retry_delay=0.01,
        retry_max_delay=0.05,
        max_deliveries=5,
        pause_after_failures=6,
    )
    async def handle(msg: Message) -> None:
        nonlocal running, most_running_while_paused
        runs.append((msg.id, msg.deliveries))
        running += 1
        # The probes: past the held entries' first runs (8) and the retries that may have
        # been claimed before the pause began (at most the 6 failures it takes), with two
        # runs of room for those still running on a loaded machine.
        if len(runs) > 16:
            most_running_while_paused = max(most_running_while_paused, running)
        try:
            await anyio.sleep(0.002)
            if not database_up:
                raise DatabaseDown("connection refused")
            handled.add(msg.id)
        finally:
            running -= 1

    async with app:
        # 8 held entries (concurrency + batch_size) fail once; then 16 probes.
        await eventually(lambda: _true(len(runs) >= 24), what="24 failed runs")
        assert await _dead_letter_count(client, names) == 0
        assert {entry_id for entry_id, _ in runs} == {entry_id for entry_id, _ in runs[:8]}
        # Fewest deliveries first: 8 probes bring every entry to 2 deliveries, 8 more to 3.
        assert max(deliveries for _, deliveries in runs[:24]) == 3
        assert most_running_while_paused == 1
        database_up = True
        await wait_drained(client, names.stream, names.group)
    assert len(handled) == 300
    assert await _dead_letter_count(client, names) == 0


async def test_without_the_pause_an_outage_dead_letters_entry_after_entry(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """The same outage with `pause_after_failures=None`: every held entry spends its
    deliveries on schedule, and the bound's worth of entries reaches the dead-letter stream
    again and again (what the README's outage arithmetic says)."""
    await fill(client, names.stream, 300)
    app = App(redis_url)
    runs: list[str] = []

    @app.consumer(
        names.stream,
        group=names.group,
        concurrency=4,
        batch_size=4,
        retry_delay=0.01,
        retry_max_delay=0.02,
        max_deliveries=5,
        pause_after_failures=None,
    )
    async def handle(msg: Message) -> None:
        runs.append(msg.id)
        raise DatabaseDown("connection refused")

    async with app:
        await eventually(lambda: _true(len(runs) >= 60), what="60 failed runs")
        await eventually(
            lambda: _dead_letter_count(client, names), what="entries in the dead-letter stream"
        )


# -- bug 2: COUNT 0 ----------------------------------------------------------------------


async def test_a_read_over_several_streams_never_asks_for_more_than_the_room(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """Three streams, batch_size=3, concurrency=1: each XREADGROUP asks COUNT 1 per stream
    (never COUNT 0, which Redis reads as no limit), so at most 4 entries are ever pending."""
    streams = [names(f"s{n}") for n in range(3)]
    for stream in streams:
        await fill(client, stream, 300)
    app = App(redis_url)
    seen_pending: list[int] = []

    @app.consumer(streams, group=names.group, concurrency=1, batch_size=3)
    async def handle(msg: Message) -> None:
        pending = [await pending_count(client, stream, names.group) for stream in streams]
        seen_pending.append(sum(pending))

    async with app:
        await eventually(lambda: _true(len(seen_pending) >= 50), what="50 handler runs")
    assert 0 < max(seen_pending) <= 4


# -- bug 3: failure logs are bounded -----------------------------------------------------


async def test_failure_logs_are_bounded_and_summed_up(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Hundreds of failed runs write a dozen lines or so: the first failure of an entry with
    its traceback, later ones one line each, then one line summing up the rest."""
    await fill(client, names.stream, 100)
    app = App(redis_url)
    runs = 0

    @app.consumer(
        names.stream,
        group=names.group,
        concurrency=4,
        batch_size=4,
        retry_delay=0.001,
        retry_max_delay=0.002,
        max_deliveries=None,
        pause_after_failures=None,
    )
    async def handle(msg: Message) -> None:
        nonlocal runs
        runs += 1
        raise DatabaseDown("connection refused")

    with caplog.at_level(logging.INFO, logger="asyncstreams"):
        async with app:
            await eventually(lambda: _true(runs >= 300), what="300 failed runs")
    failures = [r for r in caplog.records if "handler failed on entry" in r.getMessage()]
    assert 1 <= len(failures) <= 10
    first_runs = [r for r in failures if "(delivery 1 of" in r.getMessage()]
    assert first_runs
    assert all(r.exc_info for r in first_runs)
    assert all(not r.exc_info for r in failures if r not in first_runs)
    summaries = [
        r.getMessage() for r in caplog.records if "not logged one by one" in r.getMessage()
    ]
    assert len(summaries) == 1  # at stop, for the rest of the interval
    assert "retried" in summaries[0]
    assert "(DatabaseDown)" in summaries[0]
    assert len(caplog.records) < 20


# -- bugs 9 and 10: what a handler raises is its entry's failure ----------------------


async def test_a_handler_raising_cancelled_error_fails_its_entry_not_its_slot(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A CancelledError the consumer did not cause (a library's timeout, say) is a failure:
    logged, retried; with concurrency=1 the consumer goes on, and stops promptly."""
    app = App(redis_url, grace_period=30)
    runs: list[tuple[str, int]] = []

    @app.consumer(names.stream, group=names.group, concurrency=1, retry_delay=0.01)
    async def handle(msg: Message) -> None:
        runs.append((msg.id, msg.deliveries))
        if msg.fields["n"] == "0" and msg.deliveries == 1:
            raise asyncio.CancelledError

    ids = await fill(client, names.stream, 3)
    with caplog.at_level(logging.WARNING, logger="asyncstreams"):
        with anyio.fail_after(10):  # the grace period is 30 s: a stop must not wait for it
            async with app:
                await wait_drained(client, names.stream, names.group)
    assert sorted(runs) == sorted([(ids[0], 1), (ids[0], 2), (ids[1], 1), (ids[2], 1)])
    assert any("CancelledError" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
async def test_a_handler_raising_a_base_exception_fails_only_its_entry(
    redis_url: str, names: Names, client: aioredis.Redis, batch: bool
) -> None:
    """A BaseException of the handler's own is a failure of the entry that raised it: the
    entries around it are handled, only it reaches the dead-letter stream, the app runs on."""
    ids = await fill(client, names.stream, 20)
    poison = ids[7]
    app = App(redis_url)
    handled: set[str] = set()

    def run(msg: Message) -> None:
        if msg.id == poison:
            raise Fatal("poison")
        handled.add(msg.id)

    options = {"retry_delay": 0.01, "max_deliveries": 3, "concurrency": 4, "batch_size": 5}
    if batch:

        @app.consumer(names.stream, group=names.group, **options)
        async def handle_batch(msgs: list[Message]) -> None:
            if any(msg.id == poison for msg in msgs):
                raise Fatal("poison in the batch")
            for msg in msgs:
                run(msg)

    else:

        @app.consumer(names.stream, group=names.group, **options)
        async def handle(msg: Message) -> None:
            run(msg)

    async with app:
        await wait_drained(client, names.stream, names.group)
        assert app.running
    assert handled == set(ids) - {poison}
    dead = await client.xrange(f"{names.stream}:dead-letter")
    assert [(f["!dlq:id"], f["!dlq:error"], f["!dlq:deliveries"]) for _, f in dead] == [
        (poison, "Fatal", "3")
    ]


# -- bug 12: input nested too deeply -----------------------------------------------------


async def test_an_entry_nested_too_deeply_is_dead_lettered_at_once(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    app = App(redis_url)
    handled: list[Numbers] = []

    @app.consumer(names.stream, group=names.group, retry_delay=0.01)
    async def handle(numbers: Numbers) -> None:
        handled.append(numbers)

    deep = await client.xadd(names.stream, {"values": "[" * 10_000 + "]" * 10_000})
    await client.xadd(names.stream, {"values": "[1, 2]"})
    async with app:
        await wait_drained(client, names.stream, names.group)
    assert handled == [Numbers([1, 2])]
    dead = await client.xrange(f"{names.stream}:dead-letter")
    assert [(f["!dlq:id"], f["!dlq:reason"], f["!dlq:deliveries"]) for _, f in dead] == [
        (deep, "undecodable", "1")
    ]
    assert "nested too deeply" in dead[0][1]["!dlq:message"]


async def test_a_probe_whose_claim_did_not_go_through_is_sent_again(redis_url: str) -> None:
    """Paused, the policy picks a probe; were its XCLAIM lost (a connection dropped), the
    entry is still waiting for its retry: the next look must pick a probe again, not wait
    for one that never left (the consumer would stay paused for good)."""
    options = ConsumerOptions(
        "s", group="g", retry_delay=0.001, retry_max_delay=0.001, pause_after_failures=1
    )
    ledger = Ledger(options.names, limit=options.limit, batch_size=2, max_memory_bytes=1 << 20)
    client = create_client(redis_url, max_connections=1)
    try:
        failures = Failures(client, options, "c", "test", ledger)
        ledger.delivered([entry("s", b"1-1", [b"n", b"1"], 1)])
        await failures.failed(ledger.start(), DatabaseDown("down"))
        assert ledger.reads_paused
        await anyio.sleep(0.01)
        assert failures.due() == {"s": [(b"1-1", 1)]}  # the probe; its claim is lost
        await anyio.sleep(0.01)
        assert failures.due() == {"s": [(b"1-1", 1)]}  # picked again
    finally:
        await client.aclose()

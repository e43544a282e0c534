"""Delivery guarantees against a real redis-server: retries with backoff, max_deliveries and
the dead-letter stream, claiming, renewal, trimmed entries, stale consumers, lost groups."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import pairwise
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from asyncstreams import App, ConfigurationError, Message
from asyncstreams.deadletter import split
from asyncstreams.recovery import CLAIM_STEP

from .conftest import Names
from .helpers import (
    calls,
    command_calls,
    deliver,
    eventually,
    fill,
    pending_count,
    pending_entries,
    wait_drained,
)

pytestmark = pytest.mark.anyio

# How much earlier than Redis' idle time a handler run may be seen to start: the idle time
# runs from the delivery, the handler starts a moment after it.
SLACK = 0.015
# The metadata fields every dead-letter entry carries besides the original fields.
META = {
    "!dlq:stream",
    "!dlq:id",
    "!dlq:group",
    "!dlq:consumer",
    "!dlq:deliveries",
    "!dlq:reason",
    "!dlq:error",
    "!dlq:message",
    "!dlq:time",
}


class Boom(Exception):
    """What the failing handlers raise."""


class Item(msgspec.Struct):
    n: int
    tags: list[str] = []
    label: str = ""


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client whose replies stay bytes, for fields that are not UTF-8."""
    redis = aioredis.Redis.from_url(redis_url, protocol=2)
    try:
        yield redis
    finally:
        await redis.aclose()


async def _true(value: bool) -> bool:
    return value


async def _equals(value: object, expected: object) -> bool:
    """For `eventually`: `value` (awaited if it is awaitable) equals `expected`."""
    if isinstance(value, Awaitable):
        value = await value
    return value == expected


async def _dead_letters(client: aioredis.Redis, stream: str) -> list[dict[str, str]]:
    return [fields for _, fields in await client.xrange(stream)]


def _where(handler: Callable[..., object], names: Names, consumer: str = "worker-1") -> str:
    """How a consumer's log lines start: the handler's qualified name, streams, group, name."""
    return f"{handler.__qualname__} [{names.stream} group={names.group} consumer={consumer}]"


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _summary(caplog: pytest.LogCaptureFixture) -> str:
    """What the consumer's shutdown line counts: "N acked, N retried, ... N never started".

    Read after the app has stopped, it accounts for every entry the consumer held: one that
    was to run again would have run in the drain, or be counted (retried, cancelled, never
    started, given back to the group). So "no further run" is proven by the stop, not by a
    sleep.
    """
    [line] = _messages(caplog, ": stopped; ")
    return line.partition(": stopped; ")[2]


async def _wait_calls(client: aioredis.Redis, command: str, more: int, what: str) -> None:
    """Wait until the server has run `command` `more` times more than by now."""
    target = await calls(client, command) + more
    await eventually(lambda: _at_least(calls(client, command), target), what=what)


async def _at_least(value: Awaitable[int], least: int) -> bool:
    return await value >= least


# -- retries ---------------------------------------------------------------------------------


async def test_a_failing_entry_runs_again_after_a_backoff_until_it_succeeds(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    retry_delay = 0.1
    app = App(redis_url)
    runs: list[tuple[str, int, float]] = []

    @app.consumer(names.stream, group=names.group, retry_delay=retry_delay, retry_max_delay=10)
    async def handle(msg: Message) -> None:
        runs.append((msg.id, msg.deliveries, time.monotonic()))
        if len(runs) < 3:
            raise Boom(f"failing run {len(runs)}")

    with caplog.at_level(logging.INFO, logger="asyncstreams"):
        async with app:
            entry_id = await app.publish(names.stream, {"n": 1})
            await wait_drained(client, names.stream, names.group, timeout=5)
    # No 4th run: none before the stop, and none waiting for its turn at it (see _summary).
    assert [(i, d) for i, d, _ in runs] == [(entry_id, 1), (entry_id, 2), (entry_id, 3)]
    assert _summary(caplog) == "1 acked, 2 retried, 0 dead-lettered, 0 cancelled, 0 never started"
    # The n-th retry waits retry_delay * 2**(n-1), jittered to [0.5, 1] of it.
    first, second = (b - a for (_, _, a), (_, _, b) in pairwise(runs))
    assert first >= 0.5 * retry_delay - SLACK
    assert second >= 0.5 * 2 * retry_delay - SLACK
    assert await pending_count(client, names.stream, names.group) == 0


async def test_the_retry_backoff_is_capped_at_retry_max_delay(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """Uncapped, the 4th retry would wait 0.4 to 0.8 s; capped at 0.1 s, at most 0.1 s."""
    app = App(redis_url)
    runs: list[float] = []

    @app.consumer(
        names.stream, group=names.group, retry_delay=0.1, retry_max_delay=0.1, max_deliveries=10
    )
    async def handle(msg: Message) -> None:
        runs.append(time.monotonic())
        if msg.deliveries < 5:
            raise Boom(f"failing delivery {msg.deliveries}")

    async with app:
        await app.publish(names.stream, {"n": 1})
        await wait_drained(client, names.stream, names.group, timeout=5)
    gaps = [b - a for a, b in pairwise(runs)]
    assert len(gaps) == 4
    # 0.1 s at most, plus the own-entries sweep interval (0.05 s) and some scheduling.
    assert all(0.05 - SLACK <= gap < 0.35 for gap in gaps), gaps


async def test_a_retry_waits_its_backoff_even_when_it_is_longer_than_claim_idle_ms(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """claim_idle_ms is for entries other consumers left behind: the consumer's own failed
    entry still waits retry_delay * 2**(deliveries-1) (0.5 s, then 1 s, jittered), not 0.3 s."""
    retry_delay = 0.5
    app = App(redis_url)
    runs: list[tuple[int, float]] = []

    @app.consumer(
        names.stream,
        group=names.group,
        consumer="worker-1",
        retry_delay=retry_delay,
        max_deliveries=3,
        claim_idle_ms=300,
    )
    async def handle(msg: Message) -> None:
        runs.append((msg.deliveries, time.monotonic()))
        if msg.deliveries < 3:
            raise Boom(f"failing delivery {msg.deliveries}")

    async with app:
        await app.publish(names.stream, {"n": 1})
        await wait_drained(client, names.stream, names.group, timeout=5)
    assert [d for d, _ in runs] == [1, 2, 3]
    first, second = (b - a for (_, a), (_, b) in pairwise(runs))
    assert first >= 0.5 * retry_delay - SLACK, (first, second)
    assert second >= 0.5 * 2 * retry_delay - SLACK, (first, second)


# -- max_deliveries and the dead-letter stream -----------------------------------------------


@pytest.mark.parametrize("custom", [False, True], ids=["default-name", "custom-name"])
async def test_an_entry_failing_max_deliveries_times_moves_to_the_dead_letter_stream(
    redis_url: str,
    names: Names,
    client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
    custom: bool,
) -> None:
    app = App(redis_url)
    runs: list[int] = []
    options: dict[str, Any] = {"dead_letter": "dlq:{stream}"} if custom else {}
    dlq = f"dlq:{names.stream}" if custom else f"{names.stream}:dead-letter"

    @app.consumer(
        names.stream,
        group=names.group,
        consumer="worker-1",
        max_deliveries=3,
        retry_delay=0.05,
        **options,
    )
    async def handle(fields: dict[str, str], msg: Message) -> None:
        runs.append(msg.deliveries)
        raise Boom(f"cannot handle order {fields['order']}")

    before = time.time()
    with caplog.at_level(logging.INFO, logger="asyncstreams"):
        async with app:
            entry_id = await app.publish(names.stream, {"order": "o-1", "qty": 2})
            await eventually(lambda: _equals(client.xlen(dlq), 1), timeout=5, what="a dead letter")
    after = time.time()
    # No run after the last one: none before the stop, none waiting for it (see _summary).
    assert runs == [1, 2, 3]
    assert _summary(caplog) == "0 acked, 2 retried, 1 dead-lettered, 0 cancelled, 0 never started"
    assert await pending_entries(client, names.stream, names.group) == {}
    assert await client.xlen(names.stream) == 1  # acked, not deleted
    [letter] = await _dead_letters(client, dlq)
    sent_ms = int(letter.pop("!dlq:time"))
    assert int(before * 1000) <= sent_ms <= int(after * 1000) + 1
    assert letter == {
        "!dlq:stream": names.stream,
        "!dlq:id": entry_id,
        "!dlq:group": names.group,
        "!dlq:consumer": "worker-1",
        "!dlq:deliveries": "3",
        "!dlq:reason": "failed",
        "!dlq:error": "Boom",
        "!dlq:message": "cannot handle order o-1",
        "order": "o-1",
        "qty": "2",
    }
    other = f"{names.stream}:dead-letter" if custom else f"dlq:{names.stream}"
    assert await client.exists(other) == 0


async def test_max_deliveries_counts_deliveries_to_other_consumers(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """An entry another consumer has had 3 times is claimed, found out of deliveries and
    dead-lettered without running the handler."""
    entry_id = await client.xadd(names.stream, {"n": "1"})
    assert await deliver(client, names.stream, names.group, "ghost") == [entry_id]
    await client.execute_command(
        "XCLAIM", names.stream, names.group, "ghost", 0, entry_id, "IDLE", 100_000, "RETRYCOUNT", 3
    )
    assert await pending_entries(client, names.stream, names.group) == {entry_id: ("ghost", 3)}
    app = App(redis_url)
    runs: list[str] = []
    dlq = f"{names.stream}:dead-letter"

    @app.consumer(
        names.stream, group=names.group, consumer="worker-1", max_deliveries=3, claim_idle_ms=300
    )
    async def handle(msg: Message) -> None:
        runs.append(msg.id)

    async with app:
        await eventually(lambda: _equals(client.xlen(dlq), 1), timeout=5, what="a dead letter")
    assert runs == []
    assert await pending_entries(client, names.stream, names.group) == {}
    [letter] = await _dead_letters(client, dlq)
    assert {k: v for k, v in letter.items() if k != "!dlq:message"} == {
        "!dlq:stream": names.stream,
        "!dlq:id": entry_id,
        "!dlq:group": names.group,
        "!dlq:consumer": "worker-1",
        # XAUTOCLAIM counted the 4th delivery, the one that found it out of deliveries.
        "!dlq:deliveries": "4",
        "!dlq:reason": "failed",
        "!dlq:error": "",
        "!dlq:time": letter["!dlq:time"],
        "n": "1",
    }
    assert "max_deliveries=3" in letter["!dlq:message"]


async def test_undecodable_entries_are_dead_lettered_at_once(
    redis_url: str, names: Names, client: aioredis.Redis, raw: aioredis.Redis
) -> None:
    entries: list[dict[bytes, bytes]] = [
        {b"n": b"1"},
        {b"n": b"abc"},  # not an int
        {b"n": b"2", b"tags": b"[not json"},  # a nested field that is not JSON
        {b"n": b"3", b"label": b"\xff\xfe"},  # not UTF-8
        {b"n": b"4", b"tags": b'["a"]'},
    ]
    ids = [(await raw.xadd(names.stream, fields)).decode() for fields in entries]
    app = App(redis_url)
    handled: list[tuple[Item, int]] = []
    dlq = f"{names.stream}:dead-letter"

    @app.consumer(names.stream, group=names.group, consumer="worker-1", retry_delay=0.05)
    async def handle(item: Item, msg: Message) -> None:
        handled.append((item, msg.deliveries))

    async with app:
        await wait_drained(client, names.stream, names.group, timeout=5)
        await eventually(lambda: _equals(client.xlen(dlq), 3), timeout=5, what="3 dead letters")
    assert sorted(handled, key=lambda h: h[0].n) == [(Item(1), 1), (Item(4, ["a"]), 1)]
    letters = {fields[b"!dlq:id"].decode(): fields for _, fields in await raw.xrange(dlq, "-", "+")}
    assert sorted(letters) == sorted(ids[1:4])
    for index in (1, 2, 3):
        letter = letters[ids[index]]
        # The original fields, byte for byte (the invalid UTF-8 too).
        assert {k: v for k, v in letter.items() if not k.startswith(b"!dlq:")} == entries[index]
        assert {k.decode() for k in letter if k.startswith(b"!dlq:")} == META
        assert letter[b"!dlq:reason"] == b"undecodable"
        assert letter[b"!dlq:deliveries"] == b"1"
        assert letter[b"!dlq:error"] == b"DecodeError"
    schema = letters[ids[1]][b"!dlq:message"].decode()
    assert schema.startswith("entry does not match Item: ")
    assert "`$.n`" in schema
    assert (
        letters[ids[2]][b"!dlq:message"]
        .decode()
        .startswith("expected JSON in field 'tags' of Item: ")
    )
    assert letters[ids[3]][b"!dlq:message"].decode() == (
        "expected UTF-8 text in field 'label' of Item, found invalid bytes at byte 0"
    )


async def test_an_entry_larger_than_max_payload_bytes_is_dead_lettered(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    big_id = await client.xadd(names.stream, {"blob": "x" * 1000})
    await client.xadd(names.stream, {"blob": "small"})
    app = App(redis_url)
    handled: list[dict[str, str]] = []
    dlq = f"{names.stream}:dead-letter"

    @app.consumer(names.stream, group=names.group, max_payload_bytes=100)
    async def handle(fields: dict[str, str]) -> None:
        handled.append(fields)

    async with app:
        await wait_drained(client, names.stream, names.group, timeout=5)
        await eventually(lambda: _equals(client.xlen(dlq), 1), timeout=5, what="a dead letter")
    assert handled == [{"blob": "small"}]
    [letter] = await _dead_letters(client, dlq)
    assert letter["!dlq:id"] == big_id
    assert letter["!dlq:reason"] == "too-large"
    assert letter["!dlq:deliveries"] == "1"
    assert letter["!dlq:message"] == "entry is 1004 bytes, more than max_payload_bytes=100"
    assert letter["blob"] == "x" * 1000


# What a consumer with one entry parked after its 2nd run (1 retry) says as it stops.
PARKED_SUMMARY = (
    "0 acked, 1 retried, 0 dead-lettered, 0 cancelled, 0 never started, "
    "1 parked (no dead-letter stream)"
)


async def test_without_a_dead_letter_stream_an_entry_out_of_deliveries_stays_pending(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(redis_url)
    runs: list[int] = []

    @app.consumer(
        names.stream,
        group=names.group,
        consumer="worker-1",
        max_deliveries=2,
        retry_delay=0.05,
        dead_letter=None,
    )
    async def handle(msg: Message) -> None:
        runs.append(msg.deliveries)
        raise Boom("always")

    with caplog.at_level(logging.INFO, logger="asyncstreams"):
        async with app:
            entry_id = await app.publish(names.stream, {"n": 1})
            await eventually(lambda: _equals(runs, [1, 2]), timeout=5, what="2 runs")
            # The consumer's decision, logged once it is made: parked, not retried.
            await eventually(
                lambda: _true(bool(_messages(caplog, "left pending, not run again"))),
                timeout=5,
                what="the entry parked",
            )
            assert await pending_entries(client, names.stream, names.group) == {
                entry_id: ("worker-1", 2)
            }
    # No 3rd run before the stop, and none waiting for one at it: a retry scheduled would be
    # counted as retried, and one held at the stop given back to the group.
    assert runs == [1, 2]
    assert _summary(caplog) == PARKED_SUMMARY
    assert await client.exists(f"{names.stream}:dead-letter") == 0
    [parked] = _messages(caplog, "left pending, not run again")
    assert entry_id in parked


async def test_an_entry_left_pending_without_a_dead_letter_stream_is_not_claimed_again(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of deliveries with nowhere to go, the entry stays as it is: not run, not claimed
    again (which would count deliveries and log it again) once it is idle `claim_idle_ms`."""
    app = App(redis_url)
    runs: list[int] = []

    @app.consumer(
        names.stream,
        group=names.group,
        consumer="worker-1",
        max_deliveries=2,
        retry_delay=0.05,
        dead_letter=None,
        claim_idle_ms=300,
    )
    async def handle(msg: Message) -> None:
        runs.append(msg.deliveries)
        raise Boom("always")

    with caplog.at_level(logging.INFO, logger="asyncstreams"):
        async with app:
            entry_id = await app.publish(names.stream, {"n": 1})
            await eventually(lambda: _equals(runs, [1, 2]), timeout=5, what="2 runs")
            second_run = time.monotonic()  # after its last delivery
            await eventually(
                lambda: _true(bool(_messages(caplog, "left pending, not run again"))),
                timeout=5,
                what="the entry parked",
            )
            # From claim_idle_ms after its last delivery on, the entry would be idle long
            # enough for every XAUTOCLAIM scan to claim it, were it not renewed: wait until
            # then (a lower bound, not a guess), then for 4 such scans.
            await anyio.sleep(max(0.0, second_run + 0.3 - time.monotonic()))
            await _wait_calls(client, "xautoclaim", 4, "4 claim scans after claim_idle_ms")
            assert await pending_entries(client, names.stream, names.group) == {
                entry_id: ("worker-1", 2)
            }
    assert runs == [1, 2]
    assert len(_messages(caplog, "left pending, not run again")) == 1
    assert _summary(caplog) == PARKED_SUMMARY


async def test_dead_letter_fields_never_collide_and_replay_restores_the_entry(
    redis_url: str, names: Names, client: aioredis.Redis, raw: aioredis.Redis
) -> None:
    app = App(redis_url)
    failing = [True]
    seen: list[tuple[str, dict[str, str]]] = []
    dlq = f"{names.stream}:dead-letter"
    original = {"!dlq:stream": "forged", "!x": "1", "plain": "v"}

    @app.consumer(names.stream, group=names.group, max_deliveries=1)
    async def handle(fields: dict[str, str], msg: Message) -> None:
        seen.append((msg.id, fields))
        if failing[0]:
            raise Boom("not yet")

    async with app:
        entry_id = await client.xadd(names.stream, original)  # type: ignore[arg-type]
        await eventually(lambda: _equals(client.xlen(dlq), 1), timeout=5, what="a dead letter")
        [(_, stored)] = await raw.xrange(dlq, "-", "+")
        flat = [part for pair in stored.items() for part in pair]
        meta, fields = split(flat)
        assert fields == [b"!dlq:stream", b"forged", b"!x", b"1", b"plain", b"v"]
        assert (meta["stream"], meta["id"], meta["reason"]) == (names.stream, entry_id, "failed")
        assert set(meta) == {name.removeprefix("!dlq:") for name in META}

        failing[0] = False
        assert await app.replay_dead_letters(dlq) == 1
        await eventually(lambda: _equals(len(seen), 2), timeout=5, what="the replay handled")
        await wait_drained(client, names.stream, names.group, timeout=5)
    assert await client.xlen(dlq) == 0
    (first_id, first), (replayed_id, replayed) = seen
    assert (first_id, first) == (entry_id, original)
    assert replayed_id != entry_id
    assert replayed == original
    assert await client.xrange(names.stream) == [(entry_id, original), (replayed_id, original)]


async def test_replaying_a_stream_that_holds_no_dead_letters_is_an_error(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await client.xadd(names.stream, {"a": "1"})
    app = App(redis_url)
    try:
        with pytest.raises(ConfigurationError, match=r"expected a dead-letter entry"):
            await app.replay_dead_letters(names.stream)
    finally:
        await app.aclose()
    assert await client.xlen(names.stream) == 1


# -- pending entries: own, claimed, renewed, trimmed -----------------------------------------


async def test_the_consumers_own_pending_entries_come_first(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await client.xgroup_create(names.stream, names.group, id="0", mkstream=True)
    old = await fill(client, names.stream, 5, age="old")
    assert await deliver(client, names.stream, names.group, "fixed") == old
    new = await fill(client, names.stream, 5, age="new")
    app = App(redis_url)
    seen: list[tuple[str, int]] = []

    @app.consumer(names.stream, group=names.group, consumer="fixed")
    async def handle(msg: Message) -> None:
        seen.append((msg.id, msg.deliveries))

    async with app:
        await wait_drained(client, names.stream, names.group, timeout=5)
    assert len(seen) == 10
    assert sorted(seen[:5]) == [(i, 2) for i in old]
    assert sorted(seen[5:]) == [(i, 1) for i in new]


async def test_entries_of_a_crashed_consumer_are_claimed_once(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await fill(client, names.stream, 3)
    assert await deliver(client, names.stream, names.group, "ghost") == ids
    delivered_at = time.monotonic()
    app = App(redis_url)
    seen: list[tuple[str, int, str, float]] = []

    @app.consumer(names.stream, group=names.group, consumer="worker-1", claim_idle_ms=300)
    async def handle(msg: Message) -> None:
        seen.append((msg.id, msg.deliveries, msg.consumer, time.monotonic()))

    with caplog.at_level(logging.INFO, logger="asyncstreams"):
        async with app:
            await wait_drained(client, names.stream, names.group, timeout=5)
            # The claim scan goes on and finds nothing more; then the stop accounts for
            # anything claimed twice (run in the drain, or counted in the summary).
            await _wait_calls(client, "xautoclaim", 2, "2 more claim scans")
    assert sorted(s[:3] for s in seen) == [(i, 2, "worker-1") for i in ids]
    assert _summary(caplog) == "3 acked, 0 retried, 0 dead-lettered, 0 cancelled, 0 never started"
    assert all(s[3] - delivered_at >= 0.3 - SLACK for s in seen)


async def test_a_slow_handler_keeps_its_entry_from_being_claimed(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """The handler runs until the test lets it end: past claim_idle_ms, and past several
    XAUTOCLAIM scans (the peer's and its own) that would claim the entry were it not renewed."""
    app, peer = App(redis_url), App(redis_url)
    runs: list[tuple[str, str, int]] = []
    release = anyio.Event()

    async def slow(msg: Message) -> None:
        runs.append((msg.consumer, msg.id, msg.deliveries))
        await release.wait()

    app.consumer(names.stream, group=names.group, consumer="slow-1", claim_idle_ms=300)(slow)
    peer.consumer(names.stream, group=names.group, consumer="peer-1", claim_idle_ms=300)(slow)
    samples: list[dict[str, tuple[str, int]]] = []

    async def sample_until(done: Callable[[], Awaitable[bool]]) -> None:
        while not await done():
            samples.append(await pending_entries(client, names.stream, names.group))
            await anyio.sleep(0.05)

    async with app:
        try:
            entry_id = await app.publish(names.stream, {"n": 1})
            await eventually(lambda: _equals(len(runs), 1), timeout=5, what="the slow run")
            running = time.monotonic()  # after the delivery
            async with peer:
                with anyio.fail_after(10):
                    # Idle for claim_idle_ms by now, were it not renewed...
                    await sample_until(lambda: _true(time.monotonic() - running >= 0.3))
                    # ...and 6 scans that would claim it (about 0.45 s at 2 consumers).
                    scans = await calls(client, "xautoclaim") + 6
                    await sample_until(lambda: _at_least(calls(client, "xautoclaim"), scans))
                samples.append(await pending_entries(client, names.stream, names.group))
                release.set()
                await wait_drained(client, names.stream, names.group, timeout=5)
        finally:
            release.set()
    assert runs == [("slow-1", entry_id, 1)]
    assert len(samples) >= 2
    assert all(s == {entry_id: ("slow-1", 1)} for s in samples), samples


@pytest.mark.parametrize("delete", ["xtrim", "xdel"])
async def test_pending_entries_deleted_from_the_stream_are_dropped(
    redis_url: str,
    names: Names,
    client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
    delete: str,
) -> None:
    ids = await fill(client, names.stream, 3)
    assert await deliver(client, names.stream, names.group, "ghost") == ids
    if delete == "xtrim":
        await client.xtrim(names.stream, maxlen=0, approximate=False)
    else:
        await client.xdel(names.stream, *ids)
    app = App(redis_url)
    seen: list[str] = []

    @app.consumer(
        names.stream, group=names.group, consumer="worker-1", claim_idle_ms=300, retry_delay=0.05
    )
    async def handle(msg: Message) -> None:
        seen.append(msg.id)

    with caplog.at_level(logging.WARNING, logger="asyncstreams"):
        async with app:
            await eventually(
                lambda: _equals(pending_count(client, names.stream, names.group), 0),
                timeout=5,
                what="the deleted entries dropped from the PEL",
            )
            # The claim sweep goes on at its pace (3 more calls take at least 2 x CLAIM_STEP:
            # one that kept finding the deleted entries would spin) and nothing comes back.
            claims = await _claim_calls(client) + 3
            swept = time.monotonic()
            await eventually(
                lambda: _at_least(_claim_calls(client), claims), what="3 more claim calls"
            )
            assert time.monotonic() - swept >= 2 * CLAIM_STEP - SLACK
            assert await pending_count(client, names.stream, names.group) == 0
            new_id = await app.publish(names.stream, {"n": "after"})
            await wait_drained(client, names.stream, names.group, timeout=5)
    assert seen == [new_id]
    # One warning, or one per sweep that found some: together they count each entry once.
    warnings = _messages(caplog, "were deleted (trimmed)")
    pattern = re.compile(
        rf"{re.escape(_where(handle, names))}: (\d+) pending entries of "
        rf"{re.escape(names.stream)} were deleted \(trimmed\) before they were handled; "
        "removed from the pending entries list"
    )
    counts = [int(match[1]) for match in map(pattern.fullmatch, warnings) if match]
    assert len(counts) == len(warnings) > 0, warnings
    assert sum(counts) == 3, warnings


async def _claim_calls(client: aioredis.Redis) -> int:
    """XCLAIM and XAUTOCLAIM calls the server has answered so far (tests run one at a time)."""
    info = await client.info("all")
    return command_calls(info, "xclaim") + command_calls(info, "xautoclaim")


async def test_idle_consumers_with_nothing_pending_are_deleted(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await client.xgroup_create(names.stream, names.group, id="0", mkstream=True)
    await client.xgroup_createconsumer(names.stream, names.group, "old-empty")
    entry_id = await client.xadd(names.stream, {"n": "1"})
    assert await deliver(client, names.stream, names.group, "old-busy") == [entry_id]

    async def idle_for(ms: int) -> bool:
        consumers = await client.xinfo_consumers(names.stream, names.group)
        return all(c["idle"] >= ms for c in consumers)

    await eventually(lambda: idle_for(350), timeout=5, what="old consumers idle 0.35 s")
    app = App(redis_url)

    @app.consumer(
        names.stream, group=names.group, consumer="worker-1", delete_idle_consumers_after=0.3
    )
    async def handle(msg: Message) -> None:
        pass

    async def others() -> dict[str, int]:
        """Consumers other than the app's own (which Redis may not list before its first
        delivery) and how many entries each has pending."""
        consumers = await client.xinfo_consumers(names.stream, names.group)
        return {c["name"]: c["pending"] for c in consumers if c["name"] != "worker-1"}

    async with app:
        await eventually(
            lambda: _equals(others(), {"old-busy": 1}), timeout=5, what="old-empty deleted"
        )
        # The next clean-up (1 s later) keeps it too. A marker shows that clean-up ran: a new
        # idle consumer, deleted by it after it has looked at old-busy (XINFO CONSUMERS lists
        # consumers by name, and "old-busy" < "old-marker").
        await client.xgroup_createconsumer(names.stream, names.group, "old-marker")
        await eventually(
            lambda: _equals(others(), {"old-busy": 1}), timeout=5, what="old-marker deleted"
        )
    assert await pending_entries(client, names.stream, names.group) == {entry_id: ("old-busy", 1)}


# -- the group or the stream deleted while consuming -----------------------------------------


async def test_a_destroyed_group_is_recreated_after_the_last_entry_read(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(redis_url)
    seen: list[str] = []

    @app.consumer(names.stream, group=names.group, consumer="worker-1", block_ms=200)
    async def handle(msg: Message) -> None:
        seen.append(msg.id)

    async def group_exists() -> bool:
        groups = await client.xinfo_groups(names.stream)
        return names.group in {g["name"] for g in groups}

    with caplog.at_level(logging.INFO, logger="asyncstreams"):
        async with app:
            before = [await app.publish(names.stream, {"n": n}) for n in range(3)]
            await wait_drained(client, names.stream, names.group, timeout=5)
            assert await client.xgroup_destroy(names.stream, names.group) == 1
            await eventually(group_exists, timeout=5, what="the group recreated")
            [group] = await client.xinfo_groups(names.stream)
            assert group["last-delivered-id"] == before[-1]
            after = [await app.publish(names.stream, {"n": n}) for n in range(3, 6)]
            await wait_drained(client, names.stream, names.group, timeout=5)
    assert sorted(seen) == before + after
    assert _messages(caplog, "the stream or group is gone")
    # The id as text, as Redis shows it (not a bytes repr).
    assert _messages(caplog, f"on stream {names.stream} at {before[-1]}")


async def test_a_deleted_stream_is_recreated(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(redis_url)
    seen: list[str] = []

    @app.consumer(names.stream, group=names.group, consumer="worker-1", block_ms=200)
    async def handle(msg: Message) -> None:
        seen.append(msg.id)

    async def group_exists() -> bool:
        if not await client.exists(names.stream):
            return False
        groups = await client.xinfo_groups(names.stream)
        return names.group in {g["name"] for g in groups}

    with caplog.at_level(logging.WARNING, logger="asyncstreams"):
        async with app:
            before = [await app.publish(names.stream, {"n": n}) for n in range(2)]
            await wait_drained(client, names.stream, names.group, timeout=5)
            assert await client.delete(names.stream) == 1
            await eventually(group_exists, timeout=5, what="the stream and group recreated")
            after = [await app.publish(names.stream, {"n": n}) for n in range(2, 4)]
            await wait_drained(client, names.stream, names.group, timeout=5)
    assert sorted(seen) == before + after
    assert _messages(caplog, "the stream or group is gone")


async def test_entries_delivered_in_a_lost_reply_are_handled(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """Entries delivered to this consumer's name in a reply it never read (here: read by the
    test) are found in its own pending entries, once idle for half of claim_idle_ms, and
    handled."""
    claim_idle_ms = 600
    app = App(redis_url)
    seen: list[tuple[str, int, float]] = []

    @app.consumer(
        names.stream,
        group=names.group,
        consumer="solo",
        retry_delay=0.05,
        claim_idle_ms=claim_idle_ms,
    )
    async def handle(msg: Message) -> None:
        seen.append((msg.id, msg.deliveries, time.monotonic()))

    async with app:
        # In one MULTI, so the app's blocked read cannot take the entries first.
        async with client.pipeline(transaction=True) as multi:
            multi.xadd(names.stream, {"n": "1"})
            multi.xadd(names.stream, {"n": "2"})
            multi.xreadgroup(names.group, "solo", {names.stream: ">"}, count=10)
            first, second, reply = await multi.execute()
        read_at = time.monotonic()
        assert [entry_id for _, entries in reply for entry_id, _ in entries] == [first, second]
        await wait_drained(client, names.stream, names.group, timeout=5)
    assert sorted((i, d) for i, d, _ in seen) == [(first, 2), (second, 2)]
    assert all(at - read_at >= claim_idle_ms / 2000 - SLACK for _, _, at in seen)


# -- configuration and the summary -----------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("retry_delay", -1, "retry_delay must be a number >= 0, got -1"),
        ("retry_max_delay", 0.5, "retry_max_delay (0.5) must be at least retry_delay (1.0)"),
        ("max_deliveries", 0, "max_deliveries must be a positive integer, got 0"),
        ("claim_idle_ms", 0, "claim_idle_ms must be a positive integer, got 0"),
        ("max_payload_bytes", 0, "max_payload_bytes must be a positive integer, got 0"),
        ("dead_letter", "{stream}", "dead_letter '{stream}' names a stream this consumer reads"),
        ("dead_letter", "orders", "dead_letter 'orders' names a stream this consumer reads"),
        (
            "delete_idle_consumers_after",
            -0.5,
            "delete_idle_consumers_after must be a number >= 0, got -0.5",
        ),
    ],
)
def test_bad_delivery_options_are_refused_at_registration(
    option: str, value: object, message: str
) -> None:
    app = App()
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        app.consumer("orders", group="g", **{option: value})  # type: ignore[arg-type]
    assert app.registrations == ()


def test_a_misspelled_option_is_a_configuration_error_naming_it() -> None:
    app = App()
    options: dict[str, Any] = {"concurency": 4}
    with pytest.raises(
        ConfigurationError,
        match=r"unknown option 'concurency' \(did you mean 'concurrency'\?\); expected one of",
    ):
        app.consumer("orders", group="g", **options)


async def test_the_shutdown_summary_counts_retries_and_dead_letters(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(redis_url)
    dlq = f"{names.stream}:dead-letter"

    @app.consumer(
        names.stream, group=names.group, consumer="worker-1", max_deliveries=2, retry_delay=0.05
    )
    async def handle(fields: dict[str, str], msg: Message) -> None:
        kind = fields["kind"]
        if kind == "broken" or (kind == "flaky" and msg.deliveries == 1):
            raise Boom(kind)

    with caplog.at_level(logging.INFO, logger="asyncstreams"):
        async with app:
            for kind in ("flaky", "broken", "fine"):
                await app.publish(names.stream, {"kind": kind})
            await eventually(lambda: _equals(client.xlen(dlq), 1), timeout=5, what="a dead letter")
            await wait_drained(client, names.stream, names.group, timeout=5)
    assert _messages(caplog, "stopped;") == [
        f"{_where(handle, names)}: stopped; 2 acked, 2 retried, 1 dead-lettered, "
        "0 cancelled, 0 never started"
    ]

"""The consumer runtime against a real redis-server: delivery, acks, backpressure, stopping."""

from __future__ import annotations

import logging
import os
import time

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from asyncstreams import App, ConfigurationError, Message, RedisUnavailableError
from asyncstreams.embedded import free_port

from .conftest import Names
from .helpers import (
    blocked_reads,
    calls,
    eventually,
    fill,
    pending_count,
    wait_blocked_reads,
    wait_drained,
)

pytestmark = pytest.mark.anyio

# How the apps of this process name their connections (CLIENT LIST shows it).
CONNECTION_NAME = f"asyncstreams-{os.getpid()}"


class Order(msgspec.Struct):
    order_id: str
    qty: int
    price: float
    tags: list[str] = []
    paid: bool = False


async def test_publish_round_trip(redis_url: str, names: Names, client: aioredis.Redis) -> None:
    app = App(redis_url)
    received: list[tuple[Order, Message]] = []
    orders = [
        Order("a", 1, 9.5, ["x", "y"], paid=True),
        Order("b", -2, 0.1),
        Order("c", 3, 1e-300, ["ü"]),
    ]

    @app.consumer(names.stream, group=names.group)
    async def handle(order: Order, msg: Message) -> None:
        received.append((order, msg))

    async with app:
        ids = [await app.publish(names.stream, order) for order in orders]
        await eventually(lambda: _true(len(received) == 3), what="3 orders handled")

    assert sorted(order.order_id for order, _ in received) == ["a", "b", "c"]
    assert {order.order_id: order for order, _ in received} == {o.order_id: o for o in orders}
    for _, msg in received:
        assert msg.id in ids
        assert (msg.stream, msg.group, msg.deliveries) == (names.stream, names.group, 1)
        assert msg.consumer == app.consumer_name
    # Any Redis client reads what publish wrote: a flat map of text.
    first = (await client.xrange(names.stream))[0][1]
    assert first == {
        "order_id": "a",
        "qty": "1",
        "price": "9.5",
        "tags": '["x","y"]',
        "paid": "true",
    }
    assert await pending_count(client, names.stream, names.group) == 0


async def _true(value: bool) -> bool:
    return value


class Thumbnail(msgspec.Struct):
    name: str
    png: bytes


async def test_binary_field_values_reach_bytes_fields_raw_and_are_ignored_elsewhere(
    redis_url: str, names: Names
) -> None:
    """A binary value in a field the Struct does not declare is ignored, like any unknown
    field; a `bytes` field gets the value as stored; publish writes bytes as they are."""
    png = b"\x89PNG\r\n\x1a\n\x00\xff\xfe"
    raw = aioredis.Redis.from_url(redis_url, protocol=2)
    app = App(redis_url)
    received: list[Thumbnail] = []

    @app.consumer(names.stream, group=names.group)
    async def handle(thumbnail: Thumbnail) -> None:
        received.append(thumbnail)

    try:
        await raw.xadd(names.stream, {"name": "a", "png": png, "checksum": b"\xde\xad\xbe\xef"})
        async with app:
            published = await app.publish(names.stream, Thumbnail("b", png))
            await eventually(lambda: _true(len(received) == 2), what="2 thumbnails handled")
        assert received == [Thumbnail("a", png), Thumbnail("b", png)]
        [(_, stored)] = await raw.xrange(names.stream, published, published)
        assert stored == {b"name": b"b", b"png": png}
        assert await raw.xlen(f"{names.stream}:dead-letter") == 0
    finally:
        await raw.aclose()


async def test_dict_payload_and_fields_handler(redis_url: str, names: Names) -> None:
    app = App(redis_url)
    seen: list[dict[str, str]] = []

    @app.consumer(names.stream, group=names.group)
    async def handle(fields: dict[str, str]) -> None:
        seen.append(fields)

    async with app:
        await app.publish(names.stream, {"kind": "ping", "n": 7, "meta": {"a": 1}, "gone": None})
        await eventually(lambda: _true(len(seen) == 1), what="the entry handled")
    assert seen == [{"kind": "ping", "n": "7", "meta": '{"a":1}'}]


async def test_publish_trims_with_maxlen(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    app = App(redis_url)
    for n in range(50):
        await app.publish(names.stream, {"n": n}, maxlen=10, approximate=False)
    await app.aclose()
    assert await client.xlen(names.stream) == 10


async def test_one_handler_reads_several_streams(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    streams = [names("a"), names("b"), names("c")]
    for stream in streams:
        await fill(client, stream, 30)
    app = App(redis_url)
    seen: dict[str, set[str]] = {stream: set() for stream in streams}

    @app.consumer(streams, group=names.group, concurrency=4, batch_size=9)
    async def handle(fields: dict[str, str], msg: Message) -> None:
        seen[msg.stream].add(fields["n"])

    async with app:
        for stream in streams:
            await wait_drained(client, stream, names.group)
    assert all(seen[stream] == {str(n) for n in range(30)} for stream in streams)


async def test_handlers_share_a_group_on_different_streams(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    app = App(redis_url)
    seen: list[str] = []

    @app.consumer(names("orders"), group=names.group)
    async def orders(fields: dict[str, str]) -> None:
        seen.append("orders")

    @app.consumer(names("refunds"), group=names.group)
    async def refunds(fields: dict[str, str]) -> None:
        seen.append("refunds")

    await fill(client, names("orders"), 3)
    await fill(client, names("refunds"), 2)
    async with app:
        await wait_drained(client, names("orders"), names.group)
        await wait_drained(client, names("refunds"), names.group)
    assert sorted(seen) == ["orders"] * 3 + ["refunds"] * 2


@pytest.mark.parametrize("streams", [1, 3])
async def test_backpressure_bounds_what_is_pending(
    redis_url: str, names: Names, client: aioredis.Redis, streams: int
) -> None:
    """Under a backlog, entries delivered and not acked never exceed concurrency + batch_size."""
    concurrency, batch_size = 4, 10
    stream_names = [names(f"s{i}") for i in range(streams)]
    for stream in stream_names:
        await fill(client, stream, 300)
    app = App(redis_url)

    @app.consumer(stream_names, group=names.group, concurrency=concurrency, batch_size=batch_size)
    async def handle(fields: dict[str, str]) -> None:
        await anyio.sleep(0.002)

    peak = 0
    async with app:
        while not all([await _drained(client, s, names.group) for s in stream_names]):
            pending = sum([await pending_count(client, s, names.group) for s in stream_names])
            peak = max(peak, pending)
    assert 0 < peak <= concurrency + batch_size


async def _drained(client: aioredis.Redis, stream: str, group: str) -> bool:
    from .helpers import drained

    return await drained(client, stream, group)


async def _commandstat(client: aioredis.Redis, command: str) -> int:
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_acks_are_batched(redis_url: str, names: Names, client: aioredis.Redis) -> None:
    await fill(client, names.stream, 2000)
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group, concurrency=16, batch_size=100)
    async def handle(fields: dict[str, str]) -> None:
        pass

    acks_before = await _commandstat(client, "xack")
    reads_before = await _commandstat(client, "xreadgroup")
    async with app:
        await wait_drained(client, names.stream, names.group)
    assert await _commandstat(client, "xack") - acks_before <= 2000 / 20
    assert await _commandstat(client, "xreadgroup") - reads_before <= 2000 / 50


async def test_a_failing_handler_leaves_its_entry_pending(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await fill(client, names.stream, 10)
    app = App(redis_url)
    handled: list[str] = []

    @app.consumer(names.stream, group=names.group)
    async def handle(fields: dict[str, str], msg: Message) -> None:
        if int(fields["n"]) % 3 == 0:
            raise RuntimeError(f"cannot handle {fields['n']}")
        handled.append(msg.id)

    with caplog.at_level(logging.WARNING, logger="asyncstreams"):
        async with app:
            await eventually(lambda: _true(len(handled) == 6), what="6 entries handled")
            await eventually(lambda: _pending_is(client, names, 4), what="4 failed entries pending")
    failed = [ids[n] for n in (0, 3, 6, 9)]
    pending = await client.xpending_range(names.stream, names.group, "-", "+", 100)
    assert sorted(p["message_id"] for p in pending) == sorted(failed)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(entry_id in logged for entry_id in failed)
    assert "RuntimeError: cannot handle 3" in logged


async def _pending_is(client: aioredis.Redis, names: Names, count: int) -> bool:
    return await pending_count(client, names.stream, names.group) == count


async def test_new_group_starts_at_start_id(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await fill(client, names.stream, 5)  # written before any group exists
    app = App(redis_url)
    seen: dict[str, list[str]] = {"from-0": [], "from-$": []}

    @app.consumer(names.stream, group=names("from-0"))
    async def from_start(fields: dict[str, str]) -> None:
        seen["from-0"].append(fields["n"])

    @app.consumer(names.stream, group=names("from-$"), start_id="$")
    async def from_now(fields: dict[str, str]) -> None:
        seen["from-$"].append(fields["n"])

    async with app:
        await app.publish(names.stream, {"n": "new"})
        await wait_drained(client, names.stream, names("from-0"))
        await wait_drained(client, names.stream, names("from-$"))
    assert seen == {"from-0": ["0", "1", "2", "3", "4", "new"], "from-$": ["new"]}


async def test_an_existing_group_is_kept(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await fill(client, names.stream, 3)
    await client.xgroup_create(names.stream, names.group, id="$")  # BUSYGROUP later is fine
    app = App(redis_url)
    seen: list[str] = []

    @app.consumer(names.stream, group=names.group, start_id="0")
    async def handle(fields: dict[str, str]) -> None:
        seen.append(fields["n"])

    async with app:
        await app.publish(names.stream, {"n": "after"})
        await wait_drained(client, names.stream, names.group)
    assert seen == ["after"]


async def test_a_key_that_is_not_a_stream_is_a_clear_error(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await client.set(names.stream, "just a string")
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group)
    async def handle(fields: dict[str, str]) -> None:
        pass

    with pytest.raises(ConfigurationError, match=r"expected a stream, found a string"):
        async with app:
            pass


async def test_unreachable_redis_fails_the_start_without_the_password() -> None:
    port = free_port()
    app = App(f"redis://admin:s3cret@127.0.0.1:{port}/0")

    @app.consumer("s", group="g")
    async def handle(fields: dict[str, str]) -> None:
        pass

    with pytest.raises(RedisUnavailableError) as caught:
        async with app:
            pass
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "s3cret" not in str(caught.value)


async def test_a_blocked_read_never_holds_up_publish(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """The pool has 1 shared connection; two consumers block on reads for 30 s meanwhile."""
    app = App(redis_url, max_connections=1)
    seen: list[str] = []

    @app.consumer(names("idle-a"), group=names.group, block_ms=30_000)
    async def idle_a(fields: dict[str, str]) -> None:
        pass

    @app.consumer(names("busy"), group=names.group, block_ms=30_000)
    async def busy(fields: dict[str, str]) -> None:
        seen.append(fields["n"])

    async with app:
        await wait_blocked_reads(client, 2, name=CONNECTION_NAME)
        # Only a hang fails this: a publish waiting for a blocked read's connection would
        # wait out its 30 s BLOCK.
        with anyio.fail_after(15):
            for n in range(20):
                await app.publish(names("busy"), {"n": n})
            await eventually(lambda: _true(len(seen) == 20), what="20 handled")


async def test_stopping_does_not_wait_for_a_blocked_read(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """The stop wakes the read with CLIENT UNBLOCK instead of waiting out its 60 s BLOCK."""
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group, block_ms=60_000)
    async def handle(fields: dict[str, str]) -> None:
        pass

    # Only a hang fails the time limit: a stop that waited for the read would take 60 s.
    with anyio.fail_after(30):
        async with app:
            [reader] = await wait_blocked_reads(client, 1, name=CONNECTION_NAME)
            unblocks = await calls(client, "client|unblock")
    assert await calls(client, "client|unblock") > unblocks
    assert reader not in {str(c["id"]) for c in await client.client_list()}


@pytest.mark.slow
async def test_a_block_longer_than_the_socket_timeout_is_not_an_error(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py's 5 s socket timeout must not cut a 7 s BLOCK (and silently re-send it)."""
    app = App(redis_url)
    seen: list[float] = []

    @app.consumer(names.stream, group=names.group, block_ms=7_000)
    async def handle(fields: dict[str, str]) -> None:
        seen.append(time.monotonic())

    with caplog.at_level(logging.WARNING, logger="asyncstreams"):
        async with app:
            [reader] = await wait_blocked_reads(client, 1, name=CONNECTION_NAME)
            reads_before = await _commandstat(client, "xreadgroup")

            async def blocked_for(seconds: int) -> bool:
                """The read is still blocked, and has been for `seconds` (the connection's
                idle time: a read cut and sent again would reset it, or close it)."""
                listed = {str(c["id"]): c for c in await client.client_list()}
                read = listed.get(reader)
                assert read is not None, f"the read's connection {reader} is gone"
                assert blocked_reads([read]) == {reader}, read
                return int(read["idle"]) >= seconds

            # Past the 5 s socket timeout, one and the same XREADGROUP still waits.
            await eventually(lambda: blocked_for(6), timeout=20, what="a read blocked 6 s")
            await app.publish(names.stream, {"n": 1})
            await eventually(lambda: _true(len(seen) == 1), what="the entry handled")
            assert await _commandstat(client, "xreadgroup") - reads_before <= 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_stop_drains_running_handlers(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await fill(client, names.stream, 8)
    app = App(redis_url, grace_period=5)
    started: list[str] = []
    finished: list[str] = []

    @app.consumer(names.stream, group=names.group, concurrency=8)
    async def handle(fields: dict[str, str]) -> None:
        started.append(fields["n"])
        await anyio.sleep(0.3)
        finished.append(fields["n"])

    async with app:
        await eventually(lambda: _true(len(started) == 8), what="8 handlers running")
    assert sorted(finished) == sorted(started)
    assert await pending_count(client, names.stream, names.group) == 0


async def test_a_handler_past_the_grace_period_is_cancelled_and_stays_pending(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await fill(client, names.stream, 3)
    app = App(redis_url, grace_period=0.3)
    started: list[str] = []
    cancelled: list[str] = []

    @app.consumer(names.stream, group=names.group)
    async def handle(fields: dict[str, str]) -> None:
        started.append(fields["n"])
        try:
            await anyio.sleep(60)
        except BaseException:
            cancelled.append(fields["n"])
            raise

    # Only a hang fails the time limit: handlers waited for would run 60 s.
    with anyio.fail_after(30), caplog.at_level(logging.INFO, logger="asyncstreams"):
        async with app:
            await eventually(lambda: _true(len(started) == 3), what="3 handlers running")
            stopping = time.monotonic()
    # The stop waited the grace period, then cancelled the handlers.
    assert time.monotonic() - stopping >= 0.3
    assert sorted(cancelled) == ["0", "1", "2"]
    [summary] = [r.getMessage() for r in caplog.records if ": stopped; " in r.getMessage()]
    assert summary.endswith(
        ": stopped; 0 acked, 0 retried, 0 dead-lettered, 3 cancelled, 0 never started, "
        "3 given back to the group"
    )
    assert await pending_count(client, names.stream, names.group) == 3


async def test_lifespan_wraps_the_consumers(redis_url: str, names: Names) -> None:
    events: list[str] = []
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[None]:
        events.append("enter")
        yield
        events.append("exit")

    app = App(redis_url, lifespan=lifespan, grace_period=2)

    @app.consumer(names.stream, group=names.group)
    async def handle(fields: dict[str, str]) -> None:
        events.append("handle start")
        await anyio.sleep(0.2)
        events.append("handle end")

    async with app:
        await app.publish(names.stream, {"n": 1})
        await eventually(lambda: _true("handle start" in events), what="the handler")
    assert events == ["enter", "handle start", "handle end", "exit"]


async def test_serve_runs_until_stop(redis_url: str, names: Names) -> None:
    app = App(redis_url)
    seen: list[str] = []

    @app.consumer(names.stream, group=names.group)
    async def handle(fields: dict[str, str]) -> None:
        seen.append(fields["n"])
        app.stop()

    async with anyio.create_task_group() as tg:
        await tg.start(app.serve)
        await app.publish(names.stream, {"n": 1})
    assert seen == ["1"]


async def test_handlers_can_use_the_apps_client(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group, concurrency=16)
    async def handle(fields: dict[str, str]) -> None:
        await app.redis.incr(names("counter"))

    await fill(client, names.stream, 100)
    async with app:
        await wait_drained(client, names.stream, names.group)
    assert await client.get(names("counter")) == "100"


async def test_consumer_names_are_unique_and_overridable(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    import os
    import socket

    first, second = App(redis_url), App(redis_url)
    assert first.consumer_name != second.consumer_name
    assert first.consumer_name.startswith(f"{socket.gethostname()}-{os.getpid()}-")

    @first.consumer(names.stream, group=names.group, consumer="fixed-name")
    async def handle(fields: dict[str, str]) -> None:
        pass

    async with first:
        await first.publish(names.stream, {"n": 1})
        await wait_drained(client, names.stream, names.group)
    consumers = await client.xinfo_consumers(names.stream, names.group)
    assert [c["name"] for c in consumers] == ["fixed-name"]


async def test_a_cancelled_read_never_leaves_a_reply_on_its_connection(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    from asyncstreams._commands import GroupReader
    from asyncstreams._nodes import Nodes
    from asyncstreams._transport import create_client

    await client.xgroup_create(names.stream, names.group, id="0", mkstream=True)
    app_client = create_client(redis_url, max_connections=2)
    reader = GroupReader(Nodes(app_client), [names.stream], names.group, "c", block_ms=5_000)
    try:
        with anyio.move_on_after(0.2):
            await reader.read(10)  # blocks: the stream is empty
        # The reply of the cut read may still arrive: the connection must be gone with it.
        conn = reader._link._conn
        assert conn is None or not conn.is_connected
        entry_id = await client.xadd(names.stream, {"n": "1"})
        entries = await reader.read(10)
        # The new read sees the entry, unless the server handed it to the cut read before it
        # noticed the disconnect: then it is pending for this consumer (never lost), and the
        # recovery of the consumer's own pending entries delivers it again.
        read = [(stream, entry.decode(), flat) for stream, entry, flat, _, _ in entries]
        pending = await client.xpending_range(names.stream, names.group, "-", "+", 10, "c")
        if read:
            assert read == [(names.stream, entry_id, [b"n", b"1"])]
        else:
            assert [p["message_id"] for p in pending] == [entry_id]
    finally:
        await reader.close()
        await app_client.aclose()

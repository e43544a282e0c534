"""Batch handlers (parameters that are lists) against a real redis-server."""

from __future__ import annotations

import logging

import msgspec
import pytest
import redis.asyncio as aioredis

from asyncstreams import App, ConfigurationError, Message

from .conftest import Names
from .helpers import eventually, fill, pending_count, wait_drained

pytestmark = pytest.mark.anyio


class Item(msgspec.Struct):
    n: int


async def _true(value: bool) -> bool:
    return value


async def test_a_batch_handler_gets_lists_acked_together(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await fill(client, names.stream, 250)
    app = App(redis_url)
    calls: list[tuple[list[int], list[str]]] = []

    @app.consumer(names.stream, group=names.group, batch_size=100)
    async def load(items: list[Item], msgs: list[Message]) -> None:
        calls.append(([item.n for item in items], [msg.id for msg in msgs]))

    async with app:
        await wait_drained(client, names.stream, names.group)
    handled = sorted(n for numbers, _ in calls for n in numbers)
    assert handled == list(range(250))
    assert all(len(numbers) == len(ids) <= 100 for numbers, ids in calls)
    assert len(calls) < 250  # entries arrive many to a call
    assert await pending_count(client, names.stream, names.group) == 0


async def test_entries_that_cannot_be_handled_are_split_out_of_the_batch(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    good = [await client.xadd(names.stream, {"n": str(n)}) for n in range(5)]
    undecodable = await client.xadd(names.stream, {"n": "not a number"})
    too_large = await client.xadd(names.stream, {"n": "7", "blob": "x" * 500})
    app = App(redis_url)
    seen: list[str] = []

    @app.consumer(names.stream, group=names.group, max_payload_bytes=100)
    async def load(items: list[Item], msgs: list[Message]) -> None:
        seen.extend(msg.id for msg in msgs)

    async with app:
        await wait_drained(client, names.stream, names.group)
    assert sorted(seen) == sorted(good)
    dead = await client.xrange(f"{names.stream}:dead-letter")
    reasons = {fields["!dlq:id"]: fields["!dlq:reason"] for _, fields in dead}
    assert reasons == {undecodable: "undecodable", too_large: "too-large"}


async def test_a_failed_batch_is_retried_one_entry_at_a_time(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """One entry that keeps failing must not take its batch-mates to the dead-letter stream."""
    # The first read of a consumer takes one entry (it learns how large entries are); the
    # ten after it come in one read, as one batch.
    first, *ids = await fill(client, names.stream, 11)
    poison = ids[3]
    app = App(redis_url)
    calls: list[list[str]] = []
    handled: list[str] = []

    @app.consumer(names.stream, group=names.group, retry_delay=0.01, max_deliveries=3)
    async def load(msgs: list[Message]) -> None:
        calls.append([msg.id for msg in msgs])
        if poison in calls[-1]:
            raise RuntimeError("poison in the batch")
        handled.extend(msg.id for msg in msgs)

    with caplog.at_level(logging.WARNING, logger="asyncstreams"):
        async with app:
            await eventually(lambda: _true(len(handled) == 10), what="10 good entries handled")
            await wait_drained(client, names.stream, names.group)
    assert sorted(handled) == sorted([first, *(i for i in ids if i != poison)])
    assert calls.pop(0) == [first]
    assert calls[0] == ids  # all ten, together, the first time
    assert all(len(call) == 1 for call in calls[1:])  # retries, one by one
    assert calls.count([poison]) == 2  # deliveries 2 and 3, then the dead-letter stream
    dead = await client.xrange(f"{names.stream}:dead-letter")
    assert [fields["!dlq:id"] for _, fields in dead] == [poison]
    batch_lines = [r for r in caplog.records if "failed on a batch of 10 entries" in r.message]
    assert len(batch_lines) == 1  # one line for the batch, not one per entry


def test_lists_and_single_values_do_not_mix() -> None:
    app = App("redis://127.0.0.1:1/0")

    async def mixed(items: list[Item], msg: Message) -> None:
        pass

    with pytest.raises(ConfigurationError, match=r'parameter "msg": expected every parameter'):
        app.consumer("s", group="g")(mixed)

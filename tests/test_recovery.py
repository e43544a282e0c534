"""Recovery against a real redis-server: forgotten consumers are deleted only with nothing
pending, in one step; a consumer that stops gives back to the group what it did not run, with
delivery counts that say how many times each entry really ran."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

from asyncstreams import App, Message
from asyncstreams._commands import consumers, delete_consumer_if_idle
from asyncstreams._transport import create_client

from .conftest import Names
from .helpers import deliver, eventually, fill, pending_entries, wait_drained

pytestmark = pytest.mark.anyio


async def _true(value: bool) -> bool:
    return value


async def test_a_consumer_that_read_after_the_idle_check_is_not_deleted(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """XINFO CONSUMERS says `idle` has nothing pending; then it reads two entries. Deleting
    it now would drop them from the PEL: the delete checks again, in the same step."""
    await fill(client, names.stream, 2)
    await client.xgroup_create(names.stream, names.group, id="0")
    await client.xgroup_createconsumer(names.stream, names.group, "idle")
    app_client = create_client(redis_url, max_connections=2)
    try:
        [seen] = await consumers(app_client, names.stream, names.group)
        assert (seen.name, seen.pending) == ("idle", 0)
        delivered = await deliver(client, names.stream, names.group, "idle")  # meanwhile
        assert not await delete_consumer_if_idle(app_client, names.stream, names.group, "idle")
        assert set(await pending_entries(client, names.stream, names.group)) == set(delivered)
        await client.xack(names.stream, names.group, *delivered)
        assert await delete_consumer_if_idle(app_client, names.stream, names.group, "idle")
        assert await consumers(app_client, names.stream, names.group) == []
    finally:
        await app_client.aclose()


async def test_entries_never_started_are_given_back_with_their_delivery_uncounted(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """A consumer stopped with entries it never started hands them back: their delivery
    counter as before it took them, idle long enough for a peer to claim them at once."""
    ids = await fill(client, names.stream, 6)
    first = App(redis_url, grace_period=0)
    started: list[str] = []

    @first.consumer(
        names.stream, group=names.group, consumer="first", concurrency=1, batch_size=5,
        claim_idle_ms=60_000,
    )  # fmt: skip
    async def hang(msg: Message) -> None:
        started.append(msg.id)
        await anyio.sleep(3600)

    async with first:
        # The first read takes 1 entry, the next one 5: one runs, five wait to start.
        await eventually(
            lambda: _pending_is(client, names, 6), what="6 entries delivered to the first"
        )
    pending = await pending_entries(client, names.stream, names.group)
    assert pending == {entry_id: ("first", 1 if entry_id in started else 0) for entry_id in ids}, (
        "the cancelled run counts; the entries that never started do not"
    )

    peer = App(redis_url)
    handled: list[tuple[str, int]] = []

    @peer.consumer(names.stream, group=names.group, consumer="peer", claim_idle_ms=60_000)
    async def handle(msg: Message) -> None:
        handled.append((msg.id, msg.deliveries))

    with anyio.fail_after(10):  # claim_idle_ms is a minute: it must not wait for it
        async with peer:
            await wait_drained(client, names.stream, names.group)
    assert sorted(handled) == sorted(
        (entry_id, 2 if entry_id in started else 1) for entry_id in ids
    )


async def _pending_is(client: aioredis.Redis, names: Names, count: int) -> bool:
    return len(await pending_entries(client, names.stream, names.group)) == count

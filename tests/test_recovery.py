"""Recovery against a real redis-server: forgotten consumers are deleted only with nothing
pending, in one step; a consumer that stops gives back to the group what it did not run, with
delivery counts that say how many times each entry really ran."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

from asyncstreams import App, Message
from asyncstreams._commands import consumers, delete_consumer_if_idle
from asyncstreams._nodes import Nodes
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
    nodes = Nodes(app_client)
    try:
        [seen] = await consumers(nodes, names.stream, names.group)
        assert (seen.name, seen.pending) == ("idle", 0)
        delivered = await deliver(client, names.stream, names.group, "idle")  # meanwhile
        assert not await delete_consumer_if_idle(nodes, names.stream, names.group, "idle")
        assert set(await pending_entries(client, names.stream, names.group)) == set(delivered)
        await client.xack(names.stream, names.group, *delivered)
        assert await delete_consumer_if_idle(nodes, names.stream, names.group, "idle")
        assert await consumers(nodes, names.stream, names.group) == []
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


async def test_the_first_pass_goes_through_more_own_entries_than_there_is_room_for(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """300 entries pending on a consumer of this name (a restart), room for 4, and a handler
    that fails at first: the first pass takes them a few at a time while retries and
    renewals go on, every one is handled, and new entries are read only after them."""
    old = await fill(client, names.stream, 300)
    delivered = await deliver(client, names.stream, names.group, "fixed", count=300)
    assert delivered == old
    app = App(redis_url)
    handled: list[str] = []
    runs = 0

    @app.consumer(
        names.stream, group=names.group, consumer="fixed", concurrency=2, batch_size=2,
        retry_delay=0.01, retry_max_delay=0.05, pause_after_failures=3,
    )  # fmt: skip
    async def handle(msg: Message) -> None:
        nonlocal runs
        runs += 1
        if runs <= 12:
            raise RuntimeError("the database is not up yet")
        handled.append(msg.id)

    async with app:
        new = await fill(client, names.stream, 5)
        await wait_drained(client, names.stream, names.group, timeout=60)
    assert sorted(handled) == sorted(old + new)
    assert set(handled[-5:]) == set(new), "own pending entries first, then new ones"


async def test_entries_claimed_from_a_dead_consumer_keep_their_delivery_count(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """Two entries a dead consumer was delivered 6 times each (max_deliveries=5), with 400
    parked entries of this consumer pending between them (delivered 5 times, no dead-letter
    stream): claimed, the two are parked too, never run (the lookup of their delivery
    counts must not stop at a page of this consumer's own pending entries)."""
    first = await client.xadd(names.stream, {"dead": "first"})
    await deliver(client, names.stream, names.group, "dead", count=1)
    mine = await fill(client, names.stream, 400)
    await deliver(client, names.stream, names.group, "busy", count=400)
    last = await client.xadd(names.stream, {"dead": "last"})
    await deliver(client, names.stream, names.group, "dead", count=1)
    for _ in range(5):  # idle for 5 s as far as Redis knows: claimable at once
        await client.xclaim(names.stream, names.group, "dead", 0, [first, last], idle=5000)
    for _ in range(4):  # idle for no time: not claimed with them
        await client.xclaim(names.stream, names.group, "busy", 0, mine)
    app = App(redis_url)
    ran: list[str] = []

    @app.consumer(
        names.stream, group=names.group, consumer="busy", claim_idle_ms=2000,
        max_deliveries=5, dead_letter=None,
    )  # fmt: skip
    async def handle(msg: Message) -> None:
        ran.append(msg.id)

    async def both_claimed() -> bool:
        rows = await client.xpending_range(names.stream, names.group, "-", "+", 1000, "busy")
        return {row["message_id"] for row in rows} >= {first, last}

    async with app:
        await eventually(both_claimed, what="the dead consumer's entries claimed")
    assert ran == []
    rows = await pending_entries(client, names.stream, names.group)
    assert (rows[first], rows[last]) == (("busy", 7), ("busy", 7))


async def test_a_stop_waits_for_a_cancelled_handler_to_clean_up(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """A handler cancelled at stop that awaits its cleanup (a rollback) is waited for: the
    cleanup is done when the app has stopped, and its entry is given back."""
    app = App(redis_url, grace_period=0)
    started = anyio.Event()
    events: list[str] = []

    @app.consumer(names.stream, group=names.group, consumer="me", claim_idle_ms=60_000)
    async def handle(msg: Message) -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.05)  # the rollback
            events.append("cleaned up")

    [entry_id] = await fill(client, names.stream, 1)
    async with app:
        await started.wait()
    assert events == ["cleaned up"]
    [row] = await client.xpending_range(names.stream, names.group, "-", "+", 10)
    assert (row["message_id"], row["consumer"], row["times_delivered"]) == (entry_id, "me", 1)
    assert row["time_since_delivered"] >= 60_000, "given back: claimable by another at once"


async def test_renewal_never_takes_back_an_entry_another_consumer_claimed(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """A consumer keeps renewing what it holds; an entry a peer claimed meanwhile (this one
    was paused past claim_idle_ms) stays the peer's: renewal checks whose it is first."""
    await fill(client, names.stream, 2)
    app = App(redis_url, grace_period=0.1)
    release = anyio.Event()
    running: list[str] = []

    @app.consumer(names.stream, group=names.group, consumer="slow", claim_idle_ms=300)
    async def hold(msg: Message) -> None:
        running.append(msg.id)
        await release.wait()

    async with app:
        await eventually(lambda: _true(len(running) == 2), what="both entries running")
        peer_took = running[0]
        await client.xclaim(names.stream, names.group, "peer", 0, [peer_took], justid=True)
        renewed = app.consumers[0].figures().renewed
        # Two more renewals (every claim_idle_ms / 3): the other entry is renewed, this not.
        await eventually(
            lambda: _true(app.consumers[0].figures().renewed >= renewed + 2), what="renewals"
        )
        owners = {
            entry_id: consumer
            for entry_id, (consumer, _) in (
                await pending_entries(client, names.stream, names.group)
            ).items()
        }
        assert owners == {peer_took: "peer", running[1]: "slow"}
        release.set()

"""Partition ownership (`ordered=True`) against a real redis-server, in one process: several
apps (each one consumer) share a `Partitioned` stream, and every run is recorded (key, seq,
consumer, start, end). The checks: each partition has one owner at a time, a key's runs
never overlap and go 1..n in order, hand-overs (a consumer joining, one stopping) keep that,
a crashed owner's pending entries run first once its lease runs out, and a lost lease stops
the consumer from starting anything more of the partition. The multi-process cases (SIGKILL,
SIGSTOP, a cluster) are in test_ownership_faults.py."""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from asyncstreams import App, ConfigurationError, Message, Partitioned
from asyncstreams.consumer import Consumer
from asyncstreams.options import ConsumerOptions
from asyncstreams.ownership import assign, lease_key

from .conftest import Names
from .helpers import eventually, own_server

pytestmark = pytest.mark.anyio

LEASE_MS = 900


class Event(msgspec.Struct):
    account: str
    seq: int


@dataclass
class Runs:
    """Every run of the handler, by key: (seq, consumer, start, end)."""

    runs: dict[str, list[tuple[int, str, float, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    sleep: float = 0.001

    @property
    def count(self) -> int:
        return sum(map(len, self.runs.values()))

    async def handle(self, event: Event, msg: Message) -> None:
        start = time.monotonic()
        await anyio.sleep(self.sleep)
        self.runs[event.account].append((event.seq, msg.consumer, start, time.monotonic()))

    def check(self, keys: int, seqs: int) -> None:
        """Every key's runs: no two at once, and 1..seqs in order, each once."""
        assert len(self.runs) == keys
        for key, runs in self.runs.items():
            by_start = sorted(runs, key=lambda run: run[2])
            for before, after in itertools.pairwise(by_start):
                assert after[2] >= before[3], f"key {key}: runs overlap: {before} and {after}"
            assert [run[0] for run in by_start] == list(range(1, seqs + 1)), (key, by_start)


async def produce(client: aioredis.Redis, stream: Partitioned, keys: range, seqs: range) -> None:
    """seq `seqs` of every key of `keys`, each key to its partition."""
    async with client.pipeline(transaction=False) as pipe:
        for seq in seqs:
            for k in keys:
                account = f"acct-{k}"
                pipe.xadd(stream.stream(account), {"account": account, "seq": str(seq)})
        await pipe.execute()


def ordered_app(
    redis_url: str,
    stream: Partitioned,
    names: Names,
    runs: Runs,
    handler: Callable[..., Awaitable[None]] | None = None,
    **options: Any,
) -> App:
    """An app of one consumer of `stream`, ordered by account (`runs.handle` by default)."""
    app = App(redis_url)
    settings: dict[str, Any] = {
        "concurrency": 16,
        "batch_size": 20,
        "block_ms": 200,
        "lease_ms": LEASE_MS,
        **options,
    }
    app.consumer(stream, group=names.group, key="account", ordered=True, **settings)(
        handler or runs.handle
    )
    return app


def owned(app: App) -> set[str]:
    (consumer,) = app.consumers
    assert consumer.ownership is not None
    return set(consumer.ownership.readable)


def consumer_of(app: App) -> Consumer:
    (consumer,) = app.consumers
    return consumer


async def _true(value: bool) -> bool:
    return value


# -- the assignment ------------------------------------------------------------------------


def test_assign_is_balanced_and_the_same_for_the_same_members() -> None:
    streams = Partitioned("orders", 16).streams
    members = ["a", "b", "c"]
    owners = assign(streams, members)
    assert owners == assign(streams, list(reversed(members)))
    loads = sorted(list(owners.values()).count(m) for m in members)
    assert loads[-1] <= 6, loads
    assert sum(loads) == 16
    assert assign(streams, []) == {}
    assert set(assign(streams, ["a"]).values()) == {"a"}


def test_a_member_joining_moves_few_partitions() -> None:
    streams = Partitioned("orders", 64).streams
    before = assign(streams, ["a", "b", "c"])
    after = assign(streams, ["a", "b", "c", "d"])
    moved = sum(before[s] != after[s] for s in streams)
    assert list(after.values()).count("d") >= 15
    # Only the partitions d takes, and a few reshuffled by the lower cap, move.
    assert moved <= 30, moved


# -- options -------------------------------------------------------------------------------


def test_ordered_needs_one_partitioned_stream_and_a_key() -> None:
    with pytest.raises(ConfigurationError, match="expected one Partitioned stream, got 'plain'"):
        ConsumerOptions("plain", group="g", key="k", ordered=True)
    with pytest.raises(ConfigurationError, match=r"expected key= .* found none"):
        ConsumerOptions(Partitioned("orders", 4), group="g", ordered=True)
    with pytest.raises(ConfigurationError, match=r"lease_ms must be at least 300 \(.*\), got 100"):
        ConsumerOptions(Partitioned("orders", 4), group="g", key="k", ordered=True, lease_ms=100)
    with pytest.raises(ConfigurationError, match="ordered must be True or False, got 'yes'"):
        ConsumerOptions(Partitioned("orders", 4), group="g", ordered="yes")  # type: ignore[arg-type]


# -- the runtime ---------------------------------------------------------------------------


async def test_two_consumers_split_the_partitions_and_keep_each_key_in_order(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    stream = Partitioned(names.stream, 4)
    runs = Runs()
    await produce(client, stream, range(100), range(1, 6))
    first, second = (ordered_app(redis_url, stream, names, runs) for _ in range(2))
    async with first, second:
        await eventually(lambda: _true(runs.count == 500), timeout=30, what="500 runs")
        await eventually(
            lambda: _true(len(owned(first)) == len(owned(second)) == 2),
            timeout=10,
            what="two partitions each",
        )
        assert owned(first) | owned(second) == set(stream.streams)
    runs.check(100, 5)
    # Each partition's entries were run by one consumer.
    by_partition: dict[str, set[str]] = defaultdict(set)
    for key, key_runs in runs.runs.items():
        by_partition[stream.stream(key)].update(run[1] for run in key_runs)
    assert all(len(consumers) == 1 for consumers in by_partition.values()), by_partition


async def test_a_consumer_joining_and_one_leaving_hand_partitions_over_in_order(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "asyncstreams.ownership")
    stream = Partitioned(names.stream, 4)
    runs = Runs(sleep=0.003)
    first = ordered_app(redis_url, stream, names, runs)
    second = ordered_app(redis_url, stream, names, runs)
    seqs = 30
    async with first:
        await eventually(lambda: _true(len(owned(first)) == 4), timeout=10, what="4 partitions")
        first_name = consumer_of(first).name
        async with anyio.create_task_group() as tasks:

            async def keep_producing() -> None:
                for seq in range(1, seqs + 1):
                    await produce(client, stream, range(40), range(seq, seq + 1))
                    await anyio.sleep(0.05)

            tasks.start_soon(keep_producing)
            await anyio.sleep(0.3)
            async with second:
                await eventually(
                    lambda: _true(len(owned(second)) == 2), timeout=10, what="the second owns 2"
                )
                second_name = consumer_of(second).name
                await anyio.sleep(0.3)
            # The second stopped: its partitions go back to the first.
            await eventually(
                lambda: _true(len(owned(first)) == 4), timeout=10, what="the first owns 4 again"
            )
        await eventually(lambda: _true(runs.count == 40 * seqs), timeout=30, what="every run")
    runs.check(40, seqs)
    said = [r.getMessage() for r in caplog.records]
    handed = [line for line in said if "handed partition" in line]
    assert len(handed) == 2, said
    assert all(first_name in line for line in handed), said
    released = [line for line in said if "released partition" in line and second_name in line]
    assert len(released) == 2, said  # back to the first, at the second's stop


async def test_a_crashed_owners_pending_entries_run_first_once_its_lease_runs_out(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    stream = Partitioned(names.stream, 1)
    (partition,) = stream.streams
    await client.xgroup_create(partition, names.group, id="0", mkstream=True)
    await produce(client, stream, range(10), range(1, 3))
    # A consumer that read seq 1 and 2 of every key, then died holding the partition.
    await client.xreadgroup(names.group, "dead", {partition: ">"})
    await client.set(lease_key(partition, names.group), "dead", px=LEASE_MS)
    await produce(client, stream, range(10), range(3, 5))
    runs = Runs()
    app = ordered_app(redis_url, stream, names, runs)
    started = time.monotonic()
    async with app:
        await eventually(lambda: _true(runs.count == 40), timeout=20, what="40 runs")
        assert time.monotonic() - started >= LEASE_MS / 1000 * 0.5
    runs.check(10, 4)
    assert (await client.xpending(partition, names.group))["pending"] == 0


async def test_a_lost_lease_stops_the_consumer_starting_anything_of_the_partition(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "asyncstreams.ownership")
    stream = Partitioned(names.stream, 1)
    (partition,) = stream.streams
    runs = Runs()
    app = ordered_app(redis_url, stream, names, runs)
    async with app:
        await eventually(lambda: _true(len(owned(app)) == 1), timeout=10, what="the partition")
        assert consumer_of(app).figures().partitions_owned == 1
        # Another consumer took the lease (a failover lost it, say).
        await client.set(lease_key(partition, names.group), "usurper", px=60_000)
        await eventually(lambda: _true(not owned(app)), timeout=5, what="the lease lost")
        assert consumer_of(app).figures().partitions_owned == 0
        await produce(client, stream, range(5), range(1, 3))
        await anyio.sleep(LEASE_MS / 1000)
        assert runs.count == 0
        assert any("lost partition" in r.getMessage() for r in caplog.records)
        # The usurper goes away: the consumer takes the partition again and runs it all.
        await client.delete(lease_key(partition, names.group))
        await eventually(lambda: _true(runs.count == 10), timeout=10, what="10 runs")
    runs.check(5, 2)


async def test_a_batch_handler_keeps_each_key_in_order_across_two_consumers(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    stream = Partitioned(names.stream, 2)
    runs = Runs()

    async def load(events: list[Event], msgs: list[Message]) -> None:
        start = time.monotonic()
        await anyio.sleep(0.002)
        for event, msg in zip(events, msgs, strict=True):
            runs.runs[event.account].append((event.seq, msg.consumer, start, time.monotonic()))

    apps = [ordered_app(redis_url, stream, names, runs, load) for _ in range(2)]
    await produce(client, stream, range(50), range(1, 5))
    async with apps[0], apps[1]:
        await eventually(lambda: _true(runs.count == 200), timeout=30, what="200 runs")
    runs.check(50, 4)


async def test_a_full_redis_keeps_the_owner_and_its_lease(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis out of memory refuses a new lease (SET), not a renewal (PEXPIRE) nor the
    members' refresh (its first write, ZREMRANGEBYSCORE, is not refused, and a script that
    wrote goes on): the owner keeps its partition through it, and runs what comes after."""
    caplog.set_level(logging.WARNING, "asyncstreams.ownership")
    server = own_server("--maxmemory-policy", "noeviction").start()
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        stream = Partitioned("accounts", 1)
        runs = Runs()
        app = ordered_app(server.url, stream, Names("full"), runs)
        async with app:
            await eventually(lambda: _true(len(owned(app)) == 1), what="the partition")
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory", used // 2)
            await anyio.sleep(LEASE_MS / 1000 * 2)
            assert len(owned(app)) == 1
            assert not any("lost partition" in r.getMessage() for r in caplog.records)
            await client.config_set("maxmemory", 0)
            await produce(client, stream, range(5), range(1, 3))
            await eventually(lambda: _true(runs.count == 10), what="10 runs")
        runs.check(5, 2)
    finally:
        await client.aclose()
        server.close()


def test_a_read_must_end_before_the_lease_can_move() -> None:
    with pytest.raises(ConfigurationError, match="block_ms must be at most a quarter of lease_ms"):
        ConsumerOptions(
            Partitioned("orders", 4), group="g", key="k", ordered=True, lease_ms=4000, block_ms=1001
        )
    ConsumerOptions(Partitioned("orders", 4), group="g", key="k", ordered=True, lease_ms=8000)


async def test_a_parked_entry_is_not_taken_over(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """Without a dead-letter stream, an entry out of deliveries stays pending where it is:
    taking its partition over neither claims it (a delivery more) nor runs it."""
    stream = Partitioned(names.stream, 1)
    (partition,) = stream.streams
    await client.xgroup_create(partition, names.group, id="0", mkstream=True)
    await produce(client, stream, range(1), range(1, 2))
    await client.xreadgroup(names.group, "dead", {partition: ">"})
    await produce(client, stream, range(1, 4), range(1, 3))
    runs = Runs()
    app = ordered_app(redis_url, stream, names, runs, dead_letter=None, max_deliveries=1)
    async with app:
        await eventually(lambda: _true(runs.count == 6), timeout=10, what="6 runs")
    (parked,) = await client.xpending_range(partition, names.group, "-", "+", 10)
    assert parked["consumer"] == "dead"
    assert parked["times_delivered"] == 1
    assert "acct-0" not in runs.runs

"""The runtime on a real Redis Cluster: the session's `cluster` (tests/conftest.py: 3 masters of
the suite's binary on loopback ports), shared by every test here. None breaks a node; the one
that moves a slot to another master moves it back.

Handlers over streams of every master, `Partitioned` streams (names, keys, the bound),
dead letters in the stream's own hash slot and in another one, worker processes killed
mid-run, the least-privilege ACL with what a cluster adds to it (CLUSTER SLOTS, and ASKING
while a slot migrates), and what `App(cluster=)` means. Redis is checked with redis-py's own
cluster client, which routes each command by its key's slot independently of asyncstreams.

Entry ids are unique per stream only (two masters may well hand out the same id), so an
entry is always (stream, id) here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import msgspec
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.cluster import RedisCluster as SyncRedisCluster

from asyncstreams import (
    App,
    AsyncstreamsError,
    ConfigurationError,
    Message,
    Partitioned,
    RedisRefusedError,
)
from asyncstreams._slots import SLOTS, key_slot
from asyncstreams.embedded import EmbeddedCluster

from .conftest import Names
from .helpers import ROOT, CliProcess, eventually, wait_for
from .jepsen import History, check, read_runs

# The names the documented rule gives `Partitioned("orders", 16)`, computed once: data lives
# under them, so a change to the rule must fail here (and be a migration, not a refactor).
ORDERS_16 = [
    "{orders:0:43}",
    "{orders:1:40}",
    "{orders:2:63}",
    "{orders:3:60}",
    "{orders:4:20}",
    "{orders:5:23}",
    "{orders:6:3}",
    "{orders:7:0}",
    "{orders:8:1}",
    "{orders:9:2}",
    "{orders:10:62}",
    "{orders:11:61}",
    "{orders:12:43}",
    "{orders:13:40}",
    "{orders:14:12}",
    "{orders:15:11}",
]

# Upper bounds only: a hang fails the test instead of the suite's 120 s timeout.
HANG_GUARD = 20.0

Entry = tuple[str, str]  # (stream, entry id)


@pytest.fixture
async def checks(cluster: EmbeddedCluster) -> AsyncIterator[RedisCluster]:
    """redis-py's cluster client, decoding replies to str: the tests' own view of Redis."""
    client = RedisCluster.from_url(cluster.url, decode_responses=True, protocol=2)
    try:
        await client.initialize()
        yield client
    finally:
        await client.aclose()


def on_distinct_masters(
    cluster: EmbeddedCluster,
    names: Names,
    count: int = 3,
    accept: Callable[[str], bool] = lambda name: True,
) -> list[str]:
    """`count` stream names of this test whose slots are served by `count` different masters
    (each one that `accept` takes)."""
    found: dict[int, str] = {}
    for n in range(10_000):
        name = names(f"s{n}")
        if accept(name):
            found.setdefault(cluster.node_for_key(name).index, name)
        if len(found) == count:
            return [found[index] for index in sorted(found)]
    raise AssertionError(f"no {count} names on distinct masters")  # pragma: no cover


async def pending(checks: RedisCluster, stream: str, group: str) -> int:
    """How many entries of `stream` are pending in `group` (XPENDING's summary)."""
    summary = await checks.xpending(stream, group)
    return int(summary["pending"])


async def pending_of(
    checks: RedisCluster, streams: Iterable[str], group: str, consumer: str
) -> int:
    """How many entries of `streams` are pending on `consumer`, summed over the streams."""
    total = 0
    for stream in streams:
        summary = await checks.xpending(stream, group)
        for row in summary["consumers"] or []:
            if row["name"] == consumer:
                total += int(row["pending"])
    return total


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


async def cli(*args: str) -> tuple[str, str]:
    """`python -m asyncstreams ARGS...`, which must exit 0: its stdout and stderr."""
    done = await anyio.run_process(
        [sys.executable, "-m", "asyncstreams", *args], cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode(), done.stderr.decode()


# -- 1. one handler, streams on every master --------------------------------------------------


@pytest.mark.anyio
async def test_handler_over_streams_on_three_masters(
    cluster: EmbeddedCluster,
    checks: RedisCluster,
    names: Names,
    caplog: pytest.LogCaptureFixture,
) -> None:
    streams = on_distinct_masters(cluster, names)
    assert len({cluster.node_for_key(s).port for s in streams}) == 3
    app = App(cluster.url)
    handled: list[Entry] = []

    @app.consumer(streams, group=names.group, batch_size=30)
    async def handle(fields: dict[str, str], msg: Message) -> None:
        handled.append((msg.stream, msg.id))

    caplog.set_level(logging.INFO, logger="asyncstreams")
    # A backlog written before the app starts (the group starts at "0"), and more after.
    before = [(s, i) for s in streams for i in await app.publish_many(s, _payloads(40))]
    with anyio.fail_after(HANG_GUARD):
        async with app:
            after = [(s, i) for s in streams for i in await app.publish_many(s, _payloads(40))]
            published = before + after
            await eventually(
                lambda: _true(len(handled) >= len(published)), what="every entry handled"
            )

    assert len(published) == 240
    assert Counter(handled) == Counter(published)  # each once, none unknown
    for stream in streams:
        assert await pending(checks, stream, names.group) == 0, stream
        consumers = await checks.xinfo_consumers(stream, names.group)
        assert [c["name"] for c in consumers] == [app.consumer_name]
    text = logged(caplog)
    assert f"Redis Cluster at 127.0.0.1:{cluster.nodes[0].port}: 3 masters" in text
    assert "(a Redis Cluster of 3 masters)" in text


# -- 2. a Partitioned stream: keys, exactly once, the bound -----------------------------------


class Order(msgspec.Struct):
    customer: str
    n: int


@pytest.mark.anyio
async def test_partitioned_keys_each_land_in_one_partition_and_are_handled_once(
    cluster: EmbeddedCluster, checks: RedisCluster, names: Names
) -> None:
    orders = Partitioned(names("orders"), 16)
    app = App(cluster.url)
    handled: list[Entry] = []

    @app.consumer(orders, group=names.group)
    async def handle(order: Order, msg: Message) -> None:
        handled.append((msg.stream, msg.id))

    payloads = [Order(f"customer-{n % 37}", n) for n in range(300)]
    with anyio.fail_after(HANG_GUARD):
        async with app:
            ids = await app.publish_many(orders, payloads, keys=[o.customer for o in payloads])
            await eventually(lambda: _true(len(handled) >= len(ids)), what="every entry handled")

    written: list[Entry] = []
    partition_of: dict[str, set[int]] = {}
    for index, stream in enumerate(orders.streams):
        for entry_id, fields in await checks.xrange(stream):
            written.append((stream, entry_id))
            partition_of.setdefault(fields["customer"], set()).add(index)
        assert await pending(checks, stream, names.group) == 0, stream
    assert len(written) == len(payloads)
    assert Counter(handled) == Counter(written)
    assert len(partition_of) == 37
    for customer, partitions in partition_of.items():
        # One partition per key: CRC-32 of its UTF-8 bytes modulo 16, as documented.
        assert partitions == {zlib.crc32(customer.encode()) % 16}, customer
    # The 37 keys are spread: every partition got some, on every master.
    assert set().union(*partition_of.values()) == set(range(16))
    assert len({cluster.node_for_key(s).index for s in orders.streams}) == 3


@pytest.mark.anyio
async def test_partitioned_bound_holds_across_partitions_and_the_backlog_drains(
    cluster: EmbeddedCluster,
    checks: RedisCluster,
    names: Names,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """concurrency + batch_size holds for the consumer as a whole, not per partition: its 16
    readers (one per hash slot) share one ledger. (batch_size=8 would be refused: it must be
    at least the number of streams, 16.)"""
    orders = Partitioned(names("orders"), 16)
    concurrency, batch_size = 4, 16
    bound = concurrency + batch_size
    app = App(cluster.url, grace_period=1.0)
    handled: list[Entry] = []
    started: list[Entry] = []
    release = anyio.Event()

    @app.consumer(orders, group=names.group, concurrency=concurrency, batch_size=batch_size)
    async def handle(order: Order, msg: Message) -> None:
        started.append((msg.stream, msg.id))
        await release.wait()
        handled.append((msg.stream, msg.id))

    async def held() -> int:
        return await pending_of(checks, orders.streams, names.group, app.consumer_name)

    payloads = [Order(f"customer-{n % 37}", n) for n in range(300)]
    caplog.set_level(logging.DEBUG, logger="asyncstreams.consumer")
    with anyio.fail_after(HANG_GUARD):
        ids = await app.publish_many(orders, payloads, keys=[o.customer for o in payloads])
        async with app:
            try:
                await eventually(lambda: _true(len(started) == concurrency), what="handlers busy")
                # While every handler waits nothing is acked, so what the consumer holds only
                # grows: the sum of one poll over the partitions is at most what it holds
                # when the poll ends, and may never pass the bound.
                polls = [await held() for _ in range(30)]
            finally:
                release.set()
            await eventually(
                lambda: _true(len(handled) >= len(ids)), what="every entry handled", timeout=5
            )

    assert concurrency < max(polls) <= bound, polls
    assert len(started) == len(handled) == len(ids)
    assert len(set(handled)) == len(ids)
    for stream in orders.streams:
        assert await pending(checks, stream, names.group) == 0, stream
    # The consumer's own account, read by read, through the whole drain.
    holding = [int(h) for h in re.findall(r"; holding (\d+),", logged(caplog))]
    assert holding, "no read logged"
    assert max(holding) <= bound


# -- 3. the partition names: a rule that never changes ---------------------------------------


def test_partition_names_follow_the_documented_rule() -> None:
    orders = Partitioned("orders", 16)
    assert list(orders.streams) == ORDERS_16
    # The same in a fresh process (no state, no hash seed, nothing cached).
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, asyncstreams; "
            "print(json.dumps(asyncstreams.Partitioned('orders', 16).streams))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(fresh.stdout) == ORDERS_16
    # The rule: `{name:i:k}`, k the smallest from 0 up whose slot is in range (i + r) % n of
    # n equal ranges, r the range of the name itself; so 16 distinct ranges.
    offset = key_slot("orders") * 16 // SLOTS
    for index, stream in enumerate(ORDERS_16):
        name, i, k = stream.removeprefix("{").removesuffix("}").split(":")
        assert (name, int(i)) == ("orders", index)
        assert key_slot(stream) * 16 // SLOTS == (index + offset) % 16
        for smaller in range(int(k)):
            assert key_slot(f"{{orders:{index}:{smaller}}}") * 16 // SLOTS != (index + offset) % 16
        # Its dead-letter stream shares its slot: the hash tag is the whole name.
        assert key_slot(f"{stream}:dead-letter") == key_slot(stream)
    assert sorted(key_slot(s) * 16 // SLOTS for s in ORDERS_16) == list(range(16))


@pytest.mark.anyio
async def test_publish_without_keys_spreads_over_every_partition(
    clean_cluster: EmbeddedCluster, checks: RedisCluster
) -> None:
    orders = Partitioned("orders", 16)
    app = App(clean_cluster.url)
    try:
        many = await app.publish_many(orders, [{"n": str(n)} for n in range(48)])
        one_by_one = [await app.publish(orders, {"n": str(n)}) for n in range(48, 64)]
    finally:
        await app.aclose()
    assert (len(many), len(one_by_one)) == (48, 16)
    # Round robin: the same number in each partition, under the names of the rule.
    lengths = {stream: await checks.xlen(stream) for stream in ORDERS_16}
    assert lengths == dict.fromkeys(ORDERS_16, 4)
    by_master = Counter(clean_cluster.node_for_key(stream).index for stream in ORDERS_16)
    assert sorted(by_master) == [0, 1, 2]
    assert min(by_master.values()) >= 4, by_master
    # Every n written once, whatever its partition.
    seen = [fields["n"] for s in ORDERS_16 for _, fields in await checks.xrange(s)]
    assert sorted(seen, key=int) == [str(n) for n in range(64)]


# -- 4. dead letters in the stream's own slot, on every master --------------------------------


class Item(msgspec.Struct):
    n: int
    fail: bool = False


async def run_poison(
    app: App,
    checks: RedisCluster,
    streams: list[str],
    dead: dict[str, str],
    group: str,
    **options: Any,
) -> tuple[dict[Entry, dict[str, str]], Counter[Entry], Counter[Entry]]:
    """Consume `streams` (5 good entries, one whose handler always raises, one that does not
    decode, in each) with `app` (and consumer `options`) until the good ones are handled and
    the two poison entries of each stream are in its dead-letter stream `dead[stream]`;
    returns the poison entries with their fields, the runs of each entry, and the good
    entries handled."""
    runs: Counter[Entry] = Counter()
    good: Counter[Entry] = Counter()

    @app.consumer(
        streams,
        group=group,
        max_deliveries=2,
        retry_delay=0.01,
        retry_max_delay=0.05,
        pause_after_failures=None,
        **options,
    )
    async def handle(item: Item, msg: Message) -> None:
        runs[(msg.stream, msg.id)] += 1
        if item.fail:
            raise ValueError(f"item {item.n} fails")
        good[(msg.stream, msg.id)] += 1

    poison: dict[Entry, dict[str, str]] = {}
    with anyio.fail_after(HANG_GUARD):
        async with app:
            for stream in streams:
                await app.publish_many(stream, [{"n": str(n)} for n in range(5)])
                for fields in ({"n": "5", "fail": "true"}, {"n": "not-a-number"}):
                    poison[(stream, await app.publish(stream, fields))] = fields

            async def all_dead() -> bool:
                return all([await checks.xlen(dead[s]) == 2 for s in streams])

            await eventually(lambda: _true(len(good) == 5 * len(streams)), what="good handled")
            await eventually(all_dead, what="two dead letters in each dead-letter stream")
    return poison, runs, good


@pytest.mark.anyio
async def test_poison_on_every_master_dead_lettered_in_the_streams_slot_and_replayed(
    cluster: EmbeddedCluster, checks: RedisCluster, names: Names
) -> None:
    plain = on_distinct_masters(cluster, names)
    parts = Partitioned(names("parts"), 3)
    streams = [*plain, *parts.streams]
    assert len({cluster.node_for_key(s).index for s in parts.streams}) == 3
    # On a cluster the default name keeps the dead-letter stream in the stream's slot:
    # `{orders}:dead-letter` for `orders`; a partition's name is a hash tag already.
    dead = {s: f"{{{s}}}:dead-letter" for s in plain} | {
        s: f"{s}:dead-letter" for s in parts.streams
    }
    for stream, dlq in dead.items():
        assert key_slot(dlq) == key_slot(stream)
    app = App(cluster.url)

    poison, runs, good = await run_poison(app, checks, streams, dead, names.group)

    assert set(good.values()) == {1}
    for stream in streams:
        assert await pending(checks, stream, names.group) == 0, stream
        letters = await checks.xrange(dead[stream])
        found = {(f["!dlq:stream"], f["!dlq:id"]): f for _, f in letters}
        assert set(found) == {e for e in poison if e[0] == stream}
        for entry, fields in found.items():
            failed = "fail" in poison[entry]
            assert fields["!dlq:reason"] == ("failed" if failed else "undecodable")
            assert fields["!dlq:deliveries"] == ("2" if failed else "1")
            assert fields["!dlq:group"] == names.group
            assert {k: v for k, v in fields.items() if not k.startswith("!")} == poison[entry]
            assert runs[entry] == (2 if failed else 0)
    for stream in plain:  # the name of a single server (another slot) is not used
        assert await checks.exists(f"{stream}:dead-letter") == 0

    # The CLI lists each of them, wherever its master is, through the URL of node 0.
    for stream, dlq in dead.items():
        out, err = await cli("dead-letters", dlq, "--url", cluster.url, "--json")
        assert err.splitlines() == [f"2 of 2 entries of {dlq} shown"]
        rows = [json.loads(line) for line in out.splitlines()]
        assert {(r["dlq"]["stream"], r["dlq"]["id"]) for r in rows} == {
            e for e in poison if e[0] == stream
        }
        assert {json.dumps(r["fields"], sort_keys=True) for r in rows} == {
            json.dumps(f, sort_keys=True) for e, f in poison.items() if e[0] == stream
        }

    # Back to their streams: from Python, and with the CLI for one on another master.
    by_cli = next(s for s in plain if cluster.node_for_key(s).index != 0)
    lengths = {s: await checks.xlen(s) for s in streams}
    replayer = App(cluster.url)
    try:
        for stream in streams:
            if stream != by_cli:
                assert await replayer.replay_dead_letters(dead[stream]) == 2
    finally:
        await replayer.aclose()
    out, _ = await cli("dead-letters", dead[by_cli], "--url", cluster.url, "--replay")
    assert out.splitlines() == [f"moved 2 entries of {dead[by_cli]} back to their streams"]
    for stream in streams:
        assert await checks.xlen(dead[stream]) == 0
        assert await checks.xlen(stream) == lengths[stream] + 2
        back = [f for _, f in await checks.xrange(stream)][-2:]
        expected = [f for e, f in poison.items() if e[0] == stream]
        assert sorted(back, key=str) == sorted(expected, key=str)


# -- 5. a dead-letter stream of the user's naming, in another slot ----------------------------


@pytest.mark.anyio
async def test_dead_letter_stream_in_another_slot_gets_every_poison_entry_once(
    cluster: EmbeddedCluster, checks: RedisCluster, names: Names
) -> None:
    """`dead_letter="dlq:{stream}"` puts it in another hash slot (on another master, here):
    the move cannot be one script with the ack, so it is a copy, then the ack; and replaying
    is an XADD, then the XDEL. Nothing lost, nothing left pending, nothing copied twice."""
    streams = on_distinct_masters(
        cluster, names, accept=lambda s: cluster.node_for_key(f"dlq:{s}") != cluster.node_for_key(s)
    )
    dead = {s: f"dlq:{s}" for s in streams}
    for stream, dlq in dead.items():
        assert key_slot(dlq) != key_slot(stream)
        assert cluster.node_for_key(dlq).index != cluster.node_for_key(stream).index
    app = App(cluster.url)

    poison, runs, good = await run_poison(
        app, checks, streams, dead, names.group, dead_letter="dlq:{stream}"
    )

    assert set(good.values()) == {1}
    for stream in streams:
        assert await pending(checks, stream, names.group) == 0, stream
        assert await checks.exists(f"{{{stream}}}:dead-letter", f"{stream}:dead-letter") == 0
        letters = [f for _, f in await checks.xrange(dead[stream])]
        # Each poison entry exactly once: no copy lost, none added twice.
        assert sorted((f["!dlq:stream"], f["!dlq:id"]) for f in letters) == sorted(
            e for e in poison if e[0] == stream
        )
        for fields in letters:
            entry = (fields["!dlq:stream"], fields["!dlq:id"])
            assert {k: v for k, v in fields.items() if not k.startswith("!")} == poison[entry]
            assert runs[entry] == (2 if "fail" in poison[entry] else 0)

    lengths = {s: await checks.xlen(s) for s in streams}
    replayer = App(cluster.url)
    try:
        for stream in streams:
            assert await replayer.replay_dead_letters(dead[stream]) == 2
    finally:
        await replayer.aclose()
    for stream in streams:
        assert await checks.xlen(dead[stream]) == 0
        assert await checks.xlen(stream) == lengths[stream] + 2
        back = [f for _, f in await checks.xrange(stream)][-2:]
        expected = [f for e, f in poison.items() if e[0] == stream]
        assert sorted(back, key=str) == sorted(expected, key=str)


# -- 6. worker processes: one SIGKILLed, the other claims its entries on every master ---------


def test_sigkilled_worker_entries_claimed_on_every_master_by_the_survivor(
    cluster: EmbeddedCluster, names: Names, tmp_path: Path
) -> None:
    jobs = Partitioned(names("jobs"), 6)
    masters = {cluster.node_for_key(s).index for s in jobs.streams}
    assert masters == {0, 1, 2}
    ledger = tmp_path / "ledger.jsonl"
    env = {
        "FAULT_APP_PARTITIONED": f"{jobs.name}:{jobs.partitions}",
        "FAULT_APP_GROUP": names.group,
        "FAULT_APP_LEDGER": str(ledger),
        "FAULT_APP_CONCURRENCY": "4",
        "FAULT_APP_BATCH_SIZE": "8",
        "FAULT_APP_BLOCK_MS": "500",
        "FAULT_APP_CLAIM_IDLE_MS": "1000",
        "FAULT_APP_SLEEP": "0.1",
        "PYTHONWARNINGS": "default",
        "PYTHONASYNCIODEBUG": "",
    }
    client = SyncRedisCluster.from_url(cluster.url, decode_responses=True, protocol=2)
    workers: list[CliProcess] = []
    producer: SpreadProducer | None = None

    def start_worker() -> CliProcess:
        worker = CliProcess(
            ["run", "tests.apps.fault_app:app", "--url", cluster.url],
            env=env,
            log_path=tmp_path / f"worker-{len(workers)}.log",
        )
        workers.append(worker)
        worker.wait_for_output("asyncstreams running 1 consumer(s)", timeout=HANG_GUARD)
        return worker

    def held_by(consumer: str) -> dict[str, set[str]]:
        """The entries pending on `consumer`, by stream."""
        return {
            s: {
                str(p["message_id"])
                for p in client.xpending_range(s, names.group, "-", "+", 1000, consumer)
            }
            for s in jobs.streams
        }

    try:
        victim, survivor = start_worker(), start_worker()
        victim_name = consumer_name(victim)
        # Faster than the two handle them, spread over the partitions as it comes.
        producer = SpreadProducer(cluster.url, jobs.streams, count=150, interval=0.01).start()

        def mid_run() -> bool:
            """The victim has handled some entries, and holds some on every master."""
            done = [r for r in read_runs(ledger) if r.pid == victim.pid and r.outcome == "ok"]
            held = held_by(victim_name)
            on = {cluster.node_for_key(s).index for s, ids in held.items() if ids}
            return len(done) >= 8 and on == masters

        wait_for(mid_run, timeout=HANG_GUARD, what="the victim mid-run, holding on 3 masters")
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.wait(10)
        killed_at = time.time()
        held = held_by(victim_name)
        held_ids = set().union(*held.values())
        assert 0 < len(held_ids) <= 4 + 8
        assert {cluster.node_for_key(s).index for s, ids in held.items() if ids} == masters

        def drained() -> bool:
            """Every partition read to its end by the group, nothing pending."""
            assert survivor.process.poll() is None, survivor.output()
            for stream in jobs.streams:
                [group] = client.xinfo_groups(stream)
                last = client.xinfo_stream(stream)["last-generated-id"]
                if group["pending"] or group["last-delivered-id"] != last:
                    return False
            return True

        produced = producer.wait()
        wait_for(drained, timeout=30, what="every partition drained")
        survivor.signal(signal.SIGTERM)
        assert survivor.wait(HANG_GUARD) == 0, survivor.output()

        runs = read_runs(ledger)
        # The survivor ran to the end every entry the victim held, on each master.
        finished = {r.id for r in runs if r.pid == survivor.pid and r.outcome == "ok"}
        assert held_ids <= finished
        claimed = re.findall(r"claimed \d+ entries of (\S+) idle", survivor.output())
        assert {cluster.node_for_key(s).index for s in claimed} == masters
        history = History(
            name="cluster-sigkill",
            streams=list(jobs.streams),
            group=names.group,
            ledger=ledger,
            produced=produced,
            fault_at=killed_at,
            outputs=[w.output() for w in workers],
            killed={victim.pid: killed_at},
        )
        result = check(client, history, max_duplicates=len(held_ids))
        result.assert_ok()
        assert result.handled == len(produced)
    finally:
        for worker in workers:
            worker.stop()
        if producer is not None:
            producer.stop()
        client.close()


class SpreadProducer:
    """XADDs `count` entries over `streams` in turn, one every `interval` s, from a thread,
    under ids it chooses: `<ms at start>-<n>`, so increasing within each stream and unique
    across them (the fault app's ledger and tests/jepsen.py know entries by id alone)."""

    def __init__(self, url: str, streams: Sequence[str], *, count: int, interval: float) -> None:
        self._client = SyncRedisCluster.from_url(url, protocol=2)
        self._streams = streams
        self._count = count
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.produced: dict[str, float] = {}
        self.error: BaseException | None = None

    def start(self) -> SpreadProducer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def wait(self) -> dict[str, float]:
        self._thread.join(HANG_GUARD)
        assert not self._thread.is_alive(), "the producer is still running"
        assert self.error is None, self.error
        return self.produced

    def _run(self) -> None:
        base = int(time.time() * 1000)
        try:
            for n in range(self._count):
                if self._stop.is_set():
                    return
                entry_id = f"{base}-{n}"
                stream = self._streams[n % len(self._streams)]
                self._client.xadd(stream, {"n": str(n)}, id=entry_id)
                self.produced[entry_id] = time.time()
                self._stop.wait(self._interval)
        except BaseException as exc:
            self.error = exc
        finally:
            self._client.close()


def consumer_name(worker: CliProcess) -> str:
    found = re.search(r"consuming streams=\S+ group=\S+ consumer=(\S+)", worker.output())
    assert found, worker.output()
    return found[1]


# -- 7. the least-privilege ACL, on a cluster -------------------------------------------------

# The README's least-privilege ACL (Security), for the keys `{keys}`, plus what a cluster adds:
# CLUSTER SLOTS, for the slot map.
CLUSTER_ACL = (
    "on >{password} resetkeys {keys} resetchannels -@all"
    " +ping +client|setname +client|id +client|unblock"
    " +xgroup|create +xreadgroup +xack +xpending +xclaim +xautoclaim +xrange"
    " +xinfo|consumers +xgroup|delconsumer +multi +xadd +exec +eval"
    " +cluster|slots"
)


@contextlib.asynccontextmanager
async def acl_user(cluster: EmbeddedCluster, rules: str) -> AsyncIterator[str]:
    """A user with `rules` (`{password}` filled in) on every master; its name and password
    in a URL of node 0. ACLs are per node: Redis Cluster does not spread them."""
    user, password = f"worker-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    masters = [
        aioredis.Redis(host="127.0.0.1", port=row.master, protocol=2) for row in cluster.slot_map()
    ]
    try:
        for master in masters:
            await master.execute_command(
                "ACL", "SETUSER", user, *rules.replace("{password}", password).split()
            )
        yield f"redis://{user}:{password}@127.0.0.1:{cluster.nodes[0].port}/0"
    finally:
        for master in masters:
            await master.execute_command("ACL", "DELUSER", user)
            await master.aclose()


@pytest.mark.anyio
async def test_least_privilege_acl_with_cluster_slots_drains_a_partitioned_stream(
    cluster: EmbeddedCluster, checks: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """As that user: claim a crashed consumer's entries on every master, dead-letter one
    (the script), delete the forgotten consumer, stop at once (CLIENT UNBLOCK on each node
    of a blocked read); never refused."""
    jobs = Partitioned(f"acl-{uuid.uuid4().hex[:8]}", 3)
    assert {cluster.node_for_key(s).index for s in jobs.streams} == {0, 1, 2}
    group = "acl-group"
    keys = " ".join(f"~{s} ~{s}:dead-letter" for s in jobs.streams)
    # A consumer that crashed holding an entry of each partition.
    for stream in jobs.streams:
        await checks.xgroup_create(stream, group, id="0", mkstream=True)
        await checks.xadd(stream, {"n": "-1"})
        await checks.xreadgroup(group, "ghost", {stream: ">"}, count=1)
    app_handled: list[Entry] = []
    caplog.set_level(logging.INFO, logger="asyncstreams")

    async with acl_user(cluster, CLUSTER_ACL.replace("{keys}", keys)) as url:
        app = App(url)

        @app.consumer(
            jobs,
            group=group,
            block_ms=60_000,  # a stop that waited for the read would take a minute
            claim_idle_ms=300,
            max_deliveries=2,
            retry_delay=0.01,
            delete_idle_consumers_after=1,
        )
        async def handle(item: Item, msg: Message) -> None:
            if item.fail:
                raise ValueError("poison")
            app_handled.append((msg.stream, msg.id))

        publisher = App(cluster.url)
        try:
            with anyio.fail_after(HANG_GUARD):
                async with app:
                    ids = await publisher.publish_many(jobs, [{"n": str(n)} for n in range(30)])
                    poison = await publisher.publish(jobs, {"n": "99", "fail": "true"}, key="x")
                    await eventually(lambda: _true(len(app_handled) == 3 + 30), what="all handled")

                    async def ghost_gone() -> bool:
                        for stream in jobs.streams:
                            consumers = await checks.xinfo_consumers(stream, group)
                            if "ghost" in {c["name"] for c in consumers}:
                                return False
                        return True

                    await eventually(ghost_gone, what="the crashed consumer deleted")
                    await eventually(
                        lambda: _is(checks.xlen(f"{jobs.stream('x')}:dead-letter"), 1),
                        what="the poison entry dead-lettered",
                    )
                    stopping = time.monotonic()
                stopped_in = time.monotonic() - stopping
        finally:
            await publisher.aclose()

    assert app.failure is None
    assert stopped_in < 5.0, stopped_in  # the blocked reads were woken, not waited out
    assert len(ids) == 30
    assert len(set(app_handled)) == len(app_handled)
    for stream in jobs.streams:
        assert await pending(checks, stream, group) == 0, stream
    [(_, letter)] = await checks.xrange(f"{jobs.stream('x')}:dead-letter")
    assert (letter["!dlq:stream"], letter["!dlq:id"]) == (jobs.stream("x"), poison)
    text = logged(caplog)
    for refused in ("NOPERM", "no permissions", "could not move", "unavailable"):
        assert refused not in text
    assert "3 masters" in text


def migrate_slot(
    cluster: EmbeddedCluster, slot: int, source: int, target: int, *, finish: bool
) -> None:
    """Move hash slot `slot` from master `source` to master `target` (node indexes) as
    `redis-cli --cluster reshard` does: IMPORTING on the target, MIGRATING on the source,
    MIGRATE of every key of the slot; then, with `finish`, SETSLOT NODE on every master.
    Until then the source answers ASK for the slot's keys."""
    src, dst = cluster.nodes[source], cluster.nodes[target]
    with (
        redis.Redis(host="127.0.0.1", port=src.port, protocol=2) as from_,
        redis.Redis(host="127.0.0.1", port=dst.port, protocol=2) as to,
    ):
        if not finish:
            to.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src.node_id)
            from_.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst.node_id)
            keys = from_.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            if keys:
                from_.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
            return
    for row in cluster.slot_map():
        with redis.Redis(host="127.0.0.1", port=row.master, protocol=2) as master:
            master.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst.node_id)


@pytest.mark.anyio
async def test_least_privilege_acl_follows_a_slot_migration_with_asking(
    cluster: EmbeddedCluster, checks: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """While a stream's slot moves to another master, the old one answers ASK: the command
    goes once to the new one after ASKING, which the ACL must allow (without it the new
    master answers MOVED, back to the old one, and the consumer waits the migration out as
    an outage). The slot goes back where it was at the end."""
    stream = f"{{asking-{uuid.uuid4().hex[:8]}}}"
    slot = key_slot(stream)
    source = cluster.node_for_key(stream).index
    target = (source + 1) % 3
    group = "asking-group"
    keys = f"~{stream} ~{stream}:dead-letter"
    handled: list[str] = []
    caplog.set_level(logging.INFO, logger="asyncstreams")
    migration = ""  # "", "started", "finished"
    async with acl_user(cluster, (CLUSTER_ACL + " +asking").replace("{keys}", keys)) as url:
        app = App(url)

        @app.consumer(stream, group=group, block_ms=200)
        async def handle(fields: dict[str, str], msg: Message) -> None:
            handled.append(fields["n"])

        publisher = App(cluster.url)
        try:
            with anyio.fail_after(HANG_GUARD):
                async with app:
                    await publisher.publish_many(stream, _payloads(10))
                    await eventually(lambda: _true(len(handled) == 10), what="10 handled")
                    migration = "started"
                    migrate_slot(cluster, slot, source, target, finish=False)
                    assert await checks.exists(stream) == 1  # on the target now
                    await publisher.publish_many(stream, [{"n": str(n)} for n in range(10, 20)])
                    await eventually(
                        lambda: _true(len(handled) == 20), what="handled while migrating", timeout=5
                    )
                    migrate_slot(cluster, slot, source, target, finish=True)
                    migration = "finished"
                    await publisher.publish_many(stream, [{"n": str(n)} for n in range(20, 30)])
                    await eventually(lambda: _true(len(handled) == 30), what="handled after")
        finally:
            await publisher.aclose()
            # Back where it was, for the tests that share the cluster.
            if migration == "started":
                migrate_slot(cluster, slot, source, target, finish=True)
            if migration:
                migrate_slot(cluster, slot, target, source, finish=False)
                migrate_slot(cluster, slot, target, source, finish=True)

    assert cluster.node_for_key(stream).index == source
    assert sorted(handled, key=int) == [str(n) for n in range(30)]
    assert await pending(checks, stream, group) == 0
    text = logged(caplog)
    for trouble in ("NOPERM", "no permissions", "unavailable", "failed"):
        assert trouble not in text
    assert app.failure is None


@pytest.mark.anyio
@pytest.mark.parametrize("cluster_option", [None, True], ids=["cluster=None", "cluster=True"])
async def test_an_acl_without_cluster_slots_is_refused_at_start(
    cluster: EmbeddedCluster, cluster_option: bool | None, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's ACL as it is, on a cluster: without CLUSTER SLOTS the app cannot know
    where the streams live. As with any missing permission, that is one RedisRefusedError at
    start naming it, not a start that never ends (MOVED ridden out as an outage, forever)
    and not a bare redis-py error."""
    jobs = Partitioned(f"noslots-{uuid.uuid4().hex[:8]}", 3)
    keys = " ".join(f"~{s} ~{s}:dead-letter" for s in jobs.streams)
    rules = CLUSTER_ACL.replace(" +cluster|slots", "").replace("{keys}", keys)
    caplog.set_level(logging.INFO, logger="asyncstreams")
    async with acl_user(cluster, rules) as url:
        app = App(url, cluster=cluster_option)

        @app.consumer(jobs, group="g")
        async def handle(fields: dict[str, str]) -> None:
            raise AssertionError("no consumer may start")

        with anyio.fail_after(5), pytest.raises(RedisRefusedError, match=r"cluster\|slots"):
            async with app:
                pass
    assert "Redis is unavailable" not in logged(caplog)


# -- 8. App(cluster=...) --------------------------------------------------------------------


@pytest.mark.anyio
async def test_cluster_option_on_a_plain_server_and_on_a_cluster(
    redis_url: str, cluster: EmbeddedCluster, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncstreams")
    plain = f"127.0.0.1:{urlsplit(redis_url).port}"

    # cluster=True where there is none: a clear ConfigurationError, at start and on publish.
    required = App(redis_url, cluster=True)

    @required.consumer(names.stream, group=names.group)
    async def never(fields: dict[str, str]) -> None:
        raise AssertionError("no consumer may start")

    expected = rf"expected a Redis Cluster at {re.escape(plain)}, found a server that is not in one"
    with anyio.fail_after(HANG_GUARD), pytest.raises(ConfigurationError, match=expected):
        async with required:
            pass
    with pytest.raises(ConfigurationError, match=expected):
        await required.publish(names.stream, {"n": "1"})
    await required.aclose()
    assert required.failure is None

    # cluster=None on a plain server: as before, one server, no cluster line.
    caplog.clear()
    app = App(redis_url)
    handled: list[str] = []

    @app.consumer(names("plain"), group=names.group)
    async def handle(fields: dict[str, str], msg: Message) -> None:
        handled.append(msg.id)

    with anyio.fail_after(HANG_GUARD):
        async with app:
            ids = await app.publish_many(names("plain"), _payloads(20))
            await eventually(lambda: _true(len(handled) == 20), what="20 handled")
    assert sorted(handled) == sorted(ids)
    text = logged(caplog)
    assert f"asyncstreams running 1 consumer(s) on {plain}\n" in text + "\n"
    assert "Redis Cluster" not in text

    # cluster=False on a cluster: one server, the URL's node. A stream of its own slots
    # works; one of another master's gets MOVED, which asyncstreams does not follow then.
    here, elsewhere = (
        next(
            names(f"f{n}") for n in range(10_000) if cluster.node_for_key(names(f"f{n}")).index == i
        )
        for i in (0, 1)
    )
    single = App(cluster.url, cluster=False)
    seen: list[str] = []

    @single.consumer(here, group=names.group)
    async def local(fields: dict[str, str], msg: Message) -> None:
        seen.append(msg.id)

    caplog.clear()
    with anyio.fail_after(HANG_GUARD):
        async with single:
            local_ids = await single.publish_many(here, _payloads(5))
            await eventually(lambda: _true(len(seen) == 5), what="5 handled on the URL's node")
            with pytest.raises(AsyncstreamsError, match=r"MOVED|MovedError"):
                await single.publish(elsewhere, {"n": "1"})
    assert sorted(seen) == sorted(local_ids)
    assert "Redis Cluster" not in logged(caplog)


def _payloads(count: int) -> list[dict[str, str]]:
    return [{"n": str(n)} for n in range(count)]


async def _true(value: bool) -> bool:
    return value


async def _is(value: Awaitable[Any], expected: object) -> bool:
    return bool(await value == expected)

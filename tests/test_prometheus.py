"""asyncstreams.prometheus against a real redis-server: the names and labels, counts that
match what Redis did, group figures that match XINFO (on Redis 6.2 too, which reports no
lag), and one process refreshing the group figures however many run the app."""

from __future__ import annotations

import gc
import sys
import time
import weakref

import anyio
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.cluster import RedisCluster

from asyncstreams import App, Call, ConfigurationError, Middleware, Outcome, Partitioned
from asyncstreams._group_figures import lock_key
from asyncstreams._slots import key_slot
from asyncstreams._tally import DURATION_BOUNDS, LATENCY_BOUNDS, Tallies
from asyncstreams.embedded import EmbeddedCluster
from asyncstreams.message import entry
from asyncstreams.middleware import Chain
from asyncstreams.prometheus import Metrics, instrument, metrics_of

from .conftest import Names
from .helpers import calls, eventually, fill, wait_drained

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(exposition: bytes) -> Samples:
    """Every sample of an exposition: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[name, frozenset(labels.items())]


def named(found: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of the samples called `name`."""
    return [dict(labels) for sample, labels in found if sample == name]


# -- set-up ----------------------------------------------------------------------------


def test_without_prometheus_client_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    with pytest.raises(ConfigurationError, match=r'pip install "asyncstreams\[prometheus\]"'):
        instrument(App("redis://127.0.0.1:1/0"))


def test_instrument_once_with_a_sane_interval() -> None:
    app = App("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match="group_interval must be a number"):
        instrument(app, group_interval=0)
    metrics = instrument(app)
    assert metrics.group_interval == 15.0
    with pytest.raises(ConfigurationError, match="already"):
        instrument(app)


def test_lock_key_is_in_the_streams_hash_slot() -> None:
    for stream in ["orders", "{orders:0:ab12}", "a{b}c", "{x}", "plain:name"]:
        key = lock_key(stream, "billing{eu}")
        assert key_slot(key) == key_slot(stream), (stream, key)
        assert "billing{eu}" in key
    assert lock_key("orders", "billing") == "asyncstreams:metrics:{orders}:billing"


async def test_names_and_labels_before_and_while_running(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group)
    async def handle(fields: dict[str, str]) -> None:
        return None

    metrics = instrument(app, group_interval=0.05)
    handler = handle.__qualname__
    # Not running: the processed series of each registered handler are there, at 0.
    idle = samples(metrics.exposition())
    for outcome in ("acked", "retried", "dead_lettered", "parked", "cancelled"):
        labels = {"stream": names.stream, "group": names.group, "handler": handler}
        assert value(idle, "asyncstreams_processed_total", **labels, outcome=outcome) == 0
    assert named(idle, "asyncstreams_handler_duration_seconds_count") == [
        {"group": names.group, "handler": handler}
    ]
    assert named(idle, "asyncstreams_latency_seconds_count") == [
        {"group": names.group, "handler": handler}
    ]
    assert not named(idle, "asyncstreams_received_total")
    assert not named(idle, "asyncstreams_group_lag")

    await fill(client, names.stream, 20)
    async with app:
        await wait_drained(client, names.stream, names.group)
        running = samples(await metrics.scrape())
    consumer = {"group": names.group, "handler": handler, "consumer": app.consumer_name}
    for name in (
        "asyncstreams_received_total",
        "asyncstreams_claimed_total",
        "asyncstreams_renewed_total",
        "asyncstreams_outages_total",
        "asyncstreams_reconnects_total",
        "asyncstreams_consumer_in_outage",
        "asyncstreams_consumer_in_flight",
        "asyncstreams_consumer_room",
        "asyncstreams_consumer_limit",
        "asyncstreams_consumer_keys_held",
        "asyncstreams_consumer_waiting_behind_keys",
        "asyncstreams_consumer_partitions_owned",
    ):
        assert named(running, name) == [consumer], name
    assert value(running, "asyncstreams_received_total", **consumer) == 20
    assert value(running, "asyncstreams_consumer_in_outage", **consumer) == 0
    assert value(running, "asyncstreams_consumer_limit", **consumer) == 64 + 500
    group = {"stream": names.stream, "group": names.group}
    for name in (
        "asyncstreams_group_lag",
        "asyncstreams_group_pending",
        "asyncstreams_group_oldest_pending_age_seconds",
        "asyncstreams_group_consumers",
    ):
        assert named(running, name) == [group], name
    assert named(running, "asyncstreams_stream_length") == [{"stream": names.stream}]
    assert named(running, "asyncstreams_dead_letter_length") == [
        {**group, "dead_letter": f"{names.stream}:dead-letter"}
    ]
    assert value(running, "asyncstreams_stream_length", stream=names.stream) == 20
    assert value(running, "asyncstreams_group_consumers", **group) == 1
    latency = {"group": names.group, "handler": handler}
    assert value(running, "asyncstreams_latency_seconds_count", **latency) == 20
    buckets = named(running, "asyncstreams_latency_seconds_bucket")
    assert {labels["le"] for labels in buckets} >= {"0.001", "1.0", "3600.0", "+Inf"}
    # Stopped: the consumers' and the groups' figures are gone, the counts stay.
    stopped = samples(metrics.exposition())
    assert not named(stopped, "asyncstreams_received_total")
    assert not named(stopped, "asyncstreams_group_lag")
    labels = {**group, "handler": handler, "outcome": "acked"}
    assert value(stopped, "asyncstreams_processed_total", **labels) == 20


# -- counts against Redis ----------------------------------------------------------------


class _Acks(Middleware):
    """Counts acked entries as another middleware beside the metrics."""

    def __init__(self) -> None:
        self.acked = 0

    def settled(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
        self.acked += len(call) if outcome == "acked" else 0


# Alone, the metrics hear of acked entries through a recorder the workers call (no Call
# made); beside another middleware, through `settled`, as every middleware does.
@pytest.mark.parametrize("beside", [None, _Acks], ids=["alone", "beside-another"])
async def test_processed_counts_match_what_redis_acked_and_dead_lettered(
    redis_url: str, names: Names, client: aioredis.Redis, beside: type[_Acks] | None
) -> None:
    entries, failing = 60, 12  # every fifth entry fails on each delivery
    await fill(client, names.stream, entries)
    other = beside() if beside is not None else None
    app = App(redis_url, middleware=[other] if other is not None else [])

    @app.consumer(names.stream, group=names.group, retry_delay=0.01, max_deliveries=2)
    async def handle(fields: dict[str, str]) -> None:
        if int(fields["n"]) % 5 == 0:
            raise ValueError("refused")

    metrics = instrument(app)
    async with app:
        await wait_drained(client, names.stream, names.group)
        dead_letter = f"{names.stream}:dead-letter"
        await eventually(lambda: _length_is(client, dead_letter, failing), what="the dead letters")
        found = samples(await metrics.scrape())
    group = (await client.xinfo_groups(names.stream))[0]
    dead = await client.xlen(dead_letter)
    acked_by_redis = await client.xlen(names.stream) - group["pending"] - dead
    labels = {"stream": names.stream, "group": names.group, "handler": handle.__qualname__}

    def processed(outcome: str) -> float:
        return value(found, "asyncstreams_processed_total", **labels, outcome=outcome)

    assert processed("acked") == acked_by_redis == entries - failing
    assert processed("dead_lettered") == dead == failing
    assert processed("retried") == failing  # max_deliveries=2: one retry each
    assert processed("parked") == processed("cancelled") == 0
    if other is not None:
        assert other.acked == entries - failing
    # The path the workers took: the recorder only when the metrics are alone.
    recorder = Chain(app.middleware).recorder(handle.__qualname__, names.group)
    assert (recorder is None) == (other is not None)
    calls_made = value(
        found,
        "asyncstreams_handler_duration_seconds_count",
        group=names.group,
        handler=handle.__qualname__,
    )
    assert calls_made == entries + failing  # every delivery ran the handler
    assert value(found, "asyncstreams_dead_letter_length", stream=names.stream,
                 group=names.group, dead_letter=dead_letter) == failing  # fmt: skip


async def _length_is(client: aioredis.Redis, stream: str, length: int) -> bool:
    return bool(await client.xlen(stream) == length)


# -- group figures against XINFO ---------------------------------------------------------


async def _hold_part_of_the_stream(
    redis_url: str, names: Names, client: aioredis.Redis, *, delete_unread: bool
) -> tuple[App, Metrics, anyio.Event]:
    """A stream of 50 entries; the group reads 20 by hand (acks 5), its consumer in the app
    takes 2 more and holds them; with `delete_unread`, an entry the group has not read is
    XDELeted (Redis 7 then reports the lag as null; 6.2 never reports it)."""
    ids = await fill(client, names.stream, 50)
    await client.xgroup_create(names.stream, names.group, id="0")
    read = await client.xreadgroup(names.group, "by-hand", {names.stream: ">"}, count=20)
    await client.xack(names.stream, names.group, *[entry_id for entry_id, _ in read[0][1][:5]])
    if delete_unread:
        await client.xdel(names.stream, ids[40])
    release = anyio.Event()
    app = App(redis_url, grace_period=0.05)

    @app.consumer(
        names.stream,
        group=names.group,
        concurrency=1,
        batch_size=1,
        delete_idle_consumers_after=None,
    )
    async def hold(fields: dict[str, str]) -> None:
        await release.wait()

    return app, instrument(app, group_interval=0.05), release


async def _xinfo_lag(client: aioredis.Redis, stream: str, group: dict[str, object]) -> int:
    """XINFO GROUPS' lag, or (none: Redis 6.2, or null after an XDEL) the entries after the
    group's last-delivered id, counted."""
    if group.get("lag") is not None:
        return int(str(group["lag"]))
    return len(await client.xrange(stream, f"({group['last-delivered-id']}", "+"))


@pytest.mark.parametrize("delete_unread", [False, True], ids=["lag", "lag-null"])
async def test_lag_and_pending_match_xinfo_for_a_group_part_way(
    redis_url: str, names: Names, client: aioredis.Redis, delete_unread: bool
) -> None:
    app, metrics, release = await _hold_part_of_the_stream(
        redis_url, names, client, delete_unread=delete_unread
    )
    async with app:
        await eventually(lambda: _pending_is(client, names, 15 + 2), what="2 entries held")
        found = samples(await metrics.scrape())
        group = (await client.xinfo_groups(names.stream))[0]
        release.set()
    labels = {"stream": names.stream, "group": names.group}
    expected_lag = 50 - 20 - 2 - (1 if delete_unread else 0)
    assert await _xinfo_lag(client, names.stream, group) == expected_lag
    assert value(found, "asyncstreams_group_lag", **labels) == expected_lag
    assert value(found, "asyncstreams_group_pending", **labels) == group["pending"] == 17
    assert value(found, "asyncstreams_group_consumers", **labels) == group["consumers"] == 2
    assert value(found, "asyncstreams_stream_length", stream=names.stream) == (
        49 if delete_unread else 50
    )
    assert value(found, "asyncstreams_group_oldest_pending_age_seconds", **labels) > 0


async def _pending_is(client: aioredis.Redis, names: Names, count: int) -> bool:
    return bool((await client.xpending(names.stream, names.group))["pending"] == count)


# -- one process refreshes ---------------------------------------------------------------


async def test_one_process_of_two_reads_the_group_figures(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    interval = 0.5

    def app_of_a_process() -> tuple[App, Metrics]:
        app = App(redis_url)

        @app.consumer(names.stream, group=names.group, delete_idle_consumers_after=None)
        async def handle(fields: dict[str, str]) -> None:
            return None

        return app, instrument(app, group_interval=interval)

    (first, first_metrics), (second, second_metrics) = app_of_a_process(), app_of_a_process()
    await fill(client, names.stream, 10)
    lock = lock_key(names.stream, names.group)

    async def reads(metrics: Metrics) -> tuple[int, bool]:
        """XINFO STREAM calls made by one scrape, and whether it reported the lag."""
        before = await calls(client, "xinfo|stream")
        found = samples(await metrics.scrape())
        return await calls(client, "xinfo|stream") - before, bool(
            named(found, "asyncstreams_group_lag")
        )

    async with second:
        async with first:
            await wait_drained(client, names.stream, names.group)
            one_read, reported = await reads(first_metrics)
            assert one_read > 0
            assert reported
            assert await reads(second_metrics) == (0, False)  # the lock is the first's
            assert 0 < await client.pttl(lock) <= 2 * interval * 1000
            await anyio.sleep(interval * 1.2)
            # A new interval: the holder keeps the lock; the other still does not read.
            assert await reads(second_metrics) == (0, False)
            assert await reads(first_metrics) == (one_read, True)
            # Within the interval, the holder reports what it read, without reading again.
            assert await reads(first_metrics) == (0, True)
        # The holder stopped: it reports nothing, and two intervals later the lock is free.
        assert await reads(first_metrics) == (0, False)
        await anyio.sleep(interval * 2.2)
        assert await reads(second_metrics) == (one_read, True)


# -- the tally -------------------------------------------------------------------------


async def test_tallies_count_mixed_handlers_streams_and_batches() -> None:
    now_ms = int(time.time() * 1000)

    def call(handler: str, *ids: tuple[str, int]) -> Call:
        found = Call(
            handler,
            "g",
            "c",
            [entry(stream, f"{ms}-0".encode(), [b"n", b"1"], 1) for stream, ms in ids],
        )
        found.duration = 0.002
        return found

    tallies = Tallies()
    tallies.settled(call("a", ("s1", now_ms - 60_000)), "acked", None)
    tallies.settled(call("b", ("s1", now_ms), ("s2", now_ms + 5_000)), "acked", None)
    tallies.settled(call("a", ("s2", now_ms)), "retried", ValueError())
    tallies.settled(call("a", ("s2", now_ms)), "dead_lettered", None)  # never ran
    tallies.flush()
    a, b = tallies.tally("a", "g"), tallies.tally("b", "g")
    assert a.counts["acked"] == {"s1": 1}
    assert b.counts["acked"] == {"s1": 1, "s2": 1}
    assert a.counts["retried"] == {"s2": 1}
    assert a.counts["dead_lettered"] == {"s2": 1}
    # a: the acked call and the retried one ran; b: one call of two entries.
    assert sum(a.duration[:-1]) == 2
    assert a.duration[DURATION_BOUNDS.index(0.0025)] == 2  # le is inclusive: 0.002 <= 0.0025
    assert sum(b.duration[:-1]) == 1
    # A minute's wait is in the 120 s bucket; an id ahead of this clock in the first one.
    assert a.latency[LATENCY_BOUNDS.index(120.0)] == 1
    assert b.latency[0] >= 1
    assert sum(b.latency[:-1]) == 2


def test_metrics_of_an_app_and_no_app_kept_alive() -> None:
    app = App("redis://127.0.0.1:1/0")
    assert metrics_of(app) is None
    metrics = instrument(app)
    assert metrics_of(app) is metrics
    gone = weakref.ref(app)
    del app, metrics
    gc.collect()
    assert gone() is None


async def test_group_figures_on_a_cluster(cluster: EmbeddedCluster, names: Names) -> None:
    """A Partitioned stream over the masters: each partition's figures, its lock in its
    own hash slot."""
    stream = Partitioned(names("orders"), 4)
    app = App(cluster.url)

    @app.consumer(stream, group=names.group)
    async def handle(fields: dict[str, str]) -> None:
        return None

    metrics = instrument(app, group_interval=0.05)
    checks = RedisCluster.from_url(cluster.url, decode_responses=True, protocol=2)
    try:
        async with app:
            await app.publish_many(stream, [{"n": str(n)} for n in range(40)])
            for partition in stream.streams:
                await wait_drained(checks, partition, names.group)  # type: ignore[arg-type]
            found = samples(await metrics.scrape())
        for partition in stream.streams:
            labels = {"stream": partition, "group": names.group}
            assert value(found, "asyncstreams_group_lag", **labels) == 0
            assert value(found, "asyncstreams_group_pending", **labels) == 0
            assert await checks.exists(lock_key(partition, names.group)) == 1
        lengths = [
            value(found, "asyncstreams_stream_length", stream=partition)
            for partition in stream.streams
        ]
        assert sum(lengths) == 40
    finally:
        await checks.aclose()


async def test_a_keyed_consumer_shows_its_held_keys_and_the_entries_waiting_behind_them(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """Two keys, three entries each; the handler holds the first entry of each: two keys
    held, four entries waiting behind them."""
    for n in range(6):
        await client.xadd(names.stream, {"account": f"a{n % 2}", "n": str(n)})
    app = App(redis_url, grace_period=0.1)
    release = anyio.Event()
    started: list[str] = []

    @app.consumer(names.stream, group=names.group, key="account")
    async def apply(fields: dict[str, str]) -> None:
        started.append(fields["n"])
        await release.wait()

    metrics = instrument(app)
    async with app:
        await eventually(lambda: _running(started, 2), what="the first entry of each key")
        found = samples(await metrics.scrape())
        consumer = {"group": names.group, "handler": apply.__qualname__,
                    "consumer": app.consumer_name}  # fmt: skip
        assert value(found, "asyncstreams_consumer_keys_held", **consumer) == 2
        assert value(found, "asyncstreams_consumer_waiting_behind_keys", **consumer) == 4
        release.set()
        await wait_drained(client, names.stream, names.group)


async def _running(started: list[str], count: int) -> bool:
    return len(started) == count

"""Key lanes (`key=`) against a real redis-server: an order checker. For each of 1,000 keys
the producer writes sequence numbers 1..n (keys shuffled together, each key's in order);
the handler records each run (key, seq, start, end, outcome). The check: for every key,
runs never overlap in time, and the successful runs are 1..n in order, with nothing
missing but the entries dead-lettered (which are in the dead-letter stream)."""

from __future__ import annotations

import itertools
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from asyncstreams import App, ConfigurationError, Message
from asyncstreams.lanes import KeyedLedger
from asyncstreams.middleware import Call, Middleware, Outcome
from asyncstreams.options import ConsumerOptions

from .conftest import Names
from .helpers import eventually

pytestmark = pytest.mark.anyio

KEYS = 1_000
SEQ = 5


class Event(msgspec.Struct):
    account: str
    seq: int


@dataclass
class Runs:
    """What the handler saw: every run, by key, and the failures to inject."""

    fail_once: set[tuple[str, int]] = field(default_factory=set)
    fail_always: set[tuple[str, int]] = field(default_factory=set)
    fail_twice: set[tuple[str, int]] = field(default_factory=set)
    runs: dict[str, list[tuple[int, float, float, bool]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    failed: set[tuple[str, int]] = field(default_factory=set)
    successes: int = 0

    async def handle(self, event: Event) -> None:
        start = time.monotonic()
        await anyio.sleep(random.uniform(0, 0.002))
        key = (event.account, event.seq)
        ok = key not in self.fail_always and (key not in self.fail_once or key in self.failed)
        if key in self.failed and key in self.fail_twice:
            ok = False
            self.fail_twice.discard(key)
        self.runs[event.account].append((event.seq, start, time.monotonic(), ok))
        if not ok:
            self.failed.add(key)
            raise RuntimeError(f"injected failure of {key}")
        self.successes += 1

    def check(self, *, dead: set[tuple[str, int]] = frozenset()) -> None:  # type: ignore[assignment]
        assert len(self.runs) == KEYS
        for key, runs in self.runs.items():
            by_start = sorted(runs, key=lambda run: run[1])
            for before, after in itertools.pairwise(by_start):
                assert after[1] >= before[2], f"key {key}: runs overlap: {before} and {after}"
            succeeded = [seq for seq, _, _, ok in by_start if ok]
            expected = [seq for seq in range(1, SEQ + 1) if (key, seq) not in dead]
            assert succeeded == expected, f"key {key}: ran {succeeded}, expected {expected}"


def events(seed: int) -> list[dict[str, str]]:
    """For each of KEYS keys, seq 1..SEQ: keys shuffled together, each key's in order."""
    rng = random.Random(seed)
    slots = [f"acct-{k}" for k in range(KEYS) for _ in range(SEQ)]
    rng.shuffle(slots)
    seen: defaultdict[str, int] = defaultdict(int)
    out = []
    for account in slots:
        seen[account] += 1
        out.append({"account": account, "seq": str(seen[account])})
    return out


async def produce(client: aioredis.Redis, stream: str, items: list[dict[str, str]]) -> None:
    for start in range(0, len(items), 1000):
        async with client.pipeline(transaction=False) as pipe:
            for item in items[start : start + 1000]:
                pipe.xadd(stream, item)  # type: ignore[arg-type]
            await pipe.execute()


async def _dead_letters(client: aioredis.Redis, names: Names) -> set[tuple[str, int]]:
    stream = f"{names.stream}:dead-letter"
    if not await client.exists(stream):
        return set()
    return {
        (fields["account"], int(fields["seq"]))
        for _, fields in await client.xrange(stream)
        if fields["!dlq:stream"] == names.stream and fields["!dlq:reason"] == "failed"
    }


def _account(event: Event) -> str:
    return event.account


# The key as a field name, and as a callable (whose decoded Struct the handler then gets).
@pytest.mark.parametrize("key", ["account", _account], ids=["field", "callable"])
async def test_keys_run_in_order_with_retries_and_dead_letters(
    redis_url: str, names: Names, client: aioredis.Redis, key: object
) -> None:
    items = events(seed=1)
    rng = random.Random(2)
    keys = [(item["account"], int(item["seq"])) for item in items]
    picked = rng.sample(keys, len(keys) // 50 + len(keys) // 500)
    runs = Runs(
        fail_once=set(picked[: len(keys) // 50]), fail_always=set(picked[len(keys) // 50 :])
    )
    await produce(client, names.stream, items)
    app = App(redis_url)
    app.consumer(
        names.stream,
        group=names.group,
        concurrency=64,
        key=key,  # type: ignore[arg-type]
        retry_delay=0.01,
        retry_max_delay=0.05,
        max_deliveries=3,
        pause_after_failures=None,
    )(runs.handle)
    expected = len(items) - len(runs.fail_always)
    async with app:
        await eventually(
            lambda: _true(runs.successes >= expected), timeout=60, what=f"{expected} successes"
        )
        await eventually(
            lambda: _count_is(client, f"{names.stream}:dead-letter", len(runs.fail_always)),
            timeout=20,
            what="the dead letters",
        )
    assert runs.successes == expected
    runs.check(dead=runs.fail_always)
    assert await _dead_letters(client, names) == runs.fail_always
    assert all(key in runs.failed for key in runs.fail_once)


async def _true(value: bool) -> bool:
    return value


async def _count_is(client: aioredis.Redis, stream: str, count: int) -> bool:
    return int(await client.xlen(stream)) == count if await client.exists(stream) else count == 0


async def test_a_restarted_consumer_keeps_the_order(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """Stopped mid-run, then started again under the same name: its own pending entries
    come first, and each key's order holds across the two runs."""
    items = events(seed=3)
    runs = Runs()
    await produce(client, names.stream, items)
    for round_ in range(2):
        # No grace period: the stop cancels what runs and leaves what waits pending.
        app = App(redis_url, grace_period=0.0)
        app.consumer(
            names.stream, group=names.group, consumer="same", concurrency=64, key="account"
        )(runs.handle)
        async with app:
            consumer = app.consumers[0]
            target = len(items) // 2 if round_ == 0 else len(items)
            await eventually(
                lambda: _true(runs.successes >= target),  # noqa: B023
                timeout=60,
                what=f"{target} successes",
            )
        if round_ == 0:
            left = await _pending(client, names)
            assert left > 0, "the stop left nothing pending"
            assert consumer.stats.given_back > 0
    assert runs.successes == len(items)
    runs.check()


async def test_entries_claimed_from_a_dead_consumer_run_first(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """Another consumer read the oldest entries and died with them pending: a keyed consumer
    claims them (claim_idle_ms) before it runs the newer entries of their keys."""
    items = events(seed=4)
    runs = Runs()
    await produce(client, names.stream, items)
    await client.xgroup_create(names.stream, names.group, id="0")
    taken = await client.xreadgroup(names.group, "dead", {names.stream: ">"}, count=300)
    assert len(taken[0][1]) == 300
    await anyio.sleep(0.3)
    app = App(redis_url)
    app.consumer(
        names.stream,
        group=names.group,
        consumer="alive",
        concurrency=64,
        key="account",
        claim_idle_ms=200,
    )(runs.handle)
    async with app:
        await eventually(
            lambda: _true(runs.successes >= len(items)), timeout=60, what="every entry"
        )
        # (At least: under load, an XAUTOCLAIM may also take back one of its own held
        # entries whose renewal came late; that one is not run twice.)
        assert app.consumers[0].figures().claimed >= 300
    assert not await client.xpending_range(names.stream, names.group, "-", "+", 10, "dead")
    runs.check()


async def test_retries_run_when_everything_held_waits_behind_failed_keys(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """Two keys, a small bound: their first entries fail twice, and every other entry held
    waits behind them (the consumer reads no more). The retries need no room: they run,
    and the keys go on in order."""
    items = [{"account": f"acct-{n % 2}", "seq": str(n // 2 + 1)} for n in range(200)]
    runs = Runs(fail_once={("acct-0", 1), ("acct-1", 1)})
    runs.fail_twice = {("acct-0", 1)}
    await produce(client, names.stream, items)
    app = App(redis_url)
    app.consumer(
        names.stream,
        group=names.group,
        concurrency=2,
        batch_size=4,
        key="account",
        retry_delay=0.05,
        retry_max_delay=0.1,
    )(runs.handle)
    async with app:
        ledger = app.consumers[0].ledger
        await eventually(
            lambda: _true(ledger.states().get("waiting") == ledger.limit - 2),
            timeout=10,
            what="everything else held waiting behind the two failed keys",
        )
        assert ledger.room() == 0
        assert isinstance(ledger, KeyedLedger)
        lanes = ledger.lanes()
        assert sorted(lanes) == [b"acct-0", b"acct-1"]
        holder, waiting = lanes[b"acct-0"]
        assert ledger.waits_behind(*waiting[0]) == (b"acct-0", holder[1].decode())
        await eventually(lambda: _true(runs.successes == 200), timeout=30, what="every entry")
    for key, runs_of_key in runs.runs.items():
        succeeded = [seq for seq, _, _, ok in runs_of_key if ok]
        assert succeeded == list(range(1, 101)), key


async def test_an_entry_without_a_key_is_dead_lettered_and_blocks_nothing(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await produce(
        client,
        names.stream,
        [
            {"account": "a", "seq": "1"},
            {"seq": "2"},  # no key field
            {"account": "a", "seq": "3"},
        ],
    )
    seen: list[str] = []
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group, key="account")
    async def handle(message: Message) -> None:
        seen.append(message.fields["seq"])

    async with app:
        await eventually(
            lambda: _count_is(client, f"{names.stream}:dead-letter", 1), what="a dead letter"
        )
        await eventually(lambda: _true(len(seen) == 2), what="the keyed entries")
    assert seen == ["1", "3"]
    ((_, letter),) = await client.xrange(f"{names.stream}:dead-letter")
    assert letter["!dlq:reason"] == "undecodable"
    assert "'account' (the key)" in letter["!dlq:message"] + letter["!dlq:error"]


async def test_a_key_callable_on_the_payload_and_a_batch_handler(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """A batch handler with `key=` gets at most one entry of a key per call, and each key's
    entries in order, call after call."""
    items = events(seed=5)[:2000]
    await produce(client, names.stream, items)
    calls: list[list[Event]] = []
    app = App(redis_url)

    @app.consumer(
        names.stream, group=names.group, key=lambda e: e.account, concurrency=4, batch_size=50
    )
    async def handle(batch: list[Event]) -> None:
        calls.append(batch)
        await anyio.sleep(0.001)

    async with app:
        await eventually(
            lambda: _true(sum(map(len, calls)) == len(items)), timeout=30, what="every entry"
        )
    order: defaultdict[str, list[int]] = defaultdict(list)
    for batch in calls:
        accounts = [event.account for event in batch]
        assert len(set(accounts)) == len(accounts), "two entries of one key in one call"
        for event in batch:
            order[event.account].append(event.seq)
    for account, seqs in order.items():
        assert seqs == list(range(1, len(seqs) + 1)), account


class Outcomes(Middleware):
    """Every settled call: (outcome, the seq fields of its entries)."""

    def __init__(self) -> None:
        self.settled_calls: list[tuple[Outcome, list[str]]] = []

    def settled(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
        seqs = [message.fields.get("seq", "?") for message in call.messages]
        self.settled_calls.append((outcome, seqs))


async def test_middleware_sees_each_outcome_in_key_order(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """What middleware is told stays true with key lanes: a retry, then the success of the
    same entry, then the next of its key; an entry without a key, dead-lettered."""
    await produce(
        client,
        names.stream,
        [{"account": "a", "seq": "1"}, {"seq": "x"}, {"account": "a", "seq": "2"}],
    )
    failed: set[str] = set()
    outcomes = Outcomes()
    app = App(redis_url)
    app.add_middleware(outcomes)

    @app.consumer(names.stream, group=names.group, key="account", retry_delay=0.01)
    async def handle(message: Message) -> None:
        if message.fields["seq"] == "1" and "1" not in failed:
            failed.add("1")
            raise RuntimeError("once")

    async with app:
        await eventually(lambda: _true(len(outcomes.settled_calls) == 4), what="four settled calls")
    keyed = [item for item in outcomes.settled_calls if item[1] != ["x"]]
    assert keyed == [("retried", ["1"]), ("acked", ["1"]), ("acked", ["2"])]
    assert ("dead_lettered", ["x"]) in outcomes.settled_calls


async def _pending(client: aioredis.Redis, names: Names) -> int:
    return int((await client.xpending(names.stream, names.group))["pending"])


# -- options -------------------------------------------------------------------------------


def test_key_must_be_a_field_name_or_a_callable() -> None:
    with pytest.raises(ConfigurationError, match="key"):
        ConsumerOptions("s", group="g", key="")
    with pytest.raises(ConfigurationError, match="key"):
        ConsumerOptions("s", group="g", key=3)  # type: ignore[arg-type]
    assert ConsumerOptions("s", group="g", key=len).key is len


async def _unused(message: Message) -> None:
    pass

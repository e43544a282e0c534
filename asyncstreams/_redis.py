"""The only module that speaks redis-py: the pool, reads, acks, groups and reply shapes.

Everything above this module works on plain values: stream names as str, entry ids as
bytes, an entry's fields as the flat `[name, value, ...]` list Redis sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any, NamedTuple

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import ConfigurationError, RedisUnavailableError
from .message import Entry
from .options import mask_url

Redis = aioredis.Redis

SOCKET_TIMEOUT = 5.0
# Errors after which the same command may succeed once Redis is back: connection loss,
# timeouts, a replica that became read-only in a failover, a server loading its dataset.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    BusyLoadingError,
    MasterDownError,
    TryAgainError,
    OSError,
)


def pack(args: tuple[str | int | float | bytes, ...]) -> bytes:
    """A command in RESP, packed in C (several times faster than redis-py's packer)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # stub: a 1-tuple
    return packed


def create_client(url: str, *, max_connections: int) -> Redis:
    """A client whose pool waits for a free connection instead of failing when all are busy."""
    try:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            # A command that failed on a dropped connection is sent again, twice at most;
            # longer outages are the consumer's to ride out, with its own backoff.
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
            client_name=f"asyncstreams-{os.getpid()}",
            # RESP2, which every supported server speaks the same way (redis-py 8 defaults
            # to RESP3); a `?protocol=3` in the URL wins, and the replies below allow for it.
            protocol=2,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"invalid Redis URL {mask_url(url)}: {exc}") from None
    return Redis.from_pool(pool)


async def exchange(
    conn: AbstractConnection, packed: bytes, replies: int = 1, timeout: float = SOCKET_TIMEOUT
) -> list[Any]:
    """Send packed commands on `conn` and read their `replies` replies, undecoded.

    Every reply is read before the first error reply is raised, so the connection stays
    clean; anything else that interrupts (a timeout, a cancellation, a lost connection)
    drops the connection, so no reply is ever left on one that is used again.
    """
    try:
        await conn.send_packed_command(packed, check_health=False)
        results: list[Any] = []
        error: ResponseError | None = None
        async with asyncio.timeout(timeout):
            for _ in range(replies):
                try:
                    results.append(
                        await conn.read_response(disable_decoding=True, timeout=math.inf)
                    )
                except ResponseError as exc:
                    error = error or exc
        if error is not None:
            raise error
        return results
    except ResponseError:
        raise
    except BaseException:
        await conn.disconnect(nowait=True)
        raise


async def raw(client: Redis, *args: str | int | bytes) -> Any:
    """One command through the pool, its reply as Redis sent it (no redis-py reply parsing)."""
    return (await raw_many(client, pack(args), 1))[0]


async def raw_many(client: Redis, packed: bytes, replies: int) -> list[Any]:
    """Several packed commands through one pooled connection; their replies, undecoded."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        return await exchange(conn, packed, replies)
    finally:
        await pool.release(conn)


def reserve_connections(client: Redis, total: int) -> None:
    """Let the pool grow to at least `total` connections (consumers registered late)."""
    pool = client.connection_pool
    pool.max_connections = max(pool.max_connections, total)


def describe(client: Redis) -> str:
    """Where `client` connects, for logs: host and port or socket path, never a password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


async def check_reachable(client: Redis) -> None:
    """PING, turning any failure into RedisUnavailableError naming the server."""
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise RedisUnavailableError(
            f"cannot reach Redis at {describe(client)}: {exc or type(exc).__name__}"
        ) from None


def is_group_gone(exc: BaseException) -> bool:
    """The group (NOGROUP) or its stream (Redis 7 ends a blocked read: UNBLOCKED) is gone."""
    return isinstance(exc, ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED"))


def is_transient(exc: BaseException) -> bool:
    """True for errors that go away by themselves: the same command will work later."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    # BUSY: a script is running; redis-py has no class for it.
    return isinstance(exc, ResponseError) and str(exc).startswith("BUSY ")


async def ensure_group(client: Redis, stream: str, group: str, start_id: str | bytes) -> bool:
    """Create `group` on `stream` at `start_id` (and the stream if missing); True if created."""
    try:
        await raw(client, "XGROUP", "CREATE", stream, group, start_id, "MKSTREAM")
    except ResponseError as exc:
        if str(exc).startswith("BUSYGROUP"):
            return False
        if str(exc).startswith("WRONGTYPE"):
            raise await _not_a_stream(client, stream) from None
        raise
    return True


async def _not_a_stream(client: Redis, stream: str) -> ConfigurationError:
    found = _text(await raw(client, "TYPE", stream))
    return ConfigurationError(f"key {stream!r}: expected a stream, found a {found}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def add(
    client: Redis,
    stream: str,
    payloads: list[Mapping[str, str | bytes]],
    *,
    maxlen: int | None,
    approximate: bool,
) -> list[str]:
    """XADD each field map to `stream`, pipelined 1000 at a time; returns the new entry ids.

    Raises RedisUnavailableError when Redis cannot be reached, ConfigurationError when the
    key holds something other than a stream.
    """
    head: tuple[str | int, ...] = ("XADD", stream)
    if maxlen is not None:
        head += ("MAXLEN", "~" if approximate else "=", maxlen)
    head += ("*",)
    ids: list[str] = []
    for start in range(0, len(payloads), 1000):
        chunk = payloads[start : start + 1000]
        packed = b"".join(pack((*head, *chain.from_iterable(f.items()))) for f in chunk)
        try:
            replies = await raw_many(client, packed, len(chunk))
        except (RedisError, OSError) as exc:
            if str(exc).startswith("WRONGTYPE"):
                raise await _not_a_stream(client, stream) from None
            if is_transient(exc):
                raise RedisUnavailableError(
                    f"cannot publish to {stream!r}: Redis at {describe(client)} is unavailable: "
                    f"{exc}"
                ) from exc
            raise
        ids += [_text(entry_id) for entry_id in replies]
    return ids


class Link:
    """A pool connection that one task keeps to itself for the commands it sends all the time.

    Commands are packed by hiredis. A command that fails or is cancelled before its reply is
    read drops the connection, so no unread reply is ever left on a connection that is used
    again; the next call connects afresh. Error replies leave the connection clean.
    """

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool
        self._conn: AbstractConnection | None = None
        self.client_id: int | None = None
        self.busy = False

    async def _connection(self) -> AbstractConnection:
        conn = self._conn
        if conn is not None and conn.is_connected:
            return conn
        if conn is None:
            conn = self._conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        else:
            await conn.connect()  # type: ignore[no-untyped-call]
        self.client_id = None
        try:
            await conn.send_command("CLIENT", "ID")
            self.client_id = int(await conn.read_response())
        except ResponseError:
            pass  # no permission for CLIENT ID: see GroupReader.unblock
        return conn

    async def call(self, packed: bytes, timeout: float = SOCKET_TIMEOUT, replies: int = 1) -> Any:
        """Send packed commands and return the last reply, undecoded.

        `replies` is how many commands `packed` holds; every reply is read before the first
        error reply is raised, so the connection stays clean.
        """
        conn = await self._connection()
        self.busy = True
        try:
            return (await exchange(conn, packed, replies, timeout))[-1]
        finally:
            self.busy = False

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.release(conn)


class GroupReader:
    """XREADGROUP for one consumer on a Link of its own.

    A blocking read holds its connection for up to BLOCK ms, so the reader never borrows a
    connection that acks or publishes are waiting for. The read timeout is BLOCK plus the
    socket timeout: a plain socket timeout shorter than BLOCK would cut every idle read.
    """

    def __init__(
        self, client: Redis, streams: Iterable[str], group: str, consumer: str, block_ms: int
    ) -> None:
        names = tuple(streams)
        self._link = Link(client)
        self._head: tuple[str, ...] = ("XREADGROUP", "GROUP", group, consumer, "COUNT")
        self._tail: tuple[str | int, ...] = ("BLOCK", block_ms, "STREAMS", *names)
        self._tail += tuple(">" for _ in names)
        self._timeout = block_ms / 1000 + SOCKET_TIMEOUT
        self._names = {name.encode(): name for name in names}
        # The last entry id read from each stream: where a deleted group is recreated.
        self.last_ids: dict[str, bytes] = {}

    @property
    def blocked(self) -> bool:
        """True from sending XREADGROUP until its reply is read."""
        return self._link.busy

    async def read(self, count: int) -> list[Entry]:
        """Entries never delivered to the group before, at most `count` per stream."""
        reply = await self._link.call(pack((*self._head, count, *self._tail)), self._timeout)
        if not reply:
            return []
        names = self._names
        # RESP2: [[stream, entries], ...]; RESP3: {stream: entries}.
        streams = reply.items() if isinstance(reply, dict) else reply
        result: list[Entry] = []
        for name, entries in streams:
            stream = names[name]
            result += [(stream, entry_id, flat, 1) for entry_id, flat in entries]
            if entries:
                self.last_ids[stream] = entries[-1][0]
        return result

    async def unblock(self, client: Redis) -> None:
        """Make a blocked read return now, empty, as if its BLOCK timed out (best effort).

        Without permission for CLIENT ID or CLIENT UNBLOCK the read just runs out its BLOCK.
        """
        client_id = self._link.client_id
        if self.blocked and client_id is not None:
            with contextlib.suppress(RedisError, OSError):
                await raw(client, "CLIENT", "UNBLOCK", client_id)

    async def close(self) -> None:
        await self._link.close()


class Acker:
    """XACK for one consumer, on a Link of its own: one XACK per stream, pipelined."""

    def __init__(self, client: Redis, group: str) -> None:
        self._link = Link(client)
        self._group = group

    async def ack(self, ids_by_stream: Mapping[str, list[bytes]]) -> None:
        group = self._group
        commands = [
            pack(("XACK", stream, group, *ids)) for stream, ids in ids_by_stream.items() if ids
        ]
        if commands:
            await self._link.call(b"".join(commands), replies=len(commands))

    async def close(self) -> None:
        await self._link.close()


# -- recovery: pending entries, claims, dead letters -------------------------------------


class Pending(NamedTuple):
    """One entry of a consumer's pending entries list (PEL), as XPENDING reports it."""

    id: bytes
    idle_ms: int
    deliveries: int


async def pending(
    client: Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    min_idle_ms: int,
    start: bytes | str = "-",
    end: bytes | str = "+",
    count: int,
) -> list[Pending]:
    """XPENDING ... IDLE: `consumer`'s pending entries idle at least `min_idle_ms`, by id."""
    reply = await raw(
        client, "XPENDING", stream, group, "IDLE", min_idle_ms, start, end, count, consumer
    )
    return [Pending(_bytes(entry_id), int(idle), int(count)) for entry_id, _, idle, count in reply]


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


# A claimed entry: its id and its fields.
Claimed = tuple[bytes, list[bytes]]


async def claim(
    client: Redis, stream: str, group: str, consumer: str, ids: list[bytes], *, min_idle_ms: int
) -> list[Claimed]:
    """XCLAIM `ids` still idle at least `min_idle_ms`: each delivery counter grows by one.

    Entries deleted (trimmed) while pending come back without fields on Redis 6.2 and not at
    all on Redis 7; either way they are left out here: see `missing`.
    """
    reply = await raw(client, "XCLAIM", stream, group, consumer, min_idle_ms, *ids)
    return [(_bytes(entry[0]), entry[1]) for entry in reply if entry and entry[1] is not None]


async def missing(client: Redis, stream: str, ids: list[bytes]) -> list[bytes]:
    """Those of `ids` no longer in the stream (deleted by XDEL, MAXLEN or XTRIM)."""
    gone = []
    for entry_id in ids:
        if not await raw(client, "XRANGE", stream, entry_id, entry_id):
            gone.append(entry_id)
    return gone


async def autoclaim(
    client: Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    min_idle_ms: int,
    cursor: bytes,
    count: int,
) -> tuple[bytes, list[Claimed], int]:
    """XAUTOCLAIM: (next cursor, claimed entries, how many were found deleted).

    Redis 7 drops deleted entries from the PEL itself and lists their ids; Redis 6.2 replies
    nil for them and leaves them pending on this consumer, for its own sweep to find and
    count (so they are not counted here).
    """
    reply = await raw(
        client, "XAUTOCLAIM", stream, group, consumer, min_idle_ms, cursor, "COUNT", count
    )
    entries = [(_bytes(entry[0]), entry[1]) for entry in reply[1] if entry and entry[1] is not None]
    deleted = len(reply[2]) if len(reply) > 2 else 0
    return _bytes(reply[0]), entries, deleted


async def renew(
    client: Redis, stream: str, group: str, consumer: str, ids: list[bytes]
) -> set[bytes]:
    """Reset the idle time of `ids` without counting a delivery (XCLAIM ... JUSTID).

    Returns those still pending (the others were acked meanwhile).
    """
    reply = await raw(client, "XCLAIM", stream, group, consumer, 0, *ids, "JUSTID")
    return {_bytes(entry_id) for entry_id in reply}


async def ack_one(client: Redis, stream: str, group: str, ids: list[bytes]) -> None:
    await raw(client, "XACK", stream, group, *ids)


async def transaction(client: Redis, *commands: tuple[str | bytes, ...]) -> list[Any]:
    """MULTI, `commands`, EXEC on one pooled connection; the results EXEC returns.

    MULTI goes first, on its own, and must answer OK: were it refused (an ACL without
    +multi), the commands sent after it would run one by one, not as a transaction. A
    command refused while queued aborts the whole transaction (EXECABORT). A command that
    fails while EXEC runs does not stop the others: its result is the error.
    """
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await exchange(conn, pack(("MULTI",)))
        packed = b"".join(pack(command) for command in commands) + pack(("EXEC",))
        replies = await exchange(conn, packed, len(commands) + 1)
    finally:
        await pool.release(conn)
    results: list[Any] = replies[-1]
    return results


async def move(
    client: Redis,
    stream: str,
    group: str,
    consumer: str,
    entry_id: bytes,
    target: str,
    fields: list[bytes | str],
) -> None:
    """XADD `fields` to `target` and XACK `entry_id`, in one MULTI: never both, never neither.

    If the XADD fails as the transaction runs (the target holds another type, say), the
    XACK has run all the same: the entry is put back in the PEL (XCLAIM ... FORCE) and the
    error raised, so it stays pending.
    """
    added, acked = await transaction(
        client, ("XADD", target, "*", *fields), ("XACK", stream, group, entry_id)
    )
    if isinstance(added, ResponseError):
        if acked:
            await raw(client, "XCLAIM", stream, group, consumer, 0, entry_id, "FORCE", "JUSTID")
        raise added


class ConsumerInfo(NamedTuple):
    name: str
    pending: int
    idle_ms: int


async def consumers(client: Redis, stream: str, group: str) -> list[ConsumerInfo]:
    """XINFO CONSUMERS: each consumer of the group, its pending count and idle time."""
    reply = await raw(client, "XINFO", "CONSUMERS", stream, group)
    result = []
    for item in reply:
        info = dict(zip(item[::2], item[1::2], strict=True)) if isinstance(item, list) else item
        info = {_text(key): value for key, value in info.items()}
        result.append(ConsumerInfo(_text(info["name"]), int(info["pending"]), int(info["idle"])))
    return result


async def delete_consumer(client: Redis, stream: str, group: str, name: str) -> int:
    """XGROUP DELCONSUMER; returns how many pending entries it dropped (we only ask at 0)."""
    return int(await raw(client, "XGROUP", "DELCONSUMER", stream, group, name))


async def entries(client: Redis, stream: str, *, after: bytes | str, count: int) -> list[Claimed]:
    """XRANGE: up to `count` entries of `stream` after id `after` ("-" for the first)."""
    start = after if after == "-" else b"(" + _bytes(after)
    reply = await raw(client, "XRANGE", stream, start, "+", "COUNT", count)
    return [(_bytes(entry_id), flat) for entry_id, flat in reply]


async def move_back(
    client: Redis,
    source: str,
    entry_id: bytes,
    source_fields: list[bytes],
    target: str,
    fields: list[bytes],
) -> str:
    """XADD `fields` to `target` and XDEL `entry_id` (whose fields are `source_fields`)
    from `source`, in one MULTI. If the XADD fails as it runs, the XDEL has run all the
    same: the entry is added back to `source` (under a new id) and the error raised."""
    new_id, _ = await transaction(
        client, ("XADD", target, "*", *fields), ("XDEL", source, entry_id)
    )
    if isinstance(new_id, ResponseError):
        await raw(client, "XADD", source, "*", *source_fields)
        raise new_id
    return _text(new_id)

"""How asyncstreams talks to Redis: the pool, held connections, packed exchanges, and what
an error means (gone for good, or worth riding out).

Commands are packed by hiredis and their replies read undecoded; what the replies mean is
_commands.py's business. Nothing above these two modules imports redis-py.
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    MasterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import ConfigurationError, RedisRefusedError, RedisUnavailableError
from .options import mask_url

Redis = aioredis.Redis

SOCKET_TIMEOUT = 5.0
# Errors after which the same command may succeed later: connection loss, timeouts, a
# replica that became read-only in a failover, a server loading its dataset or full
# (maxmemory: reads and XACK still work, and memory frees up as streams are trimmed).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    BusyLoadingError,
    MasterDownError,
    TryAgainError,
    OutOfMemoryError,
    OSError,
)
# A wrong password or a missing permission does not fix itself.
REFUSALS: tuple[type[BaseException], ...] = (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
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


def command_name(packed: bytes) -> str:
    """The name of the first command in `packed` (for error messages)."""
    parts = packed.split(b"\r\n", 3)
    return parts[2].decode(errors="replace") if len(parts) > 2 else "a command"


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
    except TimeoutError:
        await conn.disconnect(nowait=True)
        raise RedisTimeoutError(
            f"no reply to {command_name(packed)} within {timeout:g} s"
        ) from None
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


def explain(exc: BaseException) -> str:
    """`Type: message`, never empty: what went wrong, for a log line."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def check_reachable(client: Redis) -> None:
    """PING: RedisRefusedError when Redis refuses the login, RedisUnavailableError when it
    cannot be reached; both name the server, never a password."""
    try:
        await raw(client, "PING")
    except REFUSALS as exc:
        raise refused(client, exc) from None
    except (RedisError, OSError) as exc:
        raise RedisUnavailableError(
            f"cannot reach Redis at {describe(client)}: {explain(exc)}"
        ) from None


def refused(client: Redis, exc: BaseException) -> RedisRefusedError:
    """The start-up error for a Redis that answers but will not serve the app."""
    where = describe(client)
    user = client.connection_pool.connection_kwargs.get("username") or "default"
    if isinstance(exc, AuthenticationError):
        return RedisRefusedError(
            f"authentication failed at Redis {where} as user {user!r}: {exc}; expected the "
            "user name and password of the URL to be right"
        )
    if isinstance(exc, ReadOnlyError):
        return RedisRefusedError(
            f"Redis at {where} is a read-only replica ({exc}); expected the URL of the primary"
        )
    return RedisRefusedError(f"Redis at {where} refused user {user!r}: {explain(exc)}")


def refuses(exc: BaseException) -> bool:
    """Whether `exc` means Redis will not serve the app as configured: a refused login or
    command, or a read-only replica (as the app starts: later, READONLY is a failover)."""
    return isinstance(exc, (*REFUSALS, ReadOnlyError))


def is_group_gone(exc: BaseException) -> bool:
    """The group (NOGROUP) or its stream (Redis 7 ends a blocked read: UNBLOCKED) is gone."""
    return isinstance(exc, ResponseError) and str(exc).startswith(("NOGROUP", "UNBLOCKED"))


def is_transient(exc: BaseException) -> bool:
    """True for errors that go away by themselves: the same command will work later."""
    if isinstance(exc, REFUSALS):
        return False
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    # BUSY: a script is running; redis-py has no class for it.
    return isinstance(exc, ResponseError) and str(exc).startswith("BUSY ")


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

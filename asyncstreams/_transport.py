"""How asyncstreams talks to one Redis server: the pool, packed exchanges, and what an error
means (gone for good, or worth riding out).

Commands are packed by hiredis and their replies read undecoded; which server a key lives on
is _nodes.py's business, what the replies mean _commands.py's. The runtime above those three
imports nothing of redis-py but its exceptions (the CLI and the embedded servers' set-up use
its client directly).
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
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
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
# (maxmemory: reads and XACK still work, and memory frees up as streams are trimmed), a
# cluster failing over or moving slots faster than a command follows them (CLUSTERDOWN,
# TRYAGAIN, MOVED or ASK after MAX_REDIRECTS).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    AskError,
    ClusterDownError,
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


def text(value: bytes | str) -> str:
    """A reply's bytes (a stream name, an id, a type) as str; a str as it is (RESP3, or a
    decoding client)."""
    return value.decode() if isinstance(value, bytes) else value


def command_name(packed: bytes) -> str:
    """The name of the first command in `packed` (for error messages)."""
    parts = packed.split(b"\r\n", 3)
    return parts[2].decode(errors="replace") if len(parts) > 2 else "a command"


async def exchange(
    conn: AbstractConnection,
    packed: bytes,
    replies: int = 1,
    timeout: float = SOCKET_TIMEOUT,
    *,
    raise_errors: bool = True,
) -> list[Any]:
    """Send packed commands on `conn` and read their `replies` replies, undecoded.

    Every reply is read before the first error reply is raised (or, with
    `raise_errors=False`, returned in its place as a ResponseError), so the connection stays
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
                    if not raise_errors:
                        results.append(exc)
        if error is not None and raise_errors:
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
    """One command through the pool, its reply as Redis sent it (no redis-py reply parsing).

    For commands about a key, see `Nodes.raw`, which finds the server that holds it."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        return (await exchange(conn, pack(args)))[0]
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


async def ping(url: str, timeout: float) -> None:
    """PING on a connection of its own, opened for it and closed after it, all within
    `timeout` seconds (RedisTimeoutError past it; connecting is not retried): not one of an
    app's pool, which its handlers may all be using. For health checks."""
    client = Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        client_name=f"asyncstreams-health-{os.getpid()}",
        protocol=2,
    )
    try:
        async with asyncio.timeout(timeout):
            await raw(client, "PING")
    except TimeoutError:
        raise RedisTimeoutError(f"no reply to PING within {timeout:g} s") from None
    finally:
        await client.aclose()


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

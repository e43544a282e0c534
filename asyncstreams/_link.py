"""A connection one task keeps to itself for the commands it sends all the time (a
consumer's blocking reads, its acks), to the server of one key."""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import AskError, MovedError, ResponseError

from ._nodes import MAX_REDIRECTS, Nodes, send_on
from ._transport import SOCKET_TIMEOUT, Redis, exchange, pack


class Link:
    """A connection that one task keeps to itself for the commands it sends all the time,
    to the server of `key` (on a cluster it follows the key's slot to its new owner).

    Commands are packed by hiredis. A command that fails or is cancelled before its reply is
    read drops the connection, so no unread reply is ever left on a connection that is used
    again; the next call connects afresh. Error replies leave the connection clean.
    """

    def __init__(self, nodes: Nodes, key: str) -> None:
        self._nodes = nodes
        self._key = key
        self._conn: AbstractConnection | None = None
        self._pool: ConnectionPool | None = None
        self.client_id: int | None = None
        self.busy = False

    async def unblock(self) -> None:
        """CLIENT UNBLOCK the held connection, on the server it is connected to (which, on
        a cluster, may no longer own the key's slot). Nothing without its CLIENT ID."""
        pool, client_id = self._pool, self.client_id
        if pool is None or client_id is None:
            return
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await exchange(conn, pack(("CLIENT", "UNBLOCK", client_id)))
        finally:
            await pool.release(conn)

    @property
    def client(self) -> Redis:
        """The client of the server the link talks to now."""
        return self._nodes.client(self._key)

    async def _connection(self) -> AbstractConnection:
        pool = self.client.connection_pool
        conn = self._conn
        if conn is not None and self._pool is pool and conn.is_connected:
            return conn
        if conn is None or self._pool is not pool:
            await self.close()
            conn = self._conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            self._pool = pool
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
        error reply is raised, so the connection stays clean. A MOVED reply sends them
        again, to the slot's new owner; an ASK reply, once to the node named.
        """
        for redirects in range(MAX_REDIRECTS + 1):
            self.busy = True
            try:
                conn = await self._connection()
                return (await exchange(conn, packed, replies, timeout))[-1]
            except MovedError as exc:
                if not self._nodes.cluster:
                    raise self._nodes.not_followed(exc) from None
                if redirects == MAX_REDIRECTS:
                    raise
                self._nodes.moved(exc)
            except AskError as exc:
                if not self._nodes.cluster:
                    raise
                if replies != 1:
                    raise
                target = self._nodes.client_at(exc.host, exc.port)
                reply = (await send_on(target.connection_pool, [packed], True, timeout))[0]
                if isinstance(reply, ResponseError):
                    raise reply from None
                return reply
            except Exception as exc:
                self._nodes.suspect(exc)
                raise
            finally:
                self.busy = False
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pool is not None:
            await self._pool.release(conn)

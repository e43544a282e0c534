"""Which Redis server a key lives on: the one server of the URL, or, on a Redis Cluster, the
master that owns the key's hash slot.

Every command asyncstreams sends names the key it is about, and goes through `Nodes`:

- on one server, to its one client (nothing else happens: the hot path stays as it was);
- on a cluster, to the client of the master of the key's slot, from a slot map read with
  CLUSTER SLOTS. A MOVED reply updates that slot and sends the command again, to its new
  owner; an ASK reply (a slot being migrated) sends it once to the node named, after
  ASKING. A lost connection or a failover (CLUSTERDOWN, TRYAGAIN, READONLY) re-reads the
  map in the background, at most every MAP_REFRESH_INTERVAL: the caller rides the error
  out as an outage and finds the new owner when it tries again, at once if it waits on
  `map_changed`.

A command is only sent again when Redis did not run it: MOVED and ASK replies say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any, TypeVar

from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool
from redis.exceptions import (
    AskError,
    MovedError,
    NoPermissionError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from ._slots import SLOTS, key_slot
from ._transport import (
    SOCKET_TIMEOUT,
    Redis,
    describe,
    exchange,
    explain,
    is_transient,
    pack,
    raw,
    reserve_connections,
)
from .errors import ConfigurationError, RedisRefusedError

log = logging.getLogger("asyncstreams")

T = TypeVar("T")


# The most redirections one command follows before its error is raised (a slot map that
# keeps changing under it is an outage, ridden out by the caller).
MAX_REDIRECTS = 5
# The shortest time between two reads of the slot map after errors.
MAP_REFRESH_INTERVAL = 0.5
# How long one node may take to answer CLUSTER SLOTS before the next is asked.
MAP_READ_TIMEOUT = 1.0
_ASKING = pack(("ASKING",))


@lru_cache(maxsize=4096)
def slot_of(key: str) -> int:
    """The hash slot of `key` (cached: the keys asyncstreams uses are a few stream names)."""
    return key_slot(key)


class Nodes:
    """The servers of one URL: one, or the masters of a cluster (see the module's doc)."""

    def __init__(self, seed: Redis) -> None:
        self.seed = seed
        # On a cluster: the client of the master of each slot; None on one server.
        self._slots: list[Redis] | None = None
        self._clients: dict[tuple[str, int], Redis] = {}
        # The map as CLUSTER SLOTS last gave it (MOVED replies patch `_slots`, not this).
        self._last_read: list[Redis] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        # The last read of the map found slots without a master (a failover under way).
        self._incomplete = False
        self._closed = False
        # Why the URL is taken for one server though it may not be: "cluster=False", or
        # CLUSTER SLOTS refused by an ACL (its error); None when the server said so itself.
        self.single_because: str | None = None
        self._watchers: list[asyncio.Future[None]] = []

    @property
    def cluster(self) -> bool:
        return self._slots is not None

    def client(self, key: str) -> Redis:
        """The client of the server that holds `key` now."""
        slots = self._slots
        return self.seed if slots is None else slots[slot_of(key)]

    def clients(self) -> list[Redis]:
        """One client per server: the masters of a cluster, or the one server."""
        slots = self._slots
        return [self.seed] if slots is None else list(dict.fromkeys(slots))

    def same_slot(self, key: str, other: str) -> bool:
        """Whether one transaction or script may use both keys."""
        return self._slots is None or slot_of(key) == slot_of(other)

    def slot_groups(self, keys: Iterable[str]) -> list[tuple[str, ...]]:
        """`keys` in groups that one command may name together: all of them on one server,
        those of each hash slot on a cluster (in the order given)."""
        keys = tuple(keys)
        if self._slots is None:
            return [keys]
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(slot_of(key), []).append(key)
        return [tuple(group) for group in groups.values()]

    def reserve(self, total: int) -> None:
        """Let each server's pool grow to at least `total` connections."""
        reserve_connections(self.seed, total)
        for client in self._clients.values():
            reserve_connections(client, total)

    def describe(self) -> str:
        """Where the URL points, for logs (never a password)."""
        where = describe(self.seed)
        if self._slots is None:
            return where
        return f"{where} (a Redis Cluster of {len(self.clients())} masters)"

    def not_followed(self, exc: MovedError) -> ConfigurationError | RedisRefusedError:
        """A MOVED reply while the URL is taken for one server: it is a node of a Redis
        Cluster after all. Not an outage to ride out: it lasts until the configuration
        changes."""
        found = (
            f"Redis at {describe(self.seed)} is a node of a Redis Cluster (it answered "
            f"MOVED {exc.slot_id} {exc.host}:{exc.port}, so it is not one server)"
        )
        if self.single_because is None or self.single_because == "cluster=False":
            return ConfigurationError(
                f"{found}, but the app was told it is not one (cluster=False); expected "
                "cluster=None or cluster=True"
            )
        return slots_refused(self.seed, self.single_because, found)

    # -- commands ----------------------------------------------------------------------

    async def raw(self, key: str, *args: str | int | bytes) -> Any:
        """One command about `key`, on the server that holds it; its reply undecoded."""
        return (await self.pipeline(key, [pack(args)]))[0]

    async def pipeline(self, key: str, commands: Sequence[bytes]) -> list[Any]:
        """Packed commands about keys of `key`'s slot, on one connection to its server; the
        first error reply is raised once every reply is read.

        Sent again only when Redis ran none of them: MOVED and ASK come for the slot, so for
        each command alike. (Were a slot to move between two of them, a TryAgainError is
        raised, and the caller rides it out as an outage: no command runs twice.)"""

        async def run(pool: ConnectionPool, asking: bool) -> list[Any]:
            replies = await send_on(pool, commands, asking)
            moved = [isinstance(reply, AskError) for reply in replies]
            if any(moved) and not all(moved):
                raise TryAgainError(
                    f"slot of {key!r} moved during a pipeline: expected one node to answer "
                    f"all {len(replies)} commands, {sum(moved)} were redirected"
                )
            errors = [reply for reply in replies if isinstance(reply, ResponseError)]
            if errors:
                raise errors[0]
            return replies

        return await self.on_node(key, run)

    async def send(self, commands: Sequence[tuple[str, bytes]]) -> list[Any]:
        """(key, packed command) pairs, each on the server of its key: one pipeline per
        server, the servers at once. The replies in order, error replies in place as
        ResponseErrors. A command answered MOVED or ASK (so not run) is sent again to the
        node named; the others are not."""
        if self._slots is None:
            replies = await send_on(self.seed.connection_pool, [c for _, c in commands], False)
            for reply in replies:
                if isinstance(reply, MovedError):
                    raise self.not_followed(reply)
            return replies
        results: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        asked: dict[int, Redis] = {}
        for redirects in range(MAX_REDIRECTS + 1):
            groups: dict[tuple[Redis, bool], list[int]] = {}
            for index in todo:
                target = asked.pop(index, None)
                place = (target, True) if target else (self.client(commands[index][0]), False)
                groups.setdefault(place, []).append(index)
            outcomes = await asyncio.gather(
                *(
                    send_on(client.connection_pool, [commands[i][1] for i in indexes], asking)
                    for (client, asking), indexes in groups.items()
                ),
                return_exceptions=True,
            )
            todo = []
            for indexes, outcome in zip(groups.values(), outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    self.suspect(outcome)
                    raise outcome
                for index, reply in zip(indexes, outcome, strict=True):
                    results[index] = reply
                    if self._slots is None and isinstance(reply, MovedError):
                        raise self.not_followed(reply)
                    if self._slots is None or redirects == MAX_REDIRECTS:
                        continue
                    if isinstance(reply, MovedError):
                        self.moved(reply)
                        todo.append(index)
                    elif isinstance(reply, AskError):
                        asked[index] = self.client_at(reply.host, reply.port)
                        todo.append(index)
            if not todo:
                break
        return results

    async def transaction(self, key: str, *commands: tuple[str | bytes, ...]) -> list[Any]:
        """MULTI, `commands` (keys of `key`'s slot), EXEC; the results EXEC returns.

        MULTI goes first, on its own, and must answer OK: were it refused (an ACL without
        +multi), the commands sent after it would run one by one, not as a transaction. A
        command refused while queued aborts the whole transaction (EXECABORT). A command
        that fails while EXEC runs does not stop the others: its result is the error.
        """

        async def run(pool: ConnectionPool, asking: bool) -> list[Any]:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                # ASKING holds for a whole MULTI ... EXEC (Redis keeps it inside MULTI).
                await exchange(conn, (_ASKING if asking else b"") + pack(("MULTI",)), 1 + asking)
                packed = b"".join(pack(command) for command in commands) + pack(("EXEC",))
                replies = await exchange(conn, packed, len(commands) + 1)
            finally:
                await pool.release(conn)
            results: list[Any] = replies[-1]
            return results

        return await self.on_node(key, run)

    async def on_node(self, key: str, call: Callable[[ConnectionPool, bool], Awaitable[T]]) -> T:
        """`call(pool, asking)` on the server of `key`, following MOVED and ASK replies;
        `asking`: send ASKING first, on the same connection."""
        client = self.client(key)
        asking = False
        for redirects in range(MAX_REDIRECTS + 1):
            try:
                return await call(client.connection_pool, asking)
            except MovedError as exc:
                if self._slots is None:
                    raise self.not_followed(exc) from None
                if redirects == MAX_REDIRECTS:
                    raise
                client = self.moved(exc)
                asking = False
            except AskError as exc:
                if self._slots is None or redirects == MAX_REDIRECTS:
                    raise
                client = self.client_at(exc.host, exc.port)
                asking = True
            except Exception as exc:
                self.suspect(exc)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the slot map ------------------------------------------------------------------

    async def map_changed(self) -> None:
        """Return once a read of the slot map finds a slot with a new master (never, on one
        server): a command waiting out an outage may try the new master at once."""
        watcher = asyncio.get_running_loop().create_future()
        self._watchers.append(watcher)
        try:
            await watcher
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def moved(self, exc: MovedError) -> Redis:
        """A MOVED reply: the slot's new owner, now and for every later command; the rest of
        the map is read again soon (a resharding moves more than one slot)."""
        assert self._slots is not None
        client = self.client_at(exc.host, exc.port)
        self._slots[exc.slot_id] = client
        self._refresh_soon()
        return client

    def suspect(self, exc: BaseException) -> None:
        """An error that may mean the map changed (a node down, a failover): read it again
        soon."""
        if self._slots is not None and is_transient(exc):
            self._refresh_soon()

    def _refresh_soon(self) -> None:
        if self._closed:
            return
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(
                self._refresh_later(), name="asyncstreams cluster map"
            )

    async def _refresh_later(self) -> None:
        """Read the map (no sooner than MAP_REFRESH_INTERVAL after the last read), and again
        while it has slots without a master."""
        while True:
            delay = self._refreshed_at + MAP_REFRESH_INTERVAL - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
            with contextlib.suppress(RedisError, OSError):
                await self.refresh()
            if not self._incomplete:
                return

    async def refresh(self) -> None:
        """Read the slot map from the first node that answers (the URL's first), giving
        each MAP_READ_TIMEOUT: a node that is down or paused is skipped soon."""
        self._refreshed_at = time.monotonic()
        error: BaseException | None = None
        for client in dict.fromkeys([self.seed, *self._clients.values()]):
            try:
                async with asyncio.timeout(MAP_READ_TIMEOUT):
                    reply = await raw(client, "CLUSTER", "SLOTS")
            except (RedisError, OSError) as exc:  # TimeoutError is an OSError
                error = exc
                continue
            self._apply(reply, describe(client))
            return
        assert error is not None
        raise error

    def _apply(self, reply: list[Any], answered: str) -> None:
        slots: list[Redis | None] = [None] * SLOTS
        seed_host = self.seed.connection_pool.connection_kwargs.get("host", "localhost")
        for start, end, master, *_replicas in reply:
            host = master[0].decode() if isinstance(master[0], bytes) else master[0]
            # An empty or "?" host: the node does not know its own address; it is the one
            # that answered, on the URL's host.
            client = self.client_at(host if host not in ("", "?") else seed_host, int(master[1]))
            slots[int(start) : int(end) + 1] = [client] * (int(end) - int(start) + 1)
        uncovered = slots.count(None)
        if uncovered:
            # A slot no master owns (the cluster is failing over): keep its last owner,
            # whose error the caller rides out until the map is whole again.
            previous = self._slots
            for slot, owner in enumerate(slots):
                if owner is None and previous is not None:
                    slots[slot] = previous[slot]
            if slots.count(None):
                raise ConfigurationError(
                    f"the Redis Cluster at {answered} has {uncovered} of {SLOTS} hash slots "
                    "without a master; expected every slot assigned (CLUSTER ADDSLOTS)"
                )
            self._incomplete = True
        else:
            self._incomplete = False
        # Compared with the map as last read, not as MOVED replies have patched it since:
        # a slot whose move a MOVED reply told of first has a new master all the same.
        last_read, self._last_read = self._last_read, slots  # type: ignore[assignment]
        changed = last_read is not None and sum(
            a is not b for a, b in zip(last_read, slots, strict=True)
        )
        self._slots = list(slots)  # type: ignore[arg-type]  # no None left: checked above
        if changed:
            watchers, self._watchers = self._watchers, []
            for watcher in watchers:
                if not watcher.done():
                    watcher.set_result(None)
            log.info(
                "Redis Cluster: %d hash slots have a new master (map read from %s)",
                changed,
                answered,
            )

    def client_at(self, host: str, port: int) -> Redis:
        """The client of the node at host:port, made like the URL's (its password, TLS and
        timeouts), with a pool of its own."""
        client = self._clients.get((host, port))
        if client is None:
            pool = self.seed.connection_pool
            kwargs = {**pool.connection_kwargs, "host": host, "port": port}
            client = Redis.from_pool(
                BlockingConnectionPool(
                    connection_class=pool.connection_class,
                    max_connections=pool.max_connections,
                    **kwargs,
                )
            )
            self._clients[(host, port)] = client
        return client

    async def aclose(self) -> None:
        self._closed = True
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            await client.aclose()


async def send_on(
    pool: ConnectionPool,
    commands: Sequence[bytes],
    asking: bool,
    timeout: float = SOCKET_TIMEOUT,
) -> list[Any]:
    """Packed commands on one pooled connection; their replies, error replies in place.
    `asking`: each after ASKING (which holds for one command). `timeout`: for all the
    replies (a blocking read's is its BLOCK and more)."""
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        if asking:
            packed = b"".join(_ASKING + command for command in commands)
            replies = await exchange(conn, packed, 2 * len(commands), timeout, raise_errors=False)
            for refused in replies[0::2]:
                if isinstance(refused, ResponseError):
                    # ASKING itself (an ACL without +asking): the migration is waited out
                    # as an outage, and the log says why.
                    raise TryAgainError(
                        f"ASKING refused ({refused}); expected +asking in the ACL, to follow "
                        "a slot being migrated"
                    )
            return replies[1::2]
        packed = b"".join(commands)
        return await exchange(conn, packed, len(commands), timeout, raise_errors=False)
    finally:
        await pool.release(conn)


def slots_refused(seed: Redis, why: str, found: str) -> RedisRefusedError:
    """CLUSTER SLOTS refused by the ACL of the URL's user (`why`), where it is needed."""
    user = seed.connection_pool.connection_kwargs.get("username") or "default"
    return RedisRefusedError(
        f"{found}: user {user!r} may not run CLUSTER SLOTS ({why}); expected +cluster|slots "
        "in its ACL, so that asyncstreams finds the master of each stream"
    )


async def discover(seed: Redis, *, cluster: bool | None) -> Nodes:
    """The servers behind `seed`'s URL. `cluster`: None to ask the server (CLUSTER SLOTS is
    refused by a server that is not in a cluster, or by an ACL without +cluster|slots: both
    mean one server), True to require a cluster, False to never ask."""
    nodes = Nodes(seed)
    if cluster is False:
        nodes.single_because = "cluster=False"
        return nodes
    try:
        reply = await raw(seed, "CLUSTER", "SLOTS")
    except NoPermissionError as exc:
        if cluster:
            raise slots_refused(seed, explain(exc), f"Redis at {describe(seed)}") from None
        # One server, or a cluster whose first MOVED reply says so: see `not_followed`.
        nodes.single_because = explain(exc)
        return nodes
    except ResponseError as exc:
        if cluster or "cluster support disabled" not in str(exc):
            if cluster:
                raise ConfigurationError(
                    f"expected a Redis Cluster at {describe(seed)}, found a server that is "
                    f"not in one ({explain(exc)})"
                ) from None
            raise
        return nodes
    nodes._apply(reply, describe(seed))
    log.info("Redis Cluster at %s: %d masters", describe(seed), len(nodes.clients()))
    return nodes

"""The Redis commands asyncstreams sends, and their replies as plain values (the moves to
and from the dead-letter stream are _moves.py's).

Stream names are str, entry ids bytes, an entry's fields the flat `[name, value, ...]` list
Redis sends. RESP2 and RESP3 reply shapes, NOGROUP and WRONGTYPE are dealt with here; which
server a key lives on is _nodes.py's business, the connections and what an error means
_transport.py's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import NamedTuple

from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from ._link import Link
from ._nodes import Nodes
from ._transport import SOCKET_TIMEOUT, explain, is_transient, pack, text
from .errors import ConfigurationError, RedisUnavailableError
from .message import Entry, entry


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


# -- groups and publishing ---------------------------------------------------------------


async def ensure_group(nodes: Nodes, stream: str, group: str, start_id: str | bytes) -> bool:
    """Create `group` on `stream` at `start_id` (and the stream if missing); True if created.

    XGROUP CREATE is refused while Redis is full (maxmemory) even when the group exists, so
    then the group is looked for instead: a consumer of an existing group starts, and drains
    the stream, however full Redis is.
    """
    try:
        await nodes.raw(stream, "XGROUP", "CREATE", stream, group, start_id, "MKSTREAM")
    except OutOfMemoryError:
        if await group_exists(nodes, stream, group):
            return False
        raise
    except ResponseError as exc:
        if str(exc).startswith("BUSYGROUP"):
            return False
        if str(exc).startswith("WRONGTYPE"):
            raise await _not_a_stream(nodes, stream) from None
        raise
    return True


async def group_exists(nodes: Nodes, stream: str, group: str) -> bool:
    """Whether `group` exists on `stream` (XPENDING's summary: NOGROUP if it does not)."""
    try:
        await nodes.raw(stream, "XPENDING", stream, group)
    except ResponseError as exc:
        if str(exc).startswith("NOGROUP"):
            return False
        raise
    return True


async def key_type(nodes: Nodes, key: str) -> str:
    """TYPE: "stream", "none" (no such key), "string"..."""
    return text(await nodes.raw(key, "TYPE", key))


async def length(nodes: Nodes, stream: str) -> int:
    """XLEN: how many entries `stream` holds."""
    return int(await nodes.raw(stream, "XLEN", stream))


async def _not_a_stream(nodes: Nodes, stream: str) -> ConfigurationError:
    found = await key_type(nodes, stream)
    return ConfigurationError(f"key {stream!r}: expected a stream, found a {found}")


async def add(
    nodes: Nodes,
    entries: Sequence[tuple[str, Sequence[str | bytes]]],
    *,
    maxlen: int | None,
    approximate: bool,
) -> list[str]:
    """XADD each (stream, fields as name, value, name, value...), pipelined 1000 at a time
    (on a cluster, each server's share in a pipeline of its own, the servers at once);
    returns the new entry ids.

    Raises RedisUnavailableError when Redis cannot be reached, ConfigurationError when a
    key holds something other than a stream.
    """
    trim: tuple[str | int, ...] = ()
    if maxlen is not None:
        trim = ("MAXLEN", "~" if approximate else "=", maxlen)
    ids: list[str] = []
    for start in range(0, len(entries), 1000):
        chunk = entries[start : start + 1000]
        commands = [
            (stream, pack(("XADD", stream, *trim, "*", *fields))) for stream, fields in chunk
        ]
        try:
            replies = await nodes.send(commands)
            for (stream, _), reply in zip(chunk, replies, strict=True):
                if isinstance(reply, ResponseError):
                    if str(reply).startswith("WRONGTYPE"):
                        raise await _not_a_stream(nodes, stream) from None
                    raise reply
        except (RedisError, OSError) as exc:
            if is_transient(exc):
                raise RedisUnavailableError(
                    f"cannot publish to {chunk[0][0]!r}: Redis at {nodes.describe()} is "
                    f"unavailable: {explain(exc)}"
                ) from exc
            raise
        ids += [text(entry_id) for entry_id in replies]
    return ids


# -- reading and acking ------------------------------------------------------------------


class GroupReader:
    """XREADGROUP for one consumer on a Link of its own, over streams one command may name
    together (on a cluster, the streams of one hash slot).

    A blocking read holds its connection for up to BLOCK ms, so the reader never borrows a
    connection that acks or publishes are waiting for. The read timeout is BLOCK plus the
    socket timeout: a plain socket timeout shorter than BLOCK would cut every idle read.
    """

    def __init__(
        self, nodes: Nodes, streams: Iterable[str], group: str, consumer: str, block_ms: int
    ) -> None:
        names = tuple(streams)
        self.streams = names
        self._link = Link(nodes, names[0])
        self._head: tuple[str, ...] = ("XREADGROUP", "GROUP", group, consumer, "COUNT")
        self._now: tuple[str, ...] = ("STREAMS", *names, *(">" for _ in names))
        self._blocking: tuple[str | int, ...] = ("BLOCK", block_ms, *self._now)
        self._timeout = block_ms / 1000 + SOCKET_TIMEOUT
        self._names = {name.encode(): name for name in names}
        # The last entry id read from each stream: where a deleted group is recreated.
        self.last_ids: dict[str, bytes] = {}

    @property
    def blocked(self) -> bool:
        """True from sending XREADGROUP until its reply is read."""
        return self._link.busy

    async def read(
        self, count: int, *, block: bool = True, only: Sequence[str] | None = None
    ) -> list[Entry]:
        """Entries never delivered to the group before, at most `count` (>= 1) per stream
        (of `only`, some of the reader's streams, if given); with `block`, waiting up to
        BLOCK ms for some to arrive.

        COUNT 0 would mean no limit at all to Redis: a caller's mistake, refused here.
        """
        if count < 1:
            raise ValueError(f"XREADGROUP COUNT must be at least 1, got {count}")
        if only is not None:
            now = ("STREAMS", *only, *(">" for _ in only))
            head = (*self._head, count, *(("BLOCK", self._blocking[1]) if block else ()))
            reply = await self._link.call(pack((*head, *now)), self._timeout)
        elif block:
            packed = pack((*self._head, count, *self._blocking))
            reply = await self._link.call(packed, self._timeout)
        else:
            reply = await self._link.call(pack((*self._head, count, *self._now)))
        if not reply:
            return []
        names = self._names
        # RESP2: [[stream, entries], ...]; RESP3: {stream: entries}.
        streams = reply.items() if isinstance(reply, dict) else reply
        result: list[Entry] = []
        for name, entries in streams:
            stream = names[name]
            result += [(stream, i, f, 1, sum(map(len, f))) for i, f in entries]
            if entries:
                self.last_ids[stream] = entries[-1][0]
        return result

    async def unblock(self) -> None:
        """Make a blocked read return now, empty, as if its BLOCK timed out (best effort).

        Without permission for CLIENT ID or CLIENT UNBLOCK the read just runs out its BLOCK.
        """
        if self.blocked:
            with contextlib.suppress(RedisError, OSError):
                await self._link.unblock()

    async def close(self) -> None:
        await self._link.close()


class Acker:
    """XACK for one consumer: one XACK per stream, pipelined, on a Link of its own (on a
    cluster, through the pools: one pipeline per server, the servers at once)."""

    def __init__(self, nodes: Nodes, streams: Sequence[str], group: str) -> None:
        self._nodes = nodes
        self._link = Link(nodes, streams[0])
        self._group = group

    async def ack(self, ids_by_stream: Mapping[str, list[bytes]]) -> None:
        group = self._group
        commands = [
            (stream, pack(("XACK", stream, group, *ids)))
            for stream, ids in ids_by_stream.items()
            if ids
        ]
        if not commands:
            return
        if not self._nodes.cluster:
            packed = b"".join(command for _, command in commands)
            await self._link.call(packed, replies=len(commands))
            return
        for reply in await self._nodes.send(commands):
            if isinstance(reply, ResponseError):
                raise reply

    async def close(self) -> None:
        await self._link.close()


async def ack(nodes: Nodes, stream: str, group: str, ids: Sequence[bytes]) -> None:
    await nodes.raw(stream, "XACK", stream, group, *ids)


# -- pending entries: claims, renewal, giving back -----------------------------------------


class Pending(NamedTuple):
    """One entry of a consumer's pending entries list (PEL), as XPENDING reports it."""

    id: bytes
    idle_ms: int
    deliveries: int


async def pending(
    nodes: Nodes,
    stream: str,
    group: str,
    consumer: str | None,
    *,
    min_idle_ms: int,
    start: bytes | str = "-",
    end: bytes | str = "+",
    count: int,
) -> list[Pending]:
    """XPENDING ... IDLE: `consumer`'s pending entries (every consumer's, for None) idle at
    least `min_idle_ms`, by id."""
    reply = await nodes.raw(
        stream,
        "XPENDING",
        stream,
        group,
        "IDLE",
        min_idle_ms,
        start,
        end,
        count,
        *(() if consumer is None else (consumer,)),
    )
    return [Pending(_bytes(entry_id), int(idle), int(n)) for entry_id, _, idle, n in reply]


async def deliveries(
    nodes: Nodes, stream: str, group: str, consumer: str, ids: Sequence[bytes]
) -> dict[bytes, int]:
    """The delivery counters of `ids` still pending on `consumer` (XPENDING per id, one
    pipeline): XAUTOCLAIM does not report them."""
    replies = await nodes.pipeline(
        stream, [pack(("XPENDING", stream, group, i, i, 1, consumer)) for i in ids]
    )
    return {
        _bytes(row[0][0]): int(row[0][3]) for row in replies if row and text(row[0][1]) == consumer
    }


async def claim(
    nodes: Nodes,
    stream: str,
    group: str,
    consumer: str,
    due: Sequence[tuple[bytes, int]],
    *,
    min_idle_ms: int,
) -> list[Entry]:
    """XCLAIM the `due` (id, deliveries so far) entries still idle at least `min_idle_ms`.

    Each delivery counter grows by one, and so does the count in the entries returned.
    Entries deleted (trimmed) while pending come back without fields on Redis 6.2 and not
    at all on Redis 7; either way they are left out here: see `missing`.
    """
    counts = dict(due)
    reply = await nodes.raw(stream, "XCLAIM", stream, group, consumer, min_idle_ms, *counts)
    return [
        entry(stream, _bytes(item[0]), item[1], counts[_bytes(item[0])] + 1)
        for item in reply
        if item and item[1] is not None
    ]


async def missing(nodes: Nodes, stream: str, ids: Iterable[bytes]) -> list[bytes]:
    """Those of `ids` no longer in the stream (deleted by XDEL, MAXLEN or XTRIM)."""
    gone = []
    for entry_id in ids:
        if not await nodes.raw(stream, "XRANGE", stream, entry_id, entry_id):
            gone.append(entry_id)
    return gone


async def fields_of(nodes: Nodes, stream: str, entry_id: bytes) -> list[bytes] | None:
    """XRANGE of one entry: its fields, or None once it is deleted. Not a delivery."""
    reply = await nodes.raw(stream, "XRANGE", stream, entry_id, entry_id)
    return reply[0][1] if reply else None


async def autoclaim(
    nodes: Nodes,
    stream: str,
    group: str,
    consumer: str,
    *,
    min_idle_ms: int,
    cursor: bytes,
    count: int,
) -> tuple[bytes, list[tuple[bytes, list[bytes]]], int]:
    """XAUTOCLAIM: (next cursor, claimed (id, fields), how many were found deleted).

    Redis 7 drops deleted entries from the PEL itself and lists their ids; Redis 6.2 replies
    nil for them and leaves them pending on this consumer, for its own sweep to find and
    count (so they are not counted here).
    """
    reply = await nodes.raw(
        stream, "XAUTOCLAIM", stream, group, consumer, min_idle_ms, cursor, "COUNT", count
    )
    entries = [(_bytes(item[0]), item[1]) for item in reply[1] if item and item[1] is not None]
    deleted = len(reply[2]) if len(reply) > 2 else 0
    return _bytes(reply[0]), entries, deleted


# Resets the idle time of the entries still pending on this consumer (XCLAIM ... JUSTID,
# which counts no delivery), and only those: an entry another consumer claimed meanwhile (this
# one was paused past claim_idle_ms, say) stays that consumer's, where a bare XCLAIM would
# take it back. KEYS[1]: the stream; ARGV: group, consumer, ids. Returns the ids renewed.
_RENEW = """
local mine = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    mine[#mine + 1] = ARGV[i]
  end
end
if #mine == 0 then
  return {}
end
mine[#mine + 1] = 'JUSTID'
return redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
"""


async def renew(
    nodes: Nodes, stream: str, group: str, consumer: str, ids: Sequence[bytes], *, checked: bool
) -> set[bytes]:
    """Reset the idle time of those of `ids` still pending on `consumer`, without counting a
    delivery. Returns them (the others were acked, or claimed by another consumer).

    Not `checked` (an ACL without `eval`): a bare XCLAIM, which also takes back what another
    consumer claimed."""
    if checked:
        reply = await nodes.raw(stream, "EVAL", _RENEW, 1, stream, group, consumer, *ids)
    else:
        reply = await nodes.raw(stream, "XCLAIM", stream, group, consumer, 0, *ids, "JUSTID")
    return {_bytes(entry_id) for entry_id in reply}


# Hands entries back to the group: for each (id, idle ms, delivery count) still pending on
# this consumer, sets its idle time and its delivery counter (XCLAIM ... IDLE RETRYCOUNT
# JUSTID, which itself counts no delivery). One script, so that an entry another consumer
# has claimed meanwhile is left alone. KEYS[1]: the stream; ARGV: group, consumer, triples.
_GIVE_BACK = """
local given = 0
for i = 3, #ARGV, 3 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i],
               'IDLE', ARGV[i + 1], 'RETRYCOUNT', ARGV[i + 2], 'JUSTID')
    given = given + 1
  end
end
return given
"""


async def give_back(
    nodes: Nodes,
    stream: str,
    group: str,
    consumer: str,
    entries: Sequence[tuple[bytes, int, int]],
) -> int:
    """Leave (id, idle ms, deliveries) entries to the group: a consumer that claims entries
    idle for `claim_idle_ms` may take each once its idle time gets there, and its delivery
    counter says how many times it really ran. Returns how many were still ours.

    200 entries per script, so that no one call holds Redis for long.
    """
    given = 0
    for start in range(0, len(entries), 200):
        args: list[bytes | int] = list(chain.from_iterable(entries[start : start + 200]))
        given += int(await nodes.raw(stream, "EVAL", _GIVE_BACK, 1, stream, group, consumer, *args))
    return given


# -- consumers of a group ----------------------------------------------------------------


class ConsumerInfo(NamedTuple):
    name: str
    pending: int
    idle_ms: int


async def consumers(nodes: Nodes, stream: str, group: str) -> list[ConsumerInfo]:
    """XINFO CONSUMERS: each consumer of the group, its pending count and idle time."""
    reply = await nodes.raw(stream, "XINFO", "CONSUMERS", stream, group)
    result = []
    for item in reply:
        info = dict(zip(item[::2], item[1::2], strict=True)) if isinstance(item, list) else item
        info = {text(key): value for key, value in info.items()}
        result.append(ConsumerInfo(text(info["name"]), int(info["pending"]), int(info["idle"])))
    return result


# Deletes a consumer only if nothing is pending on it, in one step: a consumer that reads
# between a check and a separate DELCONSUMER would lose its new entries from the PEL.
# KEYS[1]: the stream; ARGV: group, consumer. Returns -1 when it kept the consumer.
_DELETE_IF_IDLE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return -1
end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


async def delete_consumer_if_idle(nodes: Nodes, stream: str, group: str, name: str) -> bool:
    """XGROUP DELCONSUMER `name`, only while nothing is pending on it; True if deleted."""
    return int(await nodes.raw(stream, "EVAL", _DELETE_IF_IDLE, 1, stream, group, name)) >= 0


# -- dead letters ------------------------------------------------------------------------


async def entries(
    nodes: Nodes, stream: str, *, after: bytes | str, count: int
) -> list[tuple[bytes, list[bytes]]]:
    """XRANGE: up to `count` entries of `stream` after id `after` ("-" for the first)."""
    start = after if after == "-" else b"(" + _bytes(after)
    reply = await nodes.raw(stream, "XRANGE", stream, start, "+", "COUNT", count)
    return [(_bytes(entry_id), flat) for entry_id, flat in reply]

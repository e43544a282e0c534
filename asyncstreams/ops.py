"""What operators ask of streams, as typed values: `status` (per stream its length and newest
entry, per group its lag, pending entries, consumers and dead letters), `pending_entries`
(XPENDING rows); `trim` (XTRIM MINID to what every group has read and acked) is _trim.py's.

Every command goes through `Nodes`, to the server that holds its key, so all of it works on
one server and on a Redis Cluster (`scan_streams` asks every master). The CLI's rendering of
these values is _ops_cli.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from ._nodes import Nodes
from ._slots import key_slot
from ._transport import pack, raw, text
from .errors import NotFoundError, RedisRefusedError
from .options import DEFAULT_DEAD_LETTER

# A lag Redis does not report (Redis 6.2 never does; Redis 7 not after some XDELs) is counted
# by a script, at most this many entries on either side of the group's last-delivered id
# (both sides more: the lag is at least this). A dry-run trim counts what it would remove
# the same way. One count holds Redis for a few milliseconds at this size.
COUNT_LIMIT = 10_000
SCAN_COUNT = 1000


def _fields(reply: Any) -> dict[str, Any]:
    """An XINFO reply as a dict: RESP2 sends a flat [name, value, ...] list, RESP3 a map."""
    if isinstance(reply, dict):
        return {text(key): value for key, value in reply.items()}
    return {text(key): value for key, value in zip(reply[::2], reply[1::2], strict=True)}


def script_refused(nodes: Nodes, exc: ResponseError, script: str, needs: str) -> Exception:
    """A script's command refused by the ACL (Redis does not say which): what it needs."""
    if "can't run this command" not in str(exc):
        return exc
    user = nodes.seed.connection_pool.connection_kwargs.get("username") or "default"
    return RedisRefusedError(
        f"Redis at {nodes.describe()}: user {user!r} may not run a command of the {script} "
        f"script ({exc}); expected {needs} in its ACL"
    )


def id_ms(entry_id: str) -> int:
    """The millisecond part of an entry id."""
    return int(entry_id.partition("-")[0])


def id_key(entry_id: str) -> tuple[int, int]:
    """An entry id as a pair that sorts as Redis orders ids."""
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence)


def dead_letter_names(stream: str) -> tuple[str, ...]:
    """Where the dead letters of `stream` go by the default name rule (see
    `ConsumerOptions.dead_letter_stream`): `<stream>:dead-letter`, and on a cluster
    `{<stream>}:dead-letter` when that one would land in another hash slot."""
    name = DEFAULT_DEAD_LETTER.replace("{stream}", stream)
    if key_slot(name) == key_slot(stream):
        return (name,)
    return (name, f"{{{stream}}}:dead-letter")


# -- status ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OldestPending:
    """A group's pending entry with the lowest id, as XPENDING reports it."""

    id: str
    consumer: str
    idle_ms: int  # since it was last delivered
    deliveries: int
    age_ms: int  # the server's time minus the id's milliseconds


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """One consumer group of a stream."""

    name: str
    lag: int  # entries of the stream not yet delivered to the group
    lag_exact: bool  # False: counted up to COUNT_LIMIT on both sides; the lag is at least `lag`
    lag_source: str  # "redis" (XINFO GROUPS `lag`) or "counted" (Redis gave none)
    pending: int  # delivered and not yet acked
    oldest_pending: OldestPending | None
    consumers: int
    most_idle_consumer: str | None
    most_idle_ms: int | None
    last_delivered_id: str
    dead_letter_length: int  # of the stream's dead-letter stream (one per stream)


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """One stream: its length, newest entry and groups."""

    stream: str
    length: int
    last_generated_id: str
    newest_id: str | None  # None: the stream is empty
    newest_age_ms: int | None
    dead_letter: str | None  # the dead-letter stream by the default rule, if one exists
    dead_letter_length: int
    groups: tuple[GroupStatus, ...]


# Lua: count the entries of a stream after an id, or before it, without sending them,
# reading at most `limit` on either side of it: (count, 1 if exact else 0). When both sides
# hold more than `limit`, the count is `limit`, a lower bound. _LAG: the entries of KEYS[1]
# after ARGV[1], ARGV[2] the limit.
COUNTING_LUA = """
local function bounded(key, first, last, other_first, other_last, limit)
  local found = #redis.call('XRANGE', key, first, last, 'COUNT', limit)
  if found < limit then
    return found, 1
  end
  local others = #redis.call('XRANGE', key, other_first, other_last, 'COUNT', limit)
  if others < limit then
    return redis.call('XLEN', key) - others, 1
  end
  return found, 0
end
local function count_after(key, id, limit)
  return bounded(key, '(' .. id, '+', '-', id, limit)
end
local function count_before(key, id, limit)
  return bounded(key, '-', '(' .. id, id, '+', limit)
end
"""
_LAG = (
    COUNTING_LUA
    + """
local count, exact = count_after(KEYS[1], ARGV[1], tonumber(ARGV[2]))
return {count, exact}
"""
)


class _Batch:
    """(key, command) pairs for `Nodes.send`: one pipeline per server, the servers at once."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, bytes]] = []

    def add(self, key: str, *args: str | int | bytes) -> int:
        self.commands.append((key, pack(args)))
        return len(self.commands) - 1

    async def send(self, nodes: Nodes) -> list[Any]:
        return await nodes.send(self.commands) if self.commands else []


async def scan_streams(nodes: Nodes) -> list[str]:
    """The names of every stream, sorted: SCAN ... TYPE stream on every master."""
    names: set[str] = set()
    for client in nodes.clients():
        cursor: bytes | str = "0"
        while True:
            cursor, keys = await raw(client, "SCAN", cursor, "TYPE", "stream", "COUNT", SCAN_COUNT)
            names.update(text(key) for key in keys)
            if text(cursor) == "0":
                break
    return sorted(names)


async def status(nodes: Nodes, streams: Sequence[str] | None = None) -> list[StreamStatus]:
    """The status of `streams`, or of every stream (by name) when None.

    Unnamed, a stream that is the default dead-letter stream of another and has no groups of
    its own is shown as that stream's `dead_letter`, not on its own. A named stream that does
    not exist raises NotFoundError.
    """
    named = streams is not None
    names = list(dict.fromkeys(streams)) if streams is not None else await scan_streams(nodes)
    first = _Batch()
    for stream in names:
        first.add(stream, "XINFO", "STREAM", stream)
        first.add(stream, "XINFO", "GROUPS", stream)
        first.add(stream, "TIME")
    replies = await first.send(nodes)
    found: dict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = {}
    for index, stream in enumerate(names):
        info, groups, now = replies[3 * index : 3 * index + 3]
        for reply in (info, groups, now):
            if isinstance(reply, ResponseError):
                if not named and str(reply).startswith("ERR no such key"):
                    break  # deleted since the SCAN
                if named:
                    await check_stream(nodes, stream)
                raise reply
        else:
            now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
            found[stream] = (_fields(info), [_fields(group) for group in groups], now_ms)
    if not named:
        shown = {
            name
            for stream in found
            for name in dead_letter_names(stream)
            if name != stream and name in found and not found[name][1]
        }
        found = {stream: value for stream, value in found.items() if stream not in shown}
    return await _details(nodes, found)


async def _details(
    nodes: Nodes, found: dict[str, tuple[dict[str, Any], list[dict[str, Any]], int]]
) -> list[StreamStatus]:
    """The second round: per group its oldest pending entry, consumers and (when Redis gave
    none) counted lag; per stream its dead-letter stream."""
    batch = _Batch()
    oldest: dict[tuple[str, str], int] = {}
    consumers: dict[tuple[str, str], int] = {}
    counted: dict[tuple[str, str], int] = {}
    dead: dict[str, list[tuple[str, int, int]]] = {}
    for stream, (_, groups, _) in found.items():
        for group in groups:
            name = text(group["name"])
            if int(group["pending"]):
                oldest[stream, name] = batch.add(stream, "XPENDING", stream, name, "-", "+", 1)
            consumers[stream, name] = batch.add(stream, "XINFO", "CONSUMERS", stream, name)
            if group.get("lag") is None:
                last = group["last-delivered-id"]
                counted[stream, name] = batch.add(
                    stream, "EVAL", _LAG, 1, stream, last, COUNT_LIMIT
                )
        dead[stream] = [
            (name, batch.add(name, "TYPE", name), batch.add(name, "XLEN", name))
            for name in dead_letter_names(stream)
        ]
    replies = await batch.send(nodes)
    for reply in replies:
        if isinstance(reply, ResponseError) and not str(reply).startswith("WRONGTYPE"):
            # WRONGTYPE: XLEN of a dead-letter name that holds no stream
            raise script_refused(nodes, reply, "lag-counting", "+eval +xrange +xlen")
    result = []
    for stream, (info, groups, now_ms) in found.items():
        letters = [
            (name, int(replies[length]))
            for name, kind, length in dead[stream]
            if text(replies[kind]) == "stream"
        ]
        dead_letter, dead_length = letters[0] if letters else (None, 0)
        group_rows = []
        for group in groups:
            name = text(group["name"])
            if group.get("lag") is not None:
                # Redis 7 counts entries trimmed before the group read them as lag still;
                # those that remain after its last-delivered id are at most all of them.
                lag, exact, source = min(int(group["lag"]), int(info["length"])), True, "redis"
            else:
                count, exact_flag = replies[counted[stream, name]]
                lag, exact, source = int(count), bool(exact_flag), "counted"
            first = None
            if (stream, name) in oldest and replies[oldest[stream, name]]:
                entry_id, consumer, idle, deliveries = replies[oldest[stream, name]][0]
                first = OldestPending(
                    text(entry_id),
                    text(consumer),
                    int(idle),
                    int(deliveries),
                    max(0, now_ms - id_ms(text(entry_id))),
                )
            members = [_fields(item) for item in replies[consumers[stream, name]]]
            idlest = max(members, key=lambda member: int(member["idle"]), default=None)
            group_rows.append(
                GroupStatus(
                    name=name,
                    lag=lag,
                    lag_exact=exact,
                    lag_source=source,
                    pending=int(group["pending"]),
                    oldest_pending=first,
                    consumers=len(members),
                    most_idle_consumer=None if idlest is None else text(idlest["name"]),
                    most_idle_ms=None if idlest is None else int(idlest["idle"]),
                    last_delivered_id=text(group["last-delivered-id"]),
                    dead_letter_length=dead_length,
                )
            )
        newest = info.get("last-entry")
        newest_id = text(newest[0]) if newest else None
        result.append(
            StreamStatus(
                stream=stream,
                length=int(info["length"]),
                last_generated_id=text(info["last-generated-id"]),
                newest_id=newest_id,
                newest_age_ms=None if newest_id is None else max(0, now_ms - id_ms(newest_id)),
                dead_letter=dead_letter,
                dead_letter_length=dead_length,
                groups=tuple(group_rows),
            )
        )
    return result


async def check_stream(nodes: Nodes, stream: str) -> None:
    """NotFoundError unless `stream` is a stream."""
    found = text(await nodes.raw(stream, "TYPE", stream))
    if found == "none":
        raise NotFoundError(f"stream {stream!r} does not exist on {nodes.describe()}")
    if found != "stream":
        raise NotFoundError(f"key {stream!r} is a {found}, not a stream")


# -- pending entries ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """One pending entry: delivered to `consumer`, not yet acked."""

    id: str
    consumer: str
    idle_ms: int  # since it was last delivered
    deliveries: int


async def pending_entries(
    nodes: Nodes, stream: str, group: str, *, consumer: str | None = None, limit: int = 100
) -> tuple[list[PendingEntry], int]:
    """The first `limit` pending entries of `group` (of `consumer` only, if given), by id,
    and how many there are in all. NotFoundError names a stream, group or consumer that does
    not exist."""
    await check_stream(nodes, stream)
    try:
        count, _, _, per_consumer = await nodes.raw(stream, "XPENDING", stream, group)
    except ResponseError as exc:
        if str(exc).startswith("NOGROUP"):
            raise await _no_group(nodes, stream, group) from None
        raise
    total = int(count)
    by: tuple[str, ...] = ()
    if consumer is not None:
        reply = await nodes.raw(stream, "XINFO", "CONSUMERS", stream, group)
        if consumer not in {text(_fields(item)["name"]) for item in reply}:
            raise NotFoundError(
                f"group {group!r} of stream {stream!r} has no consumer {consumer!r}"
            )
        counts = {text(name): int(n) for name, n in per_consumer or ()}
        total, by = counts.get(consumer, 0), (consumer,)
    rows = await nodes.raw(stream, "XPENDING", stream, group, "-", "+", limit, *by)
    entries = [
        PendingEntry(text(entry_id), text(owner), int(idle), int(deliveries))
        for entry_id, owner, idle, deliveries in rows
    ]
    return entries, total


async def _no_group(nodes: Nodes, stream: str, group: str) -> NotFoundError:
    groups = await nodes.raw(stream, "XINFO", "GROUPS", stream)
    names = ", ".join(repr(text(_fields(info)["name"])) for info in groups) or "none"
    return NotFoundError(f"stream {stream!r} has no group {group!r}; its groups: {names}")

"""The group figures of the metrics: per stream and group of a running app, its length, lag,
pending entries, oldest pending age, consumers and dead letters, read by one process at a
time.

However many processes run the app (`--workers N`, N pods), one reads a group's figures per
interval: the one holding the group's metrics lock, a key set with a token of its own for
two intervals and renewed at each of its refreshes (a script: set it when missing or ours).
The others find it held and report no figures for that group, so no stale value of theirs
outlives the holder's fresh one; a holder that stops refreshing (it stopped, or nothing
scrapes it) loses the lock two intervals later to the next process that asks. The figures
are those of ops.status (the lag counted by a script where Redis gives none: Redis 6.2, or
null after an XDEL).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from . import ops
from ._nodes import Nodes
from ._slots import key_slot
from ._transport import explain, pack
from .consumer import Consumer
from .errors import NotFoundError

log = logging.getLogger("asyncstreams.prometheus")

# KEYS[1] the lock, ARGV[1] our token, ARGV[2] milliseconds: 1 if we hold it now.
_TAKE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


def lock_key(stream: str, group: str) -> str:
    """The metrics lock of `group` on `stream`, in the stream's hash slot on a cluster.

    `asyncstreams:metrics:{orders}:billing` hashes on the stream's name; a stream whose name
    has braces (a hash tag of its own, as a Partitioned stream's partitions do) starts the
    key instead, keeping its tag: `{orders:0:ab}:asyncstreams:metrics:billing`.
    """
    key = f"asyncstreams:metrics:{{{stream}}}:{group}"
    if key_slot(key) == key_slot(stream):
        return key
    return f"{stream}:asyncstreams:metrics:{group}"


@dataclass(frozen=True, slots=True)
class GroupFigures:
    """One group of one stream, as its lock holder last read it."""

    stream: str
    group: str
    length: int  # of the stream
    lag: int  # entries not yet delivered to the group (at least this when counted far)
    pending: int
    oldest_pending_age: float  # seconds since the oldest pending entry's id; 0 when none
    consumers: int
    dead_letter: str | None  # the consumer's dead-letter stream for this stream, if any
    dead_letter_length: int


@dataclass(frozen=True, slots=True)
class _Watched:
    stream: str
    group: str
    dead_letter: str | None


class GroupWatch:
    """Reads the group figures of an app's running consumers, at most once per `interval`
    seconds, where this process holds the group's lock."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        # The figures of the last refresh: replaced whole, so a scrape on another thread
        # reads one refresh's figures or the next one's.
        self.figures: tuple[GroupFigures, ...] = ()
        self._token = secrets.token_hex(8)
        self._due = 0.0
        self._task: asyncio.Task[None] | None = None
        self._last_error = ""

    async def refresh(self, consumers: Sequence[Consumer]) -> None:
        """Read the figures again if `interval` has passed since the last time, and wait
        for it; one read at a time (a second caller waits for the first one's)."""
        task = self.kick(consumers)
        if task is not None:
            # Shielded: a scrape that gives up must not cut the read short for the next one.
            await asyncio.shield(task)

    def kick(self, consumers: Sequence[Consumer]) -> asyncio.Task[None] | None:
        """Start reading the figures again if `interval` has passed since the last time, on
        this thread's running event loop (the app's); the read under way, if any. Without
        consumers (the app is not running) there are no figures."""
        if not consumers:
            self.figures = ()
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # another thread (a scrape of prometheus_client's own server)
        task = self._task
        if task is not None and not task.done():
            return task
        if time.monotonic() < self._due:
            return None
        self._due = time.monotonic() + self.interval
        task = self._task = loop.create_task(
            self._refresh(consumers), name="asyncstreams metrics refresh"
        )
        return task

    async def _refresh(self, consumers: Sequence[Consumer]) -> None:
        nodes = consumers[0].nodes
        watched = _watched(consumers, nodes)
        try:
            held = await self._take(nodes, watched)
            self.figures = await _read(nodes, held)
        except Exception as exc:  # an outage, a refusal: no figures this time
            self.figures = ()
            if explain(exc) != self._last_error:
                self._last_error = explain(exc)
                log.warning("metrics: could not read the group figures (%s)", self._last_error)
        else:
            self._last_error = ""

    async def _take(self, nodes: Nodes, watched: list[_Watched]) -> list[_Watched]:
        """The groups whose lock this process holds now (taken or renewed)."""
        hold_ms = max(1, round(2 * self.interval * 1000))
        commands = []
        for group in watched:
            key = lock_key(group.stream, group.group)
            commands.append((key, pack(("EVAL", _TAKE_LUA, 1, key, self._token, hold_ms))))
        replies = await nodes.send(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [group for group, reply in zip(watched, replies, strict=True) if int(reply)]


def _watched(consumers: Sequence[Consumer], nodes: Nodes) -> list[_Watched]:
    found: dict[tuple[str, str], _Watched] = {}
    for consumer in consumers:
        options = consumer.options
        for stream in options.names:
            dead_letter = options.dead_letter_stream(stream, cluster=nodes.cluster)
            found[stream, options.group] = _Watched(stream, options.group, dead_letter)
    return list(found.values())


async def _read(nodes: Nodes, held: list[_Watched]) -> tuple[GroupFigures, ...]:
    if not held:
        return ()
    streams = list(dict.fromkeys(group.stream for group in held))
    try:
        statuses = await ops.status(nodes, streams)
    except NotFoundError:
        # A stream deleted since its group was made (it is made again with the group).
        statuses = []
        for stream in streams:
            try:
                statuses += await ops.status(nodes, [stream])
            except NotFoundError:
                continue
    letters = sorted({group.dead_letter for group in held if group.dead_letter is not None})
    lengths = await nodes.send([(name, pack(("XLEN", name))) for name in letters])
    dead_lengths = {
        name: int(length)
        for name, length in zip(letters, lengths, strict=True)
        if not isinstance(length, Exception)  # WRONGTYPE: a key that is not a stream
    }
    by_stream = {status.stream: status for status in statuses}
    figures = []
    for watched in held:
        status = by_stream.get(watched.stream)
        groups = {group.name: group for group in status.groups} if status else {}
        group = groups.get(watched.group)
        if status is None or group is None:
            continue  # deleted meanwhile
        oldest = group.oldest_pending
        figures.append(
            GroupFigures(
                stream=watched.stream,
                group=watched.group,
                length=status.length,
                lag=group.lag,
                pending=group.pending,
                oldest_pending_age=0.0 if oldest is None else oldest.age_ms / 1000,
                consumers=group.consumers,
                dead_letter=watched.dead_letter,
                dead_letter_length=dead_lengths.get(watched.dead_letter, 0)
                if watched.dead_letter is not None
                else 0,
            )
        )
    return tuple(figures)

"""Partition ownership (`ordered=True`): each partition of a `Partitioned` stream is read by
one consumer of the group at a time, so that key lanes (lanes.py) order a key's entries
across processes, not only inside one.

Everything is decided through Redis, by two kinds of keys:

- The members: a sorted set per stream and group (`{orders}:members:billing`), each live
  consumer scored with when it stops counting (Redis' clock plus `lease_ms`), refreshed
  every quarter of `lease_ms`. Every consumer reads the same list, and computes the same
  assignment from it (`assign`): each member wants about `partitions / members`.
- The leases: one key per partition in the partition's own hash slot
  (`{orders:3:0}:owner:billing`), holding its owner's consumer name, with `lease_ms` to
  live. A consumer takes a lease only when it is free (SET NX), renews it only while it is
  its own, and deletes it only while it is its own (scripts: compare and act in one step).

A partition changes hands in these steps:

1. The old owner stops reading it (a read in flight is woken with CLIENT UNBLOCK), gives
   back to the group what it holds of it and has not started (queued, waiting behind a key,
   waiting for a retry), lets what runs finish and its acks be answered, then deletes the
   lease. It renews the lease meanwhile: a hand-over never leaves the partition to two.
2. The new owner, once the lease is free, takes it, and claims every entry of the
   partition still pending in the group, whoever holds it, in id order (XPENDING, then
   XCLAIM), as its bound allows: a crashed owner's entries (its lease expired) run first.
3. Only then does it read new entries of the partition.

Safety rests on the leases alone; the members list only balances. An owner counts its lease
as valid until the time it sent its last successful renewal plus `lease_ms`, less a quarter
of it (renewals go every quarter: a renewal lost in a failover leaves Redis keeping the
lease at least as long as its owner counts it, and one renewal may fail without the lease
lapsing); past that it starts nothing more of the partition: no read, no handler (checked
before each read and each handler call), and it drops what it had not started. Redis
expires the lease only later, after any read the old owner sent has ended (`block_ms` is at
most a quarter of `lease_ms`), so whatever Redis delivered to the old owner is pending by
the time a new owner lists the partition's pending entries to take them over.
The worst case is a handler that was already running when its owner lost the lease: a
process paused (SIGSTOP, a VM stall) longer than the lease finishes, when it resumes, the
handlers it was running, while the new owner runs those entries again. Losing more than one
renewal in a failover (replication lagging by more than a quarter of `lease_ms`) may likewise
let a new owner start while the old one still runs for up to that lag.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.abc
from redis.exceptions import RedisError

from . import _commands
from ._nodes import Nodes
from ._transport import REFUSALS, explain
from .codec import Invoke, InvokeBatch
from .errors import DecodeError, RedisRefusedError
from .failures import LeaseLost
from .ledger import Ledger
from .message import Entry
from .options import ConsumerOptions
from .partitions import Partitioned

log = logging.getLogger("asyncstreams.ownership")
T = TypeVar("T")

# How often an owner looks again while a hand-over or a take-over is in progress, or while
# it waits for a partition another owner still holds.
STEP = 0.1
# XPENDING page size when taking over a partition's pending entries.
PAGE = 200

# Refreshes (ARGV[2] ms to live, by Redis' clock) or removes (ARGV[2] == "0") the member
# ARGV[1], drops the members that stopped counting, and returns those left, sorted.
# KEYS[1]: the members' sorted set.
_MEMBERS = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[2])
if ttl == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  if redis.call('PTTL', KEYS[1]) < ttl * 2 then
    redis.call('PEXPIRE', KEYS[1], ttl * 2)
  end
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# Renews the lease KEYS[1] for ARGV[1] (ARGV[2] ms) if it is ARGV[1]'s (1), takes it if it
# is free and ARGV[3] is "1" (2); else 0.
_LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not owner and ARGV[3] == '1' then
  -- A first write a full Redis does not refuse (a no-op here): a script that wrote goes
  -- on, so a lease is taken while Redis is full too (the stream must drain to free it).
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""

# Deletes the lease KEYS[1] if it is ARGV[1]'s.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lease_key(stream: str, group: str) -> str:
    """The lease of partition `stream` for `group`, in the partition's hash slot."""
    return f"{stream}:owner:{group}"


def members_key(partitioned: Partitioned, group: str) -> str:
    """The members of `group` on `partitioned`."""
    return f"{{{partitioned.name}}}{partitioned.suffix}:members:{group}"


def assign(streams: Sequence[str], members: Sequence[str]) -> dict[str, str]:
    """Each partition's owner among `members`: the same answer in every process for the
    same members. Each member gets at most `ceil(partitions / members)`; a partition goes
    to the first member with room in an order that depends on the partition and the member
    only (rendezvous hashing), so a member joining or leaving moves few partitions."""
    if not members:
        return {}
    most = -(-len(streams) // len(members))
    load = dict.fromkeys(members, 0)
    owners: dict[str, str] = {}
    for stream in streams:
        ranked = sorted(members, key=lambda m: (zlib.crc32(f"{stream}\0{m}".encode()), m))
        owner = next(m for m in ranked if load[m] < most)
        load[owner] += 1
        owners[stream] = owner
    return owners


class Ownership:
    """The partitions one consumer owns, and the task that keeps them (see the module's
    doc)."""

    def __init__(
        self,
        nodes: Nodes,
        options: ConsumerOptions,
        partitioned: Partitioned,
        name: str,
        where: str,
        *,
        ledger: Ledger,
        take_on: Callable[[Sequence[Entry]], Awaitable[None]],
        changed: Callable[[], None],
        busy: Callable[[str], bool],
    ) -> None:
        self._nodes = nodes
        self._group = options.group
        self._name = name
        self._where = where
        self._ledger = ledger
        self._take_on = take_on
        self._changed = changed
        # Whether a read, or a retry's claim, is on its way for a stream.
        self._busy = busy
        self._streams = partitioned.streams
        self._members_key = members_key(partitioned, options.group)
        self._lease_ms = options.lease_ms
        # The delivery count at which an entry is parked (no dead-letter stream); else None.
        self._parked_at = (
            options.max_deliveries
            if options.max_deliveries is not None
            and options.dead_letter_stream(partitioned.streams[0], cluster=nodes.cluster) is None
            else None
        )
        # Members refreshed and leases renewed every quarter of `lease_ms`.
        self.interval = options.lease_ms / 4000
        # Owned partitions, and until when (time.monotonic()) their lease counts as valid.
        self.until: dict[str, float] = {}
        # Owned partitions being taken over: where their pending entries' claim goes on.
        self._taking: dict[str, bytes | str] = {}
        # Owned partitions being handed over: since when.
        self._handing: dict[str, float] = {}
        # Partitions wanted and not owned yet: since when.
        self._wanted: dict[str, float] = {}
        self._claimed: dict[str, int] = {}
        # Owned and taken over: read from.
        self.readable: set[str] = set()
        self.members: list[str] = []
        self._next_beat = 0.0
        # The members' refresh and the renewals on their way ("members", or a stream).
        self._running: set[str] = set()
        # Set when the members' refresh finds partitions to take or to hand over.
        self._wake = asyncio.Event()
        self._left = False

    # -- what is owned -----------------------------------------------------------------

    def valid(self, stream: str) -> bool:
        """Whether this consumer's lease on `stream` still counts (see the module's doc)."""
        return self.until.get(stream, 0.0) > time.monotonic()

    def readable_now(self, streams: Sequence[str]) -> list[str]:
        """Those of `streams` to read now: owned, taken over, not being handed over, with a
        valid lease (checked before each read)."""
        now = time.monotonic()
        until = self.until
        return [s for s in streams if s in self.readable and until.get(s, 0.0) > now]

    def guard(self, invoke: Invoke) -> Invoke:
        """`invoke`, raising LeaseLost instead for an entry whose lease no longer counts
        (checked before each handler call)."""
        until, clock = self.until, time.monotonic

        def owned(stream: str, entry_id: bytes, flat: list[bytes], deliveries: int) -> Any:
            if until.get(stream, 0.0) <= clock():
                raise LeaseLost(stream)
            return invoke(stream, entry_id, flat, deliveries)

        return owned

    def guard_batch(self, invoke_batch: InvokeBatch) -> InvokeBatch:
        """`guard` for a batch handler: entries whose lease no longer counts are split out."""
        until, clock = self.until, time.monotonic

        def owned(
            entries: list[Entry],
        ) -> tuple[list[Entry], list[tuple[Entry, DecodeError]], Awaitable[Any] | None]:
            now = clock()
            kept = [item for item in entries if until.get(item[0], 0.0) > now]
            if len(kept) == len(entries):
                return invoke_batch(entries)
            lost: list[tuple[Entry, Any]] = [
                (item, LeaseLost(item[0])) for item in entries if until.get(item[0], 0.0) <= now
            ]
            if not kept:
                return kept, lost, None
            passed, rejected, run = invoke_batch(kept)
            return passed, [*rejected, *lost], run

        return owned

    # -- the task --------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Join the members at start: an ACL that refuses the scripts is a RedisRefusedError
        then (an outage is ridden out by the task)."""
        self.members = await self._attempt("joining the members", self._beat(self._lease_ms)) or []

    async def run(self) -> None:
        """Keep the members list, the leases and the hand-overs going until cancelled.

        The members' refresh and each lease's renewal run as tasks of their own (one at a
        time each), every `interval`: a master that hangs holds up only its own leases."""
        async with anyio.create_task_group() as tasks:
            while True:
                started = time.monotonic()
                if started >= self._next_beat:
                    self._next_beat = started + self.interval
                    self._start("members", tasks, self._refresh)
                    for stream in self.until:
                        self._start(stream, tasks, partial(self._renew, stream))
                await self.step()
                busy = self._taking or self._handing or self._wanted
                pause = STEP if busy else self.interval
                self._wake.clear()
                with anyio.move_on_after(max(0.0, started + pause - time.monotonic())):
                    await self._wake.wait()  # the members' refresh found work

    def _start(
        self, name: str, tasks: anyio.abc.TaskGroup, call: Callable[[], Awaitable[None]]
    ) -> None:
        """Run `call` in `tasks` unless the last one of `name` is still on its way."""
        if name in self._running:
            return
        self._running.add(name)

        async def once() -> None:
            try:
                await call()
            finally:
                self._running.discard(name)

        tasks.start_soon(once)

    async def _refresh(self) -> None:
        members = await self._attempt("refreshing the members", self._beat(self._lease_ms))
        if members is not None:
            self.members = members
            self._plan(time.monotonic(), self._ledger.closed)

    async def step(self) -> None:
        """One round: what to lose, hand over and take. A Redis error stops only the part it
        happened in; a refusal (ACL) stops the consumer."""
        closed = self._ledger.closed
        for stream in list(self.until):
            if not self.valid(stream):
                self._lose(stream, "its lease was not renewed in time")
        for stream in self._streams:
            if stream not in self.until and self._ledger.ids(stream):
                self._drop(stream)  # a read that was in flight when the lease was lost
        for stream in list(self._handing):
            await self._attempt(f"handing {stream} over", self._hand_over_step(stream))
        for stream in list(self._taking):
            await self._attempt(f"taking {stream} over", self._take_over_step(stream))
        if not closed:
            for stream in [s for s in self._wanted if s not in self.until]:
                await self._attempt(f"taking the lease of {stream}", self._acquire(stream))

    def _plan(self, now: float, closed: bool) -> None:
        """From the members: the partitions to take, and those to hand over."""
        wanted = {
            stream
            for stream, owner in assign(self._streams, self.members).items()
            if owner == self._name
        }
        self._wanted = {
            s: self._wanted.get(s, now) for s in wanted if s not in self.until and not closed
        }
        for stream in self.until:
            if stream not in wanted and stream not in self._handing:
                self._hand_over(stream)
        if self._wanted or self._handing:
            self._wake.set()

    async def _attempt(self, what: str, call: Awaitable[T]) -> T | None:
        """`call`'s result; None if Redis failed it (logged: the next round tries again)."""
        try:
            return await call
        except (RedisError, OSError) as exc:
            if isinstance(exc, REFUSALS) or "can't run this command" in str(exc):
                raise RedisRefusedError(
                    f"{self._where}: partition ownership (ordered=True): {what} was refused "
                    f"({exc}); expected +eval and the commands its scripts run in the ACL"
                ) from None
            log.warning(
                "%s: partition ownership: %s failed (%s); trying again",
                self._where,
                what,
                explain(exc),
            )
            return None

    async def _beat(self, ttl: int) -> list[str]:
        reply = await self._nodes.raw(
            self._members_key, "EVAL", _MEMBERS, 1, self._members_key, self._name, ttl
        )
        return [m.decode() if isinstance(m, bytes) else str(m) for m in reply]

    async def _lease(self, stream: str, take: bool) -> int:
        key = lease_key(stream, self._group)
        return int(
            await self._nodes.raw(
                key, "EVAL", _LEASE, 1, key, self._name, self._lease_ms, "1" if take else "0"
            )
        )

    def _counted(self, sent: float) -> float:
        """Until when a lease renewed by a call sent at `sent` counts here."""
        return sent + self._lease_ms * 3 / 4000

    async def _renew(self, stream: str) -> None:
        sent = time.monotonic()
        renewed = await self._attempt(f"renewing the lease of {stream}", self._lease(stream, False))
        if renewed is None or stream not in self.until:
            return  # it counts until it runs out; or it was lost meanwhile
        if renewed:
            self.until[stream] = max(self.until[stream], self._counted(sent))
        else:
            self._lose(stream, "its lease has another owner")

    async def _acquire(self, stream: str) -> None:
        sent = time.monotonic()
        if not await self._lease(stream, take=True):
            return
        self.until[stream] = self._counted(sent)
        self._taking[stream] = "-"
        self._claimed[stream] = 0
        log.debug("%s: took the lease of partition %s", self._where, stream)

    # -- taking over -----------------------------------------------------------------------

    async def _take_over_step(self, stream: str) -> None:
        """Claim a page of the partition's pending entries (every consumer's), in id order,
        as many as the bound allows; once none are left, the partition is read."""
        start = self._taking.get(stream)
        if start is None or not self.valid(stream):
            return  # handed over or lost since the round began
        ledger = self._ledger
        room = ledger.room()
        if room < 1 or ledger.closed:
            return
        page = await _commands.pending(
            self._nodes,
            stream,
            self._group,
            None,
            min_idle_ms=0,
            start=start,
            count=min(room, PAGE),
        )
        # Entries out of deliveries with no dead-letter stream stay where they are, parked
        # (claimed, each hand-over would count a delivery and log them again).
        spent = self._parked_at
        fresh = [
            p
            for p in page
            if not ledger.holds(stream, p.id) and (spent is None or p.deliveries < spent)
        ]
        if fresh:
            claimed = await _commands.claim(
                self._nodes,
                stream,
                self._group,
                self._name,
                [(p.id, p.deliveries) for p in fresh],
                min_idle_ms=0,
            )
            self._claimed[stream] = self._claimed.get(stream, 0) + len(claimed)
            await self._take_on(claimed)
        if stream not in self._taking:
            return  # handed over or lost meanwhile (the members' refresh and the renewals
            # run beside this): what was claimed is given back or dropped with the rest
        if len(page) < min(room, PAGE):
            del self._taking[stream]
            self.readable.add(stream)
            wanted_since = self._wanted.pop(stream, None)
            log.info(
                "%s: owns partition %s (waited %.0f ms; took over %d pending entries)",
                self._where,
                stream,
                0.0 if wanted_since is None else (time.monotonic() - wanted_since) * 1000,
                self._claimed.pop(stream, 0),
            )
            self._changed()
        else:
            self._taking[stream] = b"(" + page[-1].id

    # -- handing over, losing ---------------------------------------------------------------

    def _hand_over(self, stream: str) -> None:
        """Stop reading `stream`, to hand it over once what is held of it is done with."""
        self._handing[stream] = time.monotonic()
        self._taking.pop(stream, None)
        self.readable.discard(stream)
        self._changed()

    async def _hand_over_step(self, stream: str) -> None:
        """Give back what is not started; once nothing of `stream` is held and no read of
        it is in flight, delete the lease."""
        if stream not in self._handing:
            return  # lost since the round began
        await self._give_back(stream)
        if stream not in self._handing or self._ledger.ids(stream) or self._busy(stream):
            return  # lost meanwhile, or not done with yet
        # Not owned from here on, before the lease goes (a renewal on its way then finds
        # it gone, and leaves it be); should the delete fail, the lease runs out instead.
        since = self._handing.pop(stream)
        del self.until[stream]
        key = lease_key(stream, self._group)
        await self._nodes.raw(key, "EVAL", _RELEASE, 1, key, self._name)
        log.info(
            "%s: handed partition %s over in %.0f ms",
            self._where,
            stream,
            (time.monotonic() - since) * 1000,
        )

    async def _give_back(self, stream: str) -> None:
        """Leave to the group what is held of `stream` and not started (the next owner
        claims it); parked entries too (left pending, as they are)."""
        left = self._drop(stream)  # before any await: no worker starts one meanwhile
        if left:  # should this fail, they stay pending here, delivered once more than they ran
            await _commands.give_back(
                self._nodes, stream, self._group, self._name, [(i, 0, n) for i, _, n in left]
            )

    def _lose(self, stream: str, why: str) -> None:
        """The lease no longer counts: nothing more of `stream` starts here; what was not
        started is dropped (it stays pending, for the new owner to claim)."""
        del self.until[stream]
        self._taking.pop(stream, None)
        self._handing.pop(stream, None)
        self.readable.discard(stream)
        left = self._drop(stream)
        log.warning(
            "%s: lost partition %s (%s); %d entries not started are left to its next owner",
            self._where,
            stream,
            why,
            len(left),
        )
        self._changed()

    def _drop(self, stream: str) -> list[tuple[bytes, float | None, int]]:
        """Forget what is held of `stream` and not started (it stays pending in Redis, for
        the partition's owner to claim); returns it."""
        ledger = self._ledger
        left = ledger.leave(stream).get(stream, [])
        ledger.given_back(stream, [entry_id for entry_id, _, _ in left])
        parked = list(ledger.parked(stream))
        if parked:
            ledger.unpark(stream, parked)
        return left

    # -- stopping --------------------------------------------------------------------------

    async def leave(self) -> None:
        """At stop, once the consumer is done: delete the leases of the partitions nothing
        is held of any more, and leave the members (best effort: leases run out anyway)."""
        if self._left:
            return
        self._left = True
        for stream in list(self.until):
            if self._ledger.ids(stream):
                continue
            key = lease_key(stream, self._group)
            try:
                await self._nodes.raw(key, "EVAL", _RELEASE, 1, key, self._name)
            except Exception as exc:
                log.warning(
                    "%s: could not release partition %s (%s); its lease runs out in %d ms",
                    self._where,
                    stream,
                    explain(exc),
                    self._lease_ms,
                )
                continue
            del self.until[stream]
            log.info("%s: released partition %s at stop", self._where, stream)
        try:
            await self._beat(0)
        except Exception as exc:
            log.debug("%s: could not leave the members: %s", self._where, explain(exc))

"""The ledger of one consumer: every entry Redis delivered to it that it is not done with.

An entry is held from its delivery to this consumer (a read, or a claim) until it is done
with here (acked, moved to the dead-letter stream, given back, or found deleted), and while
held it is in exactly one state:

    queued -> running -> acking ------------------------------> done (XACK answered)
                |-> retrying (waits out its backoff) -> claimed again -> queued
                |-> parked (out of deliveries, no dead-letter stream: left pending)
                |-> moving (its move to the dead-letter stream failed: tried again later)
                '-> done (moved to the dead-letter stream)

Only the ledger changes these counts and id sets; the reader, the workers, the failure
policy and the recovery ask it. Every state counts against the bound: the consumer holds at
most `limit` (concurrency + batch_size) entries, retrying and parked ones included, so
whatever the handler does, Redis never hands it more. Entries in memory (queued and
running) also count their bytes: reading waits while they take `max_memory_bytes`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from typing import NamedTuple

from .deadletter import DeadLetter
from .message import Entry

# How long a finished entry may wait for others to share its XACK.
ACK_INTERVAL = 0.002
# An entry's id and size, in C: read for every entry delivered.
_ID = itemgetter(1)
_SIZE = itemgetter(4)


class Retry(NamedTuple):
    """A held entry waiting out its backoff (`due`, loop time) before it runs again."""

    due: float
    deliveries: int


class Ledger:
    """What one consumer holds, by state and by stream; `room()` and waiting for it."""

    __slots__ = (
        "_batch_size",
        "_entry_size",
        "_fewest_streams",
        "_finished_before",
        "_ids",
        "_in_flight_count",
        "_max_memory",
        "_moving",
        "_n_streams",
        "_parked",
        "_read_size",
        "_reading",
        "_retries",
        "_room_waiters",
        "ack_count",
        "ack_due",
        "acks",
        "closed",
        "held",
        "limit",
        "memory",
        "queue",
        "reads_paused",
        "received",
        "running",
    )

    def __init__(
        self,
        streams: Sequence[str],
        *,
        limit: int,
        batch_size: int,
        max_memory_bytes: int,
        read_size: int | None = None,
    ) -> None:
        self.limit = limit
        self._batch_size = batch_size
        # The most one read brings (in all its streams): `batch_size` unless told less.
        self._read_size = batch_size if read_size is None else read_size
        self._n_streams = len(streams)
        self._max_memory = max_memory_bytes
        # Every state at once: how many entries are held, and their ids by stream.
        self.held = 0
        # Entries delivered since the start (read, or claimed), held or not any more.
        self.received = 0
        self._ids: dict[str, set[bytes]] = {stream: set() for stream in streams}
        # Queued: the workers take from the left (the per-entry path uses it directly).
        self.queue: deque[Entry] = deque()
        self.running = 0
        # Bytes of the queued and running entries' fields, and the size reads are planned
        # with (0 until the first entries arrive: then a read takes one entry per stream).
        self.memory = 0
        self._entry_size = 0
        # Acking: finished, waiting for the next XACK (`acks`), or in one (in flight).
        self.acks: dict[str, list[bytes]] = {stream: [] for stream in streams}
        self.ack_count = 0
        self._in_flight_count = 0
        self.ack_due = asyncio.Event()
        # Entries finished and acked since the start (see `successes`).
        self._finished_before = 0
        self._retries: dict[str, dict[bytes, Retry]] = {stream: {} for stream in streams}
        self._parked: dict[str, dict[bytes, int]] = {stream: {} for stream in streams}
        self._moving: dict[str, dict[bytes, DeadLetter]] = {stream: {} for stream in streams}
        # What the XREADGROUP on its way may bring (room kept for it, not to be claimed).
        self._reading = 0
        # The fewest streams a waiting reader reads (several readers: one per hash slot).
        self._fewest_streams = len(streams)
        # Set by the failure policy when handlers keep failing; the first success clears it.
        self.reads_paused = False
        self.closed = False
        self._room_waiters: list[asyncio.Future[None]] = []

    # -- what is held ------------------------------------------------------------------

    def room(self) -> int:
        """How many more entries may be claimed: what is not held, nor kept for a read."""
        return self.limit - self.held - self._reading

    def holds(self, stream: str, entry_id: bytes) -> bool:
        return entry_id in self._ids[stream]

    def ids(self, stream: str) -> list[bytes]:
        """The ids of `stream` held now, in every state (a copy: it is awaited over)."""
        return list(self._ids[stream])

    @property
    def successes(self) -> int:
        """How many entries have been handled so far (it grows with each success)."""
        return self._finished_before + self._in_flight_count + self.ack_count

    def states(self) -> dict[str, int]:
        """How many entries are held in each state; they add up to `held`."""
        return {
            "queued": len(self.queue),
            "running": self.running,
            "acking": self.ack_count + self._in_flight_count,
            "retrying": sum(map(len, self._retries.values())),
            "parked": sum(map(len, self._parked.values())),
            "moving": sum(map(len, self._moving.values())),
        }

    # -- reading -----------------------------------------------------------------------

    def read_count(self, streams: int | None = None) -> int:
        """COUNT for the next XREADGROUP (per stream) over `streams` streams (all of them by
        default); 0 while the reader should wait.

        A read brings at most `read_size` entries (`lanes.read_size`: a batch, but less
        for a pipeline's handler of one entry per call). It is sent when there is room for
        a whole batch (room is left to build up meanwhile: the recovery's claims take it
        too), less rather than let the workers run dry; never more than fits in
        `max_memory_bytes` at the size of recent entries. Several readers (one per hash
        slot, on a cluster) share the room: each read keeps room for what it may bring
        until its reply is in.
        """
        if self.reads_paused or self.closed:
            return 0
        streams = streams or self._n_streams
        room = self.limit - self.held - self._reading
        if room < streams or (room < self._batch_size and self.queue):
            return 0
        count = min(self._read_size, room)
        size = self._entry_size
        if size == 0:
            return 1
        # What other reads on their way may bring counts too (several readers, on a cluster).
        fits = (self._max_memory - self.memory - self._reading * size) // size
        if fits < streams:
            if self.memory:
                return 0
            fits = streams  # one entry larger than the limit is still read, on its own
        return min(count, fits) // streams

    def read_started(self, count: int, streams: int | None = None) -> int:
        """An XREADGROUP asking for `count` per stream of `streams` (all by default) is on
        its way: keep room for it. Returns the room kept, for `read_ended`."""
        kept = count * (streams or self._n_streams)
        self._reading += kept
        return kept

    def read_ended(self, kept: int) -> None:
        """Its reply is in (and delivered first, with no await between), or it failed. The
        room it kept is free again: a reader waiting for room (one of several, on a
        cluster) may read now."""
        self._reading -= kept
        self.wake_reader()

    async def wait_for_room(self, streams: int | None = None) -> None:
        """Wait until `read_count(streams)` is above 0, or the ledger is closed."""
        if streams is not None and streams < self._fewest_streams:
            self._fewest_streams = streams
        loop = asyncio.get_running_loop()
        while not self.read_count(streams) and not self.closed:
            waiter = loop.create_future()
            self._room_waiters.append(waiter)
            await waiter

    def wake_reader(self) -> None:
        """A waiting reader may read now (room freed, or the workers ran dry): wake it.
        (Those of several readers that read fewer streams may read sooner than the others:
        each woken reader asks again for its own streams.)"""
        if self._room_waiters and self.read_count(self._fewest_streams):
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """Stop reading for good: a waiting reader returns."""
        self.closed = True
        self._wake_waiters()

    def pause_reads(self) -> None:
        self.reads_paused = True

    def resume_reads(self) -> None:
        if self.reads_paused:
            self.reads_paused = False
            self._wake_waiters()

    # -- delivered -> queued -----------------------------------------------------------

    def delivered(self, entries: list[Entry]) -> None:
        """Entries delivered to this consumer and not held yet (read with `>`, or claimed)."""
        if not entries:
            return
        self._in_memory(entries)
        self.held += len(entries)
        self.received += len(entries)
        if self._n_streams == 1:
            self._ids[entries[0][0]].update(map(_ID, entries))
        else:
            ids = self._ids
            for entry in entries:
                ids[entry[0]].add(entry[1])
        self.queue.extend(entries)

    def hold_running(self, entry: Entry) -> None:
        """An entry claimed only to be moved to the dead-letter stream: held, and running
        (its move) at once."""
        self.held += 1
        self._ids[entry[0]].add(entry[1])
        self.running += 1
        self._in_memory([entry])

    def _in_memory(self, entries: list[Entry]) -> None:
        """Count the bytes of entries brought into memory; reads are planned with the size
        of the largest of recent ones."""
        self._entry_size = max(max(map(_SIZE, entries)), self._entry_size // 2)
        self.memory += sum(map(_SIZE, entries))

    # -- queued -> running -> acking ---------------------------------------------------

    def start(self) -> Entry:
        """A worker takes the next queued entry (the queue must not be empty)."""
        self.running += 1
        return self.queue.popleft()

    def start_many(self, most: int) -> list[Entry]:
        queue = self.queue
        taken = [queue.popleft() for _ in range(min(len(queue), most))]
        self.running += len(taken)
        return taken

    def finished(self, entry: Entry) -> None:
        """The handler returned: the entry waits for its XACK (sent soon, with others)."""
        self.running -= 1
        self.memory -= entry[4]
        self.acks[entry[0]].append(entry[1])
        count = self.ack_count = self.ack_count + 1
        if count >= self._batch_size or self._room_waiters:
            self.ack_due.set()
        elif count == 1:
            asyncio.get_running_loop().call_later(ACK_INTERVAL, self.ack_due.set)
        if self.reads_paused:
            self.resume_reads()

    def finished_many(self, entries: list[Entry]) -> None:
        """A batch handler returned: its entries wait for their XACK together."""
        first = self.ack_count == 0
        acks = self.acks
        for entry in entries:
            acks[entry[0]].append(entry[1])
        self.running -= len(entries)
        self.memory -= sum(map(_SIZE, entries))
        self.ack_count += len(entries)
        if self.ack_count >= self._batch_size or self._room_waiters:
            self.ack_due.set()
        elif first:  # as in finished: one timer per ack batch, not one per call
            asyncio.get_running_loop().call_later(ACK_INTERVAL, self.ack_due.set)
        if self.reads_paused:
            self.resume_reads()

    def take_acks(self, streams: Iterable[str] | None = None) -> tuple[dict[str, list[bytes]], int]:
        """The finished entries of `streams` (all by default), by stream, for one XACK each;
        in flight until answered. (On a cluster, each master's streams are acked apart, so
        a master that does not answer holds up only its own.)"""
        if streams is None:
            batch = {stream: ids for stream, ids in self.acks.items() if ids}
            count = self.ack_count
        else:
            batch = {stream: ids for stream in streams if (ids := self.acks[stream])}
            count = sum(map(len, batch.values()))
        for stream in batch:
            self.acks[stream] = []  # the lists go; the dict the workers append through stays
        self.ack_count -= count
        self._in_flight_count += count
        return batch, count

    def acked(self, batch: dict[str, list[bytes]], count: int) -> None:
        """The XACK of `batch` was answered: done with those entries."""
        self._in_flight_count -= count
        self._finished_before += count
        for stream, ids in batch.items():
            self._ids[stream].difference_update(ids)
        self.held -= count
        self.wake_reader()

    def ack_failed(self, batch: dict[str, list[bytes]], count: int) -> None:
        """The XACK of `batch` did not get through: they wait for the next one, first."""
        self._in_flight_count -= count
        for stream, ids in batch.items():
            self.acks[stream] = ids + self.acks[stream]
        self.ack_count += count

    # -- running -> retrying, parked, moving, or done ---------------------------------

    def _stopped_running(self, entry: Entry) -> None:
        self.running -= 1
        self.memory -= entry[4]

    def retry_at(self, entry: Entry, due: float) -> None:
        """The entry failed: it waits here until `due` (loop time), then runs again."""
        self._stopped_running(entry)
        self._retries[entry[0]][entry[1]] = Retry(due, entry[3])
        self.wake_reader()

    def park(self, entry: Entry) -> None:
        """Out of deliveries with no dead-letter stream: held, and never run again."""
        self._stopped_running(entry)
        self._parked[entry[0]][entry[1]] = entry[3]

    def move_later(self, entry: Entry, letter: DeadLetter) -> None:
        """Its move to the dead-letter stream (as `letter`) failed: held until it is tried
        again."""
        self._stopped_running(entry)
        self._moving[entry[0]][entry[1]] = letter
        self.wake_reader()

    def dead_lettered(self, entry: Entry) -> None:
        """Moved to the dead-letter stream (acked in the same step), or found to be no
        longer this consumer's to move: done with."""
        self._stopped_running(entry)
        self._release(entry[0], [entry[1]])

    def cancelled(self, entries: Sequence[Entry]) -> None:
        """Running entries whose handler was cancelled: they stay held, as retries due now
        (pending in Redis; at stop they are given back)."""
        now = asyncio.get_running_loop().time()
        for entry in entries:
            self._stopped_running(entry)
            self._retries[entry[0]][entry[1]] = Retry(now, entry[3])

    # -- retrying, parked, moving -> ... ---------------------------------------------

    def waits_for_retry(self, stream: str, entry_id: bytes) -> bool:
        return entry_id in self._retries[stream]

    def retries(self) -> Iterator[tuple[str, bytes, Retry]]:
        """Every entry waiting for a retry: (stream, id, its retry)."""
        for stream, retries in self._retries.items():
            for entry_id, retry in retries.items():
                yield stream, entry_id, retry

    def rerun(self, stream: str, claimed: list[Entry], asked: Sequence[bytes]) -> None:
        """Retries `asked` were claimed back: those `claimed` are queued again (each a new
        delivery); the rest are no longer pending here (deleted, or acked by hand)."""
        retries = self._retries[stream]
        # Those dropped meanwhile (a partition handed over or lost, with `ordered=True`)
        # are not this consumer's to run: left pending, for the partition's owner.
        still = [entry_id for entry_id in asked if retries.pop(entry_id, None) is not None]
        if len(still) < len(asked):
            kept = set(still)
            claimed = [entry for entry in claimed if entry[1] in kept]
        asked = still
        back = {entry[1] for entry in claimed}
        self._release(stream, [entry_id for entry_id in asked if entry_id not in back])
        if claimed:
            # Their sizes may lower the size reads are planned with: room for more.
            self._in_memory(claimed)
            self.queue.extend(claimed)
            self.wake_reader()

    def moves(self) -> Iterator[tuple[str, bytes, DeadLetter]]:
        """Every entry waiting for its move: (stream, id, the dead letter it becomes)."""
        for stream, moving in self._moving.items():
            for entry_id, letter in moving.items():
                yield stream, entry_id, letter

    def moved(self, stream: str, entry_id: bytes) -> None:
        """A held move went through (or the entry is gone): done with."""
        del self._moving[stream][entry_id]
        self._release(stream, [entry_id])

    def unpark(self, stream: str, gone: Iterable[bytes]) -> None:
        """Parked entries no longer pending on this consumer (acked by hand, or claimed by
        another): done with."""
        parked = self._parked[stream]
        released = [entry_id for entry_id in gone if parked.pop(entry_id, None) is not None]
        self._release(stream, released)

    def parked(self, stream: str) -> dict[bytes, int]:
        return dict(self._parked[stream])

    def _release(self, stream: str, ids: list[bytes]) -> None:
        if ids:
            self._ids[stream].difference_update(ids)
            self.held -= len(ids)
            self.wake_reader()

    # -- stopping ----------------------------------------------------------------------

    def leave(self, only: str | None = None) -> dict[str, list[tuple[bytes, float | None, int]]]:
        """At stop (or when a partition is handed over: of stream `only`): the entries not
        run to the end here, to give back to the group, by stream, as (id, when its retry
        is due or None to run at once, deliveries it ran).

        Queued entries never started: their delivery here did not run, so it is not
        counted. Entries waiting for a retry keep their count and their due time.
        """
        left: dict[str, list[tuple[bytes, float | None, int]]] = {
            s: [] for s in self._ids if only is None or s == only
        }
        for stream, entry_id, _, deliveries, _ in self.queue:
            if stream in left:
                left[stream].append((entry_id, None, deliveries - 1))
        for stream, entry_id, retry in self.retries():
            if stream in left:
                left[stream].append((entry_id, retry.due, retry.deliveries))
        return left

    def given_back(self, stream: str, ids: list[bytes]) -> None:
        """Entries left to the group at stop: done with here."""
        gone = set(ids)
        queue = self.queue
        kept = [entry for entry in queue if entry[0] != stream or entry[1] not in gone]
        self.memory -= sum(entry[4] for entry in queue) - sum(entry[4] for entry in kept)
        queue.clear()  # in place: the workers hold this deque
        queue.extend(kept)
        retries = self._retries[stream]
        for entry_id in ids:
            retries.pop(entry_id, None)
        self._release(stream, ids)

"""The ledger on its own (no Redis): what one consumer holds, in each state, as the reader,
the workers, the failure policy and the recovery move entries through it, and how much the
reader may ask for."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from asyncstreams.codec import plan_handler
from asyncstreams.deadletter import DeadLetter, Reason, dead_letter
from asyncstreams.lanes import KeyedLedger, key_function, make_ledger, order
from asyncstreams.ledger import Ledger, Retry
from asyncstreams.message import Entry, Message, entry
from asyncstreams.options import ConsumerOptions
from asyncstreams.outbox import Outbox

pytestmark = pytest.mark.anyio

T = TypeVar("T")
Key = tuple[str, bytes]

STREAMS = ("a", "b", "c")
# Claimed entries delivered more often than this are only moved (`hold_running`), not run.
MAX_DELIVERIES = 3
# Entry sizes in bytes: mostly small, some larger than a whole `max_memory_bytes`.
SIZES = st.one_of(st.integers(1, 40), st.integers(1, 1_000))


def make(stream: str, number: int, size: int = 10, deliveries: int = 1) -> Entry:
    """An entry of `size` bytes: a field "n" and a value of `size - 1` bytes."""
    return entry(stream, f"{number}-0".encode(), [b"n", b"x" * (size - 1)], deliveries)


def letter(item: Entry) -> DeadLetter:
    """The dead letter an entry becomes when its handler failed on its last delivery."""
    return dead_letter(
        stream=item[0],
        entry_id=item[1],
        group="group",
        consumer="consumer",
        deliveries=item[3],
        reason=Reason.FAILED,
        error="ValueError",
    )


def _by_id(left: tuple[bytes, float | None, int]) -> bytes:
    return left[0]


# -- the model ---------------------------------------------------------------------------

# The model's states, and the ledger state each counts in. "running" entries are run by a
# handler; "rejecting" ones were claimed only to be moved to the dead-letter stream.
LEDGER_STATE = {
    "queued": "queued",
    "running": "running",
    "rejecting": "running",
    "buffered": "acking",
    "in_flight": "acking",
    "retrying": "retrying",
    "parked": "parked",
    "moving": "moving",
    "waiting": "waiting",
}


class LedgerMachine(RuleBasedStateMachine):
    """One consumer's ledger, driven as the runtime drives it, against a model of what it
    holds in each state.

    The ledger's timers and loop time need a running loop: every call runs in this machine's
    own event loop, which then runs a few more iterations so a reader woken by the call
    returns before the checks."""

    ledger: Ledger

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.streams: tuple[str, ...] = ()
        self.batch_size = 0
        self.max_memory = 0
        self.numbers = itertools.count(1)  # entry ids, never reused
        # Every held entry (as last delivered) and its state.
        self.entries: dict[Key, Entry] = {}
        self.state: dict[Key, str] = {}
        self.queue: list[Key] = []
        self.buffered: dict[str, list[bytes]] = {}
        self.in_flight: tuple[dict[str, list[bytes]], int] | None = None
        self.retry: dict[Key, Retry] = {}
        self.move: dict[Key, DeadLetter] = {}
        # A read asked for (its COUNT per stream), its reply not delivered yet.
        self.planned = 0
        self.kept = 0
        # Ledger calls made so far, and after how many the consumer may stop.
        self.calls = 0
        self.stop_after = 0
        # A reader waiting in `wait_for_room`.
        self.reader: asyncio.Task[None] | None = None

    def teardown(self) -> None:
        reader = self.reader
        if reader is not None and not reader.done():
            reader.cancel()
            self.loop.run_until_complete(asyncio.wait([reader]))
        self.loop.close()

    # -- running ledger calls ------------------------------------------------------------

    def _do(self, call: Callable[[], T], *, wakes: bool = False) -> T:
        """Run `call` in the loop; `wakes`: the call promises to wake a waiting reader
        when it leaves room to read (or closes the ledger)."""

        async def step() -> T:
            result = call()
            for _ in range(3):
                await asyncio.sleep(0)
            return result

        result = self.loop.run_until_complete(step())
        self.calls += 1
        reader = self.reader
        if reader is not None:
            ledger = self.ledger
            if reader.done():
                reader.result()
                assert ledger.closed or ledger.read_count() > 0, "wait_for_room returned early"
                self.reader = None
            elif wakes:
                assert not ledger.closed, "close() did not wake the reader"
                assert ledger.read_count() == 0, "a reader waiting for room was not woken"
        return result

    # -- the model -----------------------------------------------------------------------

    def _keys(self, *states: str) -> list[Key]:
        return [key for key, state in self.state.items() if state in states]

    def _hold(self, item: Entry, state: str) -> None:
        key = (item[0], item[1])
        assert key not in self.state
        self.entries[key] = item
        self.state[key] = state
        if state == "queued":
            self.queue.append(key)

    def _done(self, key: Key) -> None:
        del self.entries[key]
        del self.state[key]

    def _freed(self, keys: list[Key]) -> None:
        """These entries stopped holding whatever they held (key lanes: their key)."""

    def _handler_running(self) -> list[Key]:
        return self._keys("running")

    def _runnable_retries(self) -> list[Key]:
        return [key for key in self._keys("running") if self.entries[key][3] < MAX_DELIVERIES]

    # -- set-up --------------------------------------------------------------------------

    @initialize(
        streams=st.integers(1, len(STREAMS)),
        concurrency=st.integers(1, 4),
        extra=st.integers(0, 4),
        max_memory=st.integers(1, 2_000),
        stop_after=st.integers(0, 100),
    )
    def configure(
        self, streams: int, concurrency: int, extra: int, max_memory: int, stop_after: int
    ) -> None:
        self.stop_after = stop_after
        self.streams = STREAMS[:streams]
        self.batch_size = streams + extra  # options: batch_size >= the number of streams
        self.max_memory = max_memory
        self.buffered = {stream: [] for stream in self.streams}
        self.ledger = self._ledger(concurrency + self.batch_size)

    def _ledger(self, limit: int) -> Ledger:
        return Ledger(
            self.streams, limit=limit, batch_size=self.batch_size, max_memory_bytes=self.max_memory
        )

    def _make(
        self, data: st.DataObject, stream: str, size: int, deliveries: int = 1, *, claimed: bool
    ) -> Entry:
        """A new entry (`claimed`: by a claim, not a read)."""
        return make(stream, next(self.numbers), size, deliveries)

    # -- delivered: the reader and the recovery's claims ---------------------------------

    @precondition(lambda self: self.planned == 0 and self.ledger.read_count() > 0)
    @precondition(lambda self: self.planned == 0)
    @rule()
    def ask_to_read(self) -> None:
        """The reader sends XREADGROUP with COUNT `read_count()`, keeping room for its reply;
        other rules run before the reply is delivered."""
        self.planned = self._do(self.ledger.read_count)
        if self.planned:
            self.kept = self._do(functools.partial(self.ledger.read_started, self.planned))

    @precondition(lambda self: self.planned > 0)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        """The reply: up to COUNT new entries of each stream (none, if the read failed)."""
        entries: list[Entry] = []
        for stream in self.streams:
            sizes = data.draw(st.lists(SIZES, max_size=self.planned), label=stream)
            entries += [self._make(data, stream, size, claimed=False) for size in sizes]

        def reply() -> None:
            self.ledger.read_ended(self.kept)
            self.ledger.delivered(entries)

        self._do(reply)
        for item in entries:
            self._hold(item, "queued")
        self.planned = 0

    @precondition(
        lambda self: (
            not self.ledger.closed and not self.ledger.reads_paused and self.ledger.room() >= 1
        )
    )
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        """Entries claimed (own pending ones, or other consumers' idle ones), as many as
        there is room for: those out of deliveries are held only to be moved."""
        stream = data.draw(st.sampled_from(self.streams))
        most = min(self.ledger.room(), self.batch_size)
        specs = data.draw(
            st.lists(
                st.tuples(SIZES, st.integers(1, MAX_DELIVERIES + 2)), min_size=1, max_size=most
            )
        )
        # A claim's entries come in id order (XAUTOCLAIM, XPENDING pages).
        claimed = sorted(
            (self._make(data, stream, size, n, claimed=True) for size, n in specs),
            key=lambda item: order(item[1]),
        )
        runnable = [item for item in claimed if item[3] <= MAX_DELIVERIES]
        self._do(lambda: self.ledger.delivered(runnable))
        for item in runnable:
            self._hold(item, "queued")
        for item in claimed:
            if item[3] > MAX_DELIVERIES:
                self._do(functools.partial(self.ledger.hold_running, item))
                self._hold(item, "rejecting")

    # -- queued -> running -> acking -----------------------------------------------------

    @precondition(lambda self: self.queue)
    @rule()
    def start(self) -> None:
        item = self._do(self.ledger.start)
        key = self.queue.pop(0)
        assert item == self.entries[key]
        self.state[key] = "running"

    @precondition(lambda self: self.queue)
    @rule(most=st.integers(1, 8))
    def start_many(self, most: int) -> None:
        taken = self._do(lambda: self.ledger.start_many(most))
        keys, self.queue = self.queue[:most], self.queue[most:]
        assert taken == [self.entries[key] for key in keys]
        for key in keys:
            self.state[key] = "running"

    def _finished(self, keys: list[Key], *, many: bool) -> None:
        ledger = self.ledger
        waiting = self.reader is not None
        wakes = ledger.reads_paused  # a success resumes reading
        items = [self.entries[key] for key in keys]
        if many:
            self._do(lambda: ledger.finished_many(items), wakes=wakes)
        else:
            self._do(functools.partial(ledger.finished, items[0]), wakes=wakes)
        for stream, entry_id in keys:
            self.state[stream, entry_id] = "buffered"
            self.buffered[stream].append(entry_id)
        self._freed(keys)
        assert not ledger.reads_paused
        # A full batch, or a reader waiting for room: the acks go at once, not after
        # ACK_INTERVAL (unless this success resumed reading: that wakes the reader itself).
        if (waiting and not wakes) or ledger.ack_count >= self.batch_size:
            assert ledger.ack_due.is_set(), "the acks are not flushed at once"

    @precondition(lambda self: self._handler_running())
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self._finished([data.draw(st.sampled_from(self._handler_running()))], many=False)

    @precondition(lambda self: self._handler_running())
    @rule(data=st.data())
    def finish_many(self, data: st.DataObject) -> None:
        keys = data.draw(
            st.lists(st.sampled_from(self._handler_running()), min_size=1, unique=True)
        )
        self._finished(keys, many=True)

    @precondition(lambda self: self.in_flight is None and any(self.buffered.values()))
    @rule()
    def take_acks(self) -> None:
        """The ack flusher wakes (clearing `ack_due`) and sends one XACK per stream."""
        self.ledger.ack_due.clear()
        batch, count = self._do(self.ledger.take_acks)
        expected = {stream: ids for stream, ids in self.buffered.items() if ids}
        assert batch == expected
        assert count == sum(map(len, expected.values()))
        for stream, ids in batch.items():
            for entry_id in ids:
                self.state[stream, entry_id] = "in_flight"
        self.buffered = {stream: [] for stream in self.streams}
        self.in_flight = (batch, count)

    @precondition(lambda self: self.in_flight is not None)
    @rule()
    def acked(self) -> None:
        assert self.in_flight is not None
        batch, count = self.in_flight
        self._do(lambda: self.ledger.acked(batch, count), wakes=True)
        for stream, ids in batch.items():
            for entry_id in ids:
                self._done((stream, entry_id))
        self.in_flight = None

    @precondition(lambda self: self.in_flight is not None)
    @rule()
    def ack_failed(self) -> None:
        assert self.in_flight is not None
        batch, count = self.in_flight
        self._do(lambda: self.ledger.ack_failed(batch, count))
        for stream, ids in batch.items():
            for entry_id in ids:
                self.state[stream, entry_id] = "buffered"
            self.buffered[stream] = ids + self.buffered[stream]
        self.in_flight = None

    # -- running -> retrying, parked, moving, or done -----------------------------------

    @precondition(lambda self: self._runnable_retries())
    @rule(data=st.data(), delay=st.floats(0, 10))
    def fail(self, data: st.DataObject, delay: float) -> None:
        """The handler raised on a delivery before the last: a retry after a backoff."""
        key = data.draw(st.sampled_from(self._runnable_retries()))
        item = self.entries[key]
        due = self.loop.time() + delay
        self._do(lambda: self.ledger.retry_at(item, due), wakes=True)
        self.state[key] = "retrying"
        self.retry[key] = Retry(due, item[3])

    @precondition(lambda self: self._keys("running", "rejecting"))
    @rule(data=st.data())
    def park(self, data: st.DataObject) -> None:
        """Out of deliveries (or not decodable, too large) with no dead-letter stream."""
        key = data.draw(st.sampled_from(self._keys("running", "rejecting")))
        self._do(functools.partial(self.ledger.park, self.entries[key]))
        self.state[key] = "parked"
        self._freed([key])

    @precondition(lambda self: self._keys("running", "rejecting"))
    @rule(data=st.data())
    def move_later(self, data: st.DataObject) -> None:
        """Its move to the dead-letter stream failed."""
        key = data.draw(st.sampled_from(self._keys("running", "rejecting")))
        item = self.entries[key]
        move = letter(item)
        self._do(lambda: self.ledger.move_later(item, move), wakes=True)
        self.state[key] = "moving"
        self.move[key] = move
        self._freed([key])

    @precondition(lambda self: self._keys("running", "rejecting"))
    @rule(data=st.data())
    def dead_lettered(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self._keys("running", "rejecting")))
        self._do(functools.partial(self.ledger.dead_lettered, self.entries[key]), wakes=True)
        self._done(key)
        self._freed([key])

    @precondition(lambda self: self._handler_running())
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """The consumer's stop cancelled handlers: their entries are retries due now."""
        keys = data.draw(
            st.lists(st.sampled_from(self._handler_running()), min_size=1, unique=True)
        )
        before = self.loop.time()
        self._do(lambda: self.ledger.cancelled([self.entries[key] for key in keys]))
        retries = {(stream, entry_id): retry for stream, entry_id, retry in self.ledger.retries()}
        for key in keys:
            retry = retries[key]
            assert before <= retry.due <= self.loop.time()
            assert retry.deliveries == self.entries[key][3]
            self.state[key] = "retrying"
            self.retry[key] = retry

    @precondition(lambda self: self.move)
    @rule(data=st.data())
    def moved(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(list(self.move)))
        self._do(lambda: self.ledger.moved(*key), wakes=True)
        del self.move[key]
        self._done(key)

    # -- retrying, parked -> ... --------------------------------------------------------

    @precondition(lambda self: self.retry)
    @rule(data=st.data())
    def claim_back(self, data: st.DataObject) -> None:
        """Due retries of one stream are claimed back with XCLAIM (a new delivery each);
        those missing from its reply were deleted meanwhile."""
        stream = data.draw(st.sampled_from(sorted({stream for stream, _ in self.retry})))
        waiting = [key for key in self.retry if key[0] == stream]
        asked = data.draw(st.lists(st.sampled_from(waiting), min_size=1, unique=True))
        back = data.draw(st.lists(st.sampled_from(asked), unique=True).map(set))
        claimed: list[Entry] = []
        for key in asked:
            if key in back:
                _, entry_id, flat, deliveries, size = self.entries[key]
                claimed.append((stream, entry_id, flat, deliveries + 1, size))
        ids = [entry_id for _, entry_id in asked]
        self._do(lambda: self.ledger.rerun(stream, claimed, ids), wakes=len(back) < len(asked))
        for key in asked:
            del self.retry[key]
            if key not in back:
                self._done(key)
        self._freed([key for key in asked if key not in back])
        for item in claimed:
            key = (item[0], item[1])
            self.entries[key] = item
            self.state[key] = "queued"
            self.queue.append(key)

    @precondition(lambda self: self._keys("parked"))
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        """The renewal found some held entries (in any state) no longer pending: only the
        parked ones are released by it."""
        stream = data.draw(st.sampled_from(self.streams))
        held = sorted(self.ledger.ids(stream))
        gone = data.draw(st.lists(st.sampled_from([*held, b"0-1"]), unique=True))
        released = [
            (stream, entry_id)
            for entry_id in gone
            if self.state.get((stream, entry_id)) == "parked"
        ]
        self._do(lambda: self.ledger.unpark(stream, gone), wakes=bool(released))
        for key in released:
            self._done(key)

    # -- reading, pausing and stopping ---------------------------------------------------

    @precondition(
        lambda self: (
            self.reader is None and not self.ledger.closed and self.ledger.read_count() == 0
        )
    )
    @rule()
    def wait_for_room(self) -> None:
        self.reader = self.loop.create_task(self.ledger.wait_for_room())
        self._do(lambda: None)

    @precondition(lambda self: not self.ledger.reads_paused and self.retry)
    @rule()
    def pause_reads(self) -> None:
        """Handler runs kept failing."""
        self._do(self.ledger.pause_reads)

    @precondition(lambda self: self.ledger.reads_paused and not self.retry)
    @rule()
    def resume_reads(self) -> None:
        """Paused, with no retry left to probe with."""
        self._do(self.ledger.resume_reads, wakes=self.ledger.reads_paused)

    @precondition(lambda self: not self.ledger.closed and self.calls >= self.stop_after)
    @rule()
    def close(self) -> None:
        """The consumer stops: it reads and claims no more."""
        self._do(self.ledger.close, wakes=True)

    @precondition(lambda self: self.ledger.closed)
    @rule(data=st.data())
    def give_back(self, data: st.DataObject) -> None:
        """At stop: what was never started, and the retries, are left to the group (the
        give-back of a stream may fail: its entries stay held)."""
        left = self._do(self.ledger.leave)
        assert set(left) == set(self.streams)
        for stream in self.streams:
            expected = [
                (entry_id, None, self.entries[stream, entry_id][3] - 1)
                for s, entry_id in [*self.queue, *self._keys("waiting")]
                if s == stream
            ] + [
                (entry_id, retry.due, retry.deliveries)
                for (s, entry_id), retry in self.retry.items()
                if s == stream
            ]
            assert sorted(left[stream], key=_by_id) == sorted(expected, key=_by_id)
            if not left[stream] or not data.draw(st.booleans(), label=f"give back {stream}"):
                continue
            ids = [entry_id for entry_id, _, _ in left[stream]]
            self._do(functools.partial(self.ledger.given_back, stream, ids), wakes=True)
            for entry_id in ids:
                key = (stream, entry_id)
                self.retry.pop(key, None)
                if key in self.queue:
                    self.queue.remove(key)
                self._done(key)
            self._freed([(stream, entry_id) for entry_id in ids])

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def the_states_add_up_to_what_is_held(self) -> None:
        ledger = self.ledger
        states = ledger.states()
        assert sum(states.values()) == ledger.held
        assert ledger.held == len(self.state)
        expected = dict.fromkeys(states, 0)
        for state in self.state.values():
            expected[LEDGER_STATE[state]] += 1
        assert states == expected
        assert min(states.values(), default=0) >= 0
        assert ledger.ack_count == sum(map(len, self.buffered.values())) >= 0

    @invariant()
    def the_ids_are_those_held(self) -> None:
        ledger = self.ledger
        for stream in self.streams:
            ids = ledger.ids(stream)
            assert len(ids) == len(set(ids))
            assert set(ids) == {entry_id for s, entry_id in self.state if s == stream}
        assert all(ledger.holds(*key) for key in self.state)

    @invariant()
    def each_state_holds_its_entries(self) -> None:
        ledger = self.ledger
        assert list(ledger.queue) == [self.entries[key] for key in self.queue]
        assert {s: ids for s, ids in ledger.acks.items() if ids} == {
            s: ids for s, ids in self.buffered.items() if ids
        }
        assert {(s, i): retry for s, i, retry in ledger.retries()} == self.retry
        assert {(s, i): move for s, i, move in ledger.moves()} == self.move
        for stream in self.streams:
            assert ledger.parked(stream) == {
                entry_id: self.entries[s, entry_id][3]
                for s, entry_id in self._keys("parked")
                if s == stream
            }

    @invariant()
    def room_and_memory(self) -> None:
        ledger = self.ledger
        reading = self.planned * len(self.streams)
        assert ledger.room() == ledger.limit - ledger.held - reading
        assert ledger.held <= ledger.limit, "the bound: concurrency + batch_size"
        in_memory = self._keys("queued", "running", "rejecting", "waiting")
        assert ledger.memory == sum(self.entries[key][4] for key in in_memory) >= 0

    @invariant()
    def reads_stay_within_the_bounds(self) -> None:
        ledger = self.ledger
        count = ledger.read_count()
        streams = len(self.streams)
        assert count >= 0
        if ledger.reads_paused or ledger.closed:
            assert count == 0
        if ledger.held > ledger.limit - streams:
            assert count == 0
        if count:
            assert count * streams <= ledger.room()
            assert count * streams <= self.batch_size
        if ledger.memory >= self.max_memory:
            assert count == 0, "read_count() asks for more while memory is full"
        # ... and it does not hold back for nothing: with room for one entry per stream,
        # nothing in memory and no queued entries waiting for room for a batch, it reads.
        stopped = ledger.reads_paused or ledger.closed
        waits_for_batch = bool(ledger.queue) and ledger.room() < self.batch_size
        if not stopped and not waits_for_batch and ledger.memory == 0:
            assert count >= 1 or ledger.room() < streams


# Without the explain phase: after a failure it alone took 25 s here (the shrunk example is
# printed either way).
TestLedgerMachine = settings(
    max_examples=400,
    stateful_step_count=50,
    deadline=None,
    phases=[phase for phase in Phase if phase is not Phase.explain],
)(LedgerMachine).TestCase


# -- key lanes ---------------------------------------------------------------------------

LANE_KEYS = (b"k0", b"k1", b"k2")


async def _by_message(message: Message) -> None:
    pass


class KeyedLedgerMachine(LedgerMachine):
    """The same, with key lanes (`key="k"`): entries of a few keys (some with none), claims
    with ids older than those held. Each key held has one holder (queued, running or
    waiting for a retry) and the others wait behind it, in id order; a claimed entry older
    than a holder that has not started takes its place."""

    ledger: KeyedLedger

    def __init__(self) -> None:
        super().__init__()
        # Each key held: its holder and the entries waiting behind it, in id order.
        self.lanes: dict[bytes, tuple[Key, list[Key]]] = {}

    def _ledger(self, limit: int) -> Ledger:
        options = ConsumerOptions(self.streams, group="group", key="k")
        return KeyedLedger(
            self.streams,
            limit=limit,
            batch_size=self.batch_size,
            max_memory_bytes=self.max_memory,
            key_of=key_function(plan_handler(_by_message), options, "consumer"),
        )

    def _make(
        self, data: st.DataObject, stream: str, size: int, deliveries: int = 1, *, claimed: bool
    ) -> Entry:
        number = next(self.numbers)
        old = claimed and data.draw(st.booleans(), label="older than what is held")
        entry_id = f"0-{number}" if old else f"{number}-0"
        key = data.draw(st.sampled_from([None, *LANE_KEYS]), label="key")
        flat = [b"n", b"x" * (size - 1)] + ([b"k", key] if key is not None else [])
        return entry(stream, entry_id.encode(), flat, deliveries)

    def _key_of(self, key: Key) -> bytes | None:
        flat = self.entries[key][2]
        return flat[3] if len(flat) > 2 else None

    def _hold(self, item: Entry, state: str) -> None:
        key = (item[0], item[1])
        if state != "queued":
            super()._hold(item, state)
            return
        self.entries[key] = item
        lane_key = self._key_of(key)
        lane = self.lanes.get(lane_key) if lane_key is not None else None
        if lane_key is None or lane is None:
            if lane_key is not None:
                self.lanes[lane_key] = (key, [])
            self.state[key] = "queued"
            self.queue.append(key)
            return
        holder, waiting = lane
        if order(item[1]) < order(holder[1]) and holder in self.queue:
            self.queue[self.queue.index(holder)] = key
            self.state[key] = "queued"
            self.state[holder] = "waiting"
            self.lanes[lane_key] = (key, waiting)
            key = holder
        else:
            self.state[key] = "waiting"
        waiting.append(key)
        waiting.sort(key=lambda k: order(k[1]))

    def _done(self, key: Key) -> None:
        if self.state[key] == "waiting":  # given back
            lane_key = self._key_of(key)
            assert lane_key is not None
            self.lanes[lane_key][1].remove(key)
        super()._done(key)

    def _freed(self, keys: list[Key]) -> None:
        holders = {holder: lane_key for lane_key, (holder, _) in self.lanes.items()}
        for key in keys:
            lane_key = holders.get(key)
            if lane_key is None:
                continue
            waiting = self.lanes[lane_key][1]
            if not waiting:
                del self.lanes[lane_key]
                continue
            after = waiting.pop(0)
            self.lanes[lane_key] = (after, waiting)
            holders[after] = lane_key
            self.state[after] = "queued"
            self.queue.append(after)

    @invariant()
    def the_lanes_are_those_of_the_model(self) -> None:
        ledger = self.ledger
        assert ledger.lanes() == {k: (h, list(w)) for k, (h, w) in self.lanes.items()}
        assert ledger.keys_held == len(self.lanes)
        assert ledger.waiting == len(self._keys("waiting"))

    @invariant()
    def a_key_runs_one_entry_at_a_time(self) -> None:
        holding = [
            lane_key
            for key in self._keys("queued", "running", "retrying")
            if (lane_key := self._key_of(key)) is not None
        ]
        assert len(holding) == len(set(holding))
        for holder, waiting in self.lanes.values():
            assert self.state[holder] in ("queued", "running", "retrying")
            assert all(self.state[key] == "waiting" for key in waiting)
            assert waiting == sorted(waiting, key=lambda k: order(k[1]))


# The same settings as LedgerMachine's (the subclass has them).
TestKeyedLedgerMachine = KeyedLedgerMachine.TestCase


# -- reading: how much, and waiting for room ---------------------------------------------


def full_read(
    ledger: Ledger, streams: Sequence[str], numbers: itertools.count[int], size: int
) -> list[Entry]:
    """Deliver what `read_count()` asks for, entries of `size` bytes from every stream."""
    count = ledger.read_count()
    entries = [make(stream, next(numbers), size) for stream in streams for _ in range(count)]
    ledger.delivered(entries)
    return entries


def test_the_first_read_takes_one_entry_per_stream_then_whole_batches() -> None:
    streams = ["a", "b"]
    numbers = itertools.count(1)
    ledger = Ledger(streams, limit=4 + 100, batch_size=100, max_memory_bytes=1 << 20)
    # The size of entries is not known yet: one per stream first.
    assert ledger.read_count() == 1
    assert len(full_read(ledger, streams, numbers, 20)) == 2
    # Small entries: a whole batch, divided among the streams.
    assert ledger.read_count() == 50
    assert len(full_read(ledger, streams, numbers, 20)) == 100
    # No room for another batch while the workers have entries queued.
    assert ledger.room() == 2
    assert ledger.read_count() == 0
    while ledger.queue:
        ledger.dead_lettered(ledger.start())
    assert ledger.read_count() == 50


async def _one(message: Message) -> None: ...


async def _many(messages: list[Message]) -> None: ...


async def _emits(message: Message, out: Outbox) -> None: ...


@pytest.mark.parametrize(
    ("handler", "options", "read"),
    [
        (_one, {}, 500),  # no pipeline: whole batches
        (_one, {"output": "out"}, 188),  # a third of 64 + 500
        (_emits, {}, 188),  # an Outbox makes a pipeline too
        (_one, {"output": "out", "concurrency": 1000}, 500),  # a third is more: the batch
        (_one, {"output": "out", "concurrency": 2, "batch_size": 2}, 2),  # one per stream
        (_one, {"output": "out", "key": "k"}, 188),
        (_many, {"output": "out"}, 500),  # a batch handler's calls get whole batches
    ],
)
def test_a_pipelines_read_brings_a_third_of_the_bound_others_whole_batches(
    handler: Callable[..., object], options: dict[str, object], read: int
) -> None:
    """A pipeline's reads of a third of the bound let a read, the handlers and the commits
    overlap; other consumers, and a batch handler's (what a call gets), read whole
    batches. Once entries' size is known, a read asks for that many, divided among the
    streams."""
    streams = ["a", "b"]
    consumer = ConsumerOptions(streams, group="g", **options)  # type: ignore[arg-type]
    ledger = make_ledger(plan_handler(handler), consumer, "consumer")
    numbers = itertools.count(1)
    full_read(ledger, streams, numbers, 20)
    assert ledger.read_count() == read // 2
    assert len(full_read(ledger, streams, numbers, 20)) == read // 2 * 2


async def test_a_read_takes_what_fits_in_memory() -> None:
    numbers = itertools.count(1)
    ledger = Ledger(["s"], limit=10 + 10, batch_size=10, max_memory_bytes=1_000)
    assert ledger.read_count() == 1
    full_read(ledger, ["s"], numbers, 300)
    # 700 bytes left: two more entries of 300.
    assert ledger.read_count() == 2
    entries = full_read(ledger, ["s"], numbers, 300)
    assert ledger.memory == 900
    assert ledger.read_count() == 0  # no room in memory for one more
    for _ in range(3):
        ledger.start()
    assert ledger.read_count() == 0  # running entries are in memory too
    ledger.finished(entries[0])
    assert ledger.memory == 600
    assert ledger.read_count() == 1


async def test_readers_share_max_memory_with_the_reads_on_their_way() -> None:
    """Several readers (one per hash slot, on a cluster): what one read may bring counts
    against the memory another plans for."""
    ledger = Ledger(["a", "b"], limit=50 + 50, batch_size=50, max_memory_bytes=1_000)
    ledger.delivered([make("a", 0, size=100)])
    ledger.finished_many(ledger.start_many(1))
    ledger.acked(*ledger.take_acks())
    assert ledger.read_count(1) == 10  # 1,000 bytes of 100-byte entries
    kept = ledger.read_started(6, 1)  # reader of a: 6 of them on their way
    assert ledger.read_count(1) == 4  # reader of b: what is left
    ledger.read_ended(kept)
    assert ledger.read_count(1) == 10


@pytest.mark.parametrize("streams", [["s"], ["a", "b", "c"]])
async def test_an_entry_larger_than_max_memory_is_still_read_on_its_own(
    streams: list[str],
) -> None:
    numbers = itertools.count(1)
    ledger = Ledger(streams, limit=10 + 10, batch_size=10, max_memory_bytes=1_000)
    entries = full_read(ledger, streams, numbers, 5_000)
    assert ledger.memory == 5_000 * len(streams)
    assert ledger.read_count() == 0
    ledger.finished_many(ledger.start_many(10))
    assert ledger.memory == 0
    assert ledger.read_count() == 1  # one per stream: never nothing
    assert len(entries) == len(streams)


def test_an_entry_held_only_to_be_moved_counts_against_memory() -> None:
    """An entry claimed out of deliveries is in memory while it is moved to the dead-letter
    stream: a read waits for it like for any other, here before any entry was read."""
    ledger = Ledger(["s"], limit=10 + 10, batch_size=10, max_memory_bytes=1_000)
    ledger.hold_running(make("s", 1, 5_000, deliveries=MAX_DELIVERIES + 1))
    assert ledger.memory == 5_000
    assert ledger.read_count() == 0, "read_count() asks for more while memory is full"


@settings(max_examples=200, deadline=None)
@given(
    streams=st.integers(1, 3),
    size=st.integers(1, 3_000),
    in_memory=st.integers(1, 20),
    max_memory=st.integers(1, 10_000),
)
def test_reads_fit_in_max_memory_bytes(
    streams: int, size: int, in_memory: int, max_memory: int
) -> None:
    """With entries of one size in memory, a read never takes more than fits beside them
    (unless nothing is in memory: then one per stream)."""
    names = STREAMS[:streams]
    ledger = Ledger(names, limit=100 + 100, batch_size=100, max_memory_bytes=max_memory)
    ledger.delivered([make(names[0], n, size) for n in range(in_memory)])
    running = ledger.start_many(in_memory)  # so the queue holds nothing back
    count = ledger.read_count()
    fits = (max_memory - ledger.memory) // size
    assert count * streams <= max(fits, 0)
    assert count == min(100, max(fits, 0)) // streams
    for item in running:
        ledger.dead_lettered(item)
    assert ledger.memory == 0
    count = ledger.read_count()
    assert count >= 1
    if size * streams <= max_memory:
        assert count * streams * size <= max_memory
    else:
        assert count == 1


@pytest.mark.parametrize("how", ["retry", "park", "move later"])
@pytest.mark.parametrize("streams", [["s"], ["a", "b"]])
async def test_failed_entries_keep_their_place_against_the_bound(
    streams: list[str], how: str
) -> None:
    """Everything read fails: the consumer stops reading once it holds `limit` entries."""
    concurrency, batch_size = 3, 4
    limit = concurrency + batch_size
    ledger = Ledger(streams, limit=limit, batch_size=batch_size, max_memory_bytes=1 << 20)
    loop = asyncio.get_running_loop()
    numbers = itertools.count(1)

    def fail(item: Entry) -> None:
        if how == "retry":
            ledger.retry_at(item, loop.time() + 60)
        elif how == "park":
            ledger.park(item)
        else:
            ledger.move_later(item, letter(item))

    while ledger.read_count():
        full_read(ledger, streams, numbers, 10)
        assert ledger.held <= limit
        while ledger.queue:
            for item in ledger.start_many(concurrency):
                fail(item)
    state = {"retry": "retrying", "park": "parked", "move later": "moving"}[how]
    assert limit - len(streams) < ledger.held <= limit
    assert ledger.states()[state] == ledger.held
    assert ledger.memory == 0
    assert ledger.read_count() == 0
    with anyio.move_on_after(0.05) as waited:
        await ledger.wait_for_room()
    assert waited.cancelled_caught, "wait_for_room() returned with no room"


async def test_wait_for_room_returns_once_an_ack_frees_room() -> None:
    ledger = Ledger(["s"], limit=2 + 3, batch_size=3, max_memory_bytes=1 << 20)
    ledger.delivered([make("s", n) for n in range(5)])
    ledger.finished_many(ledger.start_many(5))
    assert ledger.room() == 0
    reader = asyncio.ensure_future(ledger.wait_for_room())
    await asyncio.sleep(0.01)
    assert not reader.done()
    assert ledger.ack_due.is_set()  # a reader waits: the acks go at once
    batch, count = ledger.take_acks()
    await asyncio.sleep(0.01)
    assert not reader.done()  # in flight: still held
    ledger.acked(batch, count)
    with anyio.fail_after(1):
        await reader
    assert ledger.read_count() == 3


async def test_an_empty_read_of_one_reader_wakes_another_waiting_for_room() -> None:
    """Several readers (one per hash slot, on a cluster) share the room: one waits while
    another's read keeps it; that read coming back empty wakes the one waiting."""
    streams = [f"p{n}" for n in range(3)]
    ledger = Ledger(streams, limit=2 + 4, batch_size=4, max_memory_bytes=1 << 20)
    ledger.delivered([make("p0", 0)])  # known entry size: reads take whole batches
    ledger.finished_many(ledger.start_many(1))
    ledger.acked(*ledger.take_acks())
    kept = ledger.read_started(ledger.read_count(1), 1)  # reader of p1: 4 of the 6
    ledger.delivered([make("p2", 1), make("p2", 2)])  # reader of p2: the other 2
    ledger.start_many(2)
    assert ledger.read_count(1) == 0
    waiting = asyncio.ensure_future(ledger.wait_for_room(1))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    ledger.read_ended(kept)  # p1's read: nothing there
    with anyio.fail_after(1):
        await waiting
    assert ledger.read_count(1) == 4


@pytest.mark.parametrize("how", ["retry", "move later", "dead-letter"])
async def test_a_failed_entry_that_frees_memory_wakes_the_reader(how: str) -> None:
    ledger = Ledger(["s"], limit=10 + 10, batch_size=10, max_memory_bytes=1_000)
    ledger.delivered([make("s", 1, 600)])
    item = ledger.start()
    assert ledger.read_count() == 0  # another entry of 600 bytes does not fit
    reader = asyncio.ensure_future(ledger.wait_for_room())
    await asyncio.sleep(0.01)
    assert not reader.done()
    if how == "retry":
        ledger.retry_at(item, asyncio.get_running_loop().time() + 60)
    elif how == "move later":
        ledger.move_later(item, letter(item))
    else:
        ledger.dead_lettered(item)
    with anyio.fail_after(1):
        await reader
    assert ledger.read_count() == 1


async def test_wait_for_room_returns_when_the_ledger_is_closed() -> None:
    ledger = Ledger(["s"], limit=1 + 1, batch_size=1, max_memory_bytes=1 << 20)
    ledger.delivered([make("s", 1), make("s", 2)])
    reader = asyncio.ensure_future(ledger.wait_for_room())
    await asyncio.sleep(0.01)
    assert not reader.done()
    ledger.close()
    with anyio.fail_after(1):
        await reader
    assert ledger.read_count() == 0
    with anyio.fail_after(1):
        await ledger.wait_for_room()  # closed: returns at once


async def test_pause_reads_stops_reading_and_a_success_resumes() -> None:
    ledger = Ledger(["a", "b"], limit=4 + 10, batch_size=10, max_memory_bytes=1 << 20)
    numbers = itertools.count(1)
    full_read(ledger, ["a", "b"], numbers, 10)
    first, second = ledger.start_many(2)
    ledger.pause_reads()
    assert ledger.read_count() == 0
    reader = asyncio.ensure_future(ledger.wait_for_room())
    await asyncio.sleep(0.01)
    assert not reader.done()
    ledger.finished(first)  # a success
    assert not ledger.reads_paused
    with anyio.fail_after(1):
        await reader
    assert ledger.read_count() == 5
    ledger.pause_reads()
    assert ledger.read_count() == 0
    ledger.finished_many([second])
    assert not ledger.reads_paused
    assert ledger.read_count() == 5


async def test_resume_reads_wakes_the_reader() -> None:
    ledger = Ledger(["s"], limit=1 + 1, batch_size=1, max_memory_bytes=1 << 20)
    ledger.pause_reads()
    reader = asyncio.ensure_future(ledger.wait_for_room())
    await asyncio.sleep(0.01)
    assert not reader.done()
    ledger.resume_reads()
    with anyio.fail_after(1):
        await reader
    assert ledger.read_count() == 1


async def test_a_finished_entry_is_acked_soon() -> None:
    ledger = Ledger(["s"], limit=4 + 10, batch_size=10, max_memory_bytes=1 << 20)
    ledger.delivered([make("s", 1)])
    ledger.finished(ledger.start())
    assert not ledger.ack_due.is_set()  # it waits a moment for others to share its XACK
    with anyio.fail_after(1):
        await ledger.ack_due.wait()
    assert ledger.take_acks() == ({"s": [b"1-0"]}, 1)

"""Key lanes: the ledger of a consumer with `key=`, which runs the entries of one key one at
a time, in id order, and different keys at once.

Each key held has a lane: the entry that holds it (queued, running, or waiting for its
retry) and the entries of the key waiting behind it, in id order (a claimed entry older than
those waiting goes before them). The ledger's queue holds only entries whose key is free
(at most one per key), so the workers take from it as they do without `key=`; when the
holder is done with (its handler returned, or it was dead-lettered, parked or released),
the next entry of its lane is queued.

    delivered -> key free?  yes -> queued (holds the key) -> running -> finished ---+
                            no  -> waiting (behind its key)                         |
                                      ^---- the next of the lane is queued <--------+
                                            (also when the holder is dead-lettered)

A failed holder keeps its key while it waits for its retry: the entries behind it wait
too. Waiting entries are held like the others (they count against the bound, their bytes
against `max_memory_bytes`, and they are renewed); a retry is claimed back without room,
so a consumer whose every held entry waits behind a failed key still runs that retry.

An entry whose key cannot be worked out (the field is missing, the payload does not
decode, the key callable raises or returns something unhashable) holds no key: it is queued
with a DecodeError that its worker raises in place of the handler's call, and the failure
policy moves it to the dead-letter stream.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from operator import itemgetter
from typing import Any

from ._decode import struct_decoder
from .codec import Arg, HandlerPlan, Invoke, InvokeBatch
from .deadletter import DeadLetter
from .errors import DecodeError
from .ledger import Ledger
from .message import Entry, Message, decode_fields
from .options import ConsumerOptions

# The key of an entry; raises DecodeError when it has none.
KeyOf = Callable[[Entry], Hashable]
# An entry id as the numbers it orders by (ms, seq): ids of several streams compare too.
Order = tuple[int, int]
_ORDER = itemgetter(0)
_NONE = object()
_finished = Ledger.finished


def order(entry_id: bytes) -> Order:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _by_id(item: Entry) -> Order:
    return order(item[1])


class KeyedLedger(Ledger):
    """The ledger, with entries queued one key at a time (see the module's docstring)."""

    __slots__ = (
        "_held",
        "_holders",
        "_key_of",
        "_lanes",
        "_max_payload",
        "payloads",
        "ready",
        "unkeyed",
        "waiting",
    )

    def __init__(
        self,
        streams: Sequence[str],
        *,
        limit: int,
        batch_size: int,
        max_memory_bytes: int,
        key_of: KeyOf,
        max_payload_bytes: int | None = None,
        payloads: dict[tuple[str, bytes], Any] | None = None,
        read_size: int | None = None,
    ) -> None:
        super().__init__(
            streams,
            limit=limit,
            batch_size=batch_size,
            max_memory_bytes=max_memory_bytes,
            read_size=read_size,
        )
        self._key_of = key_of
        self._max_payload = max_payload_bytes
        # Each key held and its holder, both ways: key -> (stream, id), (stream, id) -> key.
        # Plain dicts, no object per key: the common entry finds its key free.
        self._held: dict[Hashable, tuple[str, bytes]] = {}
        self._holders: dict[tuple[str, bytes], Hashable] = {}
        # The entries waiting behind each key that has some, in id order.
        self._lanes: dict[Hashable, deque[tuple[Order, Entry]]] = {}
        # Entries waiting behind their key (a state of their own: they add up to `held`).
        self.waiting = 0
        # Queued entries without a key, and why: their worker raises it.
        self.unkeyed: dict[tuple[str, bytes], DecodeError] = {}
        # Called with how many entries were queued when a key frees (wakes the workers).
        self.ready: Callable[[int], None] | None = None
        # The payloads a key callable decoded, for the handler's call (see `guarded`).
        self.payloads = payloads

    # -- what is held ------------------------------------------------------------------

    def states(self) -> dict[str, int]:
        return {**super().states(), "waiting": self.waiting}

    @property
    def keys_held(self) -> int:
        """How many keys are held (by an entry queued, running or waiting for its retry)."""
        return len(self._held)

    def lanes(self) -> dict[Hashable, tuple[tuple[str, bytes], list[tuple[str, bytes]]]]:
        """Each key held: its holder and the entries waiting behind it, in order (a copy)."""
        return {
            key: (holder, [(item[0], item[1]) for _, item in self._lanes.get(key, ())])
            for key, holder in self._held.items()
        }

    def waits_behind(self, stream: str, entry_id: bytes) -> tuple[Hashable, str] | None:
        """If the entry waits behind its key: the key and the id of the entry holding it
        (for diagnostics: a scan)."""
        for key, waiting in self._lanes.items():
            if any(item[1] == entry_id and item[0] == stream for _, item in waiting):
                return key, self._held[key][1].decode()
        return None

    # -- delivered -> queued or waiting ------------------------------------------------

    def delivered(self, entries: list[Entry]) -> None:
        if not entries:
            return
        self._in_memory(entries)
        self.held += len(entries)
        self.received += len(entries)
        ids = self._ids
        for item in entries:
            ids[item[0]].add(item[1])
        if self._n_streams > 1:  # one reply holds several streams: place them by id
            entries = sorted(entries, key=_by_id)
        self._place(entries)

    def _place(self, entries: list[Entry]) -> None:
        queue, held, holders, key_of = self.queue, self._held, self._holders, self._key_of
        max_payload = self._max_payload
        for item in entries:
            if max_payload is not None and item[4] > max_payload:
                queue.append(item)  # its worker dead-letters it unread (too large)
                continue
            try:
                key = key_of(item)
            except DecodeError as exc:
                self.unkeyed[item[0], item[1]] = exc
                queue.append(item)
                continue
            if key in held:
                self._wait(key, item)
            else:
                held[key] = holder = (item[0], item[1])
                holders[holder] = key
                queue.append(item)

    def _wait(self, key: Hashable, item: Entry) -> None:
        """`item`'s key is held: it waits behind it, in id order; or, older than a holder
        that has not started (a claim), it takes the key and the holder waits."""
        at = order(item[1])
        if at < order(self._held[key][1]) and self._take_key(key, item):
            return
        self._enqueue(key, at, item)

    def _enqueue(self, key: Hashable, at: Order, item: Entry) -> None:
        waiting = self._lanes.get(key)
        if waiting is None:
            waiting = self._lanes[key] = deque()
        if not waiting or at > waiting[-1][0]:
            waiting.append((at, item))
        else:
            bisect.insort(waiting, (at, item), key=_ORDER)
        self.waiting += 1

    def _take_key(self, key: Hashable, item: Entry) -> bool:
        holder = self._held[key]
        stream, entry_id = holder
        queue = self.queue
        # A claim, or another reader's reply (a reply is placed in id order): rare. From the
        # right: a holder queued lately is near the end.
        last = len(queue) - 1
        index = next(
            (
                last - i
                for i, queued in enumerate(reversed(queue))
                if queued[1] == entry_id and queued[0] == stream
            ),
            None,
        )
        if index is None:
            return False  # running, or waiting for its retry: it keeps the key
        queued = queue[index]
        queue[index] = item
        del self._holders[holder]
        self._held[key] = new = (item[0], item[1])
        self._holders[new] = key
        self._enqueue(key, order(entry_id), queued)
        return True

    # -- a holder is done with: the next of its lane is queued ---------------------------

    def _free(self, stream: str, entry_id: bytes, *, wake: bool = True) -> None:
        """`stream`'s `entry_id` is done with: if it held a key, the next of its lane is
        queued (and a worker woken, unless `wake` is False: the worker that calls goes on to
        the queue itself)."""
        key = self._holders.pop((stream, entry_id), _NONE)
        if key is _NONE:
            return
        if key in self._lanes:
            self._next(key, wake=wake)
        else:
            del self._held[key]

    def _next(self, key: Hashable, *, wake: bool) -> None:
        """The next entry waiting behind `key` holds it now, queued."""
        waiting = self._lanes[key]
        _, item = waiting.popleft()
        if not waiting:
            del self._lanes[key]
        self.waiting -= 1
        self._held[key] = holder = (item[0], item[1])
        self._holders[holder] = key
        self.queue.append(item)
        if wake and self.ready is not None:
            self.ready(1)

    def finished(self, entry: Entry) -> None:
        # `_free`, inlined (per entry), after the ledger's own (no super() lookup). No
        # worker is woken: the one that calls goes on to the queue itself.
        _finished(self, entry)
        key = self._holders.pop((entry[0], entry[1]), _NONE)
        if key is _NONE:
            return
        if key in self._lanes:
            self._next(key, wake=False)
        else:
            del self._held[key]

    def finished_many(self, entries: list[Entry]) -> None:
        super().finished_many(entries)
        for item in entries:
            self._free(item[0], item[1])

    def park(self, entry: Entry) -> None:
        super().park(entry)
        self._free(entry[0], entry[1])

    def move_later(self, entry: Entry, letter: DeadLetter) -> None:
        super().move_later(entry, letter)
        self._free(entry[0], entry[1])  # its move is decided: it does not run again

    def _release(self, stream: str, ids: list[bytes]) -> None:
        super()._release(stream, ids)
        for entry_id in ids:
            self._free(stream, entry_id)

    # -- stopping ----------------------------------------------------------------------

    def leave(self, only: str | None = None) -> dict[str, list[tuple[bytes, float | None, int]]]:
        """As the ledger's, with the entries waiting behind their key (never started)."""
        left = super().leave(only)
        for waiting in self._lanes.values():
            for _, (stream, entry_id, _, deliveries, _) in waiting:
                if stream in left:
                    left[stream].append((entry_id, None, deliveries - 1))
        return left

    def given_back(self, stream: str, ids: list[bytes]) -> None:
        gone = set(ids)
        for key, waiting in list(self._lanes.items()):
            if any(item[0] == stream and item[1] in gone for _, item in waiting):
                kept = [
                    (at, item) for at, item in waiting if item[0] != stream or item[1] not in gone
                ]
                self.waiting -= len(waiting) - len(kept)
                self.memory -= sum(item[4] for _, item in waiting) - sum(
                    item[4] for _, item in kept
                )
                if kept:
                    self._lanes[key] = deque(kept)
                else:
                    del self._lanes[key]
        for entry_id in ids:
            self.unkeyed.pop((stream, entry_id), None)
            if self.payloads is not None:
                self.payloads.pop((stream, entry_id), None)
        super().given_back(stream, ids)


# -- the key of an entry, and the calls that raise for an entry without one -------------


def key_function(
    plan: HandlerPlan,
    options: ConsumerOptions,
    consumer: str,
    payloads: dict[tuple[str, bytes], Any] | None = None,
) -> KeyOf:
    """How the key of an entry is found: the value (bytes) of the field `key` names, or what
    the `key` callable returns for the handler's payload (its Struct, else the fields as
    dict[str, str], else the Message). Raises DecodeError for an entry without one.

    `payloads`: where to keep the Struct a key callable decoded, by (stream, id), for the
    handler's call."""
    key = options.key
    if isinstance(key, str):
        name = key.encode()

        def by_field(item: Entry) -> Hashable:
            flat = item[2]
            try:
                return flat[2 * flat[0::2].index(name) + 1]
            except ValueError:
                raise DecodeError(
                    f"expected field {key!r} (the key) in the entry, found none"
                ) from None

        return by_field
    assert key is not None
    what = getattr(key, "__qualname__", None) or repr(key)
    group = options.group
    payload: Callable[[Entry], Any]
    if Arg.STRUCT in plan.args and plan.payload_type is not None:
        decode = struct_decoder(plan.payload_type)

        def payload(item: Entry) -> Any:
            return decode(item[2])

    elif Arg.FIELDS in plan.args:

        def payload(item: Entry) -> Any:
            return decode_fields(item[2])

    else:

        def payload(item: Entry) -> Any:
            return Message.from_entry(item[1], item[2], item[0], group, consumer, item[3])

    def by_call(item: Entry) -> Hashable:
        value = payload(item)  # a DecodeError goes as it is
        try:
            found = key(value)
            hash(found)
        except Exception as exc:
            raise DecodeError(
                f"expected the key callable {what} to return a hashable key, it raised "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if payloads is not None:
            payloads[item[0], item[1]] = value
        return found

    return by_call


def reuses_payload(plan: HandlerPlan, options: ConsumerOptions) -> bool:
    """Whether the Struct a key callable decodes is the handler's one argument: then the
    handler gets it, and the entry is decoded once."""
    return (
        callable(options.key)
        and not plan.batch
        and plan.args == (Arg.STRUCT,)
        and plan.keywords == (None,)
        and plan.payload_type is not None
    )


def guarded(ledger: Ledger, invoke: Invoke, plan: HandlerPlan) -> Invoke:
    """`invoke`; with key lanes, raising instead for an entry that has no key, and calling
    the handler with the payload the key callable decoded, when there is one."""
    if not isinstance(ledger, KeyedLedger):
        return invoke
    unkeyed = ledger.unkeyed
    pop = unkeyed.pop
    payloads = ledger.payloads
    if payloads is not None:
        handler, take = plan.handler, payloads.pop

        def keyed_payload(
            stream: str, entry_id: bytes, flat: list[bytes], deliveries: int
        ) -> Awaitable[Any]:
            if unkeyed:
                exc = pop((stream, entry_id), None)
                if exc is not None:
                    raise exc
            payload = take((stream, entry_id), _NONE)
            if payload is _NONE:  # a retry (claimed back, not placed): decoded as usual
                return invoke(stream, entry_id, flat, deliveries)
            return handler(payload)

        return keyed_payload

    def keyed(stream: str, entry_id: bytes, flat: list[bytes], deliveries: int) -> Awaitable[Any]:
        if unkeyed:
            exc = pop((stream, entry_id), None)
            if exc is not None:
                raise exc
        return invoke(stream, entry_id, flat, deliveries)

    return keyed


def guarded_batch(ledger: Ledger, invoke_batch: InvokeBatch) -> InvokeBatch:
    """`invoke_batch`; with key lanes, rejecting as undecodable the entries without a key."""
    if not isinstance(ledger, KeyedLedger):
        return invoke_batch
    unkeyed = ledger.unkeyed

    def keyed(
        entries: list[Entry],
    ) -> tuple[list[Entry], list[tuple[Entry, DecodeError]], Awaitable[Any] | None]:
        if not unkeyed:
            return invoke_batch(entries)
        bad: list[tuple[Entry, DecodeError]] = []
        kept: list[Entry] = []
        for item in entries:
            exc = unkeyed.pop((item[0], item[1]), None)
            if exc is None:
                kept.append(item)
            else:
                bad.append((item, exc))
        if not kept:
            return kept, bad, None
        passed, rejected, run = invoke_batch(kept)
        return passed, [*rejected, *bad], run

    return keyed


def make_ledger(plan: HandlerPlan, options: ConsumerOptions, consumer: str) -> Ledger:
    """The ledger of a consumer: with key lanes when `key=` is given."""
    size = read_size(plan, options)
    if options.key is None:
        return Ledger(
            options.names,
            limit=options.limit,
            batch_size=options.batch_size,
            max_memory_bytes=options.max_memory_bytes,
            read_size=size,
        )
    payloads: dict[tuple[str, bytes], Any] | None = {} if reuses_payload(plan, options) else None
    return KeyedLedger(
        options.names,
        limit=options.limit,
        batch_size=options.batch_size,
        max_memory_bytes=options.max_memory_bytes,
        key_of=key_function(plan, options, consumer, payloads),
        max_payload_bytes=options.max_payload_bytes,
        payloads=payloads,
        read_size=size,
    )


def read_size(plan: HandlerPlan, options: ConsumerOptions) -> int:
    """The most entries one read brings, in all its streams: `batch_size`, but for a
    pipeline's handler of one entry per call.

    That one reads a third of the bound (`concurrency + batch_size`; but one entry per
    stream at least), if that is less: one read can then be on its way while the handlers
    run on the entries of another and the commit of a third is sent. A commit takes longer
    than an XACK, and its entries hold their room until it is answered: with reads of a
    whole batch, reads and commits took turns, each about half the bound, and the consumer
    and Redis mostly waited for each other. (Other consumers read whole batches: their
    acks are quick, and smaller reads measured no faster. A batch handler's calls get what
    a read brings.)
    """
    if plan.batch or (options.output is None and not plan.outbox):
        return options.batch_size
    return min(options.batch_size, max(len(options.names), options.limit // 3))

"""For `asyncstreams.testing`: handlers watched as they run, whether an app has anything
left to do, and, when it has, an account of it.

Nothing left to do means, for each stream and group the app consumes: no lag (the group's
last delivered id is at or past the stream's last entry), nothing pending, and the
consumers hold nothing (their ledgers). Redis' side is read in one MULTI per hash slot, so
it is one moment's state: a handler that adds to another stream before its own entry is
acked is seen either still pending or with the new entry to read.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Iterator
from typing import TYPE_CHECKING, Any

from ._transport import explain
from .codec import HandlerPlan, Invoke, InvokeBatch, Outboxes
from .errors import DecodeError
from .lanes import KeyedLedger
from .message import Entry

if TYPE_CHECKING:
    from .app import App
    from .consumer import Consumer

# Pending entries listed per stream and group in an account; the rest are counted.
LISTED = 10


@dataclasses.dataclass(slots=True)
class Call:
    """One call of a handler, recorded by `TestApp(record=True)`.

    `args` and `kwargs` are what the handler was called with (decoded payloads, Messages,
    field dicts; lists of them for a batch handler). `entries` are the (stream, entry id,
    delivery count) of the entries the call got: one, or a batch. `error` is what the call
    raised, None while it runs or once it returned; `done` is True once it ended.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    entries: tuple[tuple[str, str, int], ...]
    error: BaseException | None = None
    done: bool = False


class Observer:
    """What the handlers of one TestApp did: their calls (when recorded), the last error
    of each entry, and the first error of all."""

    def __init__(self, *, record: bool) -> None:
        self.record = record
        self._calls: list[tuple[ObservedPlan, Call]] = []  # in the order they started
        # (stream, group, entry id) -> (the last exception its handler raised, the delivery)
        self.errors: dict[tuple[str, str, str], tuple[BaseException, int]] = {}
        self._first: BaseException | None = None
        self._first_where = ""
        self._first_raised = False
        self._error_seen = asyncio.Event()
        # The arguments of the call being made (see ObservedPlan): set and taken with no
        # await between.
        self._handoff: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})

    def calls_of(self, plans: list[ObservedPlan]) -> list[Call]:
        return [call for plan, call in self._calls if plan in plans]

    def handed(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._handoff = (args, kwargs)

    def watch(
        self, plan: ObservedPlan, entries: list[Entry], awaitable: Awaitable[Any]
    ) -> Awaitable[Any]:
        """The call just made on `entries` (its arguments were just handed over), to be
        awaited as the handler's: it notes what the handler raises."""
        args, kwargs = self._handoff
        self._handoff = ((), {})
        call = Call(args, kwargs, tuple((e[0], e[1].decode(), e[3]) for e in entries))
        if self.record:
            self._calls.append((plan, call))
        return self._watched(plan, entries, call, awaitable)

    async def _watched(
        self, plan: ObservedPlan, entries: list[Entry], call: Call, awaitable: Awaitable[Any]
    ) -> Any:
        try:
            return await awaitable
        except asyncio.CancelledError:
            raise  # the consumer stopping: not the handler's error
        except BaseException as exc:
            call.error = exc
            for stream, entry_id, _, deliveries, _ in entries:
                self.errors[(stream, plan.group, entry_id.decode())] = (exc, deliveries)
            if self._first is None:
                first = entries[0]
                self._first = exc
                self._first_where = (
                    f"raised by handler {plan.name} on entry {first[1].decode()} of "
                    f"{first[0]} (delivery {first[3]}), and raised again here by "
                    "TestApp(raise_errors=True)"
                )
                self._error_seen.set()
            raise
        finally:
            call.done = True

    def raise_first_error(self) -> None:
        """Raise the first handler exception, once."""
        if self._first is not None and not self._first_raised:
            self._first_raised = True
            self._first.add_note(self._first_where)
            raise self._first

    async def wait_for_error(self, timeout: float) -> None:
        """Sleep up to `timeout` seconds, less if a handler raises meanwhile."""
        if self._first is not None:
            await asyncio.sleep(timeout)
            return
        try:
            async with asyncio.timeout(timeout):
                await self._error_seen.wait()
        except TimeoutError:
            pass


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class ObservedPlan(HandlerPlan):
    """A handler's plan whose calls the Observer watches (the handler itself unchanged)."""

    observer: Observer | None = None
    group: str = ""

    # One plan per handler per TestApp: compared and hashed by identity.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @classmethod
    def of(cls, plan: HandlerPlan, observer: Observer, group: str) -> ObservedPlan:
        handler = plan.handler

        def handed(*args: Any, **kwargs: Any) -> Awaitable[Any]:
            # Called by the bound call with the arguments it made: keep them, then call.
            observer.handed(args, kwargs)
            return handler(*args, **kwargs)

        fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(HandlerPlan)}
        return cls(**{**fields, "handler": handed}, observer=observer, group=group)

    @property
    def _observer(self) -> Observer:
        assert self.observer is not None
        return self.observer

    def bind(self, group: str, consumer: str, outboxes: Outboxes | None = None) -> Invoke:
        invoke = HandlerPlan.bind(self, group, consumer, outboxes)
        watch = self._observer.watch

        def observed(s: str, i: bytes, f: list[bytes], d: int) -> Awaitable[Any]:
            # Decoding happens in `invoke`: a DecodeError is raised here, not watched.
            awaitable = invoke(s, i, f, d)
            return watch(self, [(s, i, f, d, 0)], awaitable)

        return observed

    def bind_batch(
        self, group: str, consumer: str, outboxes: Outboxes | None = None
    ) -> InvokeBatch:
        invoke_batch = HandlerPlan.bind_batch(self, group, consumer, outboxes)
        watch = self._observer.watch

        def observed(
            entries: list[Entry],
        ) -> tuple[list[Entry], list[tuple[Entry, DecodeError]], Awaitable[Any] | None]:
            passed, rejected, awaitable = invoke_batch(entries)
            if awaitable is not None:
                awaitable = watch(self, passed, awaitable)
            return passed, rejected, awaitable

        return observed


# -- the state of the streams ------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class GroupState:
    """One group on one stream, as Redis has it."""

    stream: str
    group: str
    pending: int = 0
    last_delivered: str = "0-0"
    last_entry: str | None = None  # None: the stream is empty
    problem: str | None = None  # the group or the stream is missing, say

    @property
    def lag(self) -> bool:
        return self.last_entry is not None and _id(self.last_entry) > _id(self.last_delivered)

    @property
    def done(self) -> bool:
        return self.problem is None and not self.pending and not self.lag


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _consumed(app: App) -> list[tuple[str, str]]:
    """Every (stream, group) the app consumes."""
    return [(s, r.options.group) for r in app.registrations for s in r.options.names]


async def group_states(app: App) -> tuple[list[GroupState], bool]:
    """The state of every (stream, group) the app consumes, and whether it is one moment's
    (one MULTI) or several (streams in several hash slots of a cluster)."""
    nodes = await app.servers()
    consumed = _consumed(app)
    streams = list(dict.fromkeys(stream for stream, _ in consumed))
    info: dict[str, tuple[Any, Any]] = {}
    slot_groups = nodes.slot_groups(streams)
    for group in slot_groups:
        commands: list[tuple[str | bytes, ...]] = []
        for stream in group:
            commands += [("XINFO", "GROUPS", stream), ("XREVRANGE", stream, "+", "-", "COUNT", "1")]
        replies = await nodes.transaction(group[0], *commands)
        for index, stream in enumerate(group):
            info[stream] = (replies[2 * index], replies[2 * index + 1])
    states = []
    for stream, group_name in consumed:
        groups, last = info[stream]
        state = GroupState(stream, group_name)
        if isinstance(last, Exception):
            state.problem = f"cannot read the stream: {last}"
        elif last:
            state.last_entry = _text(last[0][0])
        if isinstance(groups, Exception):
            state.problem = f"no such stream ({groups})"
        else:
            found = [_fields(g) for g in groups]
            mine = [g for g in found if _text(g["name"]) == group_name]
            if not mine:
                state.problem = "no such group (deleted?)"
            else:
                state.pending = int(mine[0]["pending"])
                state.last_delivered = _text(mine[0]["last-delivered-id"])
        states.append(state)
    return states, len(slot_groups) == 1


def _fields(reply: Any) -> dict[str, Any]:
    """A flat RESP2 map, or a RESP3 one, with text keys."""
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    return {_text(k): v for k, v in zip(reply[::2], reply[1::2], strict=True)}


def _held(app: App) -> int:
    return sum(consumer.ledger.held for consumer in app.consumers)


async def nothing_left(app: App) -> bool:
    """True when the app has nothing left to do (see the module's doc)."""
    if _held(app):
        return False
    states, one_moment = await group_states(app)
    if not all(state.done for state in states):
        return False
    if one_moment:
        return True
    # Several moments (a cluster): a second look, after the first found all done.
    states, _ = await group_states(app)
    return not _held(app) and all(state.done for state in states)


# -- the account of what is left --------------------------------------------------------------


async def account(app: App, observer: Observer, *, timeout: float, fast: bool) -> str:
    """What is left to do, per stream and group, for drain's AssertionError."""
    nodes = await app.servers()
    states, _ = await group_states(app)
    by_plan = {consumer.plan: consumer for consumer in app.consumers}
    lines = [f"drain: work left after {timeout:g} s"]
    for registration, state in _pairs(app, states):
        consumer = by_plan.get(registration.plan)
        lines.append(
            f"stream {state.stream!r}, group {state.group!r} (handler {registration.plan.name}):"
        )
        if state.problem:
            lines.append(f"  {state.problem}")
            continue
        if state.done:
            lines.append("  done")
        if state.lag:
            lines.append(
                f"  entries not read by the group yet (it last read {state.last_delivered}; "
                f"the stream's last entry is {state.last_entry})"
            )
        if state.pending:
            lines.append(f"  {state.pending} pending:")
            reply = await nodes.raw(
                state.stream, "XPENDING", state.stream, state.group, "-", "+", LISTED
            )
            for entry_id, owner, idle, deliveries in reply:
                entry_id = _text(entry_id)
                line = (
                    f"    {entry_id}: consumer {_text(owner)}, delivered {int(deliveries)} "
                    f"time(s), idle {int(idle)} ms"
                )
                if consumer is not None:
                    line += f"; {_what(consumer, state.stream, entry_id)}"
                error = observer.errors.get((state.stream, state.group, entry_id))
                if error is not None:
                    exc, delivery = error
                    line += f"; last error (delivery {delivery}): {explain(exc)}"
                lines.append(line)
            if state.pending > LISTED:
                lines.append(f"    ... and {state.pending - LISTED} more")
    for consumer in app.consumers:
        held = {name: n for name, n in consumer.ledger.states().items() if n}
        if held:
            counts = ", ".join(f"{n} {name}" for name, n in held.items())
            lines.append(f"consumer of {consumer.where} holds {counts}")
    if not fast:
        lines.append("(fast=False: retries wait retry_delay * 2**(deliveries - 1) seconds)")
    return "\n".join(lines)


def _pairs(app: App, states: list[GroupState]) -> Iterator[tuple[Any, GroupState]]:
    index = 0
    for registration in app.registrations:
        for _ in registration.options.names:
            yield registration, states[index]
            index += 1


def _what(consumer: Consumer, stream: str, entry_id: str) -> str:
    """What the consumer is doing with a pending entry, as its ledger says."""
    ledger = consumer.ledger
    raw = entry_id.encode()
    if not ledger.holds(stream, raw):
        return "not held by a running consumer"
    if ledger.waits_for_retry(stream, raw):
        for s, i, retry in ledger.retries():
            if (s, i) == (stream, raw):
                due = retry.due - asyncio.get_running_loop().time()
                return f"waiting for its retry (due in {max(due, 0.0):.3f} s)"
    if raw in ledger.parked(stream):
        return "parked: out of deliveries, and no dead-letter stream"
    if any((s, i) == (stream, raw) for s, i, _ in ledger.moves()):
        return "waiting to be moved to the dead-letter stream"
    if any(entry[0] == stream and entry[1] == raw for entry in ledger.queue):
        return "queued"
    if isinstance(ledger, KeyedLedger) and (behind := ledger.waits_behind(stream, raw)):
        key, holder = behind
        return f"waiting behind its key {key!r} (held by entry {holder})"
    return "running, or waiting for its ack"

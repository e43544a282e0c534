"""Middleware: code that runs around every handler call and hears how each one ended.

Register it with `App(middleware=[...])` or `app.add_middleware(...)` before the app
starts; each consumer then runs its handler calls through every middleware, in the order
they were registered (the first is the outermost). A subclass overrides what it needs:

    class Sessions(Middleware):
        async def around(self, call: Call, proceed: Proceed) -> None:
            async with database.session():
                await proceed()

        def settled(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
            if error is not None and outcome == "dead_lettered":
                report(error, call.messages)

`around` wraps the call: what it raises fails the call's entries as the handler's own
exceptions do (a retry, then the dead-letter stream). `settled` hears, once the failure
policy has decided, what became of the call's entries. It must be quick and must not
raise (what it raises is logged and dropped): it runs in the worker, before the next entry.

A middleware that overrides neither costs nothing; one that overrides only `settled` adds
no await to the handler's call. With no middleware registered, the workers run the same
code as before middleware existed (`python -m benchmarks --scenarios middleware`
measures all three).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from .errors import ConfigurationError
from .message import Entry, Message

log = logging.getLogger("asyncstreams.middleware")

Outcome = Literal["acked", "retried", "dead_lettered", "parked", "cancelled"]
"""What became of the entries of a handler call:

- `acked`: the handler returned; the entries are acked with the consumer's next batch of
  acks (an XACK that fails is tried again until it lands or the entries are claimed);
- `retried`: the handler failed; the entries stay pending and run again after a backoff;
- `dead_lettered`: moved to the dead-letter stream (their last delivery failed, or they do
  not decode or are too large); a move Redis refuses is held and tried again;
- `parked`: as `dead_lettered`, for a consumer without a dead-letter stream: the entries
  stay pending and are not run again;
- `cancelled`: the consumer stopped while the handler ran; the entries stay pending and
  are delivered again (to this group's next consumer to claim them).
"""

OUTCOMES: tuple[Outcome, ...] = ("acked", "retried", "dead_lettered", "parked", "cancelled")

Proceed = Callable[[], Awaitable[None]]


class Call:
    """One handler call: one entry, or the batch of a batch handler.

    `handler` is the handler's qualified name; `duration` the seconds the call took, set
    once it returned or raised (0.0 for entries that never reached the handler: those that
    do not decode or are too large). `messages` and `ids` are built on first use;
    `entries` is the cheapest view, for middleware on the hot path (metrics): the entries
    as the consumer holds them, not copied, tuples of (stream, entry id as bytes, the flat
    [name, value, ...] field list, deliveries, size in bytes). Read them; do not change them.
    """

    __slots__ = ("_messages", "consumer", "duration", "entries", "group", "handler")

    handler: str
    group: str
    consumer: str
    duration: float
    entries: Sequence[Entry]

    def __init__(self, handler: str, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        self.handler = handler
        self.group = group
        self.consumer = consumer
        self.duration = 0.0
        self.entries = entries
        self._messages: list[Message] | None = None

    def __len__(self) -> int:
        """How many entries the call holds."""
        return len(self.entries)

    @property
    def messages(self) -> list[Message]:
        """The entries of the call, as the handler's `Message` parameter would get them."""
        if self._messages is None:
            group, consumer = self.group, self.consumer
            self._messages = [
                Message.from_entry(e[1], e[2], e[0], group, consumer, e[3]) for e in self.entries
            ]
        return self._messages

    @property
    def ids(self) -> list[tuple[str, str]]:
        """(stream, entry id) of each entry: cheaper than `messages` when that is enough."""
        return [(entry[0], entry[1].decode()) for entry in self.entries]

    def __repr__(self) -> str:
        return f"Call(handler={self.handler!r}, group={self.group!r}, entries={len(self)})"


class Middleware:
    """The base of every middleware; both methods do nothing unless overridden."""

    # True only for asyncstreams' own middleware whose `settled` catches and logs what it
    # raises itself (see Chain).
    _settled_catches = False

    async def around(self, call: Call, proceed: Proceed) -> None:
        """Run the call: `await proceed()` runs the next middleware, then the handler."""
        await proceed()

    def settled(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
        """The call's entries ended as `outcome`; `error` is what failed them, if anything
        (what the handler raised, or why the entries cannot be handled)."""


class Chain:
    """The middleware of one consumer, split by what each overrides."""

    __slots__ = ("_arounds", "_broken", "_settles", "settled")

    def __init__(self, middleware: Sequence[Middleware]) -> None:
        self._arounds = [m.around for m in middleware if _overrides(m, "around")]
        self._settles = [m for m in middleware if _overrides(m, "settled")]
        self._broken: set[int] = set()
        # Tell the middleware how a call's entries ended. The only one, when it is one of
        # asyncstreams' own that catches what its `settled` raises (`_settled_catches`),
        # is called directly: one Python frame less per call (the metrics' middleware).
        self.settled: Callable[[Call, Outcome, BaseException | None], None] = self._settle_each
        if len(self._settles) == 1 and type(self._settles[0])._settled_catches:
            self.settled = self._settles[0].settled

    @property
    def wraps(self) -> bool:
        """Whether any middleware overrides `around` (else calls need no wrapping)."""
        return bool(self._arounds)

    def recorder(self, handler: str, group: str) -> Callable[[Entry, float], None] | None:
        """A cheaper way than `settled` to tell of an entry acked by a call of one entry,
        given the entry and the call's duration; None unless the only middleware is
        asyncstreams' metrics (which then needs no Call made for it)."""
        if self._arounds or len(self._settles) != 1:
            return None
        only = self._settles[0]
        make: Callable[[str, str], Callable[[Entry, float], None]] | None = getattr(
            only, "acked_recorder", None
        )
        if make is None or not type(only)._settled_catches:
            return None
        return make(handler, group)

    def wrap(self, call: Call, invoke: Proceed) -> Awaitable[None]:
        """The awaitable that runs `call` through every `around`, then `invoke`."""
        proceed = invoke
        for around in reversed(self._arounds):
            proceed = _bind(around, call, proceed)
        return proceed()

    def _settle_each(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
        for middleware in self._settles:
            try:
                middleware.settled(call, outcome, error)
            except Exception:
                # Logged once per middleware: a broken one must not flood the log.
                if id(middleware) not in self._broken:
                    self._broken.add(id(middleware))
                    log.exception(
                        "%s.settled raised (logged once; its later failures are dropped)",
                        type(middleware).__qualname__,
                    )


def _bind(
    around: Callable[[Call, Proceed], Awaitable[None]], call: Call, inner: Proceed
) -> Proceed:
    return lambda: around(call, inner)


def _overrides(middleware: Middleware, name: str) -> bool:
    return getattr(type(middleware), name) is not getattr(Middleware, name)


def check_middleware(middleware: object) -> Middleware:
    """`middleware` if it is a Middleware; a clear error naming what was found if not."""
    if isinstance(middleware, Middleware):
        return middleware
    found = type(middleware).__name__
    hint = " (a class: pass an instance)" if isinstance(middleware, type) else ""
    raise ConfigurationError(
        f"middleware: expected an instance of asyncstreams.Middleware, found {found}"
        f" {middleware!r:.60}{hint}"
    )

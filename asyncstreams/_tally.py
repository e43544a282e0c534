"""The metrics' middleware: what became of every entry, in plain ints and lists.

`settled` runs in the worker for every handler call, so it does the least it can. A
prometheus_client Counter or Histogram per entry would take a lock and look its labels up
each time; here each (handler, group) has a `Tally` of plain counts and histograms bucketed
with `bisect` on fixed bounds, which asyncstreams.prometheus turns into metric families only
when it is scraped.

An acked entry (nearly every entry) is only appended to its tally's list, with its call's
duration: by `settled`, or, for a handler of one entry per call with no other middleware,
by the recorder the worker calls instead (`Tallies.acked_recorder`: no Call is made). The
lists are counted when the event loop next runs its callbacks, or at once when FLUSH_AT wait,
with C loops (map, join, Counter) and one clock reading for all of them: an acked entry's
end-to-end latency ends at that reading, within one turn of the loop of its settle.
Counting each call as it settled took about 1 us per entry in a running app (2-core
machine); the figures of this way are in the README's Metrics section.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable
from functools import partial
from operator import itemgetter
from time import time

from .message import Entry
from .middleware import OUTCOMES, Call, Middleware, Outcome

log = logging.getLogger("asyncstreams.prometheus")

# Bucket bounds (seconds) of the handler-duration histogram: handlers of stream entries are
# often sub-millisecond, so the bounds start lower than prometheus_client's defaults.
DURATION_BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Bucket bounds (seconds) of the end-to-end latency histogram: from an entry's id (the time
# Redis added it) to its handler's return; a backlog can make that minutes or hours.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
# The same bounds in milliseconds: an entry id's time is in milliseconds.
_LATENCY_BOUNDS_MS = tuple(bound * 1000 for bound in LATENCY_BOUNDS)
# Acked calls counted at once when this many wait (a handler that never awaits can settle
# thousands of entries before the loop runs its callbacks; this bounds the clock's lag).
FLUSH_AT = 256

Histogram = list[float]
"""One count per bucket (not cumulative; the last is +Inf), then the sum of the values."""

_stream_of = itemgetter(0)
_id_of = itemgetter(1)
_duration_bucket = partial(bisect_left, DURATION_BOUNDS)


def histogram(bounds: tuple[float, ...]) -> Histogram:
    return [0] * (len(bounds) + 2)


class Tally:
    """What the calls of one handler in one group came to.

    `counts[outcome][stream]`: entries. `latency`: per acked entry, milliseconds from its id
    to its count. `duration`: per call, in seconds (calls cut short by the stop and entries
    that never ran are left out). `acked` and `durations` hold the acked entries and their
    calls' durations not counted yet (see `count`).
    """

    __slots__ = (
        "acked", "counts", "duration", "durations", "group", "handler", "latency", "stream",
    )  # fmt: skip

    def __init__(self, handler: str, group: str, stream: str | None = None) -> None:
        self.handler = handler
        self.group = group
        # The only stream the handler reads in the group, if it reads one: no entry needs
        # looking at to know its stream.
        self.stream = stream
        self.counts: dict[str, dict[str, int]] = {outcome: {} for outcome in OUTCOMES}
        self.latency: Histogram = histogram(LATENCY_BOUNDS)
        self.duration: Histogram = histogram(DURATION_BOUNDS)
        # Emptied by `count`, never replaced: a recorder holds their `append`.
        self.acked: list[Entry] = []
        self.durations: list[float] = []

    def add(self, call: Call) -> None:
        """An acked call of this handler and group, to count with the next `count`."""
        self.acked.extend(call.entries)
        self.durations.append(call.duration)

    def count(self, now_ms: float) -> None:
        """Count the acked entries waiting, as settled at `now_ms`: with C loops (map, join,
        sorted, Counter) rather than Python statements per entry."""
        entries, durations = self.acked, sorted(self.durations)
        acked = self.counts["acked"]
        if self.stream is not None:
            acked[self.stream] = acked.get(self.stream, 0) + len(entries)
        else:
            for stream, count in Counter(map(_stream_of, entries)).items():
                acked[stream] = acked.get(stream, 0) + count
        # An id's first part is the time Redis added the entry, in milliseconds, and many
        # entries share one: each time is parsed once. (A clock behind Redis's makes a wait
        # negative: the first bucket.)
        times = Counter(b"-".join(map(_id_of, entries)).split(b"-")[::2])
        entries.clear()
        self.durations.clear()
        latency = self.latency
        for added, count in times.items():
            waited = now_ms - int(added)
            latency[bisect_left(_LATENCY_BOUNDS_MS, waited)] += count
            latency[-1] += waited * count
        # Sorted, each bucket is one bisect per count (and most calls of a handler take
        # about as long: the first bounds hold them all).
        histogram, total, below = self.duration, len(durations), 0
        for bucket, bound in enumerate(DURATION_BOUNDS):
            upto = bisect_right(durations, bound)
            histogram[bucket] += upto - below
            below = upto
            if below == total:
                break
        histogram[len(DURATION_BOUNDS)] += total - below
        histogram[-1] += sum(durations)


class Tallies(Middleware):
    """Counts every settled entry, per handler and group (see `Tally`)."""

    # Chain calls `settled` directly: it catches what it raises (a bug) itself.
    _settled_catches = True

    def __init__(self) -> None:
        # handler -> group -> Tally: lookups of strings whose hashes are cached, no key
        # tuple made per call.
        self.tallies: dict[str, dict[str, Tally]] = {}
        # Acked calls not counted yet, of any handler.
        self._acked: list[Call] = []
        # The streams a handler reads in a group (set by the collector, from the app's
        # registrations): a tally made while the app runs knows its only one.
        self.streams_of: Callable[[str, str], set[str]] = lambda handler, group: set()
        # The event loop the calls settle on (counted there only).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._broken = False
        # The asyncstreams.prometheus.Metrics these tallies are counted for (see its
        # metrics_of).
        self.metrics: object = None

    def tally(self, handler: str, group: str) -> Tally:
        """The tally of `handler` in `group`, made on first use."""
        by_group = self.tallies.setdefault(handler, {})
        found = by_group.get(group)
        if found is None:
            streams = self.streams_of(handler, group)
            only = next(iter(streams)) if len(streams) == 1 else None
            found = by_group[group] = Tally(handler, group, only)
        return found

    def settled(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
        try:
            if outcome == "acked":
                acked = self._acked
                acked.append(call)
                if len(acked) == 1:
                    self._flush_soon()
                elif len(acked) >= FLUSH_AT:
                    self.flush()
                return
            tally = self.tally(call.handler, call.group)
            counts = tally.counts[outcome]
            for entry in call.entries:
                counts[entry[0]] = counts.get(entry[0], 0) + 1
            if outcome != "cancelled" and error is not None:
                # Not cut short by the stop, and it ran (an entry claimed after its last
                # delivery is dead-lettered unrun, with no error).
                histogram = tally.duration
                histogram[_duration_bucket(call.duration)] += 1
                histogram[-1] += call.duration
        except Exception:
            self._failed()

    def acked_recorder(self, handler: str, group: str) -> Callable[[Entry, float], None]:
        """What a worker calls with each entry its handler acked, and the call's duration:
        `settled` without a Call made per entry (see Chain.recorder)."""
        tally = self.tally(handler, group)
        acked, add_entry, add_duration = tally.acked, tally.acked.append, tally.durations.append

        def record(entry: Entry, duration: float) -> None:
            add_entry(entry)
            add_duration(duration)
            if len(acked) == 1:
                self._flush_soon()
            elif len(acked) >= FLUSH_AT:
                tally.count(time() * 1000.0)

        return record

    def _flush_soon(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Count the acked calls and entries waiting. On the loop's thread only (a scrape
        from another thread sees them once the loop has run this)."""
        calls, self._acked = self._acked, []
        now_ms = time() * 1000.0
        try:
            for call in calls:
                self.tally(call.handler, call.group).add(call)
            for by_group in self.tallies.values():
                for tally in by_group.values():
                    if tally.acked or tally.durations:
                        tally.count(now_ms)
        except Exception:
            self._failed()

    def _failed(self) -> None:
        if not self._broken:
            self._broken = True
            log.exception("metrics: counting a settled call failed (logged once)")

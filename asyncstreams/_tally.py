"""The metrics' middleware: what became of every entry, in plain ints and lists.

`settled` runs in the worker for every handler call, so it does the least it can. A
prometheus_client Counter or Histogram per entry would take a lock and look its labels up
each time; here each (handler, group) has a `Tally` of plain counts and histograms bucketed
with `bisect` on fixed bounds, which asyncstreams.prometheus turns into metric families only
when it is scraped.

An acked call (nearly every call) is only appended to a list; the list is counted when the
event loop next runs its callbacks, or at once when it holds FLUSH_AT calls, in one tight
loop and with one clock reading for all of them (an acked entry's end-to-end latency ends
at that reading: within one turn of the loop of its settle). Counting at each settle cost
about 1 us per entry in a running app on a 2-core machine, with its caches cold; this way,
see the README's Metrics section.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from time import time

from .middleware import OUTCOMES, Call, Middleware, Outcome

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


def histogram(bounds: tuple[float, ...]) -> Histogram:
    return [0] * (len(bounds) + 2)


class Tally:
    """What the calls of one handler in one group came to.

    `latency[stream]` holds the stream's acked entries, in milliseconds from their id to
    their settle: its counts are also how many entries of the stream were acked (one
    observation each). `counts[outcome][stream]`: the entries of every other outcome.
    `duration`: per call, in seconds (calls cut short by the stop and entries that never
    ran are left out).
    """

    __slots__ = ("counts", "duration", "group", "handler", "latency")

    def __init__(self, handler: str, group: str) -> None:
        self.handler = handler
        self.group = group
        self.latency: dict[str, Histogram] = {}
        self.counts: dict[str, dict[str, int]] = {o: {} for o in OUTCOMES if o != "acked"}
        self.duration: Histogram = histogram(DURATION_BOUNDS)


class Tallies(Middleware):
    """Counts every settled entry, per handler and group (see `Tally`)."""

    def __init__(self) -> None:
        # handler -> group -> Tally: lookups of strings whose hashes are cached, no key
        # tuple made per call.
        self.tallies: dict[str, dict[str, Tally]] = {}
        self._acked: list[Call] = []
        # The event loop the calls settle on (flush there only).
        self.loop: asyncio.AbstractEventLoop | None = None

    def tally(self, handler: str, group: str) -> Tally:
        """The tally of `handler` in `group`, made on first use."""
        by_group = self.tallies.setdefault(handler, {})
        found = by_group.get(group)
        if found is None:
            found = by_group[group] = Tally(handler, group)
        return found

    def settled(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
        if outcome == "acked":
            acked = self._acked
            acked.append(call)
            if len(acked) == 1:
                loop = self.loop = asyncio.get_running_loop()
                loop.call_soon(self.flush)
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
            _observe(tally.duration, DURATION_BOUNDS, call.duration)

    def flush(self) -> None:
        """Count the acked calls that wait (on the loop's thread: a scrape elsewhere sees
        them at its next turn)."""
        acked = self._acked
        if not acked:
            return
        self._acked = []
        now_ms = time() * 1000.0
        handler = group = ""
        latencies: dict[str, Histogram] = {}
        durations: Histogram = []
        for call in acked:
            if call.handler is not handler or call.group is not group:
                handler, group = call.handler, call.group
                tally = self.tally(handler, group)
                latencies, durations = tally.latency, tally.duration
            for entry in call.entries:
                try:
                    latency = latencies[entry[0]]
                except KeyError:
                    latency = latencies[entry[0]] = histogram(LATENCY_BOUNDS)
                # The id's first part is the time Redis added the entry (milliseconds); a
                # clock behind Redis's makes the wait negative: the first bucket.
                waited = now_ms - int(entry[1].partition(b"-")[0])
                latency[bisect_left(_LATENCY_BOUNDS_MS, waited)] += 1
                latency[-1] += waited
            duration = call.duration
            durations[bisect_left(DURATION_BOUNDS, duration)] += 1
            durations[-1] += duration


def _observe(histogram: Histogram, bounds: tuple[float, ...], value: float) -> None:
    histogram[bisect_left(bounds, value)] += 1
    histogram[-1] += value

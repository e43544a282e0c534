"""The metric families of an instrumented app, made at scrape time (prometheus_client's
custom-collector interface) from the tallies, the running consumers' figures and the group
figures. Imported only once prometheus_client is known to be installed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ._group_figures import GroupWatch
from ._tally import DURATION_BOUNDS, LATENCY_BOUNDS, Histogram, Tallies, Tally
from .app import App
from .middleware import OUTCOMES

_CONSUMER = ["group", "handler", "consumer"]
_GROUP = ["stream", "group"]


class AppCollector:
    """Collects the metrics of one app (registered in the registry by `instrument`)."""

    def __init__(self, app: App, tallies: Tallies, watch: GroupWatch) -> None:
        self._app = app
        self._tallies = tallies
        self._watch = watch
        tallies.streams_of = self._streams_of

    def _streams_of(self, handler: str, group: str) -> set[str]:
        """The streams `handler` reads in `group` (the handler may be registered twice)."""
        return {
            stream
            for registration in self._app.registrations
            if registration.plan.name == handler and registration.options.group == group
            for stream in registration.options.names
        }

    def collect(self) -> Iterator[Metric]:
        if _on_loop_of(self._tallies):
            self._tallies.flush()
        # Scraped on the app's loop without `Metrics.scrape`: the group figures are read
        # again, when due, for the next scrape. (The app stopped: they are dropped.)
        self._watch.kick(self._app.consumers)
        yield from self._processed()
        yield from self._consumers()
        yield from self._groups()

    def _processed(self) -> Iterator[Metric]:
        processed = CounterMetricFamily(
            "asyncstreams_processed",
            "Entries settled by handler calls, by outcome (acked, retried, dead_lettered, "
            "parked, cancelled)",
            labels=["stream", "group", "handler", "outcome"],
        )
        durations = HistogramMetricFamily(
            "asyncstreams_handler_duration_seconds",
            "Seconds each handler call took (a batch handler's call: the whole batch)",
            labels=["group", "handler"],
        )
        latencies = HistogramMetricFamily(
            "asyncstreams_latency_seconds",
            "Seconds from an acked entry's id (the time Redis added it) to its handler's return",
            labels=["group", "handler"],
        )
        # Every registered handler has its series from the first scrape, at 0 until it
        # settles an entry: rate() and absent() need them.
        streams: dict[tuple[str, str], set[str]] = {}
        for registration in self._app.registrations:
            key = (registration.plan.name, registration.options.group)
            streams.setdefault(key, set()).update(registration.options.names)
        tallies = {
            (handler, group): tally
            for handler, by_group in list(self._tallies.tallies.items())
            for group, tally in list(by_group.items())
        }
        for handler, group in sorted(streams.keys() | tallies.keys()):
            # A handler that has settled nothing yet has no tally: its series are at 0.
            tally = tallies.get((handler, group)) or Tally(handler, group)
            counts = {outcome: dict(tally.counts[outcome]) for outcome in OUTCOMES}
            named = streams.get((handler, group), set())
            for stream in sorted(named.union(*counts.values())):
                for outcome in OUTCOMES:
                    processed.add_metric(
                        [stream, group, handler, outcome], counts[outcome].get(stream, 0)
                    )
            labels = [group, handler]
            durations.add_metric(labels, *_buckets(list(tally.duration), DURATION_BOUNDS, 1))
            latencies.add_metric(labels, *_buckets(list(tally.latency), LATENCY_BOUNDS, 0.001))
        yield processed
        yield durations
        yield latencies

    def _consumers(self) -> Iterator[Metric]:
        families = [
            (attribute, kind(name, text, labels=_CONSUMER))
            for attribute, kind, name, text in _CONSUMER_METRICS
        ]
        for consumer in self._app.consumers:
            figures = consumer.figures()
            labels = [consumer.options.group, consumer.plan.name, consumer.name]
            for attribute, family in families:
                family.add_metric(labels, float(getattr(figures, attribute)))
        for _, family in families:
            yield family

    def _groups(self) -> Iterator[Metric]:
        length = GaugeMetricFamily(
            "asyncstreams_stream_length", "Entries in the stream (XLEN)", labels=["stream"]
        )
        families = [
            (attribute, GaugeMetricFamily(name, text, labels=_GROUP))
            for attribute, name, text in _GROUP_METRICS
        ]
        dead = GaugeMetricFamily(
            "asyncstreams_dead_letter_length",
            "Entries in the dead-letter stream that the group's consumer moves the stream's "
            "failed entries to",
            labels=[*_GROUP, "dead_letter"],
        )
        streams: set[str] = set()
        for figures in self._watch.figures:
            labels = [figures.stream, figures.group]
            if figures.stream not in streams:
                streams.add(figures.stream)
                length.add_metric([figures.stream], figures.length)
            for attribute, family in families:
                family.add_metric(labels, float(getattr(figures, attribute)))
            if figures.dead_letter is not None:
                dead.add_metric([*labels, figures.dead_letter], figures.dead_letter_length)
        yield length
        for _, family in families:
            yield family
        yield dead


# Per running consumer, from Consumer.figures(): (attribute, type, name, help).
_Family = type[CounterMetricFamily | GaugeMetricFamily]
_CONSUMER_METRICS: tuple[tuple[str, _Family, str, str], ...] = (
    ("received", CounterMetricFamily, "asyncstreams_received",
     "Entries delivered to the consumer: read, or claimed from other consumers"),
    ("claimed", CounterMetricFamily, "asyncstreams_claimed",
     "Idle entries of other consumers that the consumer claimed"),
    ("renewed", CounterMetricFamily, "asyncstreams_renewed",
     "Idle times of held entries reset (their leases renewed)"),
    ("outages", CounterMetricFamily, "asyncstreams_outages",
     "Times Redis became unavailable to the consumer"),
    ("reconnects", CounterMetricFamily, "asyncstreams_reconnects",
     "Times the consumer got through to Redis again after an outage"),
    ("in_outage", GaugeMetricFamily, "asyncstreams_consumer_in_outage",
     "1 while Redis is unavailable to the consumer, else 0"),
    ("in_flight", GaugeMetricFamily, "asyncstreams_consumer_in_flight",
     "Entries the consumer holds, in every state (queued, running, acking, to retry)"),
    ("room", GaugeMetricFamily, "asyncstreams_consumer_room",
     "How many more entries the consumer may hold now"),
    ("limit", GaugeMetricFamily, "asyncstreams_consumer_limit",
     "The most entries the consumer holds at once (concurrency + batch_size)"),
    ("keys_held", GaugeMetricFamily, "asyncstreams_consumer_keys_held",
     "With key=: keys held by an entry queued, running or waiting for a retry (else 0)"),
    ("waiting_behind_keys", GaugeMetricFamily, "asyncstreams_consumer_waiting_behind_keys",
     "With key=: entries the consumer holds that wait behind an earlier entry of their key"),
    ("partitions_owned", GaugeMetricFamily, "asyncstreams_consumer_partitions_owned",
     "With ordered=True: partitions whose lease the consumer holds now (else 0)"),
)  # fmt: skip
# Per stream and group, from the group figures: (attribute, name, help).
_GROUP_METRICS = (
    ("lag", "asyncstreams_group_lag",
     "Entries of the stream not yet delivered to the group"),
    ("pending", "asyncstreams_group_pending",
     "Entries delivered to the group's consumers and not yet acked"),
    ("oldest_pending_age", "asyncstreams_group_oldest_pending_age_seconds",
     "Seconds since the id of the group's oldest pending entry (0 when none is pending)"),
    ("consumers", "asyncstreams_group_consumers",
     "Consumers of the group (XINFO CONSUMERS)"),
)  # fmt: skip


def _on_loop_of(tallies: Tallies) -> bool:
    """Whether this thread runs the event loop the tallies' calls settle on."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return loop is tallies.loop


def _buckets(
    histogram: Histogram, bounds: tuple[float, ...], scale: float
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs ending with +Inf, and the sum times `scale`."""
    buckets: list[tuple[str, float]] = []
    running = 0.0
    for bound, count in zip((*bounds, float("inf")), histogram[:-1], strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return buckets, histogram[-1] * scale

"""OpenTelemetry: a CONSUMER span per handler call, the messaging metrics, and the trace
context carried from `publish` to the handler in the entry itself.

    from asyncstreams.otel import instrument_tracing

    app = App()
    instrument_tracing(app)  # before the app starts; the global providers unless given

Spans follow OpenTelemetry's messaging semantic conventions for a push-based "process"
operation. Redis has no `messaging.system` value of its own there; custom values are
allowed, and this module uses "redis". The delivery count, Redis' own counter, goes in
`messaging.redis.message.delivery_count`, the namespace the conventions reserve for a
system's own attributes (Service Bus has `messaging.servicebus.message.delivery_count`).
What became of the entries is `asyncstreams.outcome` (see `Outcome`).

`publish` writes the W3C trace context of the current span as the entry's `traceparent`
field (and `tracestate`, only when the context has one) once `instrument_tracing` turned
that on for the app: an XRANGE reader sees the field, a `dict[str, str]` handler gets it, a
Struct decoder ignores it (unless the Struct has `forbid_unknown_fields=True`).

Needs `opentelemetry-api` (`pip install "asyncstreams[otel]"`); without it, importing this
module raises ConfigurationError. No other module of asyncstreams imports OpenTelemetry:
an app not instrumented pays one attribute check per `publish`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .errors import ConfigurationError
from .message import Message
from .middleware import Call, Middleware, Outcome, Proceed

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.trace.status import Status, StatusCode
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:
    raise ConfigurationError(
        f"asyncstreams.otel: expected opentelemetry-api installed, found none ({exc}); "
        'install it with: pip install "asyncstreams[otel]"'
    ) from exc

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from .app import App

__all__ = ["TRACEPARENT", "TRACESTATE", "Tracing", "instrument_tracing", "trace_fields"]

TRACEPARENT = "traceparent"
"""The entry field that carries the producer's trace context (W3C `traceparent`)."""
TRACESTATE = "tracestate"
"""The W3C `tracestate` field, written beside it only when the context has one."""

SYSTEM = "redis"
DELIVERY_COUNT = "messaging.redis.message.delivery_count"
OUTCOME = "asyncstreams.outcome"

# The conventions' advice for duration histograms, in seconds.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACEPARENT = TRACEPARENT.encode()
_TRACESTATE = TRACESTATE.encode()

Attributes = dict[str, AttributeValue]


def trace_fields() -> dict[str, str]:
    """The fields carrying the current span's context: `traceparent`, and `tracestate` when
    it has one; none outside a span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def producer_context(message: Message) -> SpanContext | None:
    """The span context the entry was published in, from its `traceparent` field; None
    when it has none, or one that is not a valid W3C traceparent."""
    raw = message.raw
    parent = raw.get(_TRACEPARENT)
    if parent is None:
        return None
    carrier = {TRACEPARENT: parent.decode(errors="replace")}
    state = raw.get(_TRACESTATE)
    if state is not None:
        carrier[TRACESTATE] = state.decode(errors="replace")
    found = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
    return found if found.is_valid else None


class _Open:
    """A span kept open from the end of its call until every entry of it has settled."""

    __slots__ = ("failed", "outcomes", "remaining", "span")

    def __init__(self, span: trace.Span, remaining: int, failed: bool) -> None:
        self.span = span
        self.remaining = remaining
        self.failed = failed
        self.outcomes: list[Outcome] = []


class Tracing(Middleware):
    """A CONSUMER span per handler call and the messaging metrics, from the providers given
    or the global ones (`opentelemetry.trace.set_tracer_provider` and the metrics one).

    The span, `process {stream}`, is current while the handler runs (its own spans are
    children) and ends once the entries have settled, with `asyncstreams.outcome`. A call
    of one entry continues the producer's trace: its parent is the entry's `traceparent`,
    also linked. A batch call links each entry's context and has no parent of its own. A
    handler's `Exception` is recorded, with status ERROR and `error.type`; a cancellation
    is not an error (the outcome says `cancelled`). Entries that reach no handler (too
    large; a batch's entries that do not decode) get a span of their own, ended at once.
    Metrics: `messaging.process.duration` (s) per call, `messaging.client.consumed.messages`
    per entry.

    `instrument_tracing(app)` adds one and turns on the `traceparent` field for the app's
    `publish`; added with `App(middleware=[Tracing()])`, it traces handlers only.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("asyncstreams", __version__, tracer_provider)
        meter = metrics.get_meter("asyncstreams", __version__, meter_provider)
        self._duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Duration of processing operation.",
            explicit_bucket_boundaries_advisory=_BUCKETS,
        )
        self._consumed = meter.create_counter(
            "messaging.client.consumed.messages",
            unit="{message}",
            description="Number of messages that were delivered to the application.",
        )
        # Open spans by the entries they wait for: (consumer, group, stream, entry id). By
        # entry, not by call: a batch's entries may settle one by one, in calls of their own.
        self._open: dict[tuple[str, str, str, str], _Open] = {}
        self._span_attributes: dict[tuple[str, str, str | None], Attributes] = {}
        self._metric_attributes: dict[tuple[str, str | None], Attributes] = {}

    async def around(self, call: Call, proceed: Proceed) -> None:
        messages = call.messages
        span = self._start(call, messages)
        metric = self._metric(call.group, messages)
        self._consumed.add(len(messages), metric)
        token = otel_context.attach(trace.set_span_in_context(span))
        began = time.perf_counter()
        error_type: str | None = None
        try:
            await proceed()
        except Exception as exc:
            error_type = _failed(span, exc)
            raise
        finally:
            otel_context.detach(token)
            if error_type is not None:
                metric = {**metric, "error.type": error_type}
            self._duration.record(time.perf_counter() - began, metric)
            opened = _Open(span, len(messages), error_type is not None)
            consumer, group = call.consumer, call.group
            for message in messages:
                self._open[(consumer, group, message.stream, message.id)] = opened

    def settled(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
        found: list[_Open] = []
        consumer, group = call.consumer, call.group
        for stream, entry_id in call.ids:
            opened = self._open.pop((consumer, group, stream, entry_id), None)
            if opened is not None:
                opened.remaining -= 1
                if opened not in found:
                    found.append(opened)
        for opened in found:
            _settle(opened, outcome, error)
        if not found and error is not None:
            self._unrun(call, outcome, error)

    def _unrun(self, call: Call, outcome: Outcome, error: BaseException) -> None:
        """A span for entries that failed before reaching the handler (too large, or a
        batch's entries that do not decode): the call's duration, ended now."""
        messages = call.messages
        began = time.time_ns() - int(call.duration * 1e9)
        span = self._start(call, messages, start_time=began)
        error_type = _failed(span, error)
        span.set_attribute(OUTCOME, outcome)
        span.end()
        metric = self._metric(call.group, messages)
        self._consumed.add(len(messages), metric)
        self._duration.record(call.duration, {**metric, "error.type": error_type})

    def _start(
        self, call: Call, messages: Sequence[Message], start_time: int | None = None
    ) -> trace.Span:
        stream = _stream(messages)
        key = (call.consumer, call.group, stream)
        fixed = self._span_attributes.get(key)
        if fixed is None:
            fixed = self._span_attributes[key] = {
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.consumer.group.name": call.group,
                "messaging.client.id": call.consumer,
            }
            if stream is not None:
                fixed["messaging.destination.name"] = stream
        attributes = dict(fixed)
        parent: Context | None = None
        links: list[Link] = []
        if len(messages) == 1:
            message = messages[0]
            attributes["messaging.message.id"] = message.id
            attributes[DELIVERY_COUNT] = message.deliveries
            producer = producer_context(message)
            if producer is not None:
                parent = trace.set_span_in_context(NonRecordingSpan(producer))
                links.append(Link(producer))
        else:
            attributes["messaging.batch.message_count"] = len(messages)
            for message in messages:
                producer = producer_context(message)
                if producer is not None:
                    links.append(Link(producer, {"messaging.message.id": message.id}))
        return self._tracer.start_span(
            f"process {stream}" if stream is not None else "process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
            start_time=start_time,
        )

    def _metric(self, group: str, messages: Sequence[Message]) -> Attributes:
        stream = _stream(messages)
        key = (group, stream)
        found = self._metric_attributes.get(key)
        if found is None:
            found = self._metric_attributes[key] = {
                "messaging.system": SYSTEM,
                "messaging.operation.name": "process",
                "messaging.consumer.group.name": group,
            }
            if stream is not None:
                found["messaging.destination.name"] = stream
        return found


def _stream(messages: Sequence[Message]) -> str | None:
    """The stream of every message, or None when they come from several (a batch handler
    consuming several streams)."""
    stream = messages[0].stream
    return stream if all(m.stream == stream for m in messages) else None


def _failed(span: trace.Span, error: BaseException) -> str:
    """Record `error` on `span` as its failure; returns its `error.type`."""
    error_type = type(error).__qualname__
    if span.is_recording():
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{error_type}: {error}"))
        span.set_attribute("error.type", error_type)
    return error_type


def _settle(opened: _Open, outcome: Outcome, error: BaseException | None) -> None:
    """Some of the span's entries ended as `outcome`; the span ends with its last."""
    if outcome not in opened.outcomes:
        opened.outcomes.append(outcome)
    if error is not None and not opened.failed and isinstance(error, Exception):
        # Failed outside the span (a middleware around it raised): still the call's error.
        opened.failed = True
        _failed(opened.span, error)
    if opened.remaining == 0:
        # Entries of one call end alike but for rare splits (the stop cut a batch's
        # settling short): then every outcome, e.g. "cancelled,retried".
        opened.span.set_attribute(OUTCOME, ",".join(sorted(opened.outcomes)))
        opened.span.end()


def instrument_tracing(
    app: App,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    inject: bool = True,
) -> Tracing:
    """Trace `app`: add a `Tracing` middleware (after those already registered) and, with
    `inject` (the default), write the current trace context into each entry `app.publish`
    and `publish_many` add, as the field `traceparent` (and `tracestate` when there is one).

    Call it before the app starts. Raises ConfigurationError when the app is running or
    already has a Tracing middleware. Returns the middleware.
    """
    if any(isinstance(m, Tracing) for m in app.middleware):
        raise ConfigurationError(
            "instrument_tracing: expected an app without a Tracing middleware, found one "
            "registered already (instrument an app once)"
        )
    tracing = Tracing(tracer_provider=tracer_provider, meter_provider=meter_provider)
    app.add_middleware(tracing)
    if inject:
        app._trace_fields = trace_fields
    return tracing

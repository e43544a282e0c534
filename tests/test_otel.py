"""asyncstreams.otel against a real redis-server: the spans and metrics of handler calls, read
back from OpenTelemetry's SDK (in-memory exporter and metric reader), and the trace context
that `publish` writes into entries."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
)

import asyncstreams.otel
from asyncstreams import App, ConfigurationError, Message
from asyncstreams.otel import TRACEPARENT, Tracing, instrument_tracing, trace_fields

from .conftest import Names
from .helpers import eventually, fill, wait_drained

pytestmark = pytest.mark.anyio


class Item(msgspec.Struct):
    n: int


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    spans: InMemorySpanExporter
    meter_provider: MeterProvider
    metrics: InMemoryMetricReader

    def finished(self, name_prefix: str = "process") -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name.startswith(name_prefix)]

    async def wait_spans(self, count: int) -> list[ReadableSpan]:
        async def enough() -> bool:
            return len(self.finished()) >= count

        await eventually(enough, what=f"{count} process spans")
        return self.finished()

    def points(self, name: str) -> list[object]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield Telemetry(tracer_provider, spans, meter_provider, reader)
    tracer_provider.shutdown()
    meter_provider.shutdown()


def traced_app(redis_url: str, telemetry: Telemetry) -> App:
    app = App(redis_url)
    instrument_tracing(
        app,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    return app


def ids(context: SpanContext) -> tuple[int, int]:
    return context.trace_id, context.span_id


def open_spans(app: App) -> int:
    """How many entries the app's Tracing still holds a span open for."""
    (tracing,) = [m for m in app.middleware if isinstance(m, Tracing)]
    return len(tracing._open)


def traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


async def test_a_consumer_span_per_entry_with_the_conventions_attributes(
    redis_url: str, names: Names, client: aioredis.Redis, telemetry: Telemetry
) -> None:
    app = traced_app(redis_url, telemetry)

    @app.consumer(names.stream, group=names.group, consumer="c1")
    async def handle(item: Item) -> None:
        pass

    async with app:
        ids = [await app.publish(names.stream, Item(n)) for n in range(3)]
        await wait_drained(client, names.stream, names.group)
        spans = await telemetry.wait_spans(3)

    assert len(spans) == 3
    assert sorted(str(s.attributes["messaging.message.id"]) for s in spans) == sorted(ids)  # type: ignore[index]
    for span in spans:
        assert span.name == f"process {names.stream}"
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is None  # published outside any span: a trace of its own
        assert span.status.status_code is StatusCode.UNSET
        attributes = dict(span.attributes or {})
        del attributes["messaging.message.id"]
        assert attributes == {
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": names.stream,
            "messaging.consumer.group.name": names.group,
            "messaging.client.id": "c1",
            "messaging.redis.message.delivery_count": 1,
            "asyncstreams.outcome": "acked",
        }


async def test_a_failure_is_recorded_and_the_retry_gets_a_span_of_its_own(
    redis_url: str, names: Names, client: aioredis.Redis, telemetry: Telemetry
) -> None:
    app = traced_app(redis_url, telemetry)
    runs = 0

    @app.consumer(names.stream, group=names.group, retry_delay=0.01)
    async def handle(item: Item) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ValueError("not yet")

    async with app:
        entry_id = await app.publish(names.stream, Item(1))
        await wait_drained(client, names.stream, names.group)
        first, retry = sorted(
            await telemetry.wait_spans(2),
            key=lambda s: str((s.attributes or {})["messaging.redis.message.delivery_count"]),
        )

    assert first.attributes is not None
    assert retry.attributes is not None
    assert first.attributes["messaging.message.id"] == retry.attributes["messaging.message.id"]
    assert first.attributes["messaging.message.id"] == entry_id
    assert first.attributes["messaging.redis.message.delivery_count"] == 1
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "ValueError: not yet"
    assert first.attributes["error.type"] == "ValueError"
    assert first.attributes["asyncstreams.outcome"] == "retried"
    (event,) = first.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "not yet"

    assert retry.attributes["messaging.redis.message.delivery_count"] == 2
    assert retry.status.status_code is StatusCode.UNSET
    assert "error.type" not in retry.attributes
    assert retry.attributes["asyncstreams.outcome"] == "acked"
    assert retry.context is not None
    assert first.context is not None
    assert retry.context.span_id != first.context.span_id
    assert open_spans(app) == 0


async def test_the_producers_trace_continues_into_the_consumer_span(
    redis_url: str, names: Names, client: aioredis.Redis, telemetry: Telemetry
) -> None:
    app = traced_app(redis_url, telemetry)
    tracer = telemetry.tracer_provider.get_tracer("test")
    got: list[Item] = []

    @app.consumer(names.stream, group=names.group)
    async def handle(item: Item) -> None:
        got.append(item)  # the Struct decoder ignores the traceparent field
        with tracer.start_as_current_span("handler work"):
            pass

    async with app:
        with tracer.start_as_current_span("http request") as request:
            entry_id = await app.publish(names.stream, Item(7))
        await wait_drained(client, names.stream, names.group)
        (consumer,) = await telemetry.wait_spans(1)

    producer = request.get_span_context()
    ((_, fields),) = await client.xrange(names.stream)
    assert fields == {"n": "7", TRACEPARENT: traceparent(producer)}  # no tracestate: none set
    assert got == [Item(7)]

    assert consumer.attributes is not None
    assert consumer.attributes["messaging.message.id"] == entry_id
    assert consumer.context is not None
    assert consumer.parent is not None
    assert consumer.context.trace_id == producer.trace_id
    assert consumer.parent.span_id == producer.span_id
    assert consumer.parent.is_remote
    assert [link.context.span_id for link in consumer.links] == [producer.span_id]
    (work,) = telemetry.finished("handler work")
    assert work.parent is not None
    assert work.parent.span_id == consumer.context.span_id  # the span is current in the handler


async def test_a_batch_call_is_one_span_linked_to_each_producer(
    redis_url: str, names: Names, client: aioredis.Redis, telemetry: Telemetry
) -> None:
    await fill(client, names.stream, 1)  # a consumer's first read takes one entry
    app = traced_app(redis_url, telemetry)
    tracer = telemetry.tracer_provider.get_tracer("test")
    producers: dict[str, SpanContext] = {}
    for n in range(5):
        with tracer.start_as_current_span(f"request {n}") as request:
            producers[await app.publish(names.stream, Item(n))] = request.get_span_context()
    undecodable = await client.xadd(names.stream, {"n": "seven"})

    @app.consumer(names.stream, group=names.group)
    async def load(items: list[Item], messages: list[Message]) -> None:
        pass

    async with app:
        await wait_drained(client, names.stream, names.group)
        spans = await telemetry.wait_spans(3)  # the first entry, the batch, the undecodable
    await app.aclose()

    (batch,) = [s for s in spans if "messaging.batch.message_count" in (s.attributes or {})]
    assert batch.attributes is not None
    assert batch.attributes["messaging.batch.message_count"] == 5
    assert "messaging.message.id" not in batch.attributes
    assert batch.name == f"process {names.stream}"
    assert batch.parent is None
    linked = {
        str(link.attributes["messaging.message.id"]): ids(link.context)  # type: ignore[index]
        for link in batch.links
    }
    assert linked == {entry_id: ids(context) for entry_id, context in producers.items()}
    assert batch.attributes["asyncstreams.outcome"] == "acked"

    (unfit,) = [
        s for s in spans if s.attributes and s.attributes.get("messaging.message.id") == undecodable
    ]
    assert unfit.status.status_code is StatusCode.ERROR
    assert unfit.attributes is not None
    assert unfit.attributes["error.type"] == "DecodeError"
    assert unfit.attributes["asyncstreams.outcome"] == "dead_lettered"
    assert open_spans(app) == 0


async def test_metrics_count_entries_and_time_calls(
    redis_url: str, names: Names, client: aioredis.Redis, telemetry: Telemetry
) -> None:
    app = traced_app(redis_url, telemetry)

    @app.consumer(names.stream, group=names.group, max_deliveries=1)
    async def handle(item: Item) -> None:
        if item.n == 2:
            raise RuntimeError("two")

    async with app:
        for n in range(4):
            await app.publish(names.stream, Item(n))
        await wait_drained(client, names.stream, names.group)
        await telemetry.wait_spans(4)

    common = {
        "messaging.system": "redis",
        "messaging.operation.name": "process",
        "messaging.destination.name": names.stream,
        "messaging.consumer.group.name": names.group,
    }
    (consumed,) = telemetry.points("messaging.client.consumed.messages")
    assert isinstance(consumed, NumberDataPoint)
    assert consumed.value == 4
    assert dict(consumed.attributes or {}) == common
    durations = {
        str((p.attributes or {}).get("error.type")): p
        for p in telemetry.points("messaging.process.duration")
        if isinstance(p, HistogramDataPoint)
    }
    assert set(durations) == {"None", "RuntimeError"}
    ok, failed = durations["None"], durations["RuntimeError"]
    assert isinstance(ok, HistogramDataPoint)
    assert isinstance(failed, HistogramDataPoint)
    assert (ok.count, failed.count) == (3, 1)
    assert dict(failed.attributes or {}) == {**common, "error.type": "RuntimeError"}
    assert 0 < ok.sum < 5


async def test_publish_writes_tracestate_only_when_there_is_one(
    redis_url: str, names: Names, client: aioredis.Redis, telemetry: Telemetry
) -> None:
    app = traced_app(redis_url, telemetry)
    context = SpanContext(
        0x1234,
        0x5678,
        is_remote=False,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("v", "s")]),
    )
    with trace.use_span(NonRecordingSpan(context)):
        assert trace_fields() == {TRACEPARENT: traceparent(context), "tracestate": "v=s"}
        await app.publish_many(names.stream, [Item(1), {"n": "2", TRACEPARENT: "own"}])
    await app.aclose()
    assert [fields for _, fields in await client.xrange(names.stream)] == [
        {"n": "1", TRACEPARENT: traceparent(context), "tracestate": "v=s"},
        {"n": "2", TRACEPARENT: "own", "tracestate": "v=s"},  # the payload's own is kept
    ]
    assert trace_fields() == {}  # outside any span


async def test_without_instrumenting_publish_adds_no_field(
    redis_url: str, names: Names, client: aioredis.Redis, telemetry: Telemetry
) -> None:
    tracer = telemetry.tracer_provider.get_tracer("test")
    plain = App(redis_url)
    consumer_only = App(redis_url, middleware=[Tracing(tracer_provider=telemetry.tracer_provider)])
    not_injecting = App(redis_url)
    instrument_tracing(not_injecting, tracer_provider=telemetry.tracer_provider, inject=False)
    with tracer.start_as_current_span("http request"):
        for app in (plain, consumer_only, not_injecting):
            await app.publish(names.stream, Item(1))
            await app.aclose()
    assert [fields for _, fields in await client.xrange(names.stream)] == [{"n": "1"}] * 3


def test_an_app_is_instrumented_once(redis_url: str) -> None:
    app = App(redis_url)
    tracing = instrument_tracing(app)
    assert app.middleware == (tracing,)
    with pytest.raises(ConfigurationError, match="found one registered already"):
        instrument_tracing(app)


def test_without_opentelemetry_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "asyncstreams.otel")
    with pytest.raises(ConfigurationError, match=r'pip install "asyncstreams\[otel\]"'):
        importlib.import_module("asyncstreams.otel")


def test_every_name_in_all_resolves() -> None:
    for name in asyncstreams.otel.__all__:
        assert getattr(asyncstreams.otel, name) is not None


def test_without_opentelemetry_an_app_publishes_as_before(redis_url: str, names: Names) -> None:
    """In a process where opentelemetry cannot be imported: asyncstreams works, publishes
    no trace field, and never tries to load asyncstreams.otel."""
    code = f"""
import sys
sys.modules["opentelemetry"] = None
import anyio, asyncstreams, asyncstreams.testing

async def main():
    async with asyncstreams.App({redis_url!r}) as app:
        await app.publish({names.stream!r}, {{"n": "1"}})
        print((await app.redis.xrange({names.stream!r}))[0][1])

anyio.run(main)
assert "asyncstreams.otel" not in sys.modules
"""
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True
    )
    assert done.stdout.strip() == "{b'n': b'1'}"


async def test_a_call_cut_short_by_the_stop_ends_its_span_cancelled(
    redis_url: str, names: Names, client: aioredis.Redis, telemetry: Telemetry
) -> None:
    """No span is left open: the stop's cancellation settles the call, and is no error."""
    app = App(redis_url, grace_period=0.05)
    instrument_tracing(app, tracer_provider=telemetry.tracer_provider)
    started = anyio.Event()

    @app.consumer(names.stream, group=names.group)
    async def handle(item: Item) -> None:
        started.set()
        await anyio.sleep_forever()

    async with app:
        await app.publish(names.stream, Item(1))
        await started.wait()
    (span,) = await telemetry.wait_spans(1)
    assert span.attributes is not None
    assert span.attributes["asyncstreams.outcome"] == "cancelled"
    assert span.status.status_code is StatusCode.UNSET
    assert "error.type" not in span.attributes
    assert open_spans(app) == 0

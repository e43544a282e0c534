"""FastStream's Redis stream subscriber with a consumer group, as its documentation shows it.

- `faststream`: `StreamSub(stream, group=..., consumer=...)` with default settings (no COUNT
  on XREADGROUP, one XACK per entry after its handler). With `concurrency`, the subscriber's
  `max_workers=` runs that many handlers at once.
- `faststream-batch`: `StreamSub(..., batch=True, max_records=500)`: the handler receives a
  list of bodies and the batch is acked with one XACK.
- `faststream-cluster`: the same batch subscriber on `RedisClusterBroker` (redis-py's
  `RedisCluster` underneath), one per stream of `spec.streams` (a `StreamSub` reads one
  stream), all calling one handler.

The broker's per-message access log is off (`logger=None`): it would write two lines per
entry to stderr. Bodies are left unannotated, FastStream's cheapest path (an annotated body
is validated by pydantic).

Publishing is `broker.publish(fields, stream=...)`, one at a time: FastStream writes its own
envelope (one `__data__` field), so only the number of entries is checked afterwards.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import RedisStreamMessage

from ..ledger import Sink
from ..payload import SEQ_DIGITS, task_fields
from ..specs import ConsumeSpec, PublishSpec

MAX_RECORDS = 500


def _handler(spec: ConsumeSpec, sink: Sink) -> Callable[..., Awaitable[None]]:
    record = sink.record
    delay = sink.delay
    sleep = asyncio.sleep

    if spec.impl in ("faststream-batch", "faststream-cluster"):

        async def handle_batch(bodies: Any) -> None:
            for body in bodies:  # each a dict of the entry's fields, as text
                record(body["task_id"], body["created_at"])
            if delay:
                await sleep(delay)

        return handle_batch
    if spec.work == "latency":
        # The body is only the `data` field (see benchmarks/payload.py); created_at is in the
        # raw entry, which FastStream passes as the message.
        async def handle_message(body: Any, message: RedisStreamMessage) -> None:
            fields = message.raw_message["data"]
            record(fields[b"task_id"], fields[b"created_at"])

        return handle_message

    async def handle(body: Any) -> None:
        record(body[:SEQ_DIGITS], 0.0)  # the sequence number leads the data field
        if delay:
            await sleep(delay)

    return handle


@asynccontextmanager
async def consuming(spec: ConsumeSpec, sink: Sink) -> AsyncIterator[None]:
    if spec.impl == "faststream-cluster":
        async with _consuming_cluster(spec, sink):
            yield
        return
    broker = RedisBroker(spec.url, logger=None)  # type: ignore[arg-type]  # None: no logging
    consumer = f"bench-{os.getpid()}"
    if spec.impl == "faststream-batch":
        sub: StreamSub[Any] = StreamSub(
            spec.stream, group=spec.group, consumer=consumer, batch=True, max_records=MAX_RECORDS
        )
    else:
        sub = StreamSub(spec.stream, group=spec.group, consumer=consumer)
    handler = _handler(spec, sink)
    if spec.concurrency and spec.impl == "faststream":
        broker.subscriber(stream=sub, max_workers=spec.concurrency)(handler)
    else:
        broker.subscriber(stream=sub)(handler)
    await broker.start()
    try:
        yield
    finally:
        await broker.stop()


@asynccontextmanager
async def _consuming_cluster(spec: ConsumeSpec, sink: Sink) -> AsyncIterator[None]:
    from faststream.redis import RedisClusterBroker  # FastStream 0.7 and later

    broker = RedisClusterBroker(spec.url, logger=None)  # type: ignore[arg-type]  # None: no logging
    consumer = f"bench-{os.getpid()}"
    handler = _handler(spec, sink)
    for stream in spec.streams or (spec.stream,):
        sub: StreamSub[Any] = StreamSub(
            stream, group=spec.group, consumer=consumer, batch=True, max_records=MAX_RECORDS
        )
        broker.subscriber(stream=sub)(handler)
    await broker.start()
    try:
        yield
    finally:
        await broker.stop()


async def publish(spec: PublishSpec) -> float:
    broker = RedisBroker(spec.url, logger=None)  # type: ignore[arg-type]  # None: no logging
    now = time.time()
    payloads = [task_fields(seq, spec.size, now) for seq in range(spec.entries)]
    try:
        await broker.connect()
        started = time.perf_counter()
        for fields in payloads:
            await broker.publish(fields, stream=spec.stream)  # type: ignore[arg-type]  # a dict is fine
        return time.perf_counter() - started
    finally:
        await broker.stop()

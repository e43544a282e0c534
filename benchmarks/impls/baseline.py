"""The hand-written redis-py consumers asyncstreams is measured against.

Both read with `XREADGROUP ... COUNT 500 BLOCK 100 STREAMS s >` through redis-py's asyncio
client (hiredis parses replies; redis-py turns each entry into `(id, {field: value})`):

- `baseline-inline`: the handler is awaited inline for each entry of a batch, then one XACK
  carries the whole batch.
- `baseline-tasks`: one asyncio task per entry, at most `concurrency` (default 100) in flight;
  finished ids are acked by one task, one XACK per round trip with all that finished meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import redis.asyncio as aioredis

from ..ledger import Sink
from ..payload import task_fields
from ..specs import ConsumeSpec, PublishSpec

READ_COUNT = 500
BLOCK_MS = 100
IN_FLIGHT = 100
STOP_TIMEOUT = 10.0

Fields = dict[bytes, bytes]
Handler = Callable[[Fields], Awaitable[None]]


def client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, protocol=2)


def _handler(sink: Sink) -> Handler:
    record = sink.record
    delay = sink.delay
    sleep = asyncio.sleep

    async def handle(fields: Fields) -> None:
        record(fields[b"task_id"], fields[b"created_at"])
        if delay:
            await sleep(delay)

    return handle


class _Reader:
    def __init__(self, redis: aioredis.Redis, spec: ConsumeSpec) -> None:
        self.redis = redis
        self.stream = spec.stream
        self.group = spec.group
        self.consumer = f"bench-{os.getpid()}"

    async def read(self) -> list[tuple[bytes, Fields]]:
        reply: list[tuple[bytes, list[tuple[bytes, Fields]]]] = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=READ_COUNT, block=BLOCK_MS
        )  # type: ignore[assignment]  # redis-py's reply types are loose unions
        return [entry for _, entries in reply for entry in entries] if reply else []

    async def ack(self, ids: list[bytes]) -> None:
        await self.redis.xack(self.stream, self.group, *ids)


async def inline_loop(reader: _Reader, handle: Handler, stop: asyncio.Event) -> None:
    while not stop.is_set():
        entries = await reader.read()
        for _, fields in entries:
            await handle(fields)
        if entries:
            await reader.ack([entry_id for entry_id, _ in entries])


async def task_loop(reader: _Reader, handle: Handler, stop: asyncio.Event, in_flight: int) -> None:
    slots = asyncio.Semaphore(in_flight)
    finished: list[bytes] = []
    ack_due = asyncio.Event()
    running: set[asyncio.Task[None]] = set()

    async def run_one(entry_id: bytes, fields: Fields) -> None:
        try:
            await handle(fields)
        finally:
            slots.release()
        finished.append(entry_id)  # a handler that raised is not acked: it stays pending
        ack_due.set()

    async def flush() -> None:
        ids = finished[:]
        finished.clear()
        if ids:
            await reader.ack(ids)

    async def ack_loop() -> None:
        while True:
            await ack_due.wait()
            ack_due.clear()
            await flush()

    acker = asyncio.create_task(ack_loop())
    try:
        while not stop.is_set():
            for entry_id, fields in await reader.read():
                await slots.acquire()
                task = asyncio.create_task(run_one(entry_id, fields))
                running.add(task)
                task.add_done_callback(running.discard)
        await asyncio.gather(*running, return_exceptions=True)
    finally:
        acker.cancel()
        with suppress(asyncio.CancelledError):
            await acker
    await flush()


@asynccontextmanager
async def consuming(spec: ConsumeSpec, sink: Sink) -> AsyncIterator[None]:
    redis = client(spec.url)
    reader = _Reader(redis, spec)
    handle = _handler(sink)
    stop = asyncio.Event()
    if spec.impl == "baseline-inline":
        loop = inline_loop(reader, handle, stop)
    else:
        loop = task_loop(reader, handle, stop, spec.concurrency or IN_FLIGHT)
    task = asyncio.create_task(loop)

    def on_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            sink.failure = task.exception()

    task.add_done_callback(on_done)
    try:
        yield
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, STOP_TIMEOUT)
        except TimeoutError:
            raise TimeoutError(f"the consumer loop did not stop in {STOP_TIMEOUT:.0f} s") from None
        finally:
            await redis.aclose()


async def publish(spec: PublishSpec) -> float:
    """XADD `spec.entries` entries one at a time, or in pipelines of `spec.chunk`."""
    redis = client(spec.url)
    now = time.time()
    payloads = [task_fields(seq, spec.size, now) for seq in range(spec.entries)]
    try:
        await redis.ping()
        started = time.perf_counter()
        if spec.method == "redis-py-xadd":
            for fields in payloads:
                await redis.xadd(spec.stream, fields)  # type: ignore[arg-type]
        else:
            for start in range(0, len(payloads), spec.chunk):
                async with redis.pipeline(transaction=False) as pipe:
                    for fields in payloads[start : start + spec.chunk]:
                        pipe.xadd(spec.stream, fields)  # type: ignore[arg-type]
                    await pipe.execute()
        return time.perf_counter() - started
    finally:
        await redis.aclose()

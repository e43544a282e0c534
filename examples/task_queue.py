"""The task queue of the Redis Streams guide, on asyncstreams.

    python -m asyncstreams run examples.task_queue:app --embedded

`process` consumes the `task_queue` stream as a consumer of the `task_consumers` group: each
entry is decoded into a `Task`, handled, and acked once the handler returns (an entry whose
handler raises stays pending). So that something happens, the app also publishes a task every
0.2 s from its lifespan. Environment:

    TASK_QUEUE_STREAM    the stream to use (default "task_queue")
    TASK_QUEUE_PRODUCE   "0": publish nothing; feed it with examples/producer.py instead
    TASK_QUEUE_INTERVAL  seconds between published tasks (default 0.2)

Ctrl-C (or SIGTERM) stops it: reading stops, running handlers finish, their acks are sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec

from asyncstreams import App, Message, RedisUnavailableError

STREAM = os.environ.get("TASK_QUEUE_STREAM", "task_queue")
GROUP = "task_consumers"
PRODUCE = os.environ.get("TASK_QUEUE_PRODUCE", "1") != "0"
INTERVAL = float(os.environ.get("TASK_QUEUE_INTERVAL", "0.2"))
WORK_SECONDS = 0.05  # how long handling one task pretends to take

log = logging.getLogger("examples.task_queue")


class Task(msgspec.Struct):
    """The fields the guide's producer writes, so its entries decode here too."""

    task_id: str
    data: str
    created_at: float  # time.time() when the task was made; a stream entry holds it as text


async def produce(app: App) -> None:
    """Publish a task every INTERVAL seconds until cancelled, trimming the stream to ~1000."""
    for n in itertools.count():
        task = Task(
            task_id=str(uuid.uuid4()), data=f"Process this data: {n}", created_at=time.time()
        )
        try:
            await app.publish(STREAM, task, maxlen=1000)
        except RedisUnavailableError as exc:  # Redis restarting, say: the consumers ride it out
            log.warning("could not publish task %d: %s", n, exc)
        await asyncio.sleep(INTERVAL)


@asynccontextmanager
async def lifespan(app: App) -> AsyncIterator[None]:
    """Entered before the consumers start and left after they stop: runs the producer."""
    if not PRODUCE:
        yield
        return
    producer = asyncio.create_task(produce(app), name="task_queue producer")
    log.info("publishing a task to %s every %.2f s (TASK_QUEUE_PRODUCE=0: don't)", STREAM, INTERVAL)
    try:
        yield
    finally:
        producer.cancel()
        await asyncio.wait([producer])  # unlike `await producer`, never swallows our own cancel


app = App(lifespan=lifespan)
handled = itertools.count(1)


@app.consumer(STREAM, group=GROUP)
async def process(task: Task, msg: Message) -> None:
    latency_ms = (time.time() - task.created_at) * 1000
    await asyncio.sleep(WORK_SECONDS)  # the work
    log.info(
        "handled %d tasks; latest: %s (entry %s, %.1f ms after it was published)",
        next(handled),
        task.data,
        msg.id,
        latency_ms,
    )

"""asyncstreams under test: an App with one consumer, run with `async with app`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from asyncstreams import App, Call, ConfigurationError, Message, Middleware, Outcome, Partitioned

from ..ledger import Sink
from ..payload import KEY_FIELD, KeyedTask, Task, task
from ..specs import ConsumeSpec, PublishSpec

BATCH_SIZE = 500  # batch handlers read as FastStream's batch subscriber does: 500 at a time


def batch_handlers() -> str | None:
    """None if a handler may take `list[Task]` (a batch); otherwise why not."""
    app = App("redis://127.0.0.1:1/0")  # never connects: registering only plans the handler

    async def probe(tasks: list[Task]) -> None:
        return None

    try:
        app.consumer("probe", group="probe")(probe)
    except ConfigurationError:
        return "asyncstreams has no batch handlers yet (a list[Task] parameter is refused)"
    return None


def pipelines() -> str | None:
    """None if a consumer may take `output=` (pipelines); otherwise why not."""
    app = App("redis://127.0.0.1:1/0")  # never connects

    async def probe(task: Task) -> Task:
        return task

    try:
        app.consumer("probe", group="probe", output="probe-out")(probe)
    except (TypeError, ConfigurationError):
        return "asyncstreams has no pipelines yet (output= is refused)"
    return None


def key_lanes() -> str | None:
    """None if a consumer may take `key=` (key lanes); otherwise why not."""
    app = App("redis://127.0.0.1:1/0")  # never connects

    async def probe(task: Task) -> None:
        return None

    try:
        app.consumer("probe", group="probe", key="task_id")(probe)
    except (TypeError, ConfigurationError):
        return "asyncstreams has no key lanes yet (key= is refused)"
    return None


def ownership() -> str | None:
    """None if a consumer may take `ordered=True` (partition ownership); otherwise why not."""
    app = App("redis://127.0.0.1:1/0")  # never connects

    async def probe(task: Task) -> None:
        return None

    try:
        app.consumer(Partitioned("probe", 2), group="probe", key="task_id", ordered=True)(probe)
    except (TypeError, ConfigurationError):
        return "asyncstreams has no partition ownership yet (ordered= is refused)"
    return None


def publish_many() -> str | None:
    """None if `App.publish_many` exists; otherwise why not."""
    if hasattr(App, "publish_many"):
        return None
    return "App.publish_many does not exist yet"


class Trivial(Middleware):
    """Overrides both hooks and does nothing: the least a middleware costs."""

    async def around(self, call: Call, proceed: Callable[[], Awaitable[None]]) -> None:
        await proceed()

    def settled(self, call: Call, outcome: Outcome, error: BaseException | None) -> None:
        return None


def metrics_missing() -> str | None:
    """None if asyncstreams.prometheus and prometheus_client can be imported; else why not."""
    try:
        import prometheus_client  # noqa: F401

        import asyncstreams.prometheus  # noqa: F401
    except ImportError as exc:
        return f"metrics cannot be imported here ({exc})"
    return None


def _add_middleware(app: App, middleware: str) -> None:
    if middleware == "trivial":
        app.add_middleware(Trivial())
    elif middleware == "metrics":
        from asyncstreams.prometheus import instrument

        instrument(app)


def _transform(shape: str, sink: Sink) -> Callable[..., Awaitable[Any]]:
    """A no-op transform, for `output=`: the handler returns what it got (one output per
    entry). A Struct, or a batch of them (returned as the list it got)."""
    record = sink.record

    if shape == "struct":

        async def pass_task(task: Task) -> Task:
            record(task.task_id, task.created_at)
            return task

        return pass_task
    if shape == "batch":

        async def pass_batch(tasks: list[Task]) -> list[Task]:
            for one in tasks:
                record(one.task_id, one.created_at)
            return tasks

        return pass_batch
    raise ValueError(f"no transform handler for shape {shape!r}; expected struct or batch")


def _handler(shape: str, sink: Sink) -> Callable[..., Awaitable[None]]:
    record = sink.record
    delay = sink.delay
    sleep = asyncio.sleep

    if shape == "struct":

        async def handle_task(task: Task) -> None:
            record(task.task_id, task.created_at)
            if delay:
                await sleep(delay)

        return handle_task
    if shape == "keyed":

        async def handle_keyed(task: KeyedTask) -> None:
            record(task.task_id, task.created_at)
            if delay:
                await sleep(delay)

        return handle_keyed
    if shape == "fields":

        async def handle_fields(fields: dict[str, str]) -> None:
            record(fields["task_id"], fields["created_at"])
            if delay:
                await sleep(delay)

        return handle_fields
    if shape == "message":

        async def handle_message(msg: Message) -> None:
            fields = msg.fields
            record(fields["task_id"], fields["created_at"])
            if delay:
                await sleep(delay)

        return handle_message

    if shape == "batch-message":

        async def handle_messages(msgs: list[Message]) -> None:
            for msg in msgs:
                fields = msg.fields
                record(fields["task_id"], fields["created_at"])
            if delay:
                await sleep(delay)

        return handle_messages

    async def handle_batch(tasks: list[Task]) -> None:
        for one in tasks:
            record(one.task_id, one.created_at)
        if delay:
            await sleep(delay)

    return handle_batch


@asynccontextmanager
async def consuming(spec: ConsumeSpec, sink: Sink) -> AsyncIterator[None]:
    app = App(spec.url)
    options: dict[str, Any] = {"group": spec.group, "consumer": f"bench-{os.getpid()}"}
    if spec.concurrency:
        options["concurrency"] = spec.concurrency
    if spec.batch_size:
        options["batch_size"] = spec.batch_size
    elif spec.shape in ("batch", "batch-message"):
        options["batch_size"] = BATCH_SIZE
    if spec.key == "field":
        options["key"] = KEY_FIELD
    elif spec.key == "call":  # on the handler's Struct, a KeyedTask (shape "keyed")
        options["key"] = lambda task: task.key
    if spec.ordered:  # lease_ms, block_ms: the defaults
        options["ordered"] = True
    streams: str | Partitioned | list[str] = spec.stream
    if spec.partitions:
        streams = Partitioned(spec.stream, spec.partitions)
    elif spec.streams:
        streams = list(spec.streams)
    if spec.output:
        options["output"] = spec.output
        app.consumer(streams, **options)(_transform(spec.shape, sink))
    else:
        app.consumer(streams, **options)(_handler(spec.shape, sink))
    _add_middleware(app, spec.middleware)
    async with app:
        yield


async def publish(spec: PublishSpec) -> float:
    """Publish `spec.entries` tasks; returns the seconds it took (payloads made beforehand)."""
    app = App(spec.url)
    now = time.time()
    tasks = [task(seq, spec.size, now) for seq in range(spec.entries)]
    try:
        await app.redis.ping()  # connect before the clock starts
        started = time.perf_counter()
        if spec.method == "asyncstreams-publish":
            for one in tasks:
                await app.publish(spec.stream, one)
        else:
            many = getattr(app, "publish_many")  # noqa: B009  # not in every version
            for start in range(0, len(tasks), spec.chunk):
                await many(spec.stream, tasks[start : start + spec.chunk])
        return time.perf_counter() - started
    finally:
        await app.aclose()

"""A test app run by the CLI tests: the seed guide's typed handler.

`process` takes the guide's `Task` payload and the `Message` envelope and appends one JSON
line per entry to a ledger file, with the types the payload arrived as. Configured by
environment variables (TYPED_APP_*): the stream, the group, the ledger, and how many tasks
the app publishes to itself from its lifespan before its consumers start (for --embedded).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec

from asyncstreams import App, Message

from .ledger import append

env = os.environ.get
STREAM = env("TYPED_APP_STREAM", "tasks")
GROUP = env("TYPED_APP_GROUP", "task-workers")
LEDGER = env("TYPED_APP_LEDGER", "typed-ledger.jsonl")
PUBLISH = int(env("TYPED_APP_PUBLISH", "0"))


class Task(msgspec.Struct):
    task_id: str
    data: str
    created_at: float


@asynccontextmanager
async def publish_own_tasks(app: App) -> AsyncIterator[None]:
    for n in range(PUBLISH):
        task = Task(task_id=f"self-{n}", data=f"published by the app {n}", created_at=time.time())
        await app.publish(STREAM, task, maxlen=1000)
    yield


app = App(lifespan=publish_own_tasks)


@app.consumer(STREAM, group=GROUP)
async def process(task: Task, msg: Message) -> None:
    record = {
        "id": msg.id,
        "stream": msg.stream,
        "group": msg.group,
        "deliveries": msg.deliveries,
        "pid": os.getpid(),
        "task_id": task.task_id,
        "data": task.data,
        "created_at": task.created_at,
        "created_at_type": type(task.created_at).__name__,
    }
    append(LEDGER, record)

"""An asyncio web service that also consumes a stream: an App embedded in FastAPI.

It needs the `examples` extra (FastAPI and uvicorn; `dev` includes it). From the root of a
checkout, with a Redis at $ASYNCSTREAMS_URL:

    .venv/bin/pip install -e ".[examples]"
    ASYNCSTREAMS_URL=redis://localhost:6379/0 .venv/bin/uvicorn examples.fastapi_service:api

The FastAPI lifespan enters `async with worker:`, so the consumers run in the background, on
the web service's event loop, and stop (handlers finished, acks sent) when it shuts down.

    curl -X POST localhost:8000/tasks -H 'content-type: application/json' -d '{"data": "hi"}'
    curl localhost:8000/stats
    curl localhost:8000/ops/readyz

`POST /tasks` publishes a Task to the `task_queue` stream and returns its entry id;
`GET /stats` says how many tasks the embedded consumer (group `task_consumers`) has handled;
`GET /health` answers 503 once the consumers have stopped for good: if one of them fails
(Redis refuses its reads, say), the lifespan ends with that error, and uvicorn logs it but
goes on serving HTTP, so it is the health check that tells the orchestrator to restart.
`/ops` mounts asyncstreams' own routes (`asyncstreams.health.asgi_app`): `/ops/healthz`
(liveness), `/ops/readyz` (readiness: the consumers run and Redis answers) and
`/ops/metrics` (404 here: `asgi_app(worker, metrics=...)` gives it an exposition).
asyncstreams logs through `logging`; uvicorn only configures its own loggers, so add
`--log-config` (or `logging.basicConfig`) to see the consumers' start and stop lines.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgspec
from fastapi import FastAPI, Response
from pydantic import BaseModel

from asyncstreams import App, Message
from asyncstreams.health import asgi_app

log = logging.getLogger("examples.fastapi_service")


class Task(msgspec.Struct):
    """The same fields as examples/task_queue.py's Task (and the guide's producer)."""

    task_id: str
    data: str
    created_at: float


class NewTask(BaseModel):
    data: str


class Enqueued(BaseModel):
    task_id: str
    entry_id: str


class Stats(BaseModel):
    stream: str
    group: str
    handled: int


class Health(BaseModel):
    consuming: bool
    failure: str | None


@dataclass
class Counter:
    handled: int = 0


def create_service(
    url: str | None = None, *, stream: str = "task_queue", group: str = "task_consumers"
) -> FastAPI:
    """A FastAPI app publishing to `stream` and consuming it as `group`, with its own App.

    `url` None means $ASYNCSTREAMS_URL, then redis://localhost:6379/0. The App is
    `api.state.worker`.
    """
    worker = App(url)
    counter = Counter()

    @worker.consumer(stream, group=group)
    async def process(task: Task, msg: Message) -> None:
        await asyncio.sleep(0.01)  # the work
        counter.handled += 1
        log.info("handled %s (entry %s): %s", task.task_id, msg.id, task.data)

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        async with worker:  # consumers start here and are stopped gracefully on the way out
            yield

    api = FastAPI(title="asyncstreams task service", lifespan=lifespan)
    api.state.worker = worker
    api.mount("/ops", asgi_app(worker))

    @api.post("/tasks", status_code=202)
    async def enqueue(body: NewTask) -> Enqueued:
        task = Task(task_id=str(uuid.uuid4()), data=body.data, created_at=time.time())
        entry_id = await worker.publish(stream, task, maxlen=1000)
        return Enqueued(task_id=task.task_id, entry_id=entry_id)

    @api.get("/stats")
    async def stats() -> Stats:
        return Stats(stream=stream, group=group, handled=counter.handled)

    @api.get("/health", responses={503: {"model": Health}})
    async def health(response: Response) -> Health:
        failure = worker.failure
        if not worker.running:
            response.status_code = 503
        return Health(
            consuming=worker.running,
            failure=None if failure is None else f"{type(failure).__name__}: {failure}",
        )

    return api


api = create_service()

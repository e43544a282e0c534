"""A test app run by the CLI tests: its handler records every run in a ledger file.

Configured by environment variables (LEDGER_APP_*): the streams, group, concurrency and
batch size, how long each handler run takes, and where the ledger is. Each run appends a
"start" and an "end" JSON line (O_APPEND writes of one line are atomic), so a test can tell
what was handled, by which process, and whether two runs of one entry overlapped.
"""

from __future__ import annotations

import asyncio
import os
import time

from asyncstreams import App, Message

from .ledger import append

env = os.environ.get
STREAMS = env("LEDGER_APP_STREAMS", "ledger").split(",")
LEDGER = env("LEDGER_APP_LEDGER", "ledger.jsonl")
SLEEP = float(env("LEDGER_APP_SLEEP", "0"))

app = App(grace_period=float(env("LEDGER_APP_GRACE", "10")))


def record(event: dict[str, object]) -> None:
    append(LEDGER, event)


@app.consumer(
    STREAMS,
    group=env("LEDGER_APP_GROUP", "ledger-group"),
    concurrency=int(env("LEDGER_APP_CONCURRENCY", "8")),
    batch_size=int(env("LEDGER_APP_BATCH_SIZE", "10")),
)
async def handle(fields: dict[str, str], msg: Message) -> None:
    start = time.time()
    key = {"id": msg.id, "pid": os.getpid(), "start": start}
    record({**key, "event": "start", "fields": fields, "stream": msg.stream})
    if SLEEP:
        await asyncio.sleep(SLEEP)
    record({**key, "event": "end", "end": time.time()})

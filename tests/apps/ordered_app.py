"""The app the ownership fault tests run (tests/test_ownership_faults.py): one consumer of a
`Partitioned` stream with `ordered=True` and `key="key"`, whose handler records every run.

Configured by environment variables (ORDERED_APP_*, all optional):

- STREAM and PARTITIONS: the stream read, `Partitioned(STREAM, PARTITIONS)`;
- GROUP, LEASE_MS (the partitions' lease), SLEEP (how long a handler run takes);
- RUNS: the directory of the run files (one per process: `runs-<pid>.jsonl`);
- concurrency, batch_size, block_ms, claim_idle_ms, and the app's grace period.

Entries carry `key` and `seq` (the key's sequence number, from 1). Each run appends one JSON
line, once it is over and before the handler returns (so before its entry can be acked):
key, seq, pid, consumer, stream, entry id, deliveries, start and end (`time.time()`, the
same clock in every process) and `ok` (false: the run was cancelled). A run cut short by
SIGKILL leaves no line.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import msgspec

from asyncstreams import App, Message, Partitioned

from .ledger import append

env = os.environ.get

STREAM = Partitioned(env("ORDERED_APP_STREAM", "ordered"), int(env("ORDERED_APP_PARTITIONS", "8")))
GROUP = env("ORDERED_APP_GROUP", "ordered-group")
LEASE_MS = int(env("ORDERED_APP_LEASE_MS", "1500"))
SLEEP = float(env("ORDERED_APP_SLEEP", "0.003"))
RUNS = Path(env("ORDERED_APP_RUNS", "."))

OPTIONS = {
    "concurrency": int(env("ORDERED_APP_CONCURRENCY", "16")),
    "batch_size": int(env("ORDERED_APP_BATCH_SIZE", "20")),
    "block_ms": int(env("ORDERED_APP_BLOCK_MS", "300")),
    "claim_idle_ms": int(env("ORDERED_APP_CLAIM_IDLE_MS", "1000")),
}


class Event(msgspec.Struct):
    key: str
    seq: int


app = App(grace_period=float(env("ORDERED_APP_GRACE", "5")))


@app.consumer(STREAM, group=GROUP, key="key", ordered=True, lease_ms=LEASE_MS, **OPTIONS)  # type: ignore[arg-type]
async def handle(event: Event, msg: Message) -> None:
    start = time.time()
    ok = False
    try:
        await asyncio.sleep(SLEEP)
        ok = True
    finally:
        pid = os.getpid()
        append(
            str(RUNS / f"runs-{pid}.jsonl"),
            {
                "key": event.key,
                "seq": event.seq,
                "pid": pid,
                "consumer": msg.consumer,
                "stream": msg.stream,
                "id": msg.id,
                "deliveries": msg.deliveries,
                "start": start,
                "end": time.time(),
                "ok": ok,
            },
        )

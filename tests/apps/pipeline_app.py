"""The app the pipeline fault tests run (tests/test_pipeline_faults.py): a pipeline stage
whose handler returns one output per input, and optionally a second stage after it.

Configured by environment variables (PIPE_APP_*, all optional):

- INPUT, the input stream; with PARTITIONS (a count), `Partitioned(INPUT, PARTITIONS)`;
- OUTPUT, the first stage's `output=` stream; or DERIVE, with PARTITIONS, the name the
  input's partitions derive theirs with (`Partitioned(INPUT, PARTITIONS).derive(DERIVE)`);
- FINAL: when set, a second consumer (group GROUP:second) reads OUTPUT and emits to FINAL
  through an `Outbox` (OUTPUT must then be a plain stream);
- GROUP, LEDGER (FINAL_LEDGER: the second stage's, LEDGER.final by default), SLEEP (how
  long a handler run takes); concurrency, batch_size, block_ms, claim_idle_ms,
  retry_delay, max_deliveries, grace.

Each output carries the input's `n`, its entry id (`src`) and its stream (`from`), and the
pid that made it; the second stage's add the id of the entry they came from (`via`).
Each run appends a "start" and an "end" JSON line to its stage's ledger, in the fault
app's format (tests/jepsen.py reads them): a run cut short by SIGKILL has no end.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec

from asyncstreams import App, Message, Outbox, Partitioned

from .ledger import append

env = os.environ.get

INPUT = env("PIPE_APP_INPUT", "pipe-in")
PARTITIONS = int(env("PIPE_APP_PARTITIONS", "0"))
OUTPUT = env("PIPE_APP_OUTPUT", "pipe-out")
DERIVE = env("PIPE_APP_DERIVE", "")
FINAL = env("PIPE_APP_FINAL", "")
GROUP = env("PIPE_APP_GROUP", "pipe-group")
LEDGER = env("PIPE_APP_LEDGER", "pipe-ledger.jsonl")
FINAL_LEDGER = env("PIPE_APP_FINAL_LEDGER", f"{LEDGER}.final")
SLEEP = float(env("PIPE_APP_SLEEP", "0"))

SOURCE: str | Partitioned = Partitioned(INPUT, PARTITIONS) if PARTITIONS else INPUT
TARGET: str | Partitioned = OUTPUT
if isinstance(SOURCE, Partitioned) and DERIVE:
    TARGET = SOURCE.derive(DERIVE)

OPTIONS = {
    "concurrency": int(env("PIPE_APP_CONCURRENCY", "8")),
    "batch_size": int(env("PIPE_APP_BATCH_SIZE", "10")),
    "block_ms": int(env("PIPE_APP_BLOCK_MS", "500")),
    "claim_idle_ms": int(env("PIPE_APP_CLAIM_IDLE_MS", "800")),
    "retry_delay": float(env("PIPE_APP_RETRY_DELAY", "0.05")),
    "retry_max_delay": 0.5,
    "max_deliveries": int(env("PIPE_APP_MAX_DELIVERIES", "20")),
}


class Input(msgspec.Struct):
    n: int


class Output(msgspec.Struct):
    n: int
    src: str
    pid: int
    # The input's stream ("from" in the output's fields).
    from_: str = msgspec.field(name="from")


app = App(grace_period=float(env("PIPE_APP_GRACE", "5")))


@asynccontextmanager
async def recorded(ledger: str, msg: Message, n: int) -> AsyncIterator[None]:
    """A "start" line now and an "end" line when the run is over, as the fault app writes."""
    key = {"id": msg.id, "pid": os.getpid(), "start": time.time()}
    append(
        ledger,
        {
            **key,
            "event": "start",
            "stream": msg.stream,
            "consumer": msg.consumer,
            "deliveries": msg.deliveries,
            "fields": {"n": str(n)},
        },
    )
    outcome = "raised"
    try:
        if SLEEP:
            await asyncio.sleep(SLEEP)
        yield
        outcome = "ok"
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        append(ledger, {**key, "event": "end", "end": time.time(), "outcome": outcome})


@app.consumer(SOURCE, group=GROUP, output=TARGET, **OPTIONS)  # type: ignore[arg-type]
async def first(payload: Input, msg: Message) -> Output:
    async with recorded(LEDGER, msg, payload.n):
        return Output(n=payload.n, src=msg.id, pid=os.getpid(), from_=msg.stream)


if FINAL:

    @app.consumer(OUTPUT, group=f"{GROUP}:second", **OPTIONS)  # type: ignore[arg-type]
    async def second(item: Output, msg: Message, out: Outbox) -> None:
        async with recorded(FINAL_LEDGER, msg, item.n):
            out.emit(FINAL, {"n": item.n, "src": item.src, "via": msg.id, "pid": os.getpid()})

"""The app the fault-injection tests run: a ledger app with every delivery option.

Configured by environment variables (FAULT_APP_*, all optional): the streams (or
PARTITIONED, "name:count", for a `Partitioned` stream instead), group and ledger;
concurrency, batch_size, block_ms; the delivery options claim_idle_ms, retry_delay,
retry_max_delay, max_deliveries and max_payload_bytes ("none" for no limit),
delete_idle_consumers_after ("none": never); the app's grace period; and SLEEP, how long a
handler run takes.

Entries decode into `Payload`, so a field of the wrong type, invalid JSON in `meta` or
invalid UTF-8 is a poison entry. The payload also steers the run: `sleep` overrides SLEEP,
`fail` makes every run raise `PoisonError`, `exit` makes every run call `sys.exit(exit)`,
and `hang` makes the run hang (for an hour) on the entry's first `hang` deliveries, so that
a later delivery goes through.

Each run appends a "start" and an "end" JSON line to the ledger (O_APPEND writes of one
line are atomic): entry id, stream, pid, consumer, delivery count, start and end times, and
how the run ended ("ok", "raised" or "cancelled"). A run cut short by SIGKILL has no end.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import msgspec

from asyncstreams import App, Message, Partitioned

from .ledger import append

env = os.environ.get


def _int_or_none(name: str, default: str) -> int | None:
    text = env(f"FAULT_APP_{name}", default)
    return None if text == "none" else int(text)


def _float_or_none(name: str, default: str) -> float | None:
    text = env(f"FAULT_APP_{name}", default)
    return None if text == "none" else float(text)


PARTITIONED = env("FAULT_APP_PARTITIONED", "")
STREAMS: list[str] | Partitioned = env("FAULT_APP_STREAMS", "faults").split(",")
if PARTITIONED:
    _name, _, _count = PARTITIONED.rpartition(":")
    STREAMS = Partitioned(_name, int(_count))
LEDGER = env("FAULT_APP_LEDGER", "fault-ledger.jsonl")
SLEEP = float(env("FAULT_APP_SLEEP", "0"))


class PoisonError(Exception):
    """Raised by the handler for every delivery of an entry whose `fail` field is true."""


class Payload(msgspec.Struct):
    n: int
    tag: str = ""
    meta: dict[str, int] = msgspec.field(default_factory=dict)
    sleep: float | None = None
    fail: bool = False
    hang: int = 0
    exit: int = 0
    blob: str = ""


app = App(grace_period=float(env("FAULT_APP_GRACE", "10")))


def record(event: dict[str, object]) -> None:
    append(LEDGER, event)


@app.consumer(
    STREAMS,
    group=env("FAULT_APP_GROUP", "fault-group"),
    concurrency=int(env("FAULT_APP_CONCURRENCY", "8")),
    batch_size=int(env("FAULT_APP_BATCH_SIZE", "10")),
    block_ms=int(env("FAULT_APP_BLOCK_MS", "1000")),
    claim_idle_ms=int(env("FAULT_APP_CLAIM_IDLE_MS", "1000")),
    retry_delay=float(env("FAULT_APP_RETRY_DELAY", "0.1")),
    retry_max_delay=float(env("FAULT_APP_RETRY_MAX_DELAY", "1")),
    max_deliveries=_int_or_none("MAX_DELIVERIES", "5"),
    max_payload_bytes=_int_or_none("MAX_PAYLOAD_BYTES", "65536"),
    delete_idle_consumers_after=_float_or_none("DELETE_IDLE_CONSUMERS_AFTER", "3600"),
)
async def handle(payload: Payload, msg: Message) -> None:
    start = time.time()
    key = {"id": msg.id, "pid": os.getpid(), "start": start}
    record(
        {
            **key,
            "event": "start",
            "stream": msg.stream,
            "consumer": msg.consumer,
            "deliveries": msg.deliveries,
            "fields": {"n": str(payload.n)},
        }
    )
    outcome = "raised"
    try:
        if payload.hang >= msg.deliveries:
            await asyncio.sleep(3600)
        duration = SLEEP if payload.sleep is None else payload.sleep
        if duration:
            await asyncio.sleep(duration)
        if payload.fail:
            raise PoisonError(f"entry {msg.id} (n={payload.n}) fails on every delivery")
        if payload.exit:
            sys.exit(payload.exit)
        outcome = "ok"
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except SystemExit:
        outcome = "exit"
        raise
    finally:
        record({**key, "event": "end", "end": time.time(), "outcome": outcome})

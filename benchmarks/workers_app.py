"""The app of the workers scenario, run by the real CLI:

    ASYNCSTREAMS_URL=... BENCH_STREAM=... BENCH_GROUP=... BENCH_ENTRIES=... \\
    BENCH_READY_KEY=... BENCH_TALLY_KEY=... \\
        python -m asyncstreams run benchmarks.workers_app:app --workers 2

Each worker process consumes BENCH_STREAM in BENCH_GROUP with the default consumer options
and a no-op Task handler that ticks entries off in its own ledger. Its lifespan pushes the
worker's pid onto BENCH_READY_KEY when it starts, and when it stops writes its ledger and
peak RSS into the hash BENCH_TALLY_KEY (field `<pid>`: JSON), for the suite to check that
the workers together handled every entry exactly once.
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from asyncstreams import App

from .ledger import Tally
from .payload import Task

_NAMES = ("BENCH_STREAM", "BENCH_GROUP", "BENCH_ENTRIES", "BENCH_READY_KEY", "BENCH_TALLY_KEY")
_missing = [name for name in _NAMES if name not in os.environ]
if _missing:
    raise RuntimeError(
        f"benchmarks.workers_app is configured by the environment; missing {', '.join(_missing)}"
    )
STREAM = os.environ["BENCH_STREAM"]
GROUP = os.environ["BENCH_GROUP"]
READY_KEY = os.environ["BENCH_READY_KEY"]
TALLY_KEY = os.environ["BENCH_TALLY_KEY"]
tally = Tally(int(os.environ["BENCH_ENTRIES"]))


@asynccontextmanager
async def lifespan(app: App) -> AsyncIterator[None]:
    pid = str(os.getpid())
    await app.redis.rpush(READY_KEY, pid)
    yield
    report = {
        "handled": tally.count,
        "duplicates": tally.duplicates,
        "unexpected": tally.unexpected,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tally": tally.encode(),
    }
    await app.redis.hset(TALLY_KEY, pid, json.dumps(report))


app = App(lifespan=lifespan)


@app.consumer(STREAM, group=GROUP)
async def handle(task: Task) -> None:
    tally.mark(int(task.task_id))

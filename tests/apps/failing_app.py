"""A test app that fails on purpose, at start or once it is running.

Configured by environment variables (FAILING_APP_*):

- WHEN: "start" fails while the lifespan is entered, before the consumers start; "running"
  fails after the app has started: its lifespan publishes one entry to the process's own
  stream, and DELAY seconds after the handler got it the failure comes.
- HOW: "exit:N" ends the process with `os._exit(N)`, as a crash would; "raise" stops the app
  and raises RuntimeError as the lifespan is left; "RedisRefusedError", "ConfigurationError"
  or "RedisUnavailableError" (at start) raise that asyncstreams error, with "failing_app" in
  its message.
- PREFIX: the stream, `{PREFIX}:{pid}`, one per process so that each worker of a supervisor
  gets its own entry and fails on its own, and the group, `{PREFIX}:group`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from asyncstreams import App, errors

env = os.environ.get
WHEN = env("FAILING_APP_WHEN", "running")
HOW = env("FAILING_APP_HOW", "raise")
DELAY = float(env("FAILING_APP_DELAY", "0.2"))
PREFIX = env("FAILING_APP_PREFIX", "failing-app")
STREAM = f"{PREFIX}:{os.getpid()}"
ERRORS: dict[str, type[errors.AsyncstreamsError]] = {
    "RedisRefusedError": errors.RedisRefusedError,
    "ConfigurationError": errors.ConfigurationError,
    "RedisUnavailableError": errors.RedisUnavailableError,
}
failed = False


def fail() -> None:
    global failed
    if HOW.startswith("exit:"):
        os._exit(int(HOW.removeprefix("exit:")))
    failed = True
    app.stop()


@asynccontextmanager
async def lifespan(app: App) -> AsyncIterator[None]:
    if WHEN == "start":
        raise ERRORS.get(HOW, RuntimeError)(f"failing_app fails at start ({HOW}), on purpose")
    await app.publish(STREAM, {"n": "0"})
    yield
    if failed:
        raise RuntimeError("failing_app fails while running, on purpose")


app = App(lifespan=lifespan)


@app.consumer(STREAM, group=f"{PREFIX}:group", start_id="0")
async def handle(fields: dict[str, str]) -> None:
    # The app reports that it started as soon as its consumer runs; the entry reaches this
    # handler only after a read's round trip to Redis, and DELAY later the failure comes.
    asyncio.get_running_loop().call_later(DELAY, fail)

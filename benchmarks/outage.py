"""`python -m benchmarks.outage`: what a downstream outage costs a consumer.

A handler whose database is down raises for every entry. This program fills a stream on a
private redis-server (or `--url`), runs a consumer of it in a child process for `--seconds`,
and samples, every half second: the entries pending for the group (what the consumer holds),
the log lines it wrote, and the entries in the dead-letter stream. It prints one line per
sample and writes the samples as JSON (`--out`).

    python -m benchmarks.outage                             # the issue's case, 8 s
    python -m benchmarks.outage --seconds 300 --option retry_delay=1.0   # a 5-minute outage
    python -m benchmarks.outage --option pause_after_failures=None       # without the pause

Options are the consumer's (`--option name=value`, Python literals); the defaults are the
case of the issue that asked for it: concurrency=4, batch_size=4, retry_delay=30. The child
runs as a script, so it imports asyncstreams from PYTHONPATH when set: two source trees can
be compared.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from asyncstreams import App, Message
from asyncstreams.embedded import EmbeddedRedis

STREAM = "asyncstreams-bench:outage"
GROUP = "outage"
DEFAULT_OPTIONS: dict[str, Any] = {"concurrency": 4, "batch_size": 4, "retry_delay": 30.0}
CONFIG_ENV = "ASYNCSTREAMS_OUTAGE_CONFIG"


def child() -> None:
    """The consumer: every handler run fails, as while its database is down."""
    config = json.loads(os.environ[CONFIG_ENV])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = App(config["url"])

    @app.consumer(STREAM, group=GROUP, **config["options"])
    async def handle(msg: Message) -> None:
        raise ConnectionError("the database is down")

    asyncio.run(app.run())


def _literal(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"expected a Python literal in {text!r}") from None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outage", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the outage lasts")
    parser.add_argument("--entries", type=int, default=3000, help="the backlog (default 3000)")
    parser.add_argument("--option", type=_literal, action="append", default=[], metavar="K=V")
    parser.add_argument("--url", help="a Redis to use instead of a private one")
    parser.add_argument("--out", type=Path, help="write the samples here as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return 0
    options = {**DEFAULT_OPTIONS, **dict(args.option)}
    server = None if args.url else EmbeddedRedis().start()
    url = args.url or (server.url if server else "")
    try:
        samples = _run(url, args.entries, args.seconds, options)
    finally:
        if server is not None:
            server.close()
    if args.out:
        args.out.write_text(json.dumps({"options": options, "samples": samples}, indent=1))
    return 0


def _run(url: str, entries: int, seconds: float, options: dict[str, Any]) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(url)
    client.delete(STREAM, f"{STREAM}:dead-letter")
    with client.pipeline(transaction=False) as pipe:
        for n in range(entries):
            pipe.xadd(STREAM, {"n": str(n), "data": "x" * 100})
        pipe.execute()
    env = {**os.environ, CONFIG_ENV: json.dumps({"url": url, "options": options})}
    samples: list[dict[str, Any]] = []
    print(f"options {options}, {entries} entries, an outage of {seconds:g} s")
    print(f"{'s':>6} {'pending':>8} {'log lines':>10} {'dead-lettered':>14}")
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, __file__, "--child"], env=env, stderr=log)
        try:
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < seconds:
                time.sleep(min(0.5, max(0.0, seconds - elapsed)))
                log.seek(0)
                sample = {
                    "s": round(time.monotonic() - start, 1),
                    "pending": _pending(client),
                    "log_lines": log.read().count(b"\n"),
                    "dead_lettered": int(client.xlen(f"{STREAM}:dead-letter")),
                }
                samples.append(sample)
                print(
                    f"{sample['s']:>6} {sample['pending']:>8,} {sample['log_lines']:>10,} "
                    f"{sample['dead_lettered']:>14,}"
                )
        finally:
            process.terminate()
            process.wait(30)
            if process.returncode not in (0, -15):
                log.seek(0)
                print(log.read().decode(errors="replace")[-3000:], file=sys.stderr)
    client.delete(STREAM, f"{STREAM}:dead-letter")
    client.close()
    return samples


def _pending(client: redis.Redis) -> int:
    try:
        return int(client.xpending(STREAM, GROUP)["pending"])
    except redis.ResponseError:
        return 0  # the group is not there yet


if __name__ == "__main__":
    sys.exit(main())

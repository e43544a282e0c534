"""`python -m benchmarks.large`: the memory a consumer takes for large entries.

Fills a stream on a private redis-server (or `--url`) with `--entries` entries of `--mb` MB
each, runs a consumer of it in a child process (a no-op handler, the default options unless
`--option name=value` says otherwise) until every entry is either handled or, when larger
than `max_payload_bytes`, in the dead-letter stream, and reports the child's peak resident
memory (Linux's VmHWM) and how long it took.

    python -m benchmarks.large                       # 60 entries of 5 MB: over max_payload_bytes
    python -m benchmarks.large --entries 1 --mb 50   # one entry of 50 MB
    python -m benchmarks.large --option max_payload_bytes=None --mb 0.5 --entries 200

The child runs as a script, so it imports asyncstreams from PYTHONPATH when set: two source
trees can be compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import redis

from asyncstreams import App, Message
from asyncstreams.embedded import EmbeddedRedis

SCRIPT = Path(__file__).resolve()
STREAM = "asyncstreams-bench:large"
GROUP = "large"
CONFIG_ENV = "ASYNCSTREAMS_LARGE_CONFIG"


def child() -> None:
    config = json.loads(os.environ[CONFIG_ENV])
    app = App(config["url"])

    @app.consumer(STREAM, group=GROUP, **config["options"])
    async def handle(msg: Message) -> None:
        pass

    asyncio.run(app.run())


def _option(text: str) -> tuple[str, object]:
    import ast

    name, _, value = text.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"expected name=<Python literal>, got {text!r}") from None


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large", description=__doc__)
    parser.add_argument("--entries", type=int, default=60)
    parser.add_argument("--mb", type=float, default=5.0, help="size of each entry, in MB")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="K=V")
    parser.add_argument("--url", help="a Redis to use instead of a private one")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return 0
    server = None if args.url else EmbeddedRedis().start()
    url = args.url or (server.url if server else "")
    client = redis.Redis.from_url(url)
    try:
        client.delete(STREAM, f"{STREAM}:dead-letter")
        blob = b"x" * int(args.mb * (1 << 20))
        for n in range(args.entries):
            client.xadd(STREAM, {"n": str(n), "blob": blob})
        options = dict(args.option)
        env = {**os.environ, CONFIG_ENV: json.dumps({"url": url, "options": options})}
        started = time.monotonic()
        # The child's log (a line per dead letter) is not what is measured here.
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--child"], env=env, stderr=subprocess.DEVNULL
        )
        try:
            while _pending_or_unread(client):
                if process.poll() is not None or time.monotonic() - started > 300:
                    print("the consumer exited or took over 300 s", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            seconds = time.monotonic() - started
            peak = _peak_mb(process.pid)
        finally:
            process.terminate()
            process.wait(30)
        dead = int(client.xlen(f"{STREAM}:dead-letter"))
        print(
            f"{args.entries} entries of {args.mb:g} MB, options {options}: peak RSS {peak:.0f} MB, "
            f"{dead} dead-lettered, {seconds:.1f} s"
        )
        client.delete(STREAM, f"{STREAM}:dead-letter")
    finally:
        client.close()
        if server is not None:
            server.close()
    return 0


def _pending_or_unread(client: redis.Redis) -> bool:
    try:
        groups = {g["name"]: g for g in client.xinfo_groups(STREAM)}
    except redis.ResponseError:
        return True
    group = groups.get(GROUP.encode())
    last = client.xinfo_stream(STREAM)["last-generated-id"]
    return group is None or bool(group["pending"]) or group["last-delivered-id"] != last


if __name__ == "__main__":
    sys.exit(main())

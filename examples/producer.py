"""The guide's producer on asyncstreams: publish tasks to the `task_queue` stream.

    python examples/producer.py --count 5 [--url redis://localhost:6379/0] [--stream task_queue]

An App with no consumers is a publisher: `app.publish` XADDs a Struct as a flat field map
that any Redis client reads, and that a handler taking the same Struct decodes back.
Without --url, $ASYNCSTREAMS_URL is used, then redis://localhost:6379/0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

import msgspec

from asyncstreams import App, AsyncstreamsError


class Task(msgspec.Struct):
    """The same fields as examples/task_queue.py's Task (and the guide's producer)."""

    task_id: str
    data: str
    created_at: float


async def enqueue(app: App, stream: str, count: int, interval: float) -> None:
    for i in range(count):
        if i:
            await asyncio.sleep(interval)  # simulate some delay, as the guide does
        task = Task(
            task_id=str(uuid.uuid4()), data=f"Process this data: {i}", created_at=time.time()
        )
        entry_id = await app.publish(stream, task, maxlen=1000)  # trim to ~1000, as the guide
        print(f"Enqueued task with ID: {task.task_id}, message ID: {entry_id}", flush=True)


async def publish_tasks(args: argparse.Namespace) -> None:
    app = App(args.url)
    try:
        await enqueue(app, args.stream, args.count, args.interval)
    finally:
        await app.aclose()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Publish tasks to a Redis stream.")
    parser.add_argument("--count", type=int, default=5, help="tasks to publish (default 5)")
    parser.add_argument("--url", help="Redis URL (default: $ASYNCSTREAMS_URL, then localhost)")
    parser.add_argument("--stream", default="task_queue", help="stream name (default task_queue)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between tasks (default 1)"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    try:
        asyncio.run(publish_tasks(args))
    except AsyncstreamsError as exc:  # a bad URL; Redis unreachable
        print(f"producer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

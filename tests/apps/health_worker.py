"""A worker process for tests/test_health.py's supervisor test, until the runner starts
them: `python -m tests.apps.health_worker SOCKET REDIS_URL STREAM JOBS`.

It runs an App consuming STREAM (group `health`) and serves its routes on the unix socket
SOCKET, with metrics of its own: a counter `jobs_total` of JOBS and a gauge `in_flight`
labelled with its pid.
"""

from __future__ import annotations

import os
import sys

import anyio

from asyncstreams import App, Message
from asyncstreams.health import serve_worker_socket


def main() -> None:
    socket, url, stream, jobs = sys.argv[1:]
    app = App(url)

    @app.consumer(stream, group="health", block_ms=100)
    async def handle(msg: Message) -> None:
        pass

    def metrics() -> bytes:
        return (
            "# HELP jobs_total Jobs done.\n"
            "# TYPE jobs_total counter\n"
            f'jobs_total{{queue="q"}} {jobs}\n'
            "# TYPE in_flight gauge\n"
            f'in_flight{{pid="{os.getpid()}"}} 1\n'
        ).encode()

    async def run() -> None:
        async with app:
            await serve_worker_socket(app, socket, metrics=metrics)

    anyio.run(run)


if __name__ == "__main__":
    main()

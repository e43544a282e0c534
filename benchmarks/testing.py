"""What `asyncstreams.testing.TestApp` costs a test suite: the first TestApp of a process
(it starts the redis-server) and each TestApp after it (target: under 50 ms), against a
baseline measured in the same run: the same app under a plain `async with app`, on a
database emptied by hand (what TestApp adds to that is its own cost).

    .venv/bin/python -m benchmarks.testing              # about 10 s
    .venv/bin/python -m benchmarks.testing --repeat 200 --out /tmp/testing.json

Each measured run is what a small test does: enter, publish one entry, wait until it is
handled (TestApp: `drain()`; the baseline: an event the handler sets, then XPENDING until
its ack is in), leave. The first TestApp is measured in fresh processes (`--first`
of them), since only the first of a process starts a server; the others, and the baseline,
in this one, alternating, so a machine whose speed drifts weighs on both alike. Prints the
versions it ran with and writes everything as JSON (default
benchmarks/results/testing.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import redis

from asyncstreams import App
from asyncstreams._testserver import clean_database, shared_server
from asyncstreams.testing import TestApp

from .env import machine, package_versions, source

TARGET_MS = 50.0
DEFAULT_OUT = Path(__file__).parent / "results" / "testing.json"


class Order(msgspec.Struct):
    id: str
    amount: int


def make_app() -> tuple[App, list[asyncio.Event]]:
    app = App()
    handled: list[asyncio.Event] = []

    @app.consumer("orders", group="billing")
    async def bill(order: Order) -> None:
        if handled:
            handled[-1].set()

    return app, handled


async def one_test_app(app: App) -> dict[str, float]:
    """One TestApp as a small test uses it; the time of each part, in ms."""
    started = time.perf_counter()
    async with TestApp(app) as t:
        entered = time.perf_counter()
        await t.publish("orders", Order(id="o1", amount=1))
        await t.drain()
        drained = time.perf_counter()
    left = time.perf_counter()
    return {
        "total": (left - started) * 1000,
        "enter": (entered - started) * 1000,
        "publish_and_drain": (drained - entered) * 1000,
        "exit": (left - drained) * 1000,
    }


async def one_baseline(app: App, handled: list[asyncio.Event], url: str) -> dict[str, float]:
    """The same test without TestApp: `async with app` on a database emptied by hand."""
    started = time.perf_counter()
    with redis.Redis.from_url(url) as client:
        client.flushdb()
        app.configure(url=url)
        event = asyncio.Event()
        handled.append(event)
        async with app:
            entered = time.perf_counter()
            await app.publish("orders", Order(id="o1", amount=1))
            await event.wait()
            while client.xpending("orders", "billing")["pending"]:
                await asyncio.sleep(0.001)
            drained = time.perf_counter()
        handled.clear()
    left = time.perf_counter()
    return {
        "total": (left - started) * 1000,
        "enter": (entered - started) * 1000,
        "publish_and_drain": (drained - entered) * 1000,
        "exit": (left - drained) * 1000,
    }


def summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for part in runs[0]:
        values = sorted(run[part] for run in runs)
        out[part] = {
            "median": round(statistics.median(values), 2),
            "p95": round(values[min(len(values) - 1, int(len(values) * 0.95))], 2),
            "max": round(values[-1], 2),
        }
    return out


def first_in_fresh_processes(count: int) -> list[dict[str, float]]:
    runs = []
    for _ in range(count):
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.testing", "--child"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


async def child() -> None:
    app, _ = make_app()
    print(json.dumps(await one_test_app(app)))


async def further(repeat: int) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    app, handled = make_app()
    await one_test_app(app)  # the server starts here, not in what is measured
    test_apps, baseline = [], []
    with clean_database() as url:
        await one_baseline(app, handled, url)
        for _ in range(repeat):
            test_apps.append(await one_test_app(app))
            baseline.append(await one_baseline(app, handled, url))
    return test_apps, baseline


def line(name: str, stats: dict[str, dict[str, float]]) -> str:
    total = stats["total"]
    parts = ", ".join(
        f"{part} {stats[part]['median']:.1f}" for part in ("enter", "publish_and_drain", "exit")
    )
    return (
        f"{name:<34} median {total['median']:6.1f} ms  p95 {total['p95']:6.1f}  "
        f"max {total['max']:6.1f}  ({parts})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.testing", description=__doc__)
    parser.add_argument("--repeat", type=int, default=100, help="further TestApps (100)")
    parser.add_argument("--first", type=int, default=5, help="fresh processes (5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON written")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(child())
        return 0
    versions = package_versions()
    server = shared_server()
    with redis.Redis(port=server.port) as client:
        versions["redis-server"] = str(client.info("server")["redis_version"])
    versions.pop("faststream", None)
    versions.pop("matplotlib", None)
    print(" ".join(f"{name} {version}" for name, version in versions.items()))
    first = summary(first_in_fresh_processes(args.first))
    print(line(f"first TestApp ({args.first} processes)", first))
    test_apps, baseline = asyncio.run(further(args.repeat))
    each = summary(test_apps)
    base = summary(baseline)
    print(line(f"each further TestApp ({args.repeat})", each))
    print(line("baseline: async with app", base))
    median = each["total"]["median"]
    verdict = "pass" if median < TARGET_MS else "MISS"
    print(
        f"target: each further TestApp under {TARGET_MS:g} ms: {verdict} ({median:.1f} ms; "
        f"{median - base['total']['median']:+.1f} ms on the baseline)"
    )
    result: dict[str, Any] = {
        "versions": versions,
        "machine": machine(),
        "source": source(),
        "command": " ".join(["python -m benchmarks.testing", *(argv or sys.argv[1:])]),
        "target_ms": TARGET_MS,
        "first_test_app_ms": first,
        "each_further_test_app_ms": each,
        "baseline_async_with_app_ms": base,
        "passed": median < TARGET_MS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

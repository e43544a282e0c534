"""`python -m benchmarks.ab --baseline-source DIR`: this checkout's asyncstreams against
another source tree's, on the same drains, alternating.

A drain of a few hundred thousand entries lasts a second or two, and a shared 2-core
machine drifts by more than the difference sought between two versions. So each round
drains a backlog with one version then an equal one with the other (the order alternating
from round to round), and the report is the median of each, the median of the per-round
ratios, and the CPU time per entry (user + system of the consumer process), which drifts
less than wall-clock rates.

    git archive <commit> asyncstreams | tar -x -C /tmp/before
    python -m benchmarks.ab --baseline-source /tmp/before --rounds 10 --entries 300000

Each drain is a consumer with a no-op handler taking a Struct (or `--shape batch`: a
`list[Struct]` batch handler), default options, in a child process that imports
asyncstreams from the tree it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import redis
import redis.asyncio as aioredis

from asyncstreams import App
from asyncstreams.embedded import EmbeddedRedis

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
CONFIG_ENV = "ASYNCSTREAMS_AB_CONFIG"


class Task(msgspec.Struct):
    task_id: str
    data: str
    created_at: float


def child() -> None:
    """Drain the stream; print one JSON line: msgs/s and CPU µs per entry."""
    config = json.loads(os.environ[CONFIG_ENV])
    entries = config["entries"]
    app = App(config["url"])
    state = {"count": 0, "first": 0.0}

    if config["shape"] == "batch":

        @app.consumer(config["stream"], group="ab")
        async def handle_batch(tasks: list[Task]) -> None:
            if not state["count"]:
                state["first"] = time.perf_counter()
            state["count"] += len(tasks)

    else:

        @app.consumer(config["stream"], group="ab")
        async def handle(task: Task) -> None:
            if not state["count"]:
                state["first"] = time.perf_counter()
            state["count"] += 1

    async def drain() -> float:
        client = aioredis.Redis.from_url(config["url"])
        try:
            async with app:
                while True:
                    await asyncio.sleep(0.005)
                    if state["count"] >= entries:
                        summary = await client.xpending(config["stream"], "ab")
                        if summary["pending"] == 0:
                            return time.perf_counter() - state["first"]
        finally:
            await client.aclose()

    import uvloop

    seconds = uvloop.run(drain())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_us = (usage.ru_utime + usage.ru_stime) / entries * 1e6
    print(json.dumps({"rate": (entries - 1) / seconds, "cpu_us": cpu_us}))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    parser.add_argument("--baseline-source", type=Path, metavar="DIR", help="required")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--entries", type=int, default=300_000)
    parser.add_argument("--shape", choices=("struct", "batch"), default="struct")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return 0
    if args.baseline_source is None:
        parser.error("--baseline-source DIR is required: the other asyncstreams to compare")
    baseline = args.baseline_source.resolve()
    if not (baseline / "asyncstreams" / "__init__.py").is_file():
        parser.error(f"expected a folder with an asyncstreams package, found none in {baseline}")
    trees = {"this checkout": str(ROOT), f"{baseline}": str(baseline)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        for round_ in range(args.rounds):
            order = list(trees.items()) if round_ % 2 == 0 else list(trees.items())[::-1]
            for name, tree in order:
                stream = f"asyncstreams-bench:ab:{round_}"
                client.delete(stream)
                with client.pipeline(transaction=False) as pipe:
                    for n in range(args.entries):
                        pipe.xadd(
                            stream, {"task_id": f"t{n}", "data": "x" * 60, "created_at": "1.5"}
                        )
                        if n % 1000 == 999:
                            pipe.execute()
                    pipe.execute()
                config = {"url": server.url, "stream": stream, "entries": args.entries}
                env = {
                    **os.environ,
                    "PYTHONPATH": tree,
                    CONFIG_ENV: json.dumps({**config, "shape": args.shape}),
                }
                done = subprocess.run(
                    [sys.executable, str(SCRIPT), "--child"],
                    env=env,
                    cwd=tempfile.gettempdir(),
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=True,
                )
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results[name].append(result)
                print(f"round {round_ + 1} {name}: {result['rate']:,.0f} msgs/s, "
                      f"{result['cpu_us']:.2f} µs CPU per entry", flush=True)  # fmt: skip
                client.delete(stream)
        client.close()
    (this, this_runs), (other, other_runs) = results.items()
    ratios = [a["rate"] / b["rate"] for a, b in zip(this_runs, other_runs, strict=True)]
    print(f"\n{args.rounds} rounds of {args.entries:,} entries, {args.shape} handler:")
    for name, runs in results.items():
        rate = statistics.median(r["rate"] for r in runs)
        cpu = statistics.median(r["cpu_us"] for r in runs)
        print(f"  {name}: median {rate:,.0f} msgs/s, {cpu:.2f} µs CPU per entry")
    print(f"  median ratio per round ({this} / {other}): {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

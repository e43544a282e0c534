"""`python -m benchmarks.sleep_cost`: what `await asyncio.sleep(0.001)` costs by itself.

The io scenario's handler awaits 1 ms. On a 2-core machine its consumer is bound by CPU,
not by the wait, so what each wait costs in CPU (a timer, a future, the task suspended and
resumed) sets its rate as much as the consumer does. This measures that cost with nothing
else: `--tasks` tasks on uvloop, each sleeping 1 ms in a loop until `--sleeps` sleeps are
done, no Redis and no framework; the CPU time of the process per sleep, and the rate.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import uvloop


async def _sleeps(tasks: int, total: int) -> tuple[float, float]:
    """(sleeps per second, CPU µs per sleep) of `tasks` tasks sleeping 1 ms, `total` in all."""
    done = 0

    async def sleeper() -> None:
        nonlocal done
        while done < total:
            await asyncio.sleep(0.001)
            done += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(sleeper() for _ in range(tasks)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return done / wall, cpu / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sleep_cost", description=__doc__)
    parser.add_argument("--tasks", type=int, default=256)
    parser.add_argument("--sleeps", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rates, costs = [], []
    for round_ in range(1, args.rounds + 1):
        rate, cost = uvloop.run(_sleeps(args.tasks, args.sleeps))
        rates.append(rate)
        costs.append(cost)
        print(f"round {round_}: {rate:,.0f} sleeps/s, {cost:.2f} µs CPU per sleep")
    print(
        f"median of {args.rounds}: {statistics.median(rates):,.0f} sleeps/s, "
        f"{statistics.median(costs):.2f} µs CPU per sleep ({args.tasks} tasks, uvloop)"
    )


if __name__ == "__main__":
    main()

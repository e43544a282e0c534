"""`python -m benchmarks.profile`: where a no-op drain's time goes, by stage, in µs per entry.

On a private redis-server (asyncstreams.embedded.EmbeddedRedis), in this process:

1. drains of a prefilled backlog (100,000 entries of the task shape by default), by the
   asyncstreams consumer the suite runs (`benchmarks/impls/asyncstreams_impl.py`: default
   options, a no-op handler taking a Struct) and by the bare-socket ceiling
   (`benchmarks/impls/socket_impl.py`), alternating for `--rounds` rounds, each measured as
   the suite measures it (`benchmarks.child.consume`: CPU time, user + system, from the first
   entry handled until nothing is pending);
2. one more drain of each under cProfile, whose time is split into stages: each function is
   put in a stage by its module and name, and a function of no stage of its own (redis-py,
   hiredis, asyncio, anyio, builtins, the shared connection code) is shared out among its
   callers' stages in proportion to the time it spent for each;
3. prints, per stage, its share of the profiled time and that share of the unprofiled CPU
   time per entry (cProfile slows Python calls more than C, so the shares are approximate),
   with the functions that cost most in each stage (`--top`).

    .venv/bin/python -m benchmarks.profile                       # about 30 s
    .venv/bin/python -m benchmarks.profile --shape batch --entries 200000 --top 5
    .venv/bin/python -m benchmarks.profile --dump /tmp/drain.pstats   # for snakeviz, pstats
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import pstats
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis

from asyncstreams.embedded import EmbeddedRedis

from . import child, env
from .specs import ConsumeResult, ConsumeSpec, Impl, Loop, Shape
from .store import fill

Func = tuple[str, int, str]  # pstats' key: (file, line, function name)

READ = "read and parse (XREADGROUP: write, receive, hiredis, reply to entries)"
DECODE = "entry to Message / Struct (codec, msgspec)"
DISPATCH = "dispatch to a worker (ledger queue, workers, wake-ups)"
CALL = "handler call (invoke, middleware, the coroutine)"
BODY = "handler body: the suite's ledger (the same in every row)"
ACK = "ack batching (finished ids, XACK packed, written, answered)"
LOOP = "task switches (asyncio, anyio) and the rest"
KERNEL = "kernel: socket reads and writes (system CPU)"
HARNESS = "harness (left out: the suite's wait for the drain)"
# Left out too: the event loop's C code (uvloop: epoll, recv; the waits for Redis are in
# it) and the socket writes, whose wall time holds the system CPU of the KERNEL row and the
# time the process waits for a core while redis-server, woken by the write, runs.
WAIT = "event loop C code and socket writes (left out: waits included)"
STAGES = (READ, DECODE, DISPATCH, CALL, BODY, ACK, LOOP)
COUNTED = ("xreadgroup", "xack")  # the drain's round trips, per 1,000 entries
LEFT_OUT = (HARNESS, WAIT)


def _stage_of(func: Func) -> str | None:
    """The stage of a function by where it lives; None: shared out among its callers."""
    path, _, name = func
    file, folder = Path(path).name, Path(path).parent.name
    if folder == "benchmarks" and file == "child.py":
        # The waits for the drain (and the XPENDING polls they send) are the suite's; the
        # rest (the event loop the child runs, the start of the consumer) is the drain's.
        return HARNESS if name.startswith("_until") else LOOP
    if folder == "benchmarks" and file == "ledger.py":
        return BODY
    if folder == "impls":
        if name.startswith("handle"):
            return CALL
        if file == "socket_impl.py":
            stages = {"reply": READ, "send": WAIT, "inline_loop": DISPATCH, "pack": ACK}
            return stages.get(name, ACK if name == "<genexpr>" else None)  # the ids to ack
        return None
    if folder == "asyncio" and file == "runners.py" and name == "run":
        return WAIT  # its own time is the C event loop's (uvloop)
    if folder == "asyncio" and file == "streams.py":
        if name.startswith("write"):
            return WAIT
        return READ  # bytes arriving (the XREADGROUP replies, nearly all of them)
    if folder != "asyncstreams":
        return None
    if file == "middleware.py":
        return CALL
    if file == "codec.py":
        return CALL if name in ("<lambda>", "invoke_general") else DECODE
    if file == "message.py":
        return DECODE
    if file == "_commands.py":
        return ACK if "ack" in name.lower() else READ
    if file == "ledger.py":
        return ACK if "ack" in name or name.startswith("finished") else DISPATCH
    if file == "workers.py":
        return DISPATCH
    if file == "consumer.py":
        if name == "_read_loop":
            return READ
        if "flush" in name:
            return ACK
    return None


class GcClock:
    """The time the cyclic garbage collector takes meanwhile (gc.callbacks), in seconds."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self.oldest = 0.0  # ... of which in collections of the oldest generation (2)
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            spent = time.perf_counter() - self._started
            self.seconds += spent
            self.collections += 1
            if info.get("generation") == 2:
                self.oldest += spent

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


class Attribution:
    """Each function's own time, shared out among stages through the call graph."""

    def __init__(self, stats: pstats.Stats) -> None:
        self._stats: dict[Func, Any] = stats.stats  # type: ignore[attr-defined]
        self._shares: dict[Func, dict[str, float]] = {}

    def shares(self, func: Func, seen: frozenset[Func] = frozenset()) -> dict[str, float]:
        """The fraction of `func`'s own time that belongs to each stage."""
        known = self._shares.get(func)
        if known is not None:
            return known
        stage = _stage_of(func)
        if stage is not None:
            result = {stage: 1.0}
        else:
            callers: dict[Func, tuple[int, int, float, float]] = self._stats[func][4]
            # By the time spent in `func` and below for each caller: a pass-through (redis-py's
            # read_response, the shared Link.call) goes where its costly callees worked.
            weights = {c: v[3] or v[2] for c, v in callers.items() if c not in seen}
            total = sum(weights.values())
            if not total:
                result = {LOOP: 1.0}
            else:
                acc: dict[str, float] = defaultdict(float)
                for caller, weight in weights.items():
                    for name, part in self.shares(caller, seen | {func}).items():
                        acc[name] += part * weight / total
                result = dict(acc)
        if not seen:  # a share computed inside a cycle depends on the path: keep top-level ones
            self._shares[func] = result
        return result

    def by_stage(self) -> tuple[dict[str, float], dict[str, list[tuple[float, Func]]]]:
        """Seconds per stage, and the functions that make it up."""
        seconds: dict[str, float] = defaultdict(float)
        parts: dict[str, list[tuple[float, Func]]] = defaultdict(list)
        for func, (_, _, own, _, _) in self._stats.items():
            for stage, share in self.shares(func).items():
                seconds[stage] += own * share
                parts[stage].append((own * share, func))
        return seconds, parts


def _spec(url: str, stream: str, group: str, entries: int, impl: Impl, shape: Shape,
          loop: Loop) -> ConsumeSpec:  # fmt: skip
    return ConsumeSpec(impl=impl, url=url, stream=stream, group=group, entries=entries,
                       shape=shape, loop=loop, timeout=60.0 + entries / 500)  # fmt: skip


def _drain(spec: ConsumeSpec, client: redis.Redis,
           profiler: cProfile.Profile | None = None) -> tuple[ConsumeResult, float]:  # fmt: skip
    """One drain in a fresh group, as the suite's child runs it (optionally profiled); the
    share of system time in the CPU time of the whole drain (start-up included)."""
    client.xgroup_create(spec.stream, spec.group, "0")
    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        if profiler is not None:
            profiler.enable()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the child's READY line
                result = child.run(spec.loop, child.consume(spec))
        finally:
            if profiler is not None:
                profiler.disable()
    finally:
        client.xgroup_destroy(spec.stream, spec.group)
    if result.error or result.timed_out or result.distinct != spec.entries or not result.acked:
        raise RuntimeError(f"{spec.impl}: a wrong drain: {result}")
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return result, system / (user + system) if user + system else 0.0


def _calls(client: redis.Redis) -> dict[str, int]:
    """XREADGROUP and XACK calls the server has answered so far (INFO commandstats)."""
    stats: dict[str, Any] = client.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in COUNTED}


def _label(func: Func) -> str:
    path, line, name = func
    if path == "~":
        return name
    parts = Path(path).parts
    return f"{'/'.join(parts[-2:])}:{line} {name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="unprofiled drains of each")
    parser.add_argument("--shape", choices=("struct", "batch"), default="struct")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--top", type=int, default=3, help="functions shown per stage")
    parser.add_argument("--dump", type=Path, help="also write asyncstreams' profile here")
    args = parser.parse_args(argv)
    if not 2 <= args.entries <= 5_000_000 or not 1 <= args.rounds <= 50:
        parser.error("expected 2 <= --entries <= 5,000,000 and 1 <= --rounds <= 50")
    versions = env.package_versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"asyncstreams source: {env.source()}")
    contenders: dict[str, Impl] = {"asyncstreams": "asyncstreams", "ceiling": "baseline-socket"}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    system: dict[str, list[float]] = {name: [] for name in contenders}
    collector: dict[str, list[float]] = {name: [] for name in contenders}
    trips: dict[str, dict[str, float]] = {}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url, protocol=2)
        stream = "asyncstreams-bench:profile"
        client.delete(stream)
        try:
            fill(client, stream, 0, args.entries, 100)
            print(f"redis-server on {server.url}; {args.entries:,} entries of about 100 bytes, "
                  f"{args.shape} handler, {args.loop}")  # fmt: skip

            def spec(name: str, group: str) -> ConsumeSpec:
                shape: Shape = args.shape if name == "asyncstreams" else "struct"
                return _spec(server.url, stream, group, args.entries, contenders[name], shape,
                             args.loop)  # fmt: skip

            for round_ in range(args.rounds):
                order = list(contenders) if round_ % 2 == 0 else list(contenders)[::-1]
                for name in order:
                    calls = _calls(client)
                    with GcClock() as gc_clock:
                        result, share = _drain(spec(name, f"profile-{name}-{round_}"), client)
                    trips[name] = {
                        command: (count - calls[command]) / args.entries * 1000
                        for command, count in _calls(client).items()
                    }
                    cpu[name].append(result.cpu_seconds / (args.entries - 1) * 1e6)
                    system[name].append(share)
                    collector[name].append(gc_clock.seconds / args.entries * 1e6)
                    rates[name].append((args.entries - 1) / result.seconds)
                    print(f"  round {round_ + 1} {name}: {rates[name][-1]:,.0f} msgs/s, "
                          f"{cpu[name][-1]:.2f} µs CPU per entry ({share:.0%} system); "
                          f"garbage collector {gc_clock.collections} runs, "
                          f"{collector[name][-1]:.2f} µs per entry (generation 2: "
                          f"{gc_clock.oldest / args.entries * 1e6:.2f}; start-up included)",
                          flush=True)  # fmt: skip
            profiles = {}
            for name in contenders:
                # cProfile's own clock (wall time, cheap to read): a CPU clock is a system
                # call, which would weigh on every function by its number of calls.
                profiler = cProfile.Profile()
                _drain(spec(name, f"profile-{name}-profiled"), client, profiler)
                profiles[name] = pstats.Stats(profiler)
        finally:
            client.delete(stream)
            client.close()
    if args.dump is not None:
        profiles["asyncstreams"].dump_stats(str(args.dump))
    _print_table(args, profiles, cpu, system, rates)
    print("\nRedis commands per 1,000 entries (the last unprofiled drain; the suite's XPENDING "
          "polls apart): " + "; ".join(
              f"{name} " + ", ".join(f"{c.upper()} {n:.1f}" for c, n in counts.items())
              for name, counts in trips.items()))  # fmt: skip
    print("the cyclic garbage collector, in the unprofiled drains (its time is in the stages "
          "above, at whatever allocation set it off): " + "; ".join(
              f"{name} {statistics.median(values):.2f} µs per entry"
              for name, values in collector.items()))  # fmt: skip
    return 0


def _print_table(
    args: argparse.Namespace,
    profiles: dict[str, pstats.Stats],
    cpu: dict[str, list[float]],
    system: dict[str, list[float]],
    rates: dict[str, list[float]],
) -> None:
    """User CPU per entry shared out by the profile's stages; system CPU a row of its own."""
    names = ("asyncstreams", "ceiling")
    medians = {name: statistics.median(cpu[name]) for name in names}
    kernel = {name: medians[name] * statistics.median(system[name]) for name in names}
    split = {name: Attribution(profiles[name]).by_stage() for name in names}
    totals = {
        name: sum(s for stage, s in split[name][0].items() if stage not in LEFT_OUT)
        for name in names
    }
    print(f"\nmedian of {args.rounds} unprofiled drains: " + "; ".join(
        f"{name} {statistics.median(rates[name]):,.0f} msgs/s, {medians[name]:.2f} µs CPU "
        f"per entry ({kernel[name]:.2f} system)" for name in names))  # fmt: skip
    print("µs per entry: user CPU shared out by each stage's share of the profiled Python "
          "time (the event loop's C code, socket writes and the harness left out); system "
          "CPU in a row of its own\n")  # fmt: skip
    print("| stage | asyncstreams µs | ceiling µs | difference µs |")
    print("| --- | ---: | ---: | ---: |")
    for stage in (*STAGES, KERNEL):
        cells = {}
        for name in names:
            if stage == KERNEL:
                cells[name] = kernel[name]
            else:
                share = split[name][0].get(stage, 0.0) / totals[name] if totals[name] else 0.0
                cells[name] = share * (medians[name] - kernel[name])
        print(f"| {stage} | {cells['asyncstreams']:.2f} | {cells['ceiling']:.2f} "
              f"| {cells['asyncstreams'] - cells['ceiling']:+.2f} |")  # fmt: skip
    mine, theirs = medians["asyncstreams"], medians["ceiling"]
    print(f"| total: CPU per entry, unprofiled | {mine:.2f} | {theirs:.2f} "
          f"| {mine - theirs:+.2f} |")  # fmt: skip

    def per_entry(seconds: float) -> str:
        return f"{seconds / args.entries * 1e6:.2f}"

    for name in names:
        _, parts = split[name]
        print(f"\n{name}: the costliest functions of each stage (own time under cProfile, "
              "µs per entry)")  # fmt: skip
        for stage in (*STAGES, *LEFT_OUT):
            top = sorted(parts.get(stage, []), reverse=True)[: args.top]
            shown = ", ".join(f"{_label(f)} {per_entry(s)}" for s, f in top if s > 0)
            if shown:
                print(f"  {stage.split(' (')[0]}: {shown}")


if __name__ == "__main__":
    sys.exit(main())

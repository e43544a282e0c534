"""A child process of the suite: `python -m benchmarks.child KIND`.

KIND is `consume` (one consumer, timed and tallied), `publish` (a publish method, timed) or
`produce` (the latency scenario's paced producer). The child measures itself: wall time
around its own work, and its peak RSS (`ru_maxrss`), so the RSS is this consumer's alone.
It prints `READY` once consuming, then `RESULT {json}`. The spec comes in the environment
variable ASYNCSTREAMS_BENCH_SPEC (not on the command line, where `ps` would show the URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis

from . import impls, producer
from .ledger import Sink, cpu_seconds
from .specs import (
    SLEEP_SECONDS,
    SPEC_ENV,
    ConsumeResult,
    ConsumeSpec,
    Latency,
    Loop,
    ProduceSpec,
    PublishResult,
    PublishSpec,
)

T = TypeVar("T")
STALL_SECONDS = 20.0  # no entry handled for this long: give up
ACK_WAIT_SECONDS = 10.0
RSS_SAMPLE_SECONDS = 0.1


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(loop: Loop, main: Coroutine[Any, Any, T]) -> T:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


class RssSampler:
    """A thread reading this process's RSS every 0.1 s, with how many entries were handled."""

    def __init__(self, sink: Sink) -> None:
        self.samples: list[tuple[float, float, int]] = []
        self._sink = sink
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = resource.getpagesize()

    def _run(self) -> None:
        started = time.perf_counter()
        while not self._stop.is_set():
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * self._page / 2**20
            self.samples.append((time.perf_counter() - started, rss, self._sink.tally.count))
            self._stop.wait(RSS_SAMPLE_SECONDS)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _until_complete(sink: Sink, complete: asyncio.Event, deadline: float) -> bool:
    """Wait until every entry was handled; False on the deadline or a stall."""
    last_count, last_change = -1, time.perf_counter()
    while not complete.is_set():
        if sink.failure is not None:
            raise sink.failure
        try:
            await asyncio.wait_for(complete.wait(), 1.0)
        except TimeoutError:
            now = time.perf_counter()
            if sink.tally.count != last_count:
                last_count, last_change = sink.tally.count, now
            if now > deadline or now - last_change > STALL_SECONDS:
                return False
    return True


async def _until_stop_line(deadline: float) -> bool:
    """Wait for the parent to write STOP on stdin; False on the deadline."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not got.done():
            sys.stdin.readline()
            got.set_result(None)

    loop.add_reader(sys.stdin.fileno(), readable)
    try:
        await asyncio.wait_for(got, max(0.0, deadline - time.perf_counter()))
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(sys.stdin.fileno())
    return True


async def _until_acked(spec: ConsumeSpec, deadline: float) -> bool:
    """Poll every millisecond until the group has nothing pending (XPENDING; on each stream
    of `spec.nodes`, on its node, XINFO GROUPS: the cluster scenario counts every other
    command, and asyncstreams sends XPENDING itself)."""
    if spec.nodes:
        return await _until_acked_on_nodes(spec, deadline)
    redis = aioredis.Redis.from_url(spec.url, protocol=2)
    try:
        while time.perf_counter() < deadline:
            summary = await redis.xpending(spec.stream, spec.group)
            if int(summary["pending"] if isinstance(summary, dict) else summary[0]) == 0:
                return True
            await asyncio.sleep(0.001)
        return False
    finally:
        await redis.aclose()


async def _until_acked_on_nodes(spec: ConsumeSpec, deadline: float) -> bool:
    clients = {url: aioredis.Redis.from_url(url, protocol=2) for url in set(spec.nodes.values())}
    # Every entry was handled: a stream with nothing pending stays so, and is not asked again.
    left = dict(spec.nodes)
    try:
        while time.perf_counter() < deadline:
            for stream, url in list(left.items()):
                groups = await clients[url].xinfo_groups(stream)
                name = spec.group.encode()
                if any(g["name"] == name and g["pending"] == 0 for g in groups):
                    del left[stream]
            if not left:
                return True
            await asyncio.sleep(0.001)
        return False
    finally:
        for client in clients.values():
            await client.aclose()


async def _check_output(spec: ConsumeSpec) -> None:
    """Raise unless the output stream holds one entry per entry of the data set: a pipeline
    that publishes nothing, or too much, is not measured."""
    redis = aioredis.Redis.from_url(spec.url, protocol=2)
    try:
        length = await redis.xlen(spec.output)
    finally:
        await redis.aclose()
    if length != spec.entries:
        raise RuntimeError(
            f"the output stream {spec.output} holds {length:,} entries after the drain; "
            f"expected {spec.entries:,} (one per entry)"
        )


def _latency(values: Any) -> Latency | None:
    if not values:
        return None
    ordered = sorted(values)
    last = len(ordered) - 1
    return Latency(
        count=len(ordered),
        p50_ms=ordered[round(0.50 * last)] * 1000,
        p99_ms=ordered[round(0.99 * last)] * 1000,
        max_ms=ordered[last] * 1000,
    )


async def consume(spec: ConsumeSpec) -> ConsumeResult:
    complete = asyncio.Event()
    sink = Sink(
        spec.entries,
        latency=spec.work == "latency",
        delay=SLEEP_SECONDS if spec.work == "sleep" else 0.0,
        on_complete=complete.set,
    )
    consuming = impls.consuming(spec.impl)
    result = ConsumeResult()
    sampler = RssSampler(sink) if spec.sample_rss else None
    started = time.perf_counter()
    handled_at = acked_at = started
    acked_cpu = 0.0
    with sampler or contextlib.nullcontext():
        try:
            async with consuming(spec, sink):
                emit("READY")
                deadline = time.perf_counter() + spec.timeout
                if spec.until == "stdin":
                    done = await _until_stop_line(deadline)
                else:
                    done = await _until_complete(sink, complete, deadline)
                result.timed_out = not done
                handled_at = time.perf_counter()
                if not result.timed_out and spec.until == "count":
                    result.acked = await _until_acked(spec, handled_at + ACK_WAIT_SECONDS)
                acked_at = time.perf_counter()
                acked_cpu = cpu_seconds()
                if spec.output and result.acked:  # after the timed window
                    await _check_output(spec)
        except Exception as exc:  # keep the counts: they say how far it got
            traceback.print_exc()
            result.error = f"{type(exc).__name__}: {exc}".removesuffix(": ")
    tally = sink.tally
    result.handled = tally.count
    result.distinct = tally.distinct
    result.duplicates = tally.duplicates
    result.unexpected = tally.unexpected
    first_at = tally.first_at or started
    result.startup_seconds = first_at - started
    result.seconds_handled = handled_at - first_at
    result.seconds = acked_at - first_at
    if tally.first_at and acked_cpu:
        result.cpu_seconds = acked_cpu - tally.first_cpu
    result.latency = _latency(sink.latencies)
    result.rss_samples = sampler.samples if sampler is not None else None
    if spec.until == "stdin":
        result.tally = tally.encode()
    result.peak_rss_mb = peak_rss_mb()
    return result


async def publish(spec: PublishSpec) -> PublishResult:
    module = impls.publisher(spec.method)
    seconds = await module(spec)
    return PublishResult(seconds=seconds, peak_rss_mb=peak_rss_mb())


def main(argv: list[str]) -> int:
    kind, text = argv[1], os.environ.pop(SPEC_ENV, "")
    result: msgspec.Struct
    try:
        if kind == "consume":
            consume_spec = msgspec.json.decode(text, type=ConsumeSpec)
            result = run(consume_spec.loop, consume(consume_spec))
        elif kind == "publish":
            publish_spec = msgspec.json.decode(text, type=PublishSpec)
            result = run(publish_spec.loop, publish(publish_spec))
        elif kind == "produce":
            result = producer.produce(msgspec.json.decode(text, type=ProduceSpec))
        else:
            raise ValueError(f"unknown child kind {kind!r}; expected consume, publish, produce")
    except Exception as exc:
        traceback.print_exc()
        emit("RESULT " + msgspec.json.encode({"error": f"{type(exc).__name__}: {exc}"}).decode())
        return 1
    emit("RESULT " + msgspec.json.encode(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

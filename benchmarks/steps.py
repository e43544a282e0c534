"""One timed, checked run of each kind of step, from the parent's side.

Each function starts the child process(es), waits for their results with a deadline, checks
the outcome against Redis (every entry handled once, nothing pending, the group at the
stream's last id) and returns a `Run`. A run with `problems` is a failure of the suite.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from asyncstreams import Partitioned
from asyncstreams.ownership import lease_key, members_key

from .ledger import decode_bitmap, merge_bitmaps
from .procs import ROOT, Child, ChildError
from .specs import (
    SPEC_ENV,
    ConsumeResult,
    ConsumeSpec,
    Impl,
    KeyBy,
    Loop,
    Middle,
    ProduceResult,
    ProduceSpec,
    PublishMethod,
    PublishResult,
    PublishSpec,
    Shape,
    Work,
)
from .store import DataSet, Store

START_TIMEOUT = 60.0  # a child's imports and connection, on a busy machine
SLOWEST_RATE = 500  # msgs/s: a consumer slower than this is given up on (a hang, not a rate)
POLL_SECONDS = 0.005
STOP_TIMEOUT = 30.0


@dataclass
class Run:
    rate: float | None = None  # msgs/s
    seconds: float | None = None
    peak_rss_mb: float | None = None
    # CPU time (user + system) of the consumer process per entry, in µs, over the window
    # the rate is measured on (the work of every entry but the first).
    cpu_us_per_entry: float | None = None
    problems: list[str] = field(default_factory=list)
    behind: str | None = None  # the consumer did not keep up (latency): a result, not a failure
    extra: dict[str, Any] = field(default_factory=dict)


def _spawn(kind: str, spec: msgspec.Struct, name: str) -> Child:
    env = {**os.environ, SPEC_ENV: msgspec.json.encode(spec).decode()}
    source = getattr(spec, "source", "")
    if not source:
        return Child([sys.executable, "-m", "benchmarks.child", kind], name=name, env=env)
    # `python -m` puts its working directory first on sys.path: run it elsewhere, so that
    # asyncstreams comes from `source` and benchmarks from this checkout.
    env["PYTHONPATH"] = os.pathsep.join([source, str(ROOT)])
    return Child(
        [sys.executable, "-m", "benchmarks.child", kind],
        name=name,
        env=env,
        cwd=Path(tempfile.gettempdir()),
    )


def _consume_timeout(entries: int) -> float:
    return 30.0 + entries / SLOWEST_RATE


def _tally_problems(result: ConsumeResult, entries: int) -> list[str]:
    """What is wrong with a consumer's own account of its run (timed out first, if it did)."""
    problems = []
    if result.timed_out:
        problems.append(f"timed out: handled {result.handled:,} of {entries:,} entries")
    if result.error:
        problems.append(f"the consumer failed: {result.error}")
    if result.duplicates:
        problems.append(f"{_entries(result.duplicates)} handled more than once")
    if result.unexpected:
        problems.append(f"{_entries(result.unexpected)} handled that are not in the data set")
    if problems:
        return problems
    if result.distinct != entries:
        problems.append(f"handled {result.distinct:,} distinct entries of {entries:,}")
    elif not result.acked:
        problems.append("entries still pending 10 s after the last handler ran")
    return problems


def _entries(n: int) -> str:
    return f"{n:,} entry" if n == 1 else f"{n:,} entries"


def drain(
    store: Store,
    dataset: DataSet,
    *,
    impl: Impl,
    work: Work = "noop",
    shape: Shape = "struct",
    concurrency: int = 0,
    batch_size: int = 0,
    loop: Loop = "uvloop",
    sample_rss: bool = False,
    source: str = "",
    middleware: Middle = "none",
    output: bool = False,
    key: KeyBy = "",
    ordered: bool = False,
) -> Run:
    """One consumer drains the data set in a group of its own, starting at the first entry.
    `output`: it publishes what its handler returns to a fresh stream of the suite's (the
    child checks its length), deleted after the run. A partitioned data set is read as the
    `Partitioned` stream it is (the group on each partition), with `ordered=True` if asked:
    the consumer's lease keys and members, if left, are deleted after the run."""
    group = store.group(impl)
    streams = dataset.streams
    for stream in streams:
        store.create_group(stream, group, "0")
    output_stream = store.name("output") if output else ""
    spec = ConsumeSpec(
        impl=impl,
        url=store.url,
        stream=dataset.stream,
        group=group,
        entries=dataset.entries,
        work=work,
        shape=shape,
        concurrency=concurrency,
        batch_size=batch_size,
        loop=loop,
        timeout=_consume_timeout(dataset.entries),
        sample_rss=sample_rss,
        source=source,
        middleware=middleware,
        output=output_stream,
        key=key,
        ordered=ordered,
        partitions=dataset.partitions,
        # The child's check that nothing is pending: on each partition (XINFO GROUPS).
        nodes=dict.fromkeys(streams, store.url) if dataset.partitions else {},
    )
    try:
        with _spawn("consume", spec, f"consumer {impl}") as child:
            wait = START_TIMEOUT + spec.timeout + 30
            result = child.result(ConsumeResult, wait)
        problems = _tally_problems(result, dataset.entries)
        if not problems:
            problems = _check_dataset(store, dataset, group)
    finally:
        for stream in streams:
            store.destroy_group(stream, group)
        if output_stream:
            store.delete(output_stream)
        if ordered:
            store.delete(*_ownership_keys(dataset, group))
    run = Run(
        rate=(dataset.entries - 1) / result.seconds if result.seconds else None,
        seconds=result.seconds,
        peak_rss_mb=result.peak_rss_mb,
        cpu_us_per_entry=_cpu_us(result, dataset.entries),
        problems=problems,
        extra={"startup_seconds": result.startup_seconds},
    )
    if result.rss_samples:
        run.extra["rss"] = _rss_profile(result.rss_samples, dataset.entries)
    return run


def _check_dataset(store: Store, dataset: DataSet, group: str) -> list[str]:
    """What is wrong with the group on the data set's stream, or on each partition."""
    if not dataset.partitions:
        return store.check_group(dataset.stream, group, dataset.last_id, dataset.entries)
    problems = []
    for stream, last_id in dataset.last_ids.items():
        found = store.check_group(stream, group, last_id, dataset.lengths[stream])
        problems += [f"{stream}: {problem}" for problem in found]
    return problems


def _ownership_keys(dataset: DataSet, group: str) -> list[str]:
    """The keys `ordered=True` writes for `group` on a partitioned data set: the members and
    each partition's lease (asyncstreams.ownership; the consumer deletes them as it stops)."""
    partitioned = Partitioned(dataset.stream, dataset.partitions)
    return [members_key(partitioned, group), *(lease_key(s, group) for s in dataset.streams)]


def _cpu_us(result: ConsumeResult, entries: int) -> float | None:
    if not result.cpu_seconds or entries < 2:
        return None
    return result.cpu_seconds / (entries - 1) * 1e6


def _rss_profile(samples: list[tuple[float, float, int]], entries: int) -> dict[str, Any]:
    """Start (first entry handled), at 10 %, peak and end of the drain, and a thinned series."""
    started = next((s for s in samples if s[2] > 0), samples[0])
    tenth = next((s for s in samples if s[2] >= entries // 10), samples[-1])
    step = max(1, len(samples) // 200)
    return {
        "start_mb": started[1],
        "at_10pct_mb": tenth[1],
        "peak_mb": max(s[1] for s in samples),
        "end_mb": samples[-1][1],
        "growth_after_10pct_mb": samples[-1][1] - tenth[1],
        "samples": samples[::step],
    }


def latency(store: Store, *, impl: Impl, rate: int, seconds: float, size: int) -> Run:
    """A producer process XADDs at `rate` for `seconds` while one consumer handles them."""
    stream = store.name("latency")
    group = store.group(impl)
    store.create_group(stream, group, "$")
    entries = max(1, round(rate * seconds))
    # The consumer gets the run's length and as long again (at least 2 s) to catch up, and
    # a second for the producer to start.
    spec = ConsumeSpec(
        impl=impl,
        url=store.url,
        stream=stream,
        group=group,
        entries=entries,
        work="latency",
        timeout=1.0 + seconds + max(2.0, seconds),
    )
    produce = ProduceSpec(url=store.url, stream=stream, rate=rate, entries=entries, size=size)
    try:
        with _spawn("consume", spec, f"consumer {impl}") as consumer:
            consumer.wait_ready(START_TIMEOUT)
            with _spawn("produce", produce, "producer") as producer:
                made = producer.result(ProduceResult, seconds * 3 + 30)
            result = consumer.result(ConsumeResult, spec.timeout + 30)
        if made.error:
            raise ChildError(f"the producer failed: {made.error}")
        problems = _tally_problems(result, entries)
        behind = None
        if result.timed_out and len(problems) == 1:  # slow, but right so far
            behind = f"fell behind: handled {result.handled:,} of {entries:,} in time"
            problems = []
        if not problems and not behind:
            problems = store.check_group(stream, group, _last_id(store, stream), entries)
    finally:
        store.delete(stream)
    run = Run(peak_rss_mb=result.peak_rss_mb, problems=problems, behind=behind)
    run.extra = {
        "entries": entries,
        "handled": result.handled,
        "publish_rate": made.sent / made.seconds if made.seconds else None,
        "producer_max_late_ms": made.max_late_ms,
    }
    if result.latency is not None:
        run.extra.update(
            p50_ms=result.latency.p50_ms,
            p99_ms=result.latency.p99_ms,
            max_ms=result.latency.max_ms,
        )
    return run


def _last_id(store: Store, stream: str) -> str:
    info = store.client.xinfo_stream(stream)
    last = info["last-generated-id"]
    return last.decode() if isinstance(last, bytes) else str(last)


def publish(store: Store, *, method: PublishMethod, entries: int, size: int) -> Run:
    """One process publishes `entries` tasks to a fresh stream; then the stream is checked."""
    stream = store.name("publish")
    spec = PublishSpec(method=method, url=store.url, stream=stream, entries=entries, size=size)
    try:
        with _spawn("publish", spec, f"publisher {method}") as child:
            result = child.result(PublishResult, _consume_timeout(entries))
        problems = [f"the publisher failed: {result.error}"] if result.error else []
        if not problems:
            problems = _check_published(store, stream, entries, method)
    finally:
        store.delete(stream)
    return Run(
        rate=entries / result.seconds if result.seconds else None,
        seconds=result.seconds,
        peak_rss_mb=result.peak_rss_mb,
        problems=problems,
    )


def _check_published(store: Store, stream: str, entries: int, method: str) -> list[str]:
    length = store.client.xlen(stream)
    if length != entries:
        return [f"the stream holds {length:,} entries; expected {entries:,}"]
    if method.startswith("faststream"):
        return []  # FastStream's own envelope: the count is what can be checked
    seen = bytearray(entries)
    start = "-"
    while True:
        batch: list[tuple[bytes, dict[bytes, bytes]]]
        batch = store.client.xrange(stream, start, "+", count=10_000)  # type: ignore[assignment]
        for entry_id, fields in batch:
            seq = int(fields[b"task_id"])
            if not 0 <= seq < entries or seen[seq]:
                return [f"entry {entry_id!r} has task_id {seq}: duplicate or out of range"]
            seen[seq] = 1
        if len(batch) < 10_000:
            return []
        start = "(" + batch[-1][0].decode()


# -- several consumer processes on one group -----------------------------------------------


def _prepare_shared(store: Store, template: DataSet) -> tuple[str, str]:
    """A copy of the template (all entries but the last) and a group at its end."""
    stream = store.name("shared")
    store.client.copy(template.stream, stream)
    group = store.group("shared")
    store.create_group(stream, group, "$")
    return stream, group


def _release(store: Store, stream: str, group: str, template: DataSet) -> tuple[float, str]:
    """Move the group to the start and XADD the last entry, which wakes every blocked
    XREADGROUP (XGROUP SETID alone wakes none); return the seconds until drained."""
    last = template.entries  # the template holds entries 0 .. last-1
    started = time.perf_counter()
    store.client.xgroup_setid(stream, group, "0")
    last_id = store.fill(stream, last, last + 1, template.size)
    deadline = started + _consume_timeout(last + 1)
    while not store.drained(stream, group, last_id):
        if time.perf_counter() > deadline:
            raise ChildError(f"the group did not drain in {deadline - started:.0f} s")
        time.sleep(POLL_SECONDS)
    return time.perf_counter() - started, last_id


def workers_cli(store: Store, template: DataSet, *, workers: int) -> Run:
    """`python -m asyncstreams run benchmarks.workers_app:app --workers N`, timed from the
    moment every worker is ready until the group has drained; then SIGTERM."""
    stream, group = _prepare_shared(store, template)
    entries = template.entries + 1
    ready_key, tally_key = store.name("ready"), store.name("tally")
    env = {
        **os.environ,
        "ASYNCSTREAMS_URL": store.url,
        "BENCH_STREAM": stream,
        "BENCH_GROUP": group,
        "BENCH_ENTRIES": str(entries),
        "BENCH_READY_KEY": ready_key,
        "BENCH_TALLY_KEY": tally_key,
    }
    command = [sys.executable, "-m", "asyncstreams", "run", "benchmarks.workers_app:app"]
    command += ["--workers", str(workers), "--log-level", "warning"]
    spawned = time.perf_counter()
    try:
        with Child(command, name=f"asyncstreams run --workers {workers}", env=env) as cli:
            deadline = time.monotonic() + START_TIMEOUT
            while store.client.llen(ready_key) < workers:
                if cli.process.poll() is not None or time.monotonic() > deadline:
                    raise ChildError(f"{cli.name}: workers did not start: {cli.stderr_tail()}")
                time.sleep(POLL_SECONDS)
            seconds, last_id = _release(store, stream, group, template)
            wall = time.perf_counter() - spawned
            cli.signal(signal.SIGTERM)
            code = cli.wait(STOP_TIMEOUT)
            problems = [f"{cli.name} exited with code {code}: {cli.stderr_tail()}"] if code else []
        reports = [json.loads(v) for v in store.client.hgetall(tally_key).values()]
        problems += _merge_problems(reports, workers, entries)
        problems += store.check_group(stream, group, last_id, entries)
    finally:
        store.delete(stream, ready_key, tally_key)
    return Run(
        rate=entries / seconds,
        seconds=seconds,
        peak_rss_mb=max((r["peak_rss_mb"] for r in reports), default=None),
        problems=problems,
        extra={"wall_seconds": wall, "processes": workers},
    )


def workers_children(store: Store, template: DataSet, *, impl: Impl, processes: int) -> Run:
    """The same drain by `processes` consumer processes of another implementation."""
    stream, group = _prepare_shared(store, template)
    entries = template.entries + 1
    spec = ConsumeSpec(
        impl=impl,
        url=store.url,
        stream=stream,
        group=group,
        entries=entries,
        until="stdin",
        timeout=START_TIMEOUT * processes + _consume_timeout(entries),
    )
    children: list[Child] = []
    try:
        for index in range(processes):
            children.append(_spawn("consume", spec, f"consumer {impl} #{index + 1}"))
        for child in children:
            child.wait_ready(START_TIMEOUT)
        seconds, last_id = _release(store, stream, group, template)
        for child in children:
            child.send_line("STOP")
        results = [c.result(ConsumeResult, STOP_TIMEOUT) for c in children]
        problems = [f"a consumer failed: {r.error}" for r in results if r.error]
        if not problems:
            reports = [
                {"duplicates": r.duplicates, "unexpected": r.unexpected, "tally": r.tally}
                for r in results
            ]
            problems = _merge_problems(reports, processes, entries)
        if not problems:
            problems = store.check_group(stream, group, last_id, entries)
    finally:
        for child in children:
            child.close()
        store.delete(stream)
    return Run(
        rate=entries / seconds,
        seconds=seconds,
        peak_rss_mb=max(r.peak_rss_mb for r in results),
        problems=problems,
        extra={"processes": processes},
    )


def _merge_problems(reports: list[dict[str, Any]], processes: int, entries: int) -> list[str]:
    if len(reports) != processes:
        return [f"{len(reports)} of {processes} processes reported their ledger"]
    problems = []
    duplicates = sum(r["duplicates"] for r in reports)
    unexpected = sum(r["unexpected"] for r in reports)
    missing, repeated = merge_bitmaps(entries, (decode_bitmap(r["tally"]) for r in reports))
    if duplicates or repeated:
        problems.append(f"{_entries(duplicates + repeated)} handled more than once")
    if unexpected:
        problems.append(f"{_entries(unexpected)} handled that are not in the data set")
    if missing:
        problems.append(f"{_entries(missing)} never handled")
    return problems

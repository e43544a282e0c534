"""What each scenario runs: its cases, and in each case one row per implementation.

A `Step` is one row, run `repeat` times by the runner. `ref` names the asyncstreams row of
the same case that the row is compared with (the table's "asyncstreams ÷ this" column).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

from asyncstreams import App

from . import cluster as cluster_steps
from . import steps
from .config import Config
from .impls import asyncstreams_impl
from .payload import KEY_FIELD
from .specs import Impl, KeyBy, Loop, Middle, PublishMethod, Shape, Work
from .steps import Run
from .store import DataSet, Store

Role = Literal["asyncstreams", "baseline", "faststream"]
RunStep = Callable[[Store, DataSet | None], Run]

SOCKET = (
    "ceiling: bare-socket inline loop (hiredis, no client library; XREADGROUP COUNT 500, "
    "handler inline, XACK pipelined with the next read)"
)
INLINE = "baseline: inline loop (XREADGROUP COUNT 500, handler inline, one XACK per batch)"
TASKS = "baseline: task per message, {n} in flight, acks batched"
FASTSTREAM = "FastStream StreamSub with a group, defaults"
MAX_RECORDS = 500  # FastStream's batch subscribers (benchmarks/impls/faststream_impl.py)
FASTSTREAM_BATCH = f"FastStream StreamSub batch=True, max_records={MAX_RECORDS}"
# The defaults the "asyncstreams (defaults: ...)" row runs with, from the public signature.
_CONSUMER_DEFAULTS = inspect.signature(App.consumer).parameters
DEFAULT_CONCURRENCY = _CONSUMER_DEFAULTS["concurrency"].default
DEFAULT_BATCH_SIZE = _CONSUMER_DEFAULTS["batch_size"].default


@dataclass(frozen=True)
class Step:
    scenario: str
    case: str
    key: str  # unique within the case
    label: str
    role: Role
    run: RunStep
    # (entries, size) of the data set the step reads; (entries, size, keys): one with a `key`
    # field of `keys` distinct values (the keyed scenario's; Store.dataset); (entries, size,
    # keys, partitions): those entries as a Partitioned stream, spread by their keys
    data: tuple[int, int] | tuple[int, int, int] | tuple[int, int, int, int] | None = None
    entries: int | None = None  # entries handled or written, where there is no data set
    repeat: int = 1
    ref: str | None = None
    skip: str | None = None  # why the step cannot run here (reported as n/a)

    @property
    def count(self) -> int | None:
        return self.data[0] if self.data else self.entries

    @property
    def title(self) -> str:
        return f"{self.scenario} {self.case} / {self.label}"


def _faststream_missing() -> str | None:
    if importlib.util.find_spec("faststream") is None:
        return 'faststream is not installed (pip install "faststream[redis]")'
    return None


def _faststream_cluster_missing() -> str | None:
    missing = _faststream_missing()
    if missing is not None:
        return missing
    import faststream.redis

    if not hasattr(faststream.redis, "RedisClusterBroker"):
        return f"faststream {faststream.__version__} has no RedisClusterBroker"
    return None


def _drain(
    impl: Impl,
    *,
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
) -> RunStep:
    def run(store: Store, dataset: DataSet | None) -> Run:
        assert dataset is not None
        return steps.drain(
            store,
            dataset,
            impl=impl,
            work=work,
            shape=shape,
            concurrency=concurrency,
            batch_size=batch_size,
            loop=loop,
            sample_rss=sample_rss,
            source=source,
            middleware=middleware,
            output=output,
            key=key,
            ordered=ordered,
        )

    return run


def drain(config: Config) -> list[Step]:
    data = (config.drain_entries, config.entry_size)
    fs_data = (min(config.drain_entries, config.faststream_entries), config.entry_size)
    no_fs = _faststream_missing()
    row = partial(Step, "drain", "no-op", repeat=config.repeat, data=data)
    before = []
    if config.baseline_source is not None:
        source = str(config.baseline_source)
        before = [
            row("asyncstreams-source", f"asyncstreams of {source} (defaults)", "baseline",
                _drain("asyncstreams", source=source), ref="asyncstreams"),
            row("asyncstreams-source-batch", f"asyncstreams of {source}, batch handler",
                "baseline", _drain("asyncstreams", shape="batch", source=source),
                ref="asyncstreams-batch"),
        ]  # fmt: skip
    return [*before,
        row("asyncstreams", f"asyncstreams (defaults: concurrency={DEFAULT_CONCURRENCY}, "
            f"batch_size={DEFAULT_BATCH_SIZE})", "asyncstreams", _drain("asyncstreams")),
        row("asyncstreams-asyncio", "asyncstreams (asyncio loop)", "asyncstreams",
            _drain("asyncstreams", loop="asyncio")),
        row("asyncstreams-100", "asyncstreams (batch_size=100)",
            "asyncstreams", _drain("asyncstreams", batch_size=100)),
        row("asyncstreams-batch", "asyncstreams batch handler (list[Task])", "asyncstreams",
            _drain("asyncstreams", shape="batch"), skip=asyncstreams_impl.batch_handlers()),
        row("asyncstreams-batch-message", "asyncstreams batch handler (list[Message])",
            "asyncstreams", _drain("asyncstreams", shape="batch-message"),
            skip=asyncstreams_impl.batch_handlers()),
        row("socket", SOCKET, "baseline", _drain("baseline-socket"), ref="asyncstreams"),
        row("inline", INLINE, "baseline", _drain("baseline-inline"), ref="asyncstreams"),
        row("tasks", TASKS.format(n=100), "baseline", _drain("baseline-tasks"),
            ref="asyncstreams"),
        row("tasks-asyncio", TASKS.format(n=100) + " (asyncio loop)", "baseline",
            _drain("baseline-tasks", loop="asyncio"), ref="asyncstreams-asyncio"),
        row("faststream", FASTSTREAM, "faststream", _drain("faststream"), data=fs_data,
            ref="asyncstreams", skip=no_fs),
        row("faststream-batch", FASTSTREAM_BATCH, "faststream", _drain("faststream-batch"),
            ref="asyncstreams-batch", skip=no_fs),
    ]  # fmt: skip


def io(config: Config) -> list[Step]:
    data = (config.io_entries, config.entry_size)
    fs_data = (min(config.io_entries, config.faststream_entries), config.entry_size)
    no_fs = _faststream_missing()
    plan = []
    for n in config.io_concurrency:
        row = partial(Step, "io", f"1 ms handler, concurrency {n}", repeat=config.repeat,
                      data=data)  # fmt: skip
        plan += [
            row("asyncstreams", f"asyncstreams (concurrency={n})", "asyncstreams",
                _drain("asyncstreams", work="sleep", concurrency=n)),
            row("tasks", TASKS.format(n=n), "baseline",
                _drain("baseline-tasks", work="sleep", concurrency=n), ref="asyncstreams"),
            row("faststream", f"FastStream StreamSub with a group, max_workers={n}",
                "faststream", _drain("faststream", work="sleep", concurrency=n),
                data=fs_data, ref="asyncstreams", skip=no_fs),
        ]  # fmt: skip
    return plan


def latency(config: Config) -> list[Step]:
    no_fs = _faststream_missing()
    plan = []
    for rate in config.latency_rates:
        entries = max(1, round(rate * config.latency_seconds))
        row = partial(Step, "latency", f"{rate:,} msgs/s", entries=entries)

        def run(impl: Impl, rate: int = rate) -> RunStep:
            return lambda store, _: steps.latency(
                store, impl=impl, rate=rate, seconds=config.latency_seconds,
                size=config.entry_size,
            )  # fmt: skip

        plan += [
            row("asyncstreams", "asyncstreams", "asyncstreams", run("asyncstreams")),
            row("socket", SOCKET, "baseline", run("baseline-socket"), ref="asyncstreams"),
            row("inline", INLINE, "baseline", run("baseline-inline"), ref="asyncstreams"),
            row("tasks", TASKS.format(n=100), "baseline", run("baseline-tasks"),
                ref="asyncstreams"),
            row("faststream", FASTSTREAM, "faststream", run("faststream"), ref="asyncstreams",
                skip=no_fs),
        ]  # fmt: skip
    return plan


def publish(config: Config) -> list[Step]:
    entries, size = config.publish_entries, config.entry_size
    batched = config.publish_many_entries

    def run(method: PublishMethod, entries: int = entries) -> RunStep:
        return lambda store, _: steps.publish(store, method=method, entries=entries, size=size)

    one = partial(Step, "publish", "one at a time", repeat=config.repeat, entries=entries)
    many = partial(Step, "publish", "batches of 1,000", repeat=config.repeat, entries=batched)
    return [
        one("asyncstreams", "asyncstreams app.publish (sequential awaits)", "asyncstreams",
            run("asyncstreams-publish")),
        one("redis-py", "baseline: redis-py xadd (sequential awaits)", "baseline",
            run("redis-py-xadd"), ref="asyncstreams"),
        one("faststream", "FastStream broker.publish(stream=...)", "faststream",
            run("faststream-publish"), ref="asyncstreams", skip=_faststream_missing()),
        many("asyncstreams", "asyncstreams app.publish_many", "asyncstreams",
             run("asyncstreams-publish-many", batched), skip=asyncstreams_impl.publish_many()),
        many("socket", "ceiling: bare-socket XADD pipeline (hiredis, no client library)",
             "baseline", run("socket-pipeline", batched), ref="asyncstreams"),
        many("redis-py", "baseline: redis-py pipeline (transaction=False)", "baseline",
             run("redis-py-pipeline", batched), ref="asyncstreams"),
    ]  # fmt: skip


def workers(config: Config) -> list[Step]:
    # The template holds all entries but the last, which is written to start the drain.
    data = (config.workers_entries - 1, config.entry_size)
    no_fs = _faststream_missing()
    row = partial(Step, "workers", f"drain of {config.workers_entries:,}",
                  repeat=config.repeat, data=data)  # fmt: skip
    plan = []
    for n in config.workers:

        def cli(store: Store, dataset: DataSet | None, n: int = n) -> Run:
            assert dataset is not None
            return steps.workers_cli(store, dataset, workers=n)

        def children(impl: Impl, n: int = n) -> RunStep:
            def run(store: Store, dataset: DataSet | None) -> Run:
                assert dataset is not None
                return steps.workers_children(store, dataset, impl=impl, processes=n)

            return run

        plan += [
            row(f"asyncstreams-{n}", f"asyncstreams run --workers {n}", "asyncstreams", cli),
            row(f"tasks-{n}", TASKS.format(n=100) + f", {n} process(es)", "baseline",
                children("baseline-tasks"), ref=f"asyncstreams-{n}"),
            row(f"faststream-batch-{n}", FASTSTREAM_BATCH + f", {n} process(es)", "faststream",
                children("faststream-batch"), ref=f"asyncstreams-{n}", skip=no_fs),
        ]  # fmt: skip
    return plan


def payload(config: Config) -> list[Step]:
    no_fs = _faststream_missing()
    plan = []
    for size, entries in config.payload_entries.items():
        data, fs_data = (entries, size), (min(entries, config.faststream_entries), size)
        row = partial(Step, "payload", _size_label(size), repeat=config.repeat, data=data)
        plan += [
            row("asyncstreams", "asyncstreams, msgspec.Struct parameter", "asyncstreams",
                _drain("asyncstreams", shape="struct")),
            row("asyncstreams-fields", "asyncstreams, dict[str, str] fields", "asyncstreams",
                _drain("asyncstreams", shape="fields")),
            row("asyncstreams-message", "asyncstreams, Message", "asyncstreams",
                _drain("asyncstreams", shape="message")),
            row("socket", SOCKET, "baseline", _drain("baseline-socket"), ref="asyncstreams"),
            row("inline", INLINE, "baseline", _drain("baseline-inline"), ref="asyncstreams"),
            row("faststream", FASTSTREAM, "faststream", _drain("faststream"), data=fs_data,
                ref="asyncstreams", skip=no_fs),
        ]  # fmt: skip
    return plan


def memory(config: Config) -> list[Step]:
    row = partial(Step, "memory", f"{config.memory_entries:,}-entry backlog",
                  data=(config.memory_entries, config.entry_size))  # fmt: skip
    return [
        row("asyncstreams", "asyncstreams", "asyncstreams",
            _drain("asyncstreams", sample_rss=True)),
        row("tasks", TASKS.format(n=100), "baseline", _drain("baseline-tasks", sample_rss=True),
            ref="asyncstreams"),
    ]  # fmt: skip


def cluster(config: Config) -> list[Step]:
    entries, size, n = config.cluster_entries, config.entry_size, config.cluster_partitions

    def run(where: cluster_steps.Where, impl: Impl = "asyncstreams") -> RunStep:
        return lambda store, _: cluster_steps.drain(
            store, where=where, impl=impl, entries=entries, size=size, partitions=n
        )

    def idle(store: Store, _: DataSet | None) -> Run:
        return cluster_steps.idle(store, partitions=n, seconds=config.cluster_idle_seconds)

    row = partial(Step, "cluster", f"no-op drain of {entries:,}", repeat=config.repeat,
                  entries=entries)  # fmt: skip
    return [
        row("one-server", "asyncstreams, one server: 3 streams, one handler", "asyncstreams",
            run("one-server")),
        row("cluster", "asyncstreams, 3-master cluster: a stream per master, one handler",
            "asyncstreams", run("cluster")),
        row("partitioned", f"asyncstreams, 3-master cluster: Partitioned(name, {n})",
            "asyncstreams", run("partitioned")),
        row("faststream", f"FastStream RedisClusterBroker: a StreamSub per stream, batch=True, "
            f"max_records={MAX_RECORDS} (the 3 streams of the cluster)", "faststream",
            run("cluster", "faststream-cluster"), ref="cluster",
            skip=_faststream_cluster_missing()),
        Step("cluster", f"idle Partitioned(name, {n}) consumer", "idle",
             "asyncstreams, nothing arriving", "asyncstreams", idle),
    ]  # fmt: skip


def middleware(config: Config) -> list[Step]:
    """What middleware costs a no-op drain: none, one trivial middleware, the metrics."""
    row = partial(Step, "middleware", "no-op drain", repeat=config.repeat,
                  data=(config.drain_entries, config.entry_size))  # fmt: skip
    return [
        row("asyncstreams", "asyncstreams, no middleware", "asyncstreams",
            _drain("asyncstreams")),
        row("trivial", "asyncstreams, one middleware (around and settled that do nothing)",
            "asyncstreams", _drain("asyncstreams", middleware="trivial"), ref="asyncstreams"),
        row("metrics", "asyncstreams, Prometheus metrics (asyncstreams.prometheus.instrument)",
            "asyncstreams", _drain("asyncstreams", middleware="metrics"), ref="asyncstreams",
            skip=asyncstreams_impl.metrics_missing()),
    ]  # fmt: skip


def pipeline(config: Config) -> list[Step]:
    """What `output=` costs a no-op drain: the handler returns its input, one output per
    entry, committed with the entry's XACK."""
    row = partial(Step, "pipeline", "no-op drain", repeat=config.repeat,
                  data=(config.drain_entries, config.entry_size))  # fmt: skip
    no_pipelines = asyncstreams_impl.pipelines()
    return [
        row("asyncstreams", "asyncstreams, no output (the drain's no-op drain)", "asyncstreams",
            _drain("asyncstreams")),
        row("transform", "asyncstreams, output=stream: the handler returns its Task",
            "asyncstreams", _drain("asyncstreams", output=True), ref="asyncstreams",
            skip=no_pipelines),
        row("transform-batch", "asyncstreams, output=stream: a batch handler (list[Task]) "
            "returns its list", "asyncstreams", _drain("asyncstreams", shape="batch",
            output=True), ref="asyncstreams",
            skip=no_pipelines or asyncstreams_impl.batch_handlers()),
    ]  # fmt: skip


def keyed(config: Config) -> list[Step]:
    """What key lanes (`key=`) cost a no-op drain: no key; a field name and a callable on
    the payload over many distinct keys; a field name over a few hot keys. And what
    partition ownership (`ordered=True`) costs one consumer: a field name over many keys on
    a `Partitioned` stream (the same entries, each in the partition of its key), without
    and with `ordered=True`, the latter compared with the former. Every row reads entries
    with a `key` field (a data set of the scenario's own) into the same Struct."""
    entries, size = config.drain_entries, config.entry_size
    many, hot = config.keyed_keys, config.keyed_hot_keys
    parts = config.keyed_partitions
    row = partial(Step, "keyed", "no-op drain", repeat=config.repeat,
                  data=(entries, size, many))  # fmt: skip
    no_keys = asyncstreams_impl.key_lanes()
    no_ownership = no_keys or asyncstreams_impl.ownership()
    on_partitions = f'key="{KEY_FIELD}", {many:,} distinct keys, Partitioned(name, {parts})'
    return [
        row("asyncstreams", "asyncstreams, no key= (the drain's no-op drain)", "asyncstreams",
            _drain("asyncstreams", shape="keyed")),
        row("field", f'asyncstreams, key="{KEY_FIELD}" (a field name), {many:,} distinct keys',
            "asyncstreams", _drain("asyncstreams", shape="keyed", key="field"),
            ref="asyncstreams", skip=no_keys),
        row("call", f"asyncstreams, key=lambda task: task.{KEY_FIELD} (a callable), {many:,} "
            "distinct keys", "asyncstreams", _drain("asyncstreams", shape="keyed", key="call"),
            ref="asyncstreams", skip=no_keys),
        row("hot", f'asyncstreams, key="{KEY_FIELD}" (a field name), {hot:,} distinct keys '
            "(hot keys)", "asyncstreams", _drain("asyncstreams", shape="keyed", key="field"),
            data=(entries, size, hot), ref="asyncstreams", skip=no_keys),
        row("partitioned", f"asyncstreams, {on_partitions} (vs the key= row)",
            "asyncstreams", _drain("asyncstreams", shape="keyed", key="field"),
            data=(entries, size, many, parts), ref="field", skip=no_keys),
        row("ordered", f"asyncstreams, {on_partitions}, ordered=True (vs the row above)",
            "asyncstreams", _drain("asyncstreams", shape="keyed", key="field", ordered=True),
            data=(entries, size, many, parts), ref="partitioned", skip=no_ownership),
    ]  # fmt: skip


def _size_label(size: int) -> str:
    return f"{size // 1000} KB" if size >= 1000 else f"{size} B"


PLANS: dict[str, Callable[[Config], list[Step]]] = {
    "drain": drain,
    "io": io,
    "latency": latency,
    "publish": publish,
    "workers": workers,
    "payload": payload,
    "memory": memory,
    "cluster": cluster,
    "middleware": middleware,
    "pipeline": pipeline,
    "keyed": keyed,
}


def plan(config: Config) -> list[Step]:
    return [step for name in config.scenarios for step in PLANS[name](config)]

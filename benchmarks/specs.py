"""What the parent asks a child process to do, and what the child reports back.

A child is `python -m benchmarks.child KIND`, with the spec as JSON in its environment. It
writes `READY` on stdout once its consumer runs, then one `RESULT {json}` line; its logs go
to stderr.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Loop = Literal["uvloop", "asyncio"]
Work = Literal["noop", "sleep", "latency"]
# What an asyncstreams handler takes: a Struct, dict[str, str] fields, Message, list[Task],
# list[Message]; "keyed": the Struct of the keyed scenario's entries (KeyedTask, a Task with
# its `key` field).
Shape = Literal["struct", "fields", "message", "batch", "batch-message", "keyed"]
Impl = Literal[
    "asyncstreams",
    "baseline-inline",
    "baseline-tasks",
    "baseline-socket",
    "faststream",
    "faststream-batch",
    "faststream-cluster",
]
PublishMethod = Literal[
    "asyncstreams-publish",
    "asyncstreams-publish-many",
    "redis-py-xadd",
    "redis-py-pipeline",
    "socket-pipeline",
    "faststream-publish",
]

# What middleware the asyncstreams consumer runs: none, one that overrides both hooks and
# does nothing, or the Prometheus metrics (asyncstreams.prometheus.instrument).
Middle = Literal["none", "trivial", "metrics"]
# The keyed scenario's `key=`: none; the entry's `key` field by name (`key="key"`); or a
# callable on the handler's Struct (`key=lambda task: task.key`).
KeyBy = Literal["", "field", "call"]

SLEEP_SECONDS = 0.001  # the io scenario's handler: await asyncio.sleep(0.001)
SPEC_ENV = "ASYNCSTREAMS_BENCH_SPEC"  # where a child finds its spec (not argv: `ps` shows it)


class ConsumeSpec(msgspec.Struct, kw_only=True, frozen=True):
    impl: Impl
    url: str
    stream: str
    group: str
    entries: int  # entries of the data set (the ledger's size)
    work: Work = "noop"
    shape: Shape = "struct"
    concurrency: int = 0  # 0: the implementation's default
    batch_size: int = 0  # asyncstreams' batch_size (XREADGROUP COUNT); 0: its default
    loop: Loop = "uvloop"
    middleware: Middle = "none"
    # The pipeline scenario: a stream the asyncstreams consumer publishes to (`output=`), its
    # handler returning what it got, one output per entry ("": no output). The child checks
    # that the stream holds `entries` entries once the drain is done.
    output: str = ""
    # The keyed scenario: how the asyncstreams consumer is given `key=` ("": not at all);
    # `ordered=True` (with `partitions`: partition ownership, asyncstreams.ownership).
    key: KeyBy = ""
    ordered: bool = False
    # "count": done when `entries` were handled and acked (the child times it);
    # "stdin": run until the parent writes STOP (several processes share the group).
    until: Literal["count", "stdin"] = "count"
    timeout: float = 60.0  # from READY until done (a stall of 20 s ends it sooner)
    sample_rss: bool = False
    # A folder whose asyncstreams package the child imports instead of this checkout's
    # ("": this checkout's), for a before/after in one run (--baseline-source).
    source: str = ""
    # The cluster scenario: one handler over several streams (`stream` is then the first),
    # or over every partition of `Partitioned(stream, partitions)` (the keyed scenario's
    # partitioned rows too); `nodes` is where each stream lives (its node's URL), for the
    # check that nothing is pending (XINFO GROUPS, which the cluster scenario leaves out of
    # the commands it counts).
    streams: tuple[str, ...] = ()
    partitions: int = 0
    nodes: dict[str, str] = msgspec.field(default_factory=dict)


class Latency(msgspec.Struct, kw_only=True):
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float


class ConsumeResult(msgspec.Struct, kw_only=True):
    handled: int = 0
    distinct: int = 0
    duplicates: int = 0
    unexpected: int = 0
    # From the first entry handled until all were handled and nothing is pending: the rate
    # is (entries - 1) / seconds. Start-up (connecting, creating the group, starting tasks,
    # the first read) is apart, in `startup_seconds`.
    seconds: float = 0.0
    seconds_handled: float = 0.0  # ... until the last handler ran
    # CPU time (user + system) of the consumer process over `seconds`: from the first entry
    # handled until nothing is pending (resource.getrusage(RUSAGE_SELF), every thread).
    cpu_seconds: float = 0.0
    startup_seconds: float = 0.0
    acked: bool = False
    timed_out: bool = False
    peak_rss_mb: float = 0.0
    latency: Latency | None = None
    rss_samples: list[tuple[float, float, int]] | None = None  # (s, MB, handled)
    tally: str | None = None  # the bitmap, when several processes share the group
    error: str | None = None


class PublishSpec(msgspec.Struct, kw_only=True, frozen=True):
    method: PublishMethod
    url: str
    stream: str
    entries: int
    size: int
    chunk: int = 1_000
    loop: Loop = "uvloop"


class PublishResult(msgspec.Struct, kw_only=True):
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    error: str | None = None


class ProduceSpec(msgspec.Struct, kw_only=True, frozen=True):
    url: str
    stream: str
    rate: int
    entries: int
    size: int


class ProduceResult(msgspec.Struct, kw_only=True):
    sent: int = 0
    seconds: float = 0.0
    max_late_ms: float = 0.0  # how far behind its deadline the worst batch went out
    error: str | None = None

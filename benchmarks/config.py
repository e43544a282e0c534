"""What a run of the suite does: scenarios, sizes, repeats. `--quick` shrinks everything."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SCENARIOS = (
    "drain",
    "io",
    "latency",
    "publish",
    "workers",
    "payload",
    "cluster",
    "middleware",
    "pipeline",
    "keyed",
)
# Opt-in only: a 1,000,000-entry backlog takes a while to write and to drain.
OPTIONAL_SCENARIOS = ("memory",)
ALL_SCENARIOS = DEFAULT_SCENARIOS + OPTIONAL_SCENARIOS
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Where --quick writes unless --out says otherwise, so that a smoke check never overwrites the
# results of a full run (benchmarks/results/latest.*, in git); .gitignore lists it.
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"
# The keyed scenario's distinct keys over its backlog: many (the target's row) and a few.
KEYED_KEYS = 10_000
KEYED_HOT_KEYS = 10
# Its Partitioned rows (key= and ordered=True): the partitions the same entries are spread on.
KEYED_PARTITIONS = 8


@dataclass(frozen=True, kw_only=True)
class Config:
    """Sizes are entries unless named otherwise; sizes in bytes are field names plus values."""

    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    url: str | None = None
    out: Path = RESULTS_DIR
    repeat: int = 3
    quick: bool = False
    drain_entries: int = 200_000
    # FastStream's per-message subscriber handles a couple of thousand entries a second:
    # it drains at most this many (the first entries of the same data set).
    faststream_entries: int = 20_000
    io_entries: int = 20_000
    io_concurrency: tuple[int, ...] = (16, 64, 256)
    payload_entries: dict[int, int] = field(
        default_factory=lambda: {100: 20_000, 1_000: 20_000, 10_000: 5_000}
    )
    latency_rates: tuple[int, ...] = (2_000, 20_000)
    latency_seconds: float = 10.0
    publish_entries: int = 20_000  # one at a time
    publish_many_entries: int = 100_000  # in batches of 1,000
    workers: tuple[int, ...] = (1, 2)
    memory_entries: int = 1_000_000
    # The cluster scenario: its backlog, the partitions of its Partitioned stream, and how
    # long its idle consumer is watched.
    cluster_entries: int = 200_000
    cluster_partitions: int = 16
    cluster_idle_seconds: float = 5.0
    entry_size: int = 100
    # The keyed scenario: distinct keys over its backlog (the drain's), many and a few (hot).
    keyed_keys: int = KEYED_KEYS
    keyed_hot_keys: int = KEYED_HOT_KEYS
    keyed_partitions: int = KEYED_PARTITIONS
    # Another source tree's asyncstreams, drained beside this one (a before/after in one run).
    baseline_source: Path | None = None

    @property
    def workers_entries(self) -> int:
        return self.drain_entries


def quick_config(**overrides: object) -> Config:
    """Small sizes, one repeat, short latency runs: every step of the suite, checked as in a
    full run, in about 40 s on a 2-core machine, most of it spent starting a process or more
    per step. The slowest parts left, FastStream's per-message subscriber (a few thousand
    entries a second) and the latency runs (their length), get the smallest sizes."""
    base: dict[str, object] = {
        "quick": True,
        "out": QUICK_RESULTS_DIR,
        "repeat": 1,
        "drain_entries": 10_000,
        "faststream_entries": 500,
        "io_entries": 2_000,
        "payload_entries": {100: 2_000, 1_000: 2_000, 10_000: 1_000},
        "latency_seconds": 0.5,
        "publish_entries": 2_000,
        "publish_many_entries": 2_000,
        "memory_entries": 50_000,
        "cluster_entries": 6_000,
        "cluster_idle_seconds": 1.0,
    }
    base.update(overrides)
    return Config(**base)  # type: ignore[arg-type]

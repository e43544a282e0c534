"""The issue's targets, checked against a run's outcomes."""

from __future__ import annotations

from dataclasses import dataclass

from .config import KEYED_KEYS
from .results import Outcome, commands_per_entry

RSS_LIMIT_MB = 60.0
FLAT_GROWTH_MB = 5.0
CLUSTER_RATE_SHARE = 0.7  # a cluster drain against the one-server drain of the same run
CLUSTER_COMMANDS_SLACK = 0.10  # commands per entry: the cluster's at most 10% above one server's
CLUSTER_BALANCE = 1.5  # the busiest master against the mean of the masters
METRICS_SHARE = 0.9  # a no-op drain with the Prometheus metrics: within 10% of one without
PIPELINE_SHARE = 0.7  # a no-op transform (output=, one output per entry) against no output
KEYED_SHARE = 0.8  # a no-op drain with key= a field name (10,000 distinct keys) against none
# Against the ceiling, the bare-socket rows of the same run (issue #11).
CEILING_SHARE = 0.70  # no-op drain, per-message handler, default options: msgs/s
CEILING_CPU = 1.5  # ... and CPU per entry at most this multiple of the ceiling's
CEILING_BATCH_SHARE = 0.85  # batch handlers: msgs/s
CEILING_LATENCY = 1.5  # latency p99 at 2,000 msgs/s at most this multiple of the ceiling's
CEILING_PUBLISH_SHARE = 0.8  # publish_many against a bare-socket XADD pipeline
CLUSTER_CASES = (("cluster", "a stream per master"), ("partitioned", "Partitioned"))


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    passed: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "n/a" if " n/a" in self.measured else "not run"
        return "pass" if self.passed else "miss"

    def to_json(self) -> dict[str, object]:
        return {"target": self.name, "measured": self.measured, "result": self.verdict}


class _Lookup:
    def __init__(self, outcomes: list[Outcome]) -> None:
        self._by_key = {(o.step.scenario, o.step.case, o.step.key): o for o in outcomes}

    def get(self, scenario: str, case: str | None, key: str) -> Outcome | None:
        for (s, c, k), outcome in self._by_key.items():
            if s == scenario and k == key and (case is None or c == case):
                return outcome
        return None

    def rate(self, scenario: str, case: str | None, key: str) -> float | None:
        outcome = self.get(scenario, case, key)
        return outcome.median if outcome is not None else None


def _why_missing(*outcomes: Outcome | None) -> str:
    for outcome in outcomes:
        if outcome is not None and outcome.status != "ok":
            return f"{outcome.step.label}: {outcome.status}" + (
                f" ({outcome.note})" if outcome.note else ""
            )
    return "not run"


def _ratio(
    name: str, look: _Lookup, scenario: str, case: str | None, a: str, b: str, at_least: float
) -> Target:
    top, bottom = look.rate(scenario, case, a), look.rate(scenario, case, b)
    if top is None or bottom is None:
        why = _why_missing(look.get(scenario, case, a), look.get(scenario, case, b))
        return Target(name, why, None)
    ratio = top / bottom
    return Target(name, f"{ratio:.2f}x ({top:,.0f} vs {bottom:,.0f} msgs/s)", ratio >= at_least)


def evaluate(outcomes: list[Outcome]) -> list[Target]:
    look = _Lookup(outcomes)
    targets = [
        _ratio("drain no-op: asyncstreams ≥ 0.9x the task-per-message baseline",
               look, "drain", "no-op", "asyncstreams", "tasks", 0.9),
        _ratio("drain no-op: asyncstreams ≥ 40x FastStream per-message",
               look, "drain", "no-op", "asyncstreams", "faststream", 40),
        _ratio("drain no-op: asyncstreams batch handler ≥ 1.5x FastStream batch",
               look, "drain", "no-op", "asyncstreams-batch", "faststream-batch", 1.5),
    ]  # fmt: skip
    targets += _ceiling_targets(look)
    targets.append(_io_target(look))
    for rate, limit in ((2_000, 1.0), (20_000, 10.0)):
        targets.append(_latency_target(look, rate, limit))
    targets.append(_workers_target(look))
    targets.append(_rss_target(look))
    targets.append(_memory_target(look))
    targets += _cluster_targets(look)
    targets.append(
        _ratio(f"middleware: metrics on ≥ {METRICS_SHARE}x metrics off (no-op drain)",
               look, "middleware", None, "metrics", "asyncstreams", METRICS_SHARE)
    )  # fmt: skip
    targets.append(
        _ratio(f"pipeline: no-op transform ≥ {PIPELINE_SHARE}x the plain no-op drain",
               look, "pipeline", None, "transform", "asyncstreams", PIPELINE_SHARE)
    )  # fmt: skip
    targets.append(
        _ratio(f"keyed: {KEYED_KEYS:,} distinct keys ≥ {KEYED_SHARE}x unkeyed (no-op drain)",
               look, "keyed", None, "field", "asyncstreams", KEYED_SHARE)
    )  # fmt: skip
    return targets


def _ceiling_targets(look: _Lookup) -> list[Target]:
    """asyncstreams against the bare-socket rows of the same run (the ceiling)."""
    return [
        _ratio(f"drain no-op: asyncstreams (defaults) ≥ {CEILING_SHARE}x the bare-socket "
               "ceiling's msgs/s", look, "drain", "no-op", "asyncstreams", "socket",
               CEILING_SHARE),
        _cpu_target(look),
        _ratio(f"drain no-op: batch handler (list[Task]) ≥ {CEILING_BATCH_SHARE}x the ceiling",
               look, "drain", "no-op", "asyncstreams-batch", "socket", CEILING_BATCH_SHARE),
        _ratio(f"drain no-op: batch handler (list[Message]) ≥ {CEILING_BATCH_SHARE}x the "
               "ceiling", look, "drain", "no-op", "asyncstreams-batch-message", "socket",
               CEILING_BATCH_SHARE),
        _ceiling_latency_target(look, 2_000),
        _ratio(f"publish_many ≥ {CEILING_PUBLISH_SHARE}x a bare-socket XADD pipeline",
               look, "publish", "batches of 1,000", "asyncstreams", "socket",
               CEILING_PUBLISH_SHARE),
    ]  # fmt: skip


def _cpu_target(look: _Lookup) -> Target:
    name = (
        f"drain no-op: asyncstreams (defaults) CPU per entry ≤ {CEILING_CPU}x the bare-socket "
        "ceiling's"
    )
    mine, ceiling = look.get("drain", "no-op", "asyncstreams"), look.get("drain", "no-op", "socket")
    if mine is None or ceiling is None or mine.cpu_median is None or not ceiling.cpu_median:
        return Target(name, _why_missing(mine, ceiling), None)
    ratio = mine.cpu_median / ceiling.cpu_median
    return Target(
        name,
        f"{ratio:.2f}x ({mine.cpu_median:.2f} vs {ceiling.cpu_median:.2f} µs per entry)",
        ratio <= CEILING_CPU,
    )


def _ceiling_latency_target(look: _Lookup, rate: int) -> Target:
    name = f"latency p99 at {rate:,} msgs/s ≤ {CEILING_LATENCY}x the bare-socket consumer's"
    case = f"{rate:,} msgs/s"
    mine, ceiling = look.get("latency", case, "asyncstreams"), look.get("latency", case, "socket")
    values = [o.extra("p99_ms") if o is not None and o.status == "ok" else None
              for o in (mine, ceiling)]  # fmt: skip
    if values[0] is None or not values[1]:
        return Target(name, _why_missing(mine, ceiling), None)
    ratio = float(values[0]) / float(values[1])
    return Target(
        name, f"{ratio:.2f}x (p99 {values[0]:.2f} vs {values[1]:.2f} ms)", ratio <= CEILING_LATENCY
    )


def _cluster_targets(look: _Lookup) -> list[Target]:
    targets = [
        _ratio(f"cluster drain ({what}) ≥ {CLUSTER_RATE_SHARE}x one server (3 streams)",
               look, "cluster", None, key, "one-server", CLUSTER_RATE_SHARE)
        for key, what in CLUSTER_CASES
    ]  # fmt: skip
    one = look.get("cluster", None, "one-server")
    base = commands_per_entry(one) if one is not None else None
    for key, what in CLUSTER_CASES:
        name = (
            f"cluster ({what}): Redis commands per entry at most "
            f"{1 + CLUSTER_COMMANDS_SLACK:.1f}x one server's"
        )
        outcome = look.get("cluster", None, key)
        counts = commands_per_entry(outcome) if outcome is not None else None
        if base is None or counts is None:
            targets.append(Target(name, _why_missing(one, outcome), None))
            continue
        mine, theirs = _total(counts), _total(base)
        ratio = mine / theirs
        targets.append(
            Target(
                name,
                f"{ratio:.2f}x ({mine:.4f} vs {theirs:.4f})",
                # Fewer is better: one master's acks go alone, where one server gets an
                # XACK per stream in each flush.
                ratio <= 1 + CLUSTER_COMMANDS_SLACK,
            )
        )
    targets.append(_balance_target(look))
    return targets


def _total(counts: dict[str, dict[str, float]]) -> float:
    return sum(sum(by_command.values()) for by_command in counts.values())


def _balance_target(look: _Lookup) -> Target:
    name = f"cluster (Partitioned): no master above {CLUSTER_BALANCE}x the mean commands per master"
    outcome = look.get("cluster", None, "partitioned")
    counts = commands_per_entry(outcome) if outcome is not None else None
    if counts is None:
        return Target(name, _why_missing(outcome), None)
    per_master = {server: sum(by_command.values()) for server, by_command in counts.items()}
    mean = sum(per_master.values()) / len(per_master)
    busiest = max(per_master, key=lambda server: per_master[server])
    if not mean:
        return Target(name, "no commands counted", None)
    share = per_master[busiest] / mean
    shares = ", ".join(f"{server} {value / mean:.2f}" for server, value in per_master.items())
    return Target(name, f"{busiest}: {share:.2f}x the mean ({shares})", share <= CLUSTER_BALANCE)


def _io_target(look: _Lookup) -> Target:
    name = "1 ms handler at concurrency 256 ≥ 80% of min(256,000/s, no-op drain rate)"
    outcome = look.get("io", "1 ms handler, concurrency 256", "asyncstreams")
    rate = outcome.median if outcome is not None else None
    if rate is None:
        return Target(name, _why_missing(outcome), None)
    noop = look.rate("drain", "no-op", "asyncstreams")
    ceiling = min(256_000.0, noop) if noop is not None else 256_000.0
    share = rate / ceiling
    return Target(name, f"{share:.0%} ({rate:,.0f} of {ceiling:,.0f} msgs/s)", share >= 0.8)


def _latency_target(look: _Lookup, rate: int, limit_ms: float) -> Target:
    name = f"latency p99 < {limit_ms:g} ms at {rate:,} msgs/s"
    outcome = look.get("latency", f"{rate:,} msgs/s", "asyncstreams")
    if outcome is None or outcome.status == "fail" or outcome.extra("p99_ms") is None:
        return Target(name, _why_missing(outcome), None)
    p99 = float(outcome.extra("p99_ms"))
    behind = f"; {outcome.note}" if outcome.status == "behind" else ""
    return Target(name, f"p99 {p99:.2f} ms{behind}", p99 < limit_ms and not behind)


def _workers_target(look: _Lookup) -> Target:
    name = "two workers ≥ 1.5x one (asyncstreams run --workers)"
    one, two = (
        look.get("workers", None, "asyncstreams-1"),
        look.get("workers", None, "asyncstreams-2"),
    )
    if one is None or two is None or one.median is None or two.median is None:
        return Target(name, _why_missing(one, two), None)
    ratio = two.median / one.median
    return Target(
        name, f"{ratio:.2f}x ({two.median:,.0f} vs {one.median:,.0f} msgs/s)", ratio >= 1.5
    )


def _rss_target(look: _Lookup) -> Target:
    name = f"peak RSS of the consumer process < {RSS_LIMIT_MB:.0f} MB (drain no-op)"
    outcome = look.get("drain", "no-op", "asyncstreams")
    if outcome is None or outcome.peak_rss_mb is None or outcome.status != "ok":
        return Target(name, _why_missing(outcome), None)
    rss = outcome.peak_rss_mb
    return Target(name, f"{rss:.1f} MB", rss < RSS_LIMIT_MB)


def _memory_target(look: _Lookup) -> Target:
    name = (
        f"memory flat under a large backlog: RSS grows < {FLAT_GROWTH_MB:.0f} MB "
        "after 10% of the drain, peak < 60 MB"
    )
    outcome = look.get("memory", None, "asyncstreams")
    profile = outcome.extra("rss") if outcome is not None and outcome.status == "ok" else None
    if outcome is None:
        return Target(name, "not run (opt-in: --scenarios memory)", None)
    if profile is None:
        return Target(name, _why_missing(outcome), None)
    growth = float(profile["growth_after_10pct_mb"])
    return Target(
        name,
        f"{growth:+.1f} MB over {outcome.step.case} (peak {profile['peak_mb']:.0f} MB)",
        growth < FLAT_GROWTH_MB and profile["peak_mb"] < RSS_LIMIT_MB,
    )

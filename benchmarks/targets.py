"""The issue's targets, checked against a run's outcomes."""

from __future__ import annotations

from dataclasses import dataclass

from .results import Outcome

RSS_LIMIT_MB = 60.0
FLAT_GROWTH_MB = 5.0


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
    name: str, look: _Lookup, scenario: str, case: str, a: str, b: str, at_least: float
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
    targets.append(_io_target(look))
    for rate, limit in ((2_000, 1.0), (20_000, 10.0)):
        targets.append(_latency_target(look, rate, limit))
    targets.append(_workers_target(look))
    targets.append(_rss_target(look))
    targets.append(_memory_target(look))
    return targets


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

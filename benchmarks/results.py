"""The outcome of a step (all its runs) and the figures drawn from it."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .scenarios import Step
from .steps import Run

Status = Literal["ok", "fail", "n/a", "behind"]


@dataclass
class Outcome:
    step: Step
    status: Status
    runs: list[Run] = field(default_factory=list)
    note: str | None = None  # why n/a, what failed, how far behind

    @property
    def rates(self) -> list[float]:
        return [run.rate for run in self.runs if run.rate is not None]

    @property
    def median(self) -> float | None:
        rates = self.rates
        return statistics.median(rates) if rates and self.status == "ok" else None

    @property
    def cpu_us(self) -> list[float]:
        """CPU µs per entry of each run that measured it."""
        return [run.cpu_us_per_entry for run in self.runs if run.cpu_us_per_entry is not None]

    @property
    def cpu_median(self) -> float | None:
        values = self.cpu_us
        return statistics.median(values) if values and self.status == "ok" else None

    @property
    def peak_rss_mb(self) -> float | None:
        values = [run.peak_rss_mb for run in self.runs if run.peak_rss_mb is not None]
        return max(values) if values else None

    def extra(self, name: str) -> Any:
        """A figure of the (single) latency or memory run."""
        return self.runs[-1].extra.get(name) if self.runs else None

    def to_json(self) -> dict[str, Any]:
        step = self.step
        rates = self.rates
        cpu = self.cpu_us
        return {
            "scenario": step.scenario,
            "case": step.case,
            "key": step.key,
            "label": step.label,
            "role": step.role,
            "ref": step.ref,
            "entries": step.count,
            "entry_size": step.data[1] if step.data else None,
            "status": self.status,
            "note": self.note,
            "msgs_per_s": {
                "median": self.median,
                "min": min(rates) if rates else None,
                "max": max(rates) if rates else None,
            },
            "cpu_us_per_entry": {
                "median": self.cpu_median,
                "min": min(cpu) if cpu else None,
                "max": max(cpu) if cpu else None,
            },
            "peak_rss_mb": self.peak_rss_mb,
            "redis_commands_per_entry": commands_per_entry(self),
            "runs": [asdict(run) for run in self.runs],
        }


def commands_per_entry(outcome: Outcome) -> dict[str, dict[str, float]] | None:
    """Redis commands per entry handled, by server and command (INFO commandstats, the
    cluster scenario): over every good run of the step, so the mean of its runs."""
    runs = [run for run in outcome.runs if "commands" in run.extra and not run.problems]
    if not runs or not outcome.step.count:
        return None
    totals: dict[str, dict[str, int]] = {}
    for run in runs:
        for server, counts in run.extra["commands"].items():
            mine = totals.setdefault(server, {})
            for name, calls in counts.items():
                mine[name] = mine.get(name, 0) + calls
    entries = len(runs) * outcome.step.count
    return {
        server: {
            name: calls / entries
            for name, calls in sorted(counts.items(), key=lambda item: -item[1])
        }
        for server, counts in totals.items()
    }


def describe_idle(idle: dict[str, Any]) -> str:
    """The idle consumer's XREADGROUP calls per second and connections, by server."""
    reads = {
        server: rates.get("xreadgroup", 0.0) for server, rates in idle["commands_per_s"].items()
    }
    connections = idle["connections"]
    return (
        f"XREADGROUP {sum(reads.values()):.1f}/s ("
        + ", ".join(f"{server} {rate:.1f}" for server, rate in reads.items())
        + f"), {sum(connections.values())} connections ("
        + ", ".join(f"{server} {n}" for server, n in connections.items())
        + ")"
    )


def describe_run(run: Run) -> str:
    if "idle" in run.extra:
        return describe_idle(run.extra["idle"])
    if "p99_ms" in run.extra:
        return (
            f"p50 {run.extra['p50_ms']:.2f} ms, p99 {run.extra['p99_ms']:.2f} ms, "
            f"max {run.extra['max_ms']:.1f} ms"
        )
    if "rss" in run.extra:
        rss = run.extra["rss"]
        return (
            f"{run.rate:,.0f} msgs/s; RSS start {rss['start_mb']:.0f} MB, "
            f"peak {rss['peak_mb']:.0f} MB, end {rss['end_mb']:.0f} MB"
        )
    if run.rate is not None:
        text = f"{run.rate:,.0f} msgs/s"
        if run.cpu_us_per_entry is not None:
            text += f", {run.cpu_us_per_entry:.2f} µs CPU per entry"
        return text
    return "done"


def describe(outcome: Outcome) -> str:
    """The end of a progress line: the median and spread, or what went wrong."""
    if outcome.status == "n/a":
        return f"n/a ({outcome.note})"
    if outcome.status == "fail":
        return f"FAIL: {outcome.note}"
    last = describe_run(outcome.runs[-1])
    if outcome.status == "behind":
        return f"{last} ({outcome.note})"
    rates = outcome.rates
    if len(rates) > 1 and outcome.median is not None:
        text = f"{outcome.median:,.0f} msgs/s (min {min(rates):,.0f}, max {max(rates):,.0f})"
        cpu = outcome.cpu_us
        if outcome.cpu_median is not None:
            text += (
                f", {outcome.cpu_median:.2f} µs CPU per entry "
                f"(min {min(cpu):.2f}, max {max(cpu):.2f})"
            )
    else:
        text = last
    if outcome.peak_rss_mb is not None and "rss" not in outcome.runs[-1].extra:
        text += f", peak RSS {outcome.peak_rss_mb:.0f} MB"
    commands = commands_per_entry(outcome)
    if commands is not None:
        total = sum(sum(counts.values()) for counts in commands.values())
        text += f", {total:.4f} Redis commands per entry"
    return text

"""The Prometheus text format (0.0.4), read and written back, to merge the metrics of a
supervisor's workers into one exposition.

Samples with the same name and labels are added up (counters, histograms, summaries and
untyped ones), but for gauges: two workers that report a gauge with the same labels report
one quantity twice (a group's lag, read by whichever holds its metrics lock), so the largest
is kept; a per-consumer gauge carries its own `consumer` label and passes through. Gauges
named `*_created` or `*_start_time_seconds` are times: the earliest is kept. Label values
are kept as they were escaped; a sample's timestamp is dropped.

A worker that restarts starts its counters again from 0. So that the sum never goes down
(Prometheus would take the drop for a reset and count the other workers' totals again as
new), each worker's part keeps what its earlier processes counted (`WorkerPart`).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# A sample: its name, then its labels in one canonical form ('' or '{a="x",b="y"}').
Series = tuple[str, str]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\.)*)"\s*(,|\})')
# The samples of a family, by type, besides the one named as the family.
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": (),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
    "untyped": (),
}
# Samples that only go up (a summary's quantiles, named as the family, do not).
_MONOTONIC = {
    "counter": ("", "_total"),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
}


@dataclass(slots=True)
class Family:
    name: str
    type: str = "untyped"
    help: str | None = None
    samples: dict[Series, float] = field(default_factory=dict)

    def has(self, sample: str) -> bool:
        if sample == self.name:
            return True
        suffixes = _SUFFIXES.get(self.type, ())
        return sample.startswith(self.name) and sample[len(self.name) :] in suffixes


Families = dict[str, Family]


def parse(text: str) -> Families:
    """The families of an exposition, in order; ValueError for a line that is not one."""
    families: Families = {}
    current: Family | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                family = families.setdefault(parts[2], Family(parts[2]))
                rest = parts[3] if len(parts) > 3 else ""
                if parts[1] == "HELP":
                    family.help = rest
                else:
                    family.type = rest if rest in _SUFFIXES else "untyped"
                    current = family
            continue
        try:
            name, labels, value = _sample(line)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}: {line[:80]!r}") from None
        if current is not None and current.has(name):
            current.samples[name, labels] = value
        else:
            families.setdefault(name, Family(name)).samples[name, labels] = value
    return families


def _sample(line: str) -> tuple[str, str, float]:
    name_match = _NAME.match(line)
    if name_match is None:
        raise ValueError("expected a metric name")
    name, position = name_match.group(), name_match.end()
    labels: list[tuple[str, str]] = []
    if line[position : position + 1] == "{":
        position += 1
        while True:
            if line[position:].lstrip().startswith("}"):  # none, or a comma at the end
                position = line.index("}", position) + 1
                break
            label = _LABEL.match(line, position)
            if label is None:
                raise ValueError('expected labels {name="value",...}')
            labels.append((label.group(1), label.group(2)))
            position = label.end()
            if label.group(3) == "}":
                break
    fields = line[position:].split()
    if not 1 <= len(fields) <= 2 or (position < len(line) and not line[position].isspace()):
        raise ValueError("expected a value and at most a timestamp after the name and labels")
    try:
        value = float(fields[0])
    except ValueError:
        raise ValueError(f"expected a number, got {fields[0][:20]!r}") from None
    text = ",".join(f'{key}="{raw}"' for key, raw in sorted(labels))
    return name, f"{{{text}}}" if labels else "", value


def render(families: Families) -> bytes:
    lines: list[str] = []
    for family in families.values():
        if family.help is not None:
            lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.type}")
        lines += [
            f"{name}{labels} {_number(value)}" for (name, labels), value in family.samples.items()
        ]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def merge(parts: Iterable[Families]) -> Families:
    """One exposition of several: families in the order they first appear."""
    merged: Families = {}
    for families in parts:
        for name, family in families.items():
            into = merged.get(name)
            if into is None:
                into = merged[name] = Family(name, family.type, family.help)
            combine = _combiner(into)
            for series, value in family.samples.items():
                before = into.samples.get(series)
                into.samples[series] = value if before is None else combine(before, value)
    return merged


def _combiner(family: Family) -> Callable[[float, float], float]:
    if family.type != "gauge":
        return operator.add
    if family.name.endswith(("_created", "_start_time_seconds")):
        return min
    return max


def monotonic(families: Families) -> Families:
    """Only the samples that only go up: counters, and a histogram's or summary's buckets,
    count and sum."""
    kept: Families = {}
    for name, family in families.items():
        suffixes = _MONOTONIC.get(family.type)
        if suffixes is None:
            continue
        samples = {
            series: value
            for series, value in family.samples.items()
            if series[0][len(name) :] in suffixes
        }
        kept[name] = Family(name, family.type, family.help, samples)
    return kept


class WorkerPart:
    """One worker's part of the merged exposition, across its processes: what it says now,
    plus the counters of its earlier processes (each counted up to their last scrape).
    While it does not answer, its counters stay at their last values and its gauges are
    left out."""

    def __init__(self) -> None:
        self._pid: str | None = None
        self._last: Families = {}
        self._earlier: Families = {}

    def answered(self, pid: str, families: Families) -> Families:
        if self._pid is not None and pid != self._pid:
            self._earlier = merge([self._earlier, monotonic(self._last)])
        self._pid, self._last = pid, families
        return merge([families, self._earlier])

    def silent(self) -> Families:
        return merge([monotonic(self._last), self._earlier])

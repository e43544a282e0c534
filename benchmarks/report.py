"""Results on disk: latest.json (everything), latest.md (the tables), latest.png (the chart)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import chart, env
from .config import Config
from .results import Outcome, commands_per_entry, describe_idle
from .targets import Target

SCENARIO_TITLES = {
    "drain": "Drain a prefilled backlog, no-op handler",
    "io": "Drain with a handler that awaits 1 ms",
    "latency": "Steady publish and consume: publish-to-handler latency",
    "publish": "Publish throughput",
    "workers": "Worker processes: the drain by N processes of one group",
    "payload": "Payload size and typed decoding (no-op handler)",
    "memory": "Memory under a large backlog",
    "cluster": "Redis Cluster: one consumer process over three masters",
    "middleware": "What middleware costs a no-op drain",
    "pipeline": "What a pipeline's output costs a no-op drain",
    "keyed": "What key lanes (key=) cost a no-op drain",
}
SCENARIO_NOTES = {
    "drain": (
        "The ceiling is the fastest consumer Python can be: an inline loop on a bare socket "
        "(hiredis packs and parses, no client library), a no-op handler awaited per entry, "
        "one XACK per batch written with the next XREADGROUP. CPU µs per entry is the user + "
        "system time of the consumer process over the timed window, per entry. "
        "One consumer process drains the backlog in a group of its own, from the first entry; "
        "timed from the first entry handled until every entry was handled and XPENDING is "
        "empty (start-up is in the JSON, apart). FastStream's per-message subscriber drains "
        "the first {faststream:,} entries only."
    ),
    "io": "Same drain; every handler awaits `asyncio.sleep(0.001)`.",
    "latency": (
        "A producer process XADDs at a fixed rate (absolute deadlines, due entries pipelined "
        "together); latency is from its `created_at = time.time()` to the handler's start. "
        "One run per rate."
    ),
    "publish": (
        "One process writes {publish:,} tasks one at a time, or {publish_many:,} in batches "
        "of 1,000, to a fresh stream; then the stream is checked. The ceiling packs each XADD "
        "with hiredis and writes a batch at once on a bare socket."
    ),
    "workers": (
        "The real CLI (`python -m asyncstreams run benchmarks.workers_app:app --workers N`) "
        "and, for reference, N processes of the other implementations, on one group. Timed from "
        "the moment all processes are ready until the group has drained (the group is moved to "
        "the stream's start and the last entry written then, which wakes every reader)."
    ),
    "payload": "Drain with a no-op handler; the asyncstreams handler takes the entry three ways.",
    "memory": (
        "One consumer drains a large backlog while a thread samples its RSS every 0.1 s: at the "
        "first entry handled, at 10% of the drain, the peak, and at the end."
    ),
    "cluster": (
        "On servers of the scenario's own (whatever `--url` says): one redis-server, and a "
        "Redis Cluster of 3 masters of the same binary. One consumer process drains the "
        "backlog with a no-op handler: three streams (a third of the entries each) on the one "
        "server; three streams on the cluster, named so that each is on another master; a "
        "`Partitioned(name, {partitions})` stream on the cluster, written with `publish_many` "
        "and the task id as key; and the three cluster streams by FastStream's "
        "`RedisClusterBroker` (its batch subscriber: the per-message one drains a few "
        "thousand entries a second). Timed as the drain scenario. Redis commands: INFO "
        "commandstats of each server before the consumer starts and after it exits, less the "
        "suite's own INFO and XINFO GROUPS (the check that nothing is pending), divided by "
        "the entries (the mean of the runs)."
    ),
    "middleware": (
        "The drain scenario's no-op drain, by the same consumer three ways: no middleware; "
        "one middleware whose `around` only awaits `proceed()` and whose `settled` does "
        "nothing; and the Prometheus metrics of `asyncstreams.prometheus.instrument(app)` "
        "(nothing scrapes them meanwhile)."
    ),
    "pipeline": (
        "The drain scenario's no-op drain, by the same consumer three ways: no output; "
        "`output=` a stream of the suite's, the handler returning the `Task` it got (one "
        "output per entry, added with the entry's XACK by one script per ack batch); and "
        "the same by a batch handler (`list[Task]`) returning its list. After each drain the "
        "child checks that the output stream holds one entry per entry (a run that published "
        "fewer fails); the stream is deleted after each run."
    ),
    "keyed": (
        "The drain scenario's no-op drain (the same backlog, entries of about the same 100 "
        'bytes, default options), by the same consumer six ways: no `key=`; `key="key"`, a '
        "field name, over {keyed_keys:,} distinct keys; `key=lambda task: task.key`, a "
        'callable on the Struct the handler takes, over the same keys; `key="key"` over '
        "{keyed_hot:,} distinct keys (hot keys: at most {keyed_hot:,} handlers at once); and "
        'what partition ownership costs one consumer: `key="key"` over the {keyed_keys:,} '
        "keys on a `Partitioned(name, {keyed_partitions})` stream (the same entries, each in "
        "the partition of its key, `Partitioned.stream(key)`), without `ordered=True` "
        "(compared with the `key=` row on one stream) and with it (compared with the row "
        "without: the cost of ownership alone; `lease_ms` and `block_ms` the defaults). "
        "The ordered consumer takes its leases before it reads: that wait is start-up, "
        "outside the timed window, which begins at the first entry handled as in every row. "
        "Its data sets are its own: each entry has a fourth field, `key` (`k` and the entry's "
        "number modulo the keys, zero-padded, spread round robin over the backlog), its bytes "
        "taken from the filler; every row's handler takes the same Struct (the `Task` with "
        "its `key`)."
    ),
}


def _mb(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"


def _rate(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "-"


def _status_cell(outcome: Outcome) -> str | None:
    if outcome.status == "n/a":
        return f"n/a: {outcome.note}"
    if outcome.status == "fail":
        return f"**FAIL**: {outcome.note}"
    return None


def _versus(outcome: Outcome, by_key: dict[str, Outcome]) -> str:
    ref = by_key.get(outcome.step.ref or "")
    if ref is None:
        return ""
    if ref.median is None or outcome.median is None:
        return "n/a"
    return f"{ref.median / outcome.median:.2f}x"


CEILING = "socket"  # the key of the bare-socket row: the ceiling of its case


def _cpu(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _throughput_table(outcomes: list[Outcome]) -> list[str]:
    """msgs/s and CPU µs per entry; with a bare-socket row in the case, each row against it."""
    by_key = {o.step.key: o for o in outcomes}
    ceiling = by_key.get(CEILING)
    head = "| implementation | msgs/s (median) | min-max | CPU µs per entry | asyncstreams ÷ this "
    rule = "| --- | ---: | ---: | ---: | ---: "
    if ceiling is not None:
        head += "| ÷ ceiling (msgs/s, CPU) "
        rule += "| ---: "
    lines = [head + "| peak RSS MB | entries |", rule + "| ---: | ---: |"]
    for o in outcomes:
        entries = f"{o.step.count:,}" if o.step.count else "-"
        gap = "| " if ceiling is not None else ""
        status = _status_cell(o)
        if status:
            lines.append(f"| {o.step.label} | {status} | | | {gap}| | {entries} |")
            continue
        rates = o.rates
        spread = f"{min(rates):,.0f}-{max(rates):,.0f}" if len(rates) > 1 else ""
        versus = ""
        if ceiling is not None:
            versus = f"| {_against(o, ceiling)} "
        lines.append(
            f"| {o.step.label} | {_rate(o.median)} | {spread} | {_cpu(o.cpu_median)} "
            f"| {_versus(o, by_key)} {versus}| {_mb(o.peak_rss_mb)} | {entries} |"
        )
    return lines


def _against(o: Outcome, ceiling: Outcome) -> str:
    """This row's msgs/s and CPU per entry as multiples of the ceiling's."""
    if o is ceiling:
        return "1.00x, 1.00x"
    parts = []
    for mine, theirs in ((o.median, ceiling.median), (o.cpu_median, ceiling.cpu_median)):
        parts.append(f"{mine / theirs:.2f}x" if mine is not None and theirs else "n/a")
    return ", ".join(parts)


def _latency_table(outcomes: list[Outcome]) -> list[str]:
    lines = [
        "| implementation | p50 ms | p99 ms | max ms | handled | producer rate | peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        status = _status_cell(o)
        if status:
            lines.append(f"| {o.step.label} | {status} | | | | | |")
            continue

        def ms(name: str, o: Outcome = o) -> str:
            value = o.extra(name)
            return f"{value:.2f}" if value is not None else "-"

        handled = f"{o.extra('handled'):,} of {o.extra('entries'):,}"
        if o.status == "behind":
            handled += " (fell behind)"
        lines.append(
            f"| {o.step.label} | {ms('p50_ms')} | {ms('p99_ms')} | {ms('max_ms')} | {handled} "
            f"| {_rate(o.extra('publish_rate'))}/s | {_mb(o.peak_rss_mb)} |"
        )
    return lines


def _workers_table(outcomes: list[Outcome]) -> list[str]:
    base = _throughput_table(outcomes)
    singles = {o.step.key.rsplit("-", 1)[0]: o for o in outcomes if o.step.key.endswith("-1")}
    lines = [base[0].replace(" | entries |", " | vs 1 process |"), base[1]]
    for o, row in zip(outcomes, base[2:], strict=True):
        one = singles.get(o.step.key.rsplit("-", 1)[0])
        scale = ""
        if one is not None and one is not o and one.median and o.median:
            scale = f"{o.median / one.median:.2f}x"
        lines.append(row.rsplit("|", 2)[0] + f"| {scale} |")
    return lines


def _memory_table(outcomes: list[Outcome]) -> list[str]:
    lines = [
        "| implementation | msgs/s | RSS at start MB | at 10% | peak | end | growth after 10% |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        profile = o.extra("rss")
        status = _status_cell(o)
        if status or profile is None:
            lines.append(f"| {o.step.label} | {status or 'no samples'} | | | | | |")
            continue
        lines.append(
            f"| {o.step.label} | {_rate(o.median)} | {profile['start_mb']:.1f} "
            f"| {profile['at_10pct_mb']:.1f} | {profile['peak_mb']:.1f} | {profile['end_mb']:.1f} "
            f"| {profile['growth_after_10pct_mb']:+.1f} |"
        )
    return lines


def _cluster_table(outcomes: list[Outcome]) -> list[str]:
    """Throughput against the one-server row, RSS, and Redis commands per entry."""
    one = next((o for o in outcomes if o.step.key == "one-server"), None)
    lines = [
        "| implementation | msgs/s (median) | min-max | ÷ one server | peak RSS MB "
        "| commands per entry | by server | by command |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for o in outcomes:
        status = _status_cell(o)
        if status:
            lines.append(f"| {o.step.label} | {status} | | | | | | |")
            continue
        rates = o.rates
        spread = f"{min(rates):,.0f}-{max(rates):,.0f}" if len(rates) > 1 else ""
        versus = ""
        if one is not None and one is not o and one.median and o.median:
            versus = f"{o.median / one.median:.2f}x"
        counts = commands_per_entry(o) or {}
        total = sum(sum(by_command.values()) for by_command in counts.values())
        servers = ", ".join(f"{s} {sum(c.values()):.4f}" for s, c in counts.items())
        # As Redis writes them ("client|setname" is CLIENT SETNAME): no "|" in a table cell.
        merged: dict[str, float] = {}
        for by_command in counts.values():
            for name, value in by_command.items():
                merged[name] = merged.get(name, 0.0) + value
        commands = ", ".join(
            f"{name.replace('|', ' ').upper()} {value:.4f}"
            for name, value in sorted(merged.items(), key=lambda item: -item[1])
            if value >= 0.00005
        )
        lines.append(
            f"| {o.step.label} | {_rate(o.median)} | {spread} | {versus} | {_mb(o.peak_rss_mb)} "
            f"| {total:.4f} | {servers} | {commands} |"
        )
    return lines


def _idle_table(outcomes: list[Outcome]) -> list[str]:
    lines = [
        "| consumer | server | partitions | XREADGROUP per s | partitions ÷ block_ms "
        "| all commands per s | connections | peak RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        status = _status_cell(o)
        idle = o.extra("idle")
        if status or idle is None:
            lines.append(f"| {o.step.label} | {status or 'not measured'} | | | | | | |")
            continue
        for server, rates in idle["commands_per_s"].items():
            partitions = idle["partitions_per_node"][server]
            expected = partitions / idle["block_ms"] * 1000
            lines.append(
                f"| {o.step.label} | {server} | {partitions} "
                f"| {rates.get('xreadgroup', 0.0):.2f} | {expected:.2f} "
                f"| {sum(rates.values()):.2f} "
                f"| {idle['connections'][server]} | {_mb(o.peak_rss_mb)} |"
            )
    return lines


def _cluster_notes(outcomes: list[Outcome]) -> str:
    """The idle consumer's figures, for the scenario's notes."""
    idle_rows = [o for o in outcomes if o.extra("idle") is not None and o.status == "ok"]
    if not idle_rows:
        return ""
    idle = idle_rows[0].extra("idle")
    expected = idle["partitions"] / (idle["block_ms"] / 1000)
    others = {
        name
        for rates in idle["commands_per_s"].values()
        for name, rate in rates.items()
        if name != "xreadgroup" and rate
    }
    return (
        f" An idle `Partitioned(name, {idle['partitions']})` consumer (nothing arriving, "
        f"watched for {idle['seconds']:.1f} s once every partition had a blocked read): "
        f"{describe_idle(idle)}; a read per partition every `block_ms` "
        f"({idle['block_ms']:,} ms) would be {expected:.1f}/s."
        + (
            " Other commands meanwhile: "
            + ", ".join(name.replace("|", " ").upper() for name in sorted(others))
            + "."
            if others
            else ""
        )
    )


def _groups(outcomes: Iterable[Outcome]) -> dict[str, dict[str, list[Outcome]]]:
    groups: dict[str, dict[str, list[Outcome]]] = {}
    for o in outcomes:
        groups.setdefault(o.step.scenario, {}).setdefault(o.step.case, []).append(o)
    return groups


def markdown(
    config: Config,
    outcomes: list[Outcome],
    targets: list[Target],
    meta: dict[str, Any],
) -> str:
    versions = meta["versions"]
    machine = meta["machine"]
    lines = [
        "# asyncstreams benchmarks",
        "",
        f"`{meta['command']}` · {meta['started_at']} · {meta['seconds']:.0f} s",
        "",
        f"**Machine**: {machine['cpus']} CPUs, {machine['cpu_model']}, {machine['platform']}, "
        f"load average at start {machine.get('load_average_at_start', '?')}. "
        f"**Redis**: redis-server {versions.get('redis-server')} ({meta['server']}).",
        "",
        "**Versions**: "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "redis-server"),
        "",
    ]
    if config.quick:
        lines += [
            "**`--quick`**: small sizes and one repeat: a smoke check, not a measurement.",
            "",
        ]
    lines += ["## Targets", "", "| target | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {t.name} | {t.measured} | {t.verdict} |" for t in targets]
    notes = {
        "faststream": config.faststream_entries,
        "publish": config.publish_entries,
        "publish_many": config.publish_many_entries,
        "partitions": config.cluster_partitions,
        "keyed_keys": config.keyed_keys,
        "keyed_hot": config.keyed_hot_keys,
        "keyed_partitions": config.keyed_partitions,
    }
    for scenario, cases in _groups(outcomes).items():
        lines += ["", f"## {scenario}: {SCENARIO_TITLES[scenario]}", ""]
        note = SCENARIO_NOTES[scenario].format(**notes)
        if scenario == "cluster":
            note += _cluster_notes([o for rows in cases.values() for o in rows])
        lines += [note, ""]
        for case, rows in cases.items():
            lines += [f"### {case}", ""]
            if scenario == "cluster":
                idle = any(o.step.key == "idle" for o in rows)
                lines += _idle_table(rows) if idle else _cluster_table(rows)
            elif scenario == "latency":
                lines += _latency_table(rows)
            elif scenario == "workers":
                lines += _workers_table(rows)
            elif scenario == "memory":
                lines += _memory_table(rows)
            else:
                lines += _throughput_table(rows)
            lines.append("")
    failures = [o for o in outcomes if o.status == "fail"]
    if failures:
        lines += ["## Failures", ""]
        lines += [f"- {o.step.title}: {o.note}" for o in failures]
    return "\n".join(lines).rstrip() + "\n"


def _write(path: Path, text: str) -> Path:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def write(
    config: Config,
    outcomes: list[Outcome],
    targets: list[Target],
    *,
    versions: dict[str, str],
    machine: dict[str, Any],
    server: str,
    started_at: datetime.datetime,
    seconds: float,
) -> list[Path]:
    config.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": env.command_line(),
        "started_at": started_at.isoformat(timespec="seconds"),
        "seconds": seconds,
        "versions": versions,
        "machine": machine,
        "server": server,
    }
    settings = {
        k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()
    }
    document = {
        "meta": meta,
        "config": {k: v for k, v in settings.items() if k not in ("url", "out")},
        "targets": [t.to_json() for t in targets],
        "steps": [o.to_json() for o in outcomes],
    }
    paths = [
        _write(config.out / "latest.json", json.dumps(document, indent=1) + "\n"),
        _write(config.out / "latest.md", markdown(config, outcomes, targets, meta)),
    ]
    png = chart.draw(outcomes, config.out / "latest.png", title=env.command_line())
    if png is not None:
        paths.append(png)
    return paths

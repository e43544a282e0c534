"""Partition ownership (`ordered=True`) across processes, under faults: the order checker of
issue #10. Real workers (`python -m asyncstreams run tests.apps.ordered_app:app`) read a
`Partitioned` stream of 8 partitions with `key="key"` while one of them is SIGKILLed, one
joins, one leaves (SIGTERM), on a redis-server of the test's own and on the session's
3-master cluster; an owner is SIGSTOPped past its lease, then resumed; and a cluster master
holding some of the partitions (and their leases) is killed, its replica taking over.

The producer writes, for each of 1,000 keys, the sequence numbers 1..n (the keys shuffled
together, each key's in order), each entry to `Partitioned.stream(key)`. Each handler run
sleeps a few ms and appends one JSON line to its process's run file (tests/apps/ordered_app.py)
before it returns. The check, by key, across every process: no two runs at once; each run
of seq s > 1 started after a run of seq s - 1 ended, and none ran again once a later seq
had; every seq ran; a seq ran more than once only after a run on a worker that died (or was
paused) holding it, not acked; and the group has nothing pending at the end. The SIGSTOP
case measures the design's worst case (see asyncstreams/ownership.py): runs that overlap
are only runs that were already running when the owner was stopped, and the stopped worker
starts nothing of a partition once another owner took it. A last case checks what keeps a
paused owner's blocked read from taking entries once another owner can take the partition
(block_ms at most a quarter of lease_ms). The failover case measures the other worst case
the design names: a failover that loses lease renewals (overlaps only of runs on the failed
master's partitions, started before its replica took over).

Each test prints one line (pytest -s): entries, repeats, the take-over and hand-over times
the workers logged, and the time from the SIGKILL to the killed worker's partitions being
owned again. Plain sync tests, as in test_faults.py: the system under test runs in child
processes.
"""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from redis.exceptions import RedisClusterException, RedisError

from asyncstreams import Partitioned
from asyncstreams._slots import key_slot
from asyncstreams.ownership import assign, lease_key, members_key

from . import test_cluster_faults, test_faults, test_pipeline_faults
from .apps import ledger
from .helpers import CliProcess, blocked_reads, wait_for
from .jepsen import FORBIDDEN_OUTPUT, Producer
from .test_cluster_faults import NODE_TIMEOUT_MS, ClusterFaults
from .test_faults import Faults, pending_of
from .test_pipeline_faults import assert_nothing_pending

pytestmark = pytest.mark.slow

# The fault harnesses' fixtures, as they are: a redis-server of the test's own (`faults`),
# the session's 3-master cluster, flushed (`cluster_faults`), and for a test that kills a
# node, a cluster of the test's own to start (`failover_faults`: test_cluster_faults.py's
# `faults`; the session's clusters are shared, see tests/conftest.py).
faults = test_faults.faults
fault_report = test_faults.fault_report
cluster_faults = test_pipeline_faults.cluster_faults
pipeline_report = test_pipeline_faults.pipeline_report
failover_faults = test_cluster_faults.faults
cluster_fault_report = test_cluster_faults.cluster_fault_report

ORDERED_APP = "tests.apps.ordered_app:app"
RUNNING = "asyncstreams running 1 consumer(s)"
PARTITIONS = 8
KEYS = 1000
LEASE_MS = 1500
# Small option values keep every hand-over within a few seconds; a handler run takes 10 ms,
# so that a worker holds entries in its handlers whenever it is hit. block_ms is at most a
# quarter of lease_ms, as ordered=True requires (see test 4).
WORKER_DEFAULTS: dict[str, object] = {
    "partitions": PARTITIONS,
    "lease_ms": LEASE_MS,
    "sleep": 0.01,
    "concurrency": 16,
    "batch_size": 20,
    "block_ms": 300,
    "claim_idle_ms": 1000,
    "grace": 5,
}
# How long the producer takes to write everything: the faults happen while it writes.
PRODUCE_S = 12.0
# How many entries a worker holds (pending on it) when it is killed, at least.
HELD = 3

# The workers' log lines (text format: local time, then level, logger and message; the
# message starts with the consumer's `where`, which names it).
_AT = r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*consumer=(?P<consumer>[^\]\s]+)\]: "
OWNS = re.compile(
    _AT + r"owns partition (?P<stream>\S+) \(waited (?P<ms>\d+) ms; "
    r"took over (?P<took>\d+) pending entries\)",
    re.M,
)
HANDED = re.compile(_AT + r"handed partition (?P<stream>\S+) over in (?P<ms>\d+) ms", re.M)
RELEASED = re.compile(_AT + r"released partition (?P<stream>\S+) at stop", re.M)
LOST = re.compile(_AT + r"lost partition (?P<stream>\S+) \(", re.M)


# -- the workers and what they log ---------------------------------------------------------


def start_workers(faults: Faults, count: int, **settings: object) -> list[CliProcess]:
    """`count` ordered_app workers, started side by side; `settings` override
    WORKER_DEFAULTS (ORDERED_APP_*)."""
    env = {
        f"ORDERED_APP_{key.upper()}": str(value)
        for key, value in {**WORKER_DEFAULTS, **settings}.items()
    }
    env |= {
        "ORDERED_APP_STREAM": faults.stream,
        "ORDERED_APP_GROUP": faults.group,
        "ORDERED_APP_RUNS": str(faults.tmp_path),
        "PYTHONWARNINGS": "default",
        "PYTHONASYNCIODEBUG": "",
    }
    started = []
    for _ in range(count):
        log_path = faults.tmp_path / f"worker-{len(faults.workers)}.log"
        worker = CliProcess(["run", ORDERED_APP, "--url", faults.url], env=env, log_path=log_path)
        faults.workers.append(worker)
        started.append(worker)
    for worker in started:
        worker.wait_for_output(RUNNING, timeout=30)
    return started


def live(faults: Faults) -> list[CliProcess]:
    """The workers neither killed nor stopped by the test."""
    return [
        w
        for w in faults.workers
        if w.pid not in faults.killed and w.pid not in faults.stopped and w.process.poll() is None
    ]


@dataclass(frozen=True)
class Logged:
    """One ownership line of a worker's log: when (time.time()), whose, which partition."""

    at: float
    consumer: str
    stream: str
    ms: int = 0
    took: int = 0


def logged(workers: Iterable[CliProcess], pattern: re.Pattern[str]) -> list[Logged]:
    """The lines `pattern` matches in the workers' logs, in time order."""
    found = []
    for worker in workers:
        for m in pattern.finditer(worker.output()):
            groups = m.groupdict()
            found.append(
                Logged(
                    datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp(),
                    m["consumer"],
                    m["stream"],
                    int(groups.get("ms") or 0),
                    int(groups.get("took") or 0),
                )
            )
    return sorted(found, key=lambda line: line.at)


def lease_owners(faults: Faults, stream: Partitioned) -> dict[str, str | None]:
    """Each partition's lease holder (a consumer name), None when free."""
    found = {}
    for partition in stream.streams:
        owner = faults.admin.get(lease_key(partition, faults.group))
        found[partition] = owner.decode() if isinstance(owner, bytes) else owner
    return found


def owned_by(faults: Faults, stream: Partitioned, worker: CliProcess) -> set[str]:
    name = faults.consumer_name(worker)
    return {s for s, owner in lease_owners(faults, stream).items() if owner == name}


def settled(faults: Faults, stream: Partitioned, workers: Sequence[CliProcess]) -> bool:
    """True when `workers` alone own the partitions, as `assign` shares them out among them,
    and each owner has taken its partitions over (it logged `owns partition`, last)."""
    names = [faults.consumer_name(w) for w in workers]
    wanted = assign(stream.streams, names)
    if lease_owners(faults, stream) != wanted:
        return False
    for worker, name in zip(workers, names, strict=True):
        text = worker.output()
        for partition in [s for s, owner in wanted.items() if owner == name]:
            events = [
                (m.start(), pattern is OWNS)
                for pattern in (OWNS, HANDED, RELEASED, LOST)
                for m in pattern.finditer(text)
                if m["stream"] == partition
            ]
            if not events or not max(events)[1]:
                return False
    return True


def wait_settled(
    faults: Faults, stream: Partitioned, workers: Sequence[CliProcess], what: str
) -> float:
    """Wait until `settled`; returns when it was seen so."""
    faults.wait_until(lambda: settled(faults, stream, workers), what=what, timeout=20)
    return time.time()


# -- producing -------------------------------------------------------------------------------


def plan(keys: int, seqs: int, seed: int) -> list[tuple[str, int]]:
    """(key, seq) for seq 1..`seqs` of each of `keys` keys: the keys shuffled together,
    each key's seqs in order."""
    order = [f"key-{k:04d}" for k in range(keys) for _ in range(seqs)]
    random.Random(seed).shuffle(order)
    counts: Counter[str] = Counter()
    written = []
    for key in order:
        counts[key] += 1
        written.append((key, counts[key]))
    return written


def produce(faults: Faults, stream: Partitioned, entries: list[tuple[str, int]]) -> list[Producer]:
    """A producer per partition, writing its keys' entries in plan order over PRODUCE_S."""
    by_partition: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for key, seq in entries:
        by_partition[stream.stream(key)].append((key, seq))
    producers = []
    for partition in stream.streams:
        mine = by_partition[partition]
        producers.append(
            faults.produce(
                len(mine),
                PRODUCE_S / len(mine),
                stream=partition,
                fields=_fields_of(mine),
            )
        )
    return producers


def _fields_of(entries: list[tuple[str, int]]) -> Callable[[int], dict[str, str]]:
    """The fields of the n-th of `entries`."""
    return lambda n: {"key": entries[n][0], "seq": str(entries[n][1])}


def settle_pending(
    faults: Faults, partitions: Iterable[str], consumer: str, *, paused: bool = False
) -> set[tuple[str, str]]:
    """`held` by `consumer`, a worker just killed or paused, once what it sent
    before (an XACK on its way) has reached Redis; for a paused one, once the read it may
    have left blocked has ended too (entries Redis delivers to it are pending on it)."""
    time.sleep(0.05 + (int(str(WORKER_DEFAULTS["block_ms"])) / 1000 if paused else 0.0))
    return held(faults, partitions, consumer)


def held(faults: Faults, partitions: Iterable[str], consumer: str) -> set[tuple[str, str]]:
    """The entries pending on `consumer`: (partition, id), as partitions share ids."""
    return {
        (stream, _text(p["message_id"]))
        for stream in partitions
        for p in pending_of(faults.admin, stream, faults.group, consumer)
    }


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the runs and the check ------------------------------------------------------------------


@dataclass(frozen=True)
class OrderRun:
    """One run of the ordered app's handler (a line of its run files)."""

    key: str
    seq: int
    pid: int
    consumer: str
    stream: str
    id: str
    start: float
    end: float
    ok: bool


def read_order_runs(directory: Path) -> list[OrderRun]:
    return sorted(
        (
            OrderRun(
                r["key"], r["seq"], r["pid"], r["consumer"], r["stream"], r["id"],
                r["start"], r["end"], r["ok"],
            )
            for path in sorted(directory.glob("runs-*.jsonl"))
            for r in ledger.read(path)
        ),
        key=lambda run: run.start,
    )  # fmt: skip


def handled(directory: Path) -> int:
    return sum(run.ok for run in read_order_runs(directory))


@dataclass
class Verdict:
    """What the runs show, key by key."""

    runs: list[OrderRun]
    # Pairs of runs of one key at once (the earlier-started first).
    overlaps: list[tuple[OrderRun, OrderRun]] = field(default_factory=list)
    # Runs of seq s > 1 that started before any run of the key's seq before it had ended.
    reordered: list[OrderRun] = field(default_factory=list)
    # (key, seq) of the plan with no run that went through; and runs of no (key, seq) of it.
    missing: list[tuple[str, int]] = field(default_factory=list)
    unexpected: list[OrderRun] = field(default_factory=list)
    # (key, seq) that went through more than once: their runs, in start order.
    repeated: dict[tuple[str, int], list[OrderRun]] = field(default_factory=dict)

    @property
    def repeats(self) -> int:
        """Runs that went through beyond the first of their (key, seq)."""
        return sum(len(runs) - 1 for runs in self.repeated.values())

    @property
    def cancelled(self) -> list[OrderRun]:
        return [run for run in self.runs if not run.ok]


def check_order(runs: list[OrderRun], entries: Sequence[tuple[str, int]]) -> Verdict:
    """`entries`: the (key, seq) expected, each key's seqs rising (1..n, or with the gaps of
    entries a failover lost before anyone read them)."""
    verdict = Verdict(runs)
    expected = set(entries)
    previous: dict[tuple[str, int], int] = {}  # (key, seq): the key's seq before it, or 0
    last: dict[str, int] = {}
    for key, seq in sorted(expected):
        previous[key, seq] = last.get(key, 0)
        last[key] = seq
    by_key: dict[str, list[OrderRun]] = defaultdict(list)
    for run in runs:
        by_key[run.key].append(run)
        if (run.key, run.seq) not in expected:
            verdict.unexpected.append(run)
    for key_runs in by_key.values():
        key_runs.sort(key=lambda run: run.start)
        latest: OrderRun | None = None  # the run that ends last among those started so far
        for run in key_runs:
            if latest is not None and run.start < latest.end:
                verdict.overlaps.append((latest, run))
            if latest is None or run.end > latest.end:
                latest = run
        ended: dict[int, float] = {}  # seq: when its first run that went through ended
        for run in key_runs:
            if run.ok:
                ended[run.seq] = min(ended.get(run.seq, run.end), run.end)
        for run in key_runs:
            before = previous.get((run.key, run.seq), run.seq - 1)
            if before > 0 and not ended.get(before, run.start + 1) <= run.start:
                verdict.reordered.append(run)
    went_through: dict[tuple[str, int], list[OrderRun]] = defaultdict(list)
    for run in runs:
        if run.ok:
            went_through[run.key, run.seq].append(run)
    verdict.missing = sorted(expected - set(went_through))
    verdict.repeated = {k: v for k, v in went_through.items() if len(v) > 1}
    return verdict


def assert_in_order(
    verdict: Verdict,
    *,
    unacked: Mapping[int, set[tuple[str, str]]],
    overlaps_checked: bool = True,
) -> None:
    """No overlap (unless `overlaps_checked` is False: the caller checks them), no
    reordering, nothing lost, nothing cancelled; and an entry ran again only after a run
    whose ack never counted: each run of it but the last on a worker killed or paused (a
    pid of `unacked`) that held it, not acked, when it was hit (in `unacked`), and
    no seq of a key ran again, or late, after a later seq of the key had run and counted."""
    if overlaps_checked:
        assert not verdict.overlaps, f"{len(verdict.overlaps)} overlaps: {verdict.overlaps[:5]}"
    assert not verdict.reordered, f"{len(verdict.reordered)} reordered: {verdict.reordered[:5]}"
    assert not verdict.missing, f"{len(verdict.missing)} never ran: {verdict.missing[:10]}"
    assert not verdict.unexpected, verdict.unexpected[:5]
    assert not verdict.cancelled, verdict.cancelled[:5]
    bad = {
        k: v
        for k, v in verdict.repeated.items()
        if any((r.stream, r.id) not in unacked.get(r.pid, ()) for r in v[:-1])
    }
    assert not bad, f"{len(bad)} ran again after a run that was not cut: {list(bad.items())[:5]}"
    back = rewinds(verdict.runs, unacked)
    assert not back, f"{len(back)} runs after a later seq of their key had run: {back[:5]}"


def rewinds(
    runs: list[OrderRun], unacked: Mapping[int, set[tuple[str, str]]]
) -> list[tuple[OrderRun, OrderRun]]:
    """Pairs of runs of one key, the second started after the first and of a smaller seq,
    the first a run that counted (not one whose ack never did, see `assert_in_order`):
    a seq run again, or late, once a later one had run."""
    by_key: dict[str, list[OrderRun]] = defaultdict(list)
    for run in sorted(runs, key=lambda run: run.start):
        by_key[run.key].append(run)
    found = []
    for key_runs in by_key.values():
        top: OrderRun | None = None  # the run of the highest seq that counted, so far
        for run in key_runs:
            if top is not None and run.seq < top.seq:
                found.append((top, run))
            counted = (run.stream, run.id) not in unacked.get(run.pid, ())
            if counted and (top is None or run.seq > top.seq):
                top = run
    return found


def assert_clean_output(faults: Faults) -> None:
    """No traceback, and none of what asyncio and ResourceWarnings say about a bug, in any
    worker's output."""
    for worker in faults.workers:
        output = worker.output()
        for text in ("Traceback", *FORBIDDEN_OUTPUT):
            assert text not in output, output[-3000:]


# -- the summary line --------------------------------------------------------------------------


def _spread(values: Sequence[int]) -> str:
    if not values:
        return "-"
    return f"{len(values)}x median {statistics.median(values):.0f} max {max(values)}"


def summary(
    faults: Faults,
    entries: int,
    verdict: Verdict,
    **extra: object,
) -> str:
    owns = logged(faults.workers, OWNS)
    handed = logged(faults.workers, HANDED)
    line = (
        f"[ownership] {faults.name}: entries={entries} runs={len(verdict.runs)} "
        f"repeats={verdict.repeats} "
        f"waited_ms=({_spread([o.ms for o in owns])}) "
        f"handed_ms=({_spread([h.ms for h in handed])})"
    )
    return line + "".join(f" {name}={value}" for name, value in extra.items())


def taken_again(
    faults: Faults, partitions: Iterable[str], since: float, besides: str
) -> dict[str, Logged]:
    """The line in which another consumer than `besides` logged that it owns each of
    `partitions`, the first after `since`."""
    found: dict[str, Logged] = {}
    for line in logged(faults.workers, OWNS):
        if line.at >= since - 0.001 and line.consumer != besides and line.stream in partitions:
            found.setdefault(line.stream, line)
    return found


# -- 1, 2. a worker SIGKILLed, one joining, one leaving ----------------------------------------


def churn_run(faults: Faults, stream: Partitioned, seqs: int) -> None:
    """Three workers; the plan produced over PRODUCE_S; mid-run one worker SIGKILLed, then a
    fourth started, then one stopped (SIGTERM), each once the partitions settled again; then
    drained, stopped, checked."""
    workers = start_workers(faults, 3)
    wait_settled(faults, stream, workers, "3 workers sharing the partitions")
    entries = plan(KEYS, seqs, seed=len(faults.name))
    producers = produce(faults, stream, entries)
    count = len(entries)

    faults.wait_until(lambda: handled(faults.tmp_path) >= count // 6, what=f"{count // 6} runs")
    victim = max(workers, key=lambda w: len(owned_by(faults, stream, w)))
    victim_name = faults.consumer_name(victim)
    victim_parts = owned_by(faults, stream, victim)
    # Killed while it holds entries (running, queued behind their key, or not yet acked).
    faults.wait_until(
        lambda: len(held(faults, victim_parts, victim_name)) >= HELD,
        what=f"{HELD} entries pending on the victim",
    )
    killed_at = faults.kill(victim)
    at_kill = handled(faults.tmp_path)
    unacked = settle_pending(faults, victim_parts, victim_name)
    wait_settled(faults, stream, live(faults), "the killed worker's partitions owned again")
    retaken = taken_again(faults, victim_parts, killed_at, victim_name)
    assert set(retaken) == victim_parts, (retaken, victim_parts)
    kill_to_owned_ms = (max(line.at for line in retaken.values()) - killed_at) * 1000

    (joined,) = start_workers(faults, 1)
    wait_settled(faults, stream, live(faults), "a fourth worker taking its share")
    at_join = handled(faults.tmp_path)
    assert owned_by(faults, stream, joined), "the joining worker owns nothing"

    leaving = next(w for w in workers if w is not victim)
    leaving_parts = owned_by(faults, stream, leaving)
    assert faults.stop_worker(leaving) == 0, leaving.output()
    at_leave = handled(faults.tmp_path)
    wait_settled(faults, stream, live(faults), "the leaving worker's partitions owned again")
    released = {line.stream for line in logged([leaving], RELEASED)}

    for producer in producers:
        producer.wait(30)
    faults.wait_drained(list(stream.streams), timeout=30)
    faults.stop_workers()
    verdict = check_order(read_order_runs(faults.tmp_path), entries)
    print(
        "\n"
        + summary(
            faults,
            count,
            verdict,
            kill_to_owned_ms=f"{kill_to_owned_ms:.0f}",
            killed_owned=len(victim_parts),
            held_at_kill=len(unacked),
            taken_over=sum(line.took for line in retaken.values()),
            runs_at_kill_join_leave=f"{at_kill}/{at_join}/{at_leave}",
            released_at_stop=f"{len(released)}/{len(leaving_parts)}",
        )
    )
    assert_in_order(verdict, unacked={victim.pid: unacked})
    assert_nothing_pending(faults, stream.streams, faults.group)
    # What the killed worker held, its new owners claimed when they took its partitions.
    assert unacked, "the killed worker held nothing"
    assert sum(line.took for line in retaken.values()) == len(unacked), (retaken, unacked)
    # The faults were mid-run: entries were still coming when the last one happened.
    assert 0 < at_kill < at_join <= at_leave < count, (at_kill, at_join, at_leave, count)
    # Each of the four ran some of the entries.
    assert len({run.pid for run in verdict.runs}) == 4
    assert_clean_output(faults)


def test_sigkill_join_and_leave_keep_each_key_in_order(faults: Faults) -> None:
    faults.start_server()
    churn_run(faults, Partitioned(faults.stream, PARTITIONS), seqs=5)


def test_cluster_sigkill_join_and_leave_keep_each_key_in_order(
    cluster_faults: ClusterFaults,
) -> None:
    faults = cluster_faults
    stream = Partitioned(faults.stream, PARTITIONS)
    masters = {faults.cluster.master_of(key_slot(s)).port for s in stream.streams}
    assert len(masters) >= 2, masters
    churn_run(faults, stream, seqs=5)


# -- 3. an owner paused past its lease ---------------------------------------------------------


def test_an_owner_paused_past_its_lease_overlaps_only_what_it_was_running(
    faults: Faults,
) -> None:
    """SIGSTOP an owner for twice lease_ms: the others take its partitions over (and run
    again what it held) meanwhile; resumed, it finishes the runs it was in, and starts
    nothing more of those partitions until it owns them again."""
    faults.start_server()
    stream = Partitioned(faults.stream, PARTITIONS)
    # Runs of 20 ms: the owner is in several when it is stopped.
    workers = start_workers(faults, 3, sleep=0.02)
    wait_settled(faults, stream, workers, "3 workers sharing the partitions")
    entries = plan(KEYS, 4, seed=3)
    producers = produce(faults, stream, entries)
    count = len(entries)
    faults.wait_until(lambda: handled(faults.tmp_path) >= count // 5, what=f"{count // 5} runs")

    victim = max(workers, key=lambda w: len(owned_by(faults, stream, w)))
    victim_name = faults.consumer_name(victim)
    others = [w for w in workers if w is not victim]
    victim_parts = owned_by(faults, stream, victim)
    faults.wait_until(
        lambda: len(held(faults, victim_parts, victim_name)) >= HELD,
        what=f"{HELD} entries pending on the victim",
    )
    os.kill(victim.pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        unacked = settle_pending(faults, victim_parts, victim_name, paused=True)
        wait_settled(faults, stream, others, "the paused worker's partitions taken over")
        taken_at = time.time()
        # The pause: at least twice the lease.
        time.sleep(max(0.0, stopped_at + 2 * LEASE_MS / 1000 - time.time()))
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    resumed_at = time.time()

    for producer in producers:
        producer.wait(30)
    faults.wait_drained(list(stream.streams), timeout=30)
    wait_settled(faults, stream, workers, "the resumed worker back among the owners")
    faults.stop_workers()

    verdict = check_order(read_order_runs(faults.tmp_path), entries)
    taken = taken_again(faults, victim_parts, stopped_at, victim_name)
    assert set(taken) == victim_parts, (taken, victim_parts)
    back = {
        line.stream: line.at
        for line in reversed(logged([victim], OWNS))
        if line.at >= resumed_at - 0.001
    }
    mine = [run for run in verdict.runs if run.pid == victim.pid]
    in_flight = [run for run in mine if run.start < stopped_at < run.end]
    # A run of the paused worker that started once another owner had its partition, and
    # before it owned it again.
    late = [
        run
        for run in mine
        if run.stream in taken and taken[run.stream].at <= run.start < back.get(run.stream, 1e18)
    ]
    overlapping = {run for pair in verdict.overlaps for run in pair}
    print(
        "\n"
        + summary(
            faults,
            count,
            verdict,
            paused_ms=f"{(resumed_at - stopped_at) * 1000:.0f}",
            stop_to_settled_ms=f"{(taken_at - stopped_at) * 1000:.0f}",
            paused_owned=len(victim_parts),
            held_at_stop=len(unacked),
            taken_over=sum(line.took for line in taken.values()),
            in_flight_at_stop=len(in_flight),
            overlapping_pairs=len(verdict.overlaps),
            overlapping_runs=len(overlapping),
        )
    )
    assert not late, f"{len(late)} runs started on the paused worker after a take-over: {late[:5]}"
    # Every overlap is between a run the paused worker was in when it was stopped and
    # another worker's.
    for first, second in verdict.overlaps:
        assert first.pid == victim.pid, (first, second)
        assert first.start < stopped_at, (first, second)
        assert second.pid != victim.pid, (first, second)
    assert_in_order(verdict, unacked={victim.pid: unacked}, overlaps_checked=False)
    assert sum(line.took for line in taken.values()) == len(unacked), (taken, unacked)
    # Resumed, it found its leases gone.
    assert {line.stream for line in logged([victim], LOST)} >= victim_parts, victim.output()
    assert_nothing_pending(faults, stream.streams, faults.group)
    assert_clean_output(faults)


# -- 4. a paused owner's blocked read and its lease -------------------------------------------


def test_a_paused_owners_blocked_read_ends_before_its_lease_can_move(faults: Faults) -> None:
    """block_ms at its most, a quarter of lease_ms: an owner is SIGSTOPped just after it
    sent a blocking XREADGROUP on its (idle) partitions. By the time another worker has
    taken them over, Redis has ended that read; seq 1 and 2 of a key of one of them, then
    written, both go to the new owner and run in order. (With a longer BLOCK, refused since
    8e56fce, Redis served seq 1 to the paused worker's read: pending on it, left behind,
    run after seq 2 once claimed.)"""
    faults.start_server()
    stream = Partitioned(faults.stream, PARTITIONS)
    lease_ms, block_ms = 1200, 300
    workers = start_workers(faults, 2, lease_ms=lease_ms, block_ms=block_ms)
    victim, peer = workers
    wait_settled(faults, stream, workers, "2 workers sharing the partitions")
    partition = min(owned_by(faults, stream, victim))
    key, wake = (
        next(k for k in (f"{prefix}-{i}" for i in range(1000)) if stream.stream(k) == partition)
        for prefix in ("key", "wake")
    )
    # A run of the victim's: its reader sends a new blocking read right after the reply.
    faults.admin.xadd(partition, {"key": wake, "seq": "1"})
    faults.wait_until(lambda: handled(faults.tmp_path) == 1, what="the wake-up entry run")
    reader = f"asyncstreams-{victim.pid}"
    faults.wait_until(
        lambda: bool(blocked_reads(faults.admin.client_list(), reader)),
        what="the victim's read blocked",
    )
    os.kill(victim.pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        wait_settled(faults, stream, [peer], "the paused worker's partitions taken over")
        taken_at = time.time()
        blocked_at_take_over = bool(blocked_reads(faults.admin.client_list(), reader))
        for seq in (1, 2):
            faults.admin.xadd(partition, {"key": key, "seq": str(seq)})
        faults.wait_until(lambda: handled(faults.tmp_path) >= 3, what="the key's runs")
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    faults.wait_drained(list(stream.streams), timeout=20)
    faults.stop_workers()
    verdict = check_order(read_order_runs(faults.tmp_path), [(wake, 1), (key, 1), (key, 2)])
    print(
        "\n"
        + summary(
            faults,
            3,
            verdict,
            lease_ms=lease_ms,
            block_ms=block_ms,
            stop_to_settled_ms=f"{(taken_at - stopped_at) * 1000:.0f}",
            read_blocked_at_take_over=blocked_at_take_over,
        )
    )
    assert not blocked_at_take_over, "the paused worker's read outlived its lease"
    assert_in_order(verdict, unacked={})
    assert {run.pid for run in verdict.runs if run.key == key} == {peer.pid}
    assert_clean_output(faults)


# -- 5. a failover of a master holding partitions and their leases ----------------------------


def answered(check: Callable[[], bool]) -> Callable[[], bool]:
    """`check`, False instead of an error while the cluster fails over (a node gone, its
    slots not served yet, the client's map out of date)."""

    def guarded() -> bool:
        try:
            return check()
        except (RedisError, RedisClusterException, OSError):
            return False

    return guarded


def test_cluster_failover_of_a_master_holding_partitions_keeps_each_key_in_order(
    failover_faults: ClusterFaults,
) -> None:
    """A 3-master cluster of the test's own, a replica each, cluster-node-timeout 1 s. Three
    workers; mid-run, the master of the group's members key, which serves some of the
    partitions (their streams and leases), is SIGKILLed, and its replica takes over. That
    takes longer than three quarters of lease_ms, and once the master counts as failed every
    node answers CLUSTERDOWN until the replica serves its slots (cluster-require-full-coverage,
    the default): every owner loses its leases meanwhile, and the members' scores run out.
    The partitions are owned and read again once the cluster is up. What the killed master
    had not passed on to its replica (an XADD, a delivery, an ack, a renewal) is gone: an
    entry never read is not the workers' to lose; an entry runs again if its delivery or
    ack was lost, or refused (CLUSTERDOWN, any master) and its partition moved before the
    ack went through again: allowed for runs started before the replica took over. An
    overlap needs a renewal the failover lost: allowed only on the killed master's
    partitions, with a run started before the replica took over."""
    faults = failover_faults
    cluster = faults.start_cluster(3, 1, node_timeout_ms=NODE_TIMEOUT_MS)
    stream = Partitioned(faults.stream, PARTITIONS)
    members = members_key(stream, faults.group)
    victim = cluster.node_for_key(members)
    heir = next(node for node in cluster.nodes if node.replica_of == victim.index)
    witness = next(node for node in cluster.nodes[:3] if node.index != victim.index)
    victim_parts = {s for s in stream.streams if cluster.node_for_key(s).index == victim.index}
    assert 0 < len(victim_parts) < PARTITIONS, victim_parts

    workers = start_workers(faults, 3)
    wait_settled(faults, stream, workers, "3 workers sharing the partitions")
    entries = plan(KEYS, 5, seed=5)
    producers = produce(faults, stream, entries)
    producer_of = dict(zip(stream.streams, producers, strict=True))
    count = len(entries)
    faults.wait_until(lambda: handled(faults.tmp_path) >= count // 4, what=f"{count // 4} runs")
    # Killed while entries of its partitions are held (running, queued, not yet acked: 1.5
    # on average, at this rate).
    pending_at_kill = 0

    def some_pending() -> bool:
        nonlocal pending_at_kill
        pending_at_kill = sum(len(pending_of(faults.admin, s, faults.group)) for s in victim_parts)
        return pending_at_kill > 0

    faults.wait_until(some_pending, what="entries pending in the victim master's partitions")
    owner_at_kill = {s: o for s, o in lease_owners(faults, stream).items() if s in victim_parts}

    fault_at = time.time()
    cluster.kill(victim.index)
    at_kill = handled(faults.tmp_path)
    wait_for(
        lambda: faults.serves(heir, min(victim_parts), seen_by=witness.index),
        timeout=20,
        what=f"the replica on port {heir.port} serving the victim master's slots",
    )
    failed_over_at = time.time()

    def read_again() -> set[str]:
        """The partitions that ran an entry written after the kill (read from the new
        master, for the victim's)."""
        return {
            run.stream
            for run in read_order_runs(faults.tmp_path)
            if run.start > fault_at and producer_of[run.stream].produced.get(run.id, 0) > fault_at
        }

    def retaken() -> dict[str, Logged]:
        """Each victim partition's first `owns partition` line after the kill."""
        found: dict[str, Logged] = {}
        for line in logged(faults.workers, OWNS):
            if line.at >= fault_at - 0.001 and line.stream in victim_parts:
                found.setdefault(line.stream, line)
        return found

    faults.wait_until(
        answered(
            lambda: (
                set(retaken()) == victim_parts
                and settled(faults, stream, workers)
                and read_again() == set(stream.streams)
            )
        ),
        what="every partition owned and read again after the failover",
        timeout=20,
    )
    settled_at = time.time()
    at_owned = handled(faults.tmp_path)

    for producer in producers:
        producer.wait(30)
    faults.wait_until(
        answered(lambda: faults.drained(list(stream.streams))), what="drained", timeout=30
    )
    faults.stop_workers()

    runs = read_order_runs(faults.tmp_path)
    went_through = {(run.stream, run.id) for run in runs if run.ok}
    # Redis replicates asynchronously: an XADD the killed master answered and had not passed
    # on is gone, the producer none the wiser. Those never read are no one's to run.
    dropped: set[tuple[str, int]] = set()
    for partition in victim_parts:
        now_held = {_text(entry_id) for entry_id, _ in faults.admin.xrange(partition)}
        mine = [(key, seq) for key, seq in entries if stream.stream(key) == partition]
        written = producer_of[partition].produced
        for entry_id, entry in zip(written, mine, strict=True):
            if entry_id not in now_held and (partition, entry_id) not in went_through:
                assert written[entry_id] < fault_at, f"{entry} written after the kill is gone"
                dropped.add(entry)
    verdict = check_order(runs, [entry for entry in entries if entry not in dropped])
    # ... and a delivery or an ack it had not passed on, or an ack refused meanwhile: the
    # entry runs again. Allowed for runs that started before the replica took over (an
    # owner starts nothing once its lease stops counting; after the take-over, leases,
    # deliveries and acks go to a master that keeps them), and only for those.
    lost: dict[int, set[tuple[str, str]]] = defaultdict(set)
    for again in verdict.repeated.values():
        for run in again[:-1]:
            if run.start < failed_over_at:
                lost[run.pid].add((run.stream, run.id))
    again_on_victim = sum(
        len(again) - 1 for again in verdict.repeated.values() if again[0].stream in victim_parts
    )
    took = retaken()
    firsts = {
        partition: min(
            run.start
            for run in runs
            if run.stream == partition
            and run.start > fault_at
            and producer_of[partition].produced.get(run.id, 0) > fault_at
        )
        for partition in stream.streams
    }
    lost_lines = [line for line in logged(faults.workers, LOST) if line.at >= fault_at - 0.001]
    overlapping = {run for pair in verdict.overlaps for run in pair}
    outputs = "".join(worker.output() for worker in faults.workers)
    print(
        "\n"
        + summary(
            faults,
            count,
            verdict,
            victim=f"node{victim.index}",
            victim_owned=len(victim_parts),
            owners_hit=len(set(owner_at_kill.values())),
            pending_at_kill=pending_at_kill,
            failover_ms=f"{(failed_over_at - fault_at) * 1000:.0f}",
            kill_to_owned_ms=f"{(max(line.at for line in took.values()) - fault_at) * 1000:.0f}",
            kill_to_read_ms=f"{(max(firsts.values()) - fault_at) * 1000:.0f}",
            kill_to_settled_ms=f"{(settled_at - fault_at) * 1000:.0f}",
            leases_lost=len(lost_lines),
            moved=sum(line.consumer != owner_at_kill[s] for s, line in took.items()),
            taken_over=sum(line.took for line in took.values()),
            repeats_on_victim=again_on_victim,
            overlapping_pairs=len(verdict.overlaps),
            overlapping_runs=len(overlapping),
            dropped_by_failover=len(dropped),
            renewals_failed=outputs.count("renewing the lease of"),
            runs_at_kill_owned=f"{at_kill}/{at_owned}",
            producer_retries=sum(producer.retries for producer in producers),
        )
    )
    # Overlaps only of runs of the failed master's partitions, the first started before its
    # replica took over (a renewal the failover lost let the lease run out early there).
    for first, second in verdict.overlaps:
        assert first.stream in victim_parts, (first, second)
        assert first.start < failed_over_at, (first, second)
    assert_in_order(verdict, unacked=lost, overlaps_checked=False)
    assert_nothing_pending(faults, stream.streams, faults.group)
    # The fault was mid-run: entries were still coming after the partitions were owned again.
    assert 0 < at_kill < at_owned < count, (at_kill, at_owned, count)
    assert_clean_output(faults)

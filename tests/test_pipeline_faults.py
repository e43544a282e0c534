"""Pipelines under faults: real workers (`python -m asyncstreams run
tests.apps.pipeline_app:app`) whose handler returns one output per input (`output=`), one of
two SIGKILLed or SIGSTOPped past `claim_idle_ms` mid-run, on a redis-server of each test's
own and on the session's 3-master cluster.

What each test checks is what Redis holds at the end, not what the workers say: every output
carries its input's entry id (`src`), so the output stream must hold exactly one output per
input, none missing and none twice, whatever ran twice (the handler ledger, checked as in
test_faults.py by tests/jepsen.py, shows the reruns the fault explains); and nothing is left
pending. On a cluster, outputs in another hash slot than their input are published before
the ack, at-least-once: none missing, duplicates allowed, and the worker says so.

Plain sync tests, as in test_faults.py: the system under test runs in child processes.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from asyncstreams import Partitioned
from asyncstreams._slots import key_slot
from asyncstreams.embedded import EmbeddedCluster

from .conftest import Names
from .helpers import CliProcess
from .jepsen import Client, FaultReport, Result, Run, produce_now, read_runs
from .test_cluster_faults import ClusterFaults
from .test_faults import Faults, pending_of

pytestmark = pytest.mark.slow

PIPE_APP = "tests.apps.pipeline_app:app"
# Small option values keep every recovery within a few seconds; a handler run takes a few
# ms, so that a worker holds entries in its handlers whenever it is hit.
WORKER_DEFAULTS: dict[str, object] = {
    "concurrency": 8,
    "batch_size": 10,
    "block_ms": 500,
    "claim_idle_ms": 800,
    "retry_delay": 0.05,
    "sleep": 0.002,
    "grace": 5,
}
# What the first stage's consumer of a worker logs at start (its consumer name in it).
CONSUMING = re.compile(r"consuming streams=\S+ group=(\S+) consumer=(\S+)")
# The warning of a consumer whose outputs are in another hash slot than its input.
ACROSS_SLOTS = "are in different hash slots"


@pytest.fixture(scope="session")
def pipeline_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultReport]:
    report = FaultReport(tmp_path_factory.getbasetemp() / "pipeline-faults.json")
    yield report
    if report.results:
        print(f"\n[fault] {len(report.results)} results in {report.path}")


@pytest.fixture
def faults(
    request: pytest.FixtureRequest, tmp_path: Path, names: Names, pipeline_report: FaultReport
) -> Iterator[Faults]:
    harness = Faults(request.node.name.removeprefix("test_"), tmp_path, names, pipeline_report)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def cluster_faults(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    names: Names,
    pipeline_report: FaultReport,
    clean_cluster: EmbeddedCluster,
) -> Iterator[ClusterFaults]:
    """`ClusterFaults` on the session's cluster (no node is broken here: workers only)."""
    harness = ClusterFaults(
        request.node.name.removeprefix("test_"), tmp_path, names, pipeline_report
    )
    harness.cluster = clean_cluster
    harness.url = clean_cluster.url
    try:
        yield harness
    finally:
        harness.close()


# -- workers, inputs, outputs ------------------------------------------------------------


def start_workers(faults: Faults, count: int, **settings: object) -> list[CliProcess]:
    """`count` pipeline_app workers, started side by side; `settings` override
    WORKER_DEFAULTS (PIPE_APP_*). Each logs its consumer name at start."""
    env = {
        f"PIPE_APP_{key.upper()}": str(value)
        for key, value in {**WORKER_DEFAULTS, **settings}.items()
    }
    env |= {
        "PIPE_APP_GROUP": faults.group,
        "PIPE_APP_LEDGER": str(faults.ledger),
        "PYTHONWARNINGS": "default",
        "PYTHONASYNCIODEBUG": "",
    }
    consumers = 2 if settings.get("final") else 1
    started = []
    for _ in range(count):
        log_path = faults.tmp_path / f"worker-{len(faults.workers)}.log"
        worker = CliProcess(["run", PIPE_APP, "--url", faults.url], env=env, log_path=log_path)
        faults.workers.append(worker)
        started.append(worker)
    for worker in started:
        worker.wait_for_output(f"asyncstreams running {consumers} consumer(s)", timeout=30)
    return started


def consumer_of(worker: CliProcess, group: str) -> str:
    """The name of `worker`'s consumer in `group`."""
    for found_group, name in CONSUMING.findall(worker.output()):
        if found_group == group:
            return str(name)
    raise AssertionError(f"no consumer of {group} in:\n{worker.output()}")


def inputs(count: int) -> list[dict[str, str]]:
    return [{"n": str(n)} for n in range(count)]


def produce_partitioned(
    client: Client, streams: Partitioned, count: int
) -> dict[str, dict[str, float]]:
    """`count` entries over the partitions (entry n in partition n % partitions), written at
    once; the ids written, by partition."""
    written = {}
    for index, stream in enumerate(streams.streams):
        payloads = [{"n": str(n)} for n in range(index, count, streams.partitions)]
        written[stream] = produce_now(client, stream, payloads)
    return written


def entries(client: Client, stream: str) -> list[tuple[str, dict[str, str]]]:
    """The entries of `stream`: id and fields, as text."""
    return [
        (_text(entry_id), {_text(key): _text(value) for key, value in (fields or {}).items()})
        for entry_id, fields in client.xrange(stream) or []
    ]


def output_fields(client: Client, streams: Iterable[str]) -> list[dict[str, str]]:
    """Every output of `streams`, its fields as text."""
    return [fields for stream in streams for _, fields in entries(client, stream)]


def length(client: Client, streams: Iterable[str]) -> int:
    return sum(int(client.xlen(stream)) for stream in streams)


def held_by(faults: Faults, streams: Iterable[str], consumer: str) -> set[str]:
    """The ids pending on `consumer` in the test's group."""
    return {
        _text(p["message_id"])
        for stream in streams
        for p in pending_of(faults.admin, stream, faults.group, consumer)
    }


def assert_one_output_each(
    outputs: list[dict[str, str]], produced: Iterable[str], *, field: str = "src"
) -> None:
    """Exactly one output per input: each id of `produced` is the `field` of one output."""
    counts = Counter(output[field] for output in outputs)
    expected = set(produced)
    missing = sorted(expected - set(counts))
    twice = {i: n for i, n in counts.items() if n > 1}
    unexpected = sorted(set(counts) - expected)
    summary = f"{len(outputs)} outputs for {len(expected)} inputs"
    assert not missing, f"{summary}: {len(missing)} without an output: {missing[:10]}"
    assert not twice, f"{summary}: {len(twice)} with several: {list(twice.items())[:10]}"
    assert not unexpected, f"{summary}: {len(unexpected)} of no input: {unexpected[:10]}"


def group_drained(faults: Faults, stream: str, group: str) -> bool:
    """True when `group` has read every entry of `stream` and none is pending."""
    try:
        groups = {_text(g["name"]): g for g in faults.admin.xinfo_groups(stream)}
        last = _text(faults.admin.xinfo_stream(stream)["last-generated-id"])
    except redis.ResponseError:
        return False  # no stream yet
    found = groups.get(group)
    return bool(found and not found["pending"] and _text(found["last-delivered-id"]) == last)


def assert_nothing_pending(faults: Faults, streams: Iterable[str], group: str) -> None:
    left = {
        stream: len(pending_of(faults.admin, stream, group))
        for stream in streams
        if faults.admin.exists(stream)
    }
    assert not any(left.values()), f"left pending in {group}: {left}"


def reruns(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs of each input that ran more than once."""
    by_id: dict[str, list[Run]] = {}
    for run in runs:
        by_id.setdefault(run.id, []).append(run)
    return {i: its for i, its in by_id.items() if len(its) > 1}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _produced(by_stream: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {i: t for written in by_stream.values() for i, t in written.items()}


# -- the SIGKILL run, on one server or a cluster -----------------------------------------


def sigkill_run(
    faults: Faults,
    *,
    count: int,
    input_streams: list[str],
    output_streams: list[str],
    produce: Any,
    settings: Mapping[str, object],
    later_stages: Sequence[tuple[str, str]] = (),
) -> tuple[Result, dict[str, float], int, int]:
    """Two workers; `produce()` writes `count` inputs (returning {stream: {id: time}}); one
    worker SIGKILLed once a fifth of the outputs exist; the other finishes the work. Returns
    the checked history (no entry lost, left pending or run twice beyond what the killed
    worker held), the ids produced, how many entries the killed worker held and how many
    outputs existed when it died. `later_stages` are the (stream, group) of stages after the
    first, to be drained too before the workers stop."""
    victim, _peer = start_workers(faults, 2, **settings)
    produced = _produced(produce())
    assert len(produced) == count
    faults.wait_until(
        lambda: length(faults.admin, output_streams) >= count // 5,
        what=f"{count // 5} outputs",
    )
    victim_name = consumer_of(victim, faults.group)
    fault_at = faults.kill(victim)
    at_kill = length(faults.admin, output_streams)
    held = held_by(faults, input_streams, victim_name)
    faults.wait_drained(input_streams, timeout=60)
    faults.wait_until(
        lambda: all(group_drained(faults, stream, group) for stream, group in later_stages),
        what=f"the later stages drained: {later_stages}",
        timeout=60,
    )
    runs = faults.runs()
    victim_runs = [run for run in runs if run.pid == victim.pid]
    result = faults.check(
        produced,
        fault_at=fault_at,
        max_duplicates=len(held),
        streams=input_streams,
        held_by_killed_worker=len(held),
        outputs_at_kill=at_kill,
        # Runs of the killed worker that went through but whose outputs it never committed:
        # the peer ran them again.
        ran_ok_then_lost=len({r.id for r in victim_runs if r.outcome == "ok"} & set(reruns(runs))),
    )
    assert 0 < at_kill < count, f"the kill was not mid-run: {at_kill} of {count} outputs"
    assert held, "the killed worker held no entry"
    assert any(run.outcome == "ok" for run in victim_runs), "the killed worker handled nothing"
    assert result.handled == count
    return result, produced, len(held), at_kill


# -- 1. a worker SIGKILLed mid-run ---------------------------------------------------------


def test_sigkill_of_one_of_two_workers_leaves_one_output_per_input(faults: Faults) -> None:
    faults.start_server()
    out = faults.names("out")
    _, produced, _, _ = sigkill_run(
        faults,
        count=3000,
        input_streams=[faults.stream],
        output_streams=[out],
        produce=lambda: {faults.stream: produce_now(faults.admin, faults.stream, inputs(3000))},
        settings={"input": faults.stream, "output": out},
    )
    outputs = output_fields(faults.admin, [out])
    assert_one_output_each(outputs, produced)
    assert all(o["from"] == faults.stream and o["n"].isdigit() for o in outputs)
    # The outputs of each worker are there (the killed one committed some before it died).
    assert len({o["pid"] for o in outputs}) == 2
    assert_nothing_pending(faults, [faults.stream], faults.group)


# -- 2. a worker SIGSTOPped past claim_idle_ms, then resumed ------------------------------


@dataclass
class Pause:
    """What a pause did: the two workers, the ids produced, those the victim held when it
    was stopped and those the peer claimed from it meanwhile, and the claimed ones both
    workers ran to the end (the victim's run went through after it resumed: one cut by the
    pause, or one of the entries it had read but not started)."""

    victim: CliProcess
    peer: CliProcess
    produced: dict[str, float]
    held: set[str]
    taken: set[str]
    both: set[str]
    outputs: list[dict[str, str]]


def pause_run(
    faults: Faults,
    *,
    count: int,
    pause_s: float,
    in_flight: int,
    outputs_first: int,
    **settings: object,
) -> Pause:
    """Two workers; `count` inputs; the victim SIGSTOPped for `pause_s` once it runs
    `in_flight` handlers and `outputs_first` outputs exist, then SIGCONTed; both workers
    stopped once the input is drained."""
    out = faults.names("out")
    victim, peer = start_workers(faults, 2, input=faults.stream, output=out, **settings)
    produced = produce_now(faults.admin, faults.stream, inputs(count))
    victim_name = consumer_of(victim, faults.group)
    faults.wait_until(
        lambda: (
            faults.admin.xlen(out) >= outputs_first
            and len(faults.open_runs(victim.pid)) >= in_flight
        ),
        what=f"{outputs_first} outputs and {in_flight} handlers running in the victim",
    )
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        held = held_by(faults, [faults.stream], victim_name)
        at_stop = faults.admin.xlen(out)
        # The pause's length: the fault, not a condition (the peer claims what the victim
        # holds once it has been idle claim_idle_ms).
        time.sleep(pause_s)
        taken = held - held_by(faults, [faults.stream], victim_name)
        # What the victim writes once resumed is later than this.
        resumed_at = time.time()
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    faults.wait_drained(timeout=60)
    faults.stop_workers()

    ok = [run for run in read_runs(faults.ledger) if run.outcome == "ok"]
    ran_by_victim_after = {r.id for r in ok if r.pid == victim.pid and (r.end or 0) > resumed_at}
    both = taken & ran_by_victim_after & {r.id for r in ok if r.pid == peer.pid}
    outputs = output_fields(faults.admin, [out])
    by_pid = Counter(o["pid"] for o in outputs if o["src"] in taken)
    fenced = sum(w.output().count("before their outputs were committed") for w in faults.workers)
    print(
        f"\n[fault] {faults.name}: held_at_stop={len(held)} claimed_during_pause={len(taken)} "
        f"outputs_at_stop={at_stop} ran_to_the_end_in_both={len(both)} "
        f"outputs_of_claimed_by_victim={by_pid[str(victim.pid)]} "
        f"by_peer={by_pid[str(peer.pid)]} fenced_lines={fenced}"
    )
    assert set(produced) <= {run.id for run in ok}, "an input was never handled"
    # The fault did what it is for: the peer claimed the paused worker's entries...
    assert held, "the victim held no entry when it was stopped"
    assert taken, "the peer claimed none of the paused worker's entries"
    assert re.search(r"claimed \d+ entries of", peer.output()), peer.output()[-3000:]
    # ... and ran some that the paused worker also ran to the end when it resumed: both
    # runs staged an output, and one commit at most may add it.
    assert both, "no claimed input ran to the end in both workers"
    for worker in faults.workers:
        assert "Traceback" not in worker.output(), worker.output()[-3000:]
    return Pause(victim, peer, produced, held, taken, both, outputs)


def test_a_worker_paused_past_claim_idle_adds_no_second_output(faults: Faults) -> None:
    """The peer claims the paused worker's entries and commits their outputs during the
    pause (a handler run takes 10 ms); resumed, the worker finishes its own runs of them,
    whose commits find the entries acked: they add nothing."""
    faults.start_server()
    pause = pause_run(
        faults,
        count=3000,
        pause_s=3.0,
        in_flight=4,
        outputs_first=600,
        claim_idle_ms=1000,
        sleep=0.01,
    )
    assert_one_output_each(pause.outputs, pause.produced)
    assert_nothing_pending(faults, [faults.stream], faults.group)
    # Committed during the pause, by the peer.
    claimed = [o for o in pause.outputs if o["src"] in pause.both]
    assert {o["pid"] for o in claimed} == {str(pause.peer.pid)}


def test_a_worker_resumed_while_the_peer_runs_its_claimed_entries_adds_one_output_each(
    faults: Faults,
) -> None:
    """Handler runs of 2 s: the peer claims the paused worker's entries after 1 s idle
    and is still running them when the worker resumes (2.2 s after the stop) and finishes
    its own runs of them at once. Two runs of an entry, both staged, neither committed:
    one output each all the same, the peer's. (The resumed worker's lease renewal renews
    only what is still pending on it: it does not take the entries back.) Its own commit
    finds them pending on the peer, drops its outputs and says so."""
    faults.start_server()
    pause = pause_run(
        faults,
        count=16,
        pause_s=2.2,
        in_flight=4,
        outputs_first=0,
        claim_idle_ms=1000,
        sleep=2.0,
        concurrency=4,
        batch_size=4,
    )
    assert_one_output_each(pause.outputs, pause.produced)
    assert_nothing_pending(faults, [faults.stream], faults.group)
    claimed = [o for o in pause.outputs if o["src"] in pause.both]
    assert {o["pid"] for o in claimed} == {str(pause.peer.pid)}
    assert "before their outputs were committed" in pause.victim.output()


# -- 3. two stages, a -> b -> c, a worker SIGKILLed mid-run -------------------------------


def test_two_stages_under_sigkill_leave_one_final_output_per_input(faults: Faults) -> None:
    """Each worker runs both stages: `a` -> `b` (the return value) and `b` -> `c` (an
    Outbox), each in its own group; the killed worker held entries of both."""
    faults.start_server()
    a, b, c = faults.stream, faults.names("b"), faults.names("c")
    second_group = f"{faults.group}:second"
    count = 2000
    _, produced, _, _ = sigkill_run(
        faults,
        count=count,
        input_streams=[a],
        output_streams=[c],
        produce=lambda: {a: produce_now(faults.admin, a, inputs(count))},
        settings={"input": a, "output": b, "final": c},
        later_stages=[(b, second_group)],
    )
    middle = output_fields(faults.admin, [b])
    final = output_fields(faults.admin, [c])
    assert_one_output_each(middle, produced)
    assert_one_output_each(final, produced)
    # ... and each entry of b made one entry of c.
    assert_one_output_each(final, [i for i, _ in entries(faults.admin, b)], field="via")
    assert {(o["n"], o["src"]) for o in final} == {(o["n"], o["src"]) for o in middle}
    assert_nothing_pending(faults, [a], faults.group)
    assert_nothing_pending(faults, [b], second_group)
    # The second stage ran in both workers, the killed one too.
    second_runs = read_runs(Path(f"{faults.ledger}.final"))
    assert len({run.pid for run in second_runs}) == 2


# -- 4, 5. on a cluster: co-located outputs, and outputs in another slot -------------------


def test_cluster_colocated_partitions_under_sigkill_leave_one_output_per_input(
    cluster_faults: ClusterFaults,
) -> None:
    """`Partitioned(a, 4)` in, `Partitioned(a, 4).derive("b")` out: each partition's outputs
    share its slot, so they are committed with its acks in one script, on whichever master
    serves it."""
    faults = cluster_faults
    source = Partitioned(faults.names("a"), 4)
    target = source.derive("b")
    # Over two masters or three (the partitions' slots are in four ranges of 4,096).
    assert len({faults.cluster.master_of(key_slot(s)).port for s in source.streams}) >= 2
    assert all(
        key_slot(o) == key_slot(i) for i, o in zip(source.streams, target.streams, strict=True)
    )
    count = 2000
    _, produced, _, _ = sigkill_run(
        faults,
        count=count,
        input_streams=list(source.streams),
        output_streams=list(target.streams),
        produce=lambda: produce_partitioned(faults.admin, source, count),
        settings={"input": source.name, "partitions": 4, "derive": "b"},
    )
    for i, o in zip(source.streams, target.streams, strict=True):
        outputs = output_fields(faults.admin, [o])
        assert {output["from"] for output in outputs} == {i}
    assert_one_output_each(output_fields(faults.admin, target.streams), produced)
    assert_nothing_pending(faults, source.streams, faults.group)
    for worker in faults.workers:
        assert ACROSS_SLOTS not in worker.output(), worker.output()[-3000:]


def test_cluster_outputs_in_another_slot_are_at_least_once_and_say_so(
    cluster_faults: ClusterFaults,
) -> None:
    """`Partitioned(a, 4)` in, a stream in a slot of none of its partitions out: published
    before the acks, so a kill between the two may publish an output twice, never lose
    one; each worker warns, naming the slots."""
    faults = cluster_faults
    source = Partitioned(faults.names("a"), 4)
    out = faults.stream_on(0, "elsewhere")
    assert key_slot(out) not in {key_slot(s) for s in source.streams}
    count = 2000
    _, produced, held, _ = sigkill_run(
        faults,
        count=count,
        input_streams=list(source.streams),
        output_streams=[out],
        produce=lambda: produce_partitioned(faults.admin, source, count),
        settings={"input": source.name, "partitions": 4, "output": out},
    )
    outputs = output_fields(faults.admin, [out])
    counts = Counter(o["src"] for o in outputs)
    missing = set(produced) - set(counts)
    assert not missing, f"{len(missing)} inputs without an output: {sorted(missing)[:10]}"
    assert set(counts) == set(produced)
    twice = sum(n - 1 for n in counts.values())
    # A duplicate is an input whose output the killed worker published but did not ack:
    # no more than it held.
    assert twice <= held, f"{twice} outputs twice, the killed worker held {held}"
    print(f"\n[fault] {faults.name}: outputs published twice: {twice}")
    assert_nothing_pending(faults, source.streams, faults.group)
    logs = "".join(worker.output() for worker in faults.workers)
    for stream in source.streams:
        warning = (
            f"{stream!r} (slot {key_slot(stream)}) and {out!r} (slot {key_slot(out)}) "
            f"{ACROSS_SLOTS}"
        )
        assert warning in logs, logs[-3000:]
    for worker in faults.workers:
        assert worker.output().count(ACROSS_SLOTS) <= len(source.streams), worker.output()
        assert ACROSS_SLOTS in worker.output(), worker.output()[-3000:]
